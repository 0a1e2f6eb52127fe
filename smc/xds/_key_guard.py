"""No private key on an ADS stream whose peer is not a verified proxy of the node.

Role: :class:`KeyGuard`, used by :class:`~smc.xds.AdsServer` for every stream without a verified
client certificate matched to its node id (cleartext ADS, or TLS without an ``authorize``
hook): it gives the push a view of the node's snapshot in which every SDS ``Secret`` carrying
a private key inline (``tls_certificate.private_key`` or ``pkcs12`` as bytes or a string) is
absent; Secrets without key bytes (trust bundles, CRLs, certificates naming key *files* on the
proxy's host) are served as before. Each stream that asked for such a Secret is reported once
per withheld name set: a :class:`RefusalRecord` with reason ``key_withheld`` in the server's
refusals (``/debug``, :meth:`~smc.xds.AdsServer.refusals`), counted in
``smc_xds_refused_streams_total{reason="key_withheld"}`` and logged (names only, never key
bytes); the stream itself goes on. Whether an entry carries a key is decided once per interned entry and
the filtered views are kept per snapshot (bounded), so a push costs a dictionary lookup.

Concurrency: the server's event loop only (no locks).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import replace
from types import MappingProxyType

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import DecodeError

from smc.xds._server_records import RefusalRecord, XdsMetrics
from smc.xds._server_stream import _Stream
from smc.xds._snapshot import Snapshot
from smc.xds._snapshot_entry import ResourceEntry, TypeResources
from smc.xds._types import SECRET

__all__ = ["KeyGuard", "carries_private_key"]

_KEPT = 4096
_log = logging.getLogger("smc.xds.server")


def carries_private_key(value: bytes) -> bool:
    """Whether a serialised ``Secret`` holds private key bytes (inline key or PKCS#12); an
    unparsable one counts as carrying one (withheld rather than risked)."""
    secret = secret_pb2.Secret()
    try:
        secret.ParseFromString(value)
    except DecodeError:
        return True
    if not secret.HasField("tls_certificate"):
        return False
    cert = secret.tls_certificate
    inline = ("inline_bytes", "inline_string")
    return any(
        cert.HasField(part) and getattr(cert, part).WhichOneof("specifier") in inline
        for part in ("private_key", "pkcs12")
    )


class KeyGuard:
    """Views of snapshots without key-carrying Secrets, for unverified streams."""

    def __init__(self, *, refusals: deque[RefusalRecord], metrics: XdsMetrics) -> None:
        self._refusals = refusals
        self._metrics = metrics
        self._keyed: OrderedDict[int, tuple[ResourceEntry, bool]] = OrderedDict()
        self._views: OrderedDict[int, tuple[Snapshot, Snapshot, frozenset[str]]] = OrderedDict()
        self._reported: OrderedDict[int, frozenset[str]] = OrderedDict()

    def _has_key(self, entry: ResourceEntry) -> bool:
        found = self._keyed.get(id(entry))
        if found is not None and found[0] is entry:
            return found[1]
        keyed = carries_private_key(entry.value)
        self._keyed[id(entry)] = (entry, keyed)
        if len(self._keyed) > _KEPT:
            self._keyed.popitem(last=False)
        return keyed

    def _view(self, snapshot: Snapshot) -> tuple[Snapshot, frozenset[str]]:
        found = self._views.get(id(snapshot))
        if found is not None and found[0] is snapshot:
            return found[1], found[2]
        view, withheld = snapshot, frozenset[str]()
        secrets = snapshot.types.get(SECRET)
        if secrets is not None:
            withheld = frozenset(n for n, e in secrets.entries.items() if self._has_key(e))
            if withheld:
                kept = {n: e for n, e in secrets.entries.items() if n not in withheld}
                types = dict(snapshot.types)
                types[SECRET] = TypeResources.of(kept)
                view = replace(snapshot, types=MappingProxyType(types))
        self._views[id(snapshot)] = (snapshot, view, withheld)
        if len(self._views) > _KEPT:
            self._views.popitem(last=False)
        return view, withheld

    def guard(self, stream: _Stream, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` as an unverified ``stream`` may see it; reports what it asked for and
        did not get."""
        if SECRET not in snapshot.types:
            return snapshot  # nothing to withhold (and no view to remember: most snapshots)
        view, withheld = self._view(snapshot)
        ts = stream.types.get(SECRET)
        if withheld and ts is not None:
            asked = withheld if ts.wildcard else withheld & ts.names
            if asked and self._reported.get(stream.id) != asked:
                self._reported[stream.id] = asked
                if len(self._reported) > _KEPT:
                    self._reported.popitem(last=False)
                self._report(stream, asked)
        return view

    def _report(self, stream: _Stream, names: frozenset[str]) -> None:
        message = (
            f"node id {stream.node_id!r}: Secret(s) {', '.join(sorted(names))} withheld: they "
            "carry a private key and the stream has no verified client certificate of the "
            "node's identity (mTLS ADS)"
        )
        self._refusals.append(
            RefusalRecord(
                node_id=stream.node_id,
                peer_identity=stream.identity.uri if stream.identity is not None else "",
                peer=stream.peer,
                reason="key_withheld",
                message=message,
                at=time.time(),
            )
        )
        self._metrics.refused.labels("key_withheld").inc()
        _log.warning("ADS stream from %s: %s", stream.peer, message)
