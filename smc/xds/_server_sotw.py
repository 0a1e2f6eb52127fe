"""The state-of-the-world side of the ADS server: SotW requests and responses.

Role: applies a SotW request to a stream's per-type state (ACK/NACK, subscription by a digest of
the undecoded names, shared name sets) and computes the next SotW response: LDS/CDS carry every
resource, the named types (EDS/RDS/SDS) only what changed since the last response plus newly
requested names, each body serialised once per distinct content and shared by every stream (see
:mod:`smc.xds._server`). A mixin of :class:`~smc.xds.AdsServer`. Concurrency: the server's
event loop only.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from smc.xds._notfound import by_name_key, with_missing
from smc.xds._requests import names_bytes, names_digest, names_of
from smc.xds._server_stream import (
    _BODY_CACHE_SIZE,
    _NAME_SETS_KEPT,
    EMPTY_VERSION,
    StreamBookkeeping,
    _nonce_field,
    _Stream,
    _string_field,
    _TypeState,
)
from smc.xds._snapshot import ResourceEntry, Snapshot, TypeResources
from smc.xds._types import WILDCARD_TYPES

__all__ = ["SotwServer"]

_log = logging.getLogger("smc.xds.server")

_STEPS_KEPT = 64  # distinct (type, content, subscription, client state) steps remembered


@lru_cache(maxsize=1024)
def _version_field(version: str) -> bytes:
    """The ``version_info`` field of a response (what a plain ACK of it starts with)."""
    return _string_field(1, version)


@lru_cache(maxsize=64)
def _type_field(type_url: str) -> bytes:
    """The ``type_url`` field of a request."""
    return _string_field(4, type_url)


class SotwServer(StreamBookkeeping):
    """State-of-the-world requests and responses (mixed into :class:`~smc.xds.AdsServer`)."""

    # SotW subscriptions by digest of their names, shared between streams (LRU).
    _name_sets: OrderedDict[bytes, tuple[bool, frozenset[str]]]
    # Incremental named-type steps shared by streams in the same state (LRU, see _named_step).
    _steps: OrderedDict[tuple[Any, ...], tuple[frozenset[str], Any]]

    def _on_sotw_request(self, stream: _Stream, request: Any) -> None:
        """``request``: a :data:`~smc.xds._requests.RequestHead` (names left undecoded)."""
        type_url = request.type_url
        ts = stream.types.get(type_url)
        if ts is None:
            # First request of this type on this stream: an initial request whatever nonce it
            # carries (after a reconnect Envoy may still send an old stream's nonce).
            ts = stream.types[type_url] = _TypeState()
            if request.version_info:
                ts.acked_version = request.version_info
        elif request.response_nonce and request.response_nonce == ts.nonce:
            self._on_reply(stream, ts, type_url, request)
        # Otherwise the nonce is stale (a newer response is on its way, which the client will
        # answer): no ACK/NACK to record, but a change of resource_names still applies.
        # The names were not decoded (see smc.xds._requests): their raw bytes, digested.
        raw_names = names_bytes(request)
        if (
            type_url in WILDCARD_TYPES
            and (ts.sent_key is None or ts.wildcard)
            and not names_of(raw_names)
        ):
            wildcard, wanted = True, frozenset[str]()
            ts.names_digest = None
        else:
            # Every SotW request repeats all requested names (1,000 on each EDS ACK): when they
            # are the same, in the same order, as last time, the subscription is unchanged.
            digest = names_digest(raw_names)
            if digest == ts.names_digest:
                self._subscription_changed(stream, ts, type_url)
                return
            ts.names_digest = digest
            wildcard, wanted = self._name_set(digest, raw_names)
        if wildcard != ts.wildcard or wanted != ts.names:
            if type_url not in WILDCARD_TYPES:
                if wildcard or ts.wildcard:
                    ts.resync = True
                else:
                    # Newly requested names go out with the next (incremental) response.
                    new = wanted.difference(ts.names)
                    if new:
                        if ts.added is None:
                            ts.added = set()
                        ts.added.update(map(sys.intern, new))
            ts.wildcard, ts.names, ts.dirty = wildcard, wanted, True
        self._subscription_changed(stream, ts, type_url)

    def _name_set(self, digest: bytes, raw_names: bytes) -> tuple[bool, frozenset[str]]:
        """``(wildcard, names)`` of a SotW subscription, shared by every stream requesting the
        same names (one frozenset of interned strings, not one per stream: less memory, and
        the garbage collector walks it once)."""
        found = self._name_sets.get(digest)
        if found is not None:
            self._name_sets.move_to_end(digest)
            return found
        wanted = frozenset(map(sys.intern, names_of(raw_names)))
        wildcard = "*" in wanted
        if wildcard:
            wanted = wanted.difference(("*",))
        found = self._name_sets[digest] = (wildcard, wanted)
        if len(self._name_sets) > _NAME_SETS_KEPT:
            self._name_sets.popitem(last=False)
        return found

    def _named_key(self, ts: _TypeState, tr: TypeResources | None) -> int:
        """XOR-mix of the requested names present in ``tr``: O(changes) when the stream follows
        the type's change history, a scan of the requested names otherwise."""
        if tr is None:
            return 0
        if not ts.dirty and ts.synced is not None:
            changes = tr.changes_since(ts.synced)
            if changes is not None:
                key = ts.cur_key
                names = ts.names
                for name, (old, new) in changes.items():
                    if name in names:
                        key ^= old ^ new
                return key
        key = 0
        entries = tr.entries
        for name in ts.names:
            entry = entries.get(name)
            if entry is not None:
                key ^= entry.mix
        return key

    def _sotw_body(
        self, type_url: str, ts: _TypeState, tr: TypeResources | None, key: int
    ) -> tuple[bytes, int, int]:
        """Serialised full response (every requested resource) without nonce for this content,
        shared by every stream wanting the same content (LRU): ``(bytes, resource count,
        resource bytes)``."""
        version = tr.version if tr is not None else EMPTY_VERSION
        cache_key = (type_url, version, key)
        found = self._bodies.get(cache_key)
        if found is not None:
            self._bodies.move_to_end(cache_key)
            return found
        entries: Mapping[str, ResourceEntry] = tr.entries if tr is not None else {}
        if ts.wildcard:
            chosen = list(entries.values())
        else:
            chosen = [e for n in sorted(ts.names) if (e := entries.get(n)) is not None]
        return self._sotw_encode(cache_key, type_url, version, chosen)

    def _sotw_encode(
        self,
        cache_key: tuple[Any, ...],
        type_url: str,
        version: str,
        chosen: list[ResourceEntry],
    ) -> tuple[bytes, int, int]:
        response = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url)
        add = response.resources.add
        for entry in chosen:
            add(type_url=type_url, value=entry.value)
        made = (response.SerializeToString(), len(chosen), sum(len(e.value) for e in chosen))
        self._bodies[cache_key] = made
        if len(self._bodies) > _BODY_CACHE_SIZE:
            self._bodies.popitem(last=False)
        return made

    @staticmethod
    def _named_changes(
        ts: _TypeState, tr: TypeResources | None, version: str
    ) -> list[ResourceEntry] | None:
        """SotW named type: the requested resources that changed since the last response
        (``ts.synced``) plus the newly requested names that exist, sorted by name; None when
        that cannot be told incrementally (the change history does not reach back) or a
        requested resource the client holds was removed (then the whole set is sent)."""
        if version == ts.synced:
            changes: Mapping[str, tuple[int, int]] = {}
        elif tr is None or ts.synced is None:
            return None
        else:
            found = tr.changes_since(ts.synced)
            if found is None:
                return None
            changes = found
        entries: Mapping[str, ResourceEntry] = tr.entries if tr is not None else {}
        names = ts.names
        added = ts.added
        chosen: dict[str, ResourceEntry] = {}
        for name, (old, new) in changes.items():
            if old == new or name not in names or (added is not None and name in added):
                continue
            entry = entries.get(name)
            if entry is None:
                return None  # removed while requested: resend the whole set
            chosen[name] = entry
        if added is not None:
            for name in added:
                if name in names and (entry := entries.get(name)) is not None:
                    chosen[name] = entry
        return [chosen[n] for n in sorted(chosen)]

    def _sotw_response(
        self, stream: _Stream, ts: _TypeState, type_url: str, snapshot: Snapshot
    ) -> bytes | None:
        if not ts.wildcard and not ts.names and type_url not in WILDCARD_TYPES:
            return None  # a named type the client does not watch: nothing to send
        tr = snapshot.types.get(type_url)
        version = tr.version if tr is not None else EMPTY_VERSION
        named = type_url not in WILDCARD_TYPES and not ts.wildcard
        if named and not ts.resync and ts.sent_key is not None:
            step = self._named_step(ts, tr, type_url, version)
            if step is not None:
                # Incremental: the client holds the requested resources as of ``synced`` (no
                # per-stream copy of their versions is kept), whose mix is the new key.
                key, found = step
                ts.cur_key, ts.sent_key, ts.synced, ts.dirty = key, key, version, False
                ts.added = None
                if found is None:
                    return None
                return self._sotw_send(stream, ts, type_url, version, found)
            # Otherwise the whole requested set, unless its content is what the client holds.
        by_name = type_url in WILDCARD_TYPES and not ts.wildcard  # LDS/CDS by name (gRPC)
        if ts.wildcard:
            key = tr.mix if tr is not None else 0
        elif by_name:
            key = by_name_key(ts.names, tr)  # missing names count: each gets an answer
        elif not ts.dirty and ts.synced == version:
            key = ts.cur_key
        else:
            key = self._named_key(ts, tr)
        ts.cur_key, ts.synced, ts.dirty = key, version, False
        if ts.sent_key is None:
            if not ts.wildcard and key == 0 and ts.names:
                return None  # named resources that do not exist yet: sent when they appear
        elif key == ts.sent_key:
            return None
        ts.sent_key = key
        if named:
            ts.resync, ts.added = False, None
        body = self._sotw_body(type_url, ts, tr, key)
        if by_name:
            body = with_missing(body, ts.names, tr)
        return self._sotw_send(stream, ts, type_url, version, body)

    def _named_step(
        self, ts: _TypeState, tr: TypeResources | None, type_url: str, version: str
    ) -> tuple[int, tuple[bytes, int, int] | None] | None:
        """SotW named type, incremental: ``(new content key, body of the resources to send or
        None)``, or None when the whole requested set must be sent (see
        :meth:`_named_changes`). It depends only on the type's content, the subscription and
        what the client holds (``synced``, ``cur_key``, names added since), so streams in the
        same state share one computation: the result is kept for the next stream whose
        subscription is the same shared name set (see :meth:`_name_set`) in the same state,
        e.g. every proxy after an endpoint change."""
        names = ts.names if isinstance(ts.names, frozenset) else None
        memo_key: tuple[Any, ...] | None = None
        if ts.added is None and names is not None:
            memo_key = (type_url, version, ts.synced, ts.cur_key, ts.dirty, id(names))
            hit = self._steps.get(memo_key)
            if hit is not None and hit[0] is names:
                self._steps.move_to_end(memo_key)
                step: tuple[int, tuple[bytes, int, int] | None] | None = hit[1]
                return step
        chosen = self._named_changes(ts, tr, version)
        made: tuple[int, tuple[bytes, int, int] | None] | None = None
        if chosen is not None:
            key = self._named_key(ts, tr)
            found: tuple[bytes, int, int] | None = None
            if chosen:
                mix = 0
                for entry in chosen:
                    mix ^= entry.mix
                cache_key = (type_url, version, "changed", mix)
                found = self._bodies.get(cache_key)
                if found is None:
                    found = self._sotw_encode(cache_key, type_url, version, chosen)
                else:
                    self._bodies.move_to_end(cache_key)
            made = (key, found)
        if memo_key is not None and names is not None:
            self._steps[memo_key] = (names, made)
            if len(self._steps) > _STEPS_KEPT:
                self._steps.popitem(last=False)
        return made

    def _sotw_send(
        self,
        stream: _Stream,
        ts: _TypeState,
        type_url: str,
        version: str,
        body: tuple[bytes, int, int],
    ) -> bytes:
        data, count, size = body
        nonce = stream.next_nonce()
        ts.sent_version = version
        ts.nonce = nonce
        nonce_field = _nonce_field(nonce)
        ts.ack_head = _version_field(version)
        ts.ack_tail = _type_field(type_url) + nonce_field
        tm = self.metrics.for_type(type_url)
        tm.resources_sent.value += count
        tm.bytes_sent.value += size
        # A serialised message followed by more fields parses as their merge: append the nonce.
        return data + nonce_field

    def _plain_ack(self, stream: _Stream, raw: bytes) -> bool:
        """Apply ``raw`` without parsing it when it is, byte for byte, a plain ACK of the last
        (unanswered) response of one of the stream's types that repeats the subscription as it
        was: its ``version_info`` field, then exactly the resource-name bytes of the previous
        request of that type (same xxh3-128 digest), then ``type_url`` and the last nonce (the
        field order every xDS client's serializer uses). Returns False (nothing applied)
        otherwise: the caller parses the request. A SotW ACK repeats every requested name (1,000
        on an EDS ACK, ~9 KB): parsing it was a quarter of a change's CPU per stream."""
        size = len(raw)
        for type_url, ts in stream.types.items():
            if not ts.pending:
                # (an answer to a response already answered: rare, parsed as any request)
                continue
            tail = ts.ack_tail
            if not tail or not raw.endswith(tail):
                continue
            head = ts.ack_head
            if not raw.startswith(head):
                return False
            names = memoryview(raw)[len(head) : size - len(tail)]
            if ts.names_digest is None:
                # wildcard LDS/CDS: a plain ACK names nothing
                if names or not (ts.wildcard and type_url in WILDCARD_TYPES):
                    return False
            elif names_digest(names) != ts.names_digest:
                return False
            # What _on_reply does with an ACK (no error_detail, the version sent), and
            # _subscription_changed with the same names, without building a request.
            self.metrics.for_type(type_url).ack_latency.observe(time.monotonic() - ts.sent_at)
            ts.pending = False
            self._record_ack(stream, ts, type_url)
            if type_url not in WILDCARD_TYPES and not ts.wildcard and not ts.names:
                self._subscription_changed(stream, ts, type_url)
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("plain ACK from %s of %s nonce %s", stream.node_id, type_url, ts.nonce)
            if stream.blocked or ts.dirty:
                stream.due = True
                if stream.since is None:
                    stream.since = time.monotonic()
            return True
        return False
