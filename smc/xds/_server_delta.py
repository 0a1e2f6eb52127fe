"""The delta (incremental) side of the ADS server: delta requests and responses.

Role: applies a delta request to a stream's per-type state (subscribe/unsubscribe,
``initial_resource_versions``, ACK/NACK) and computes the next delta response: the resources
whose version the client does not hold plus ``removed_resources``, serialised once per distinct
diff and shared by every stream sent it. A mixin of :class:`~smc.xds.AdsServer`. Concurrency:
the server's event loop only.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from smc.xds._server_stream import (
    _BODY_CACHE_SIZE,
    EMPTY_VERSION,
    StreamBookkeeping,
    _nonce_field,
    _Stream,
    _TypeState,
)
from smc.xds._snapshot import ResourceEntry, Snapshot
from smc.xds._types import WILDCARD_TYPES

__all__ = ["DeltaServer"]


class DeltaServer(StreamBookkeeping):
    """Delta requests and responses (mixed into :class:`~smc.xds.AdsServer`)."""

    def _on_delta_request(
        self, stream: _Stream, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> None:
        type_url = request.type_url
        ts = stream.types.get(type_url)
        subscribe = request.resource_names_subscribe
        unsubscribe = request.resource_names_unsubscribe
        if ts is None:
            ts = stream.types[type_url] = _TypeState()
            ts.names = set()
            ts.held = {
                sys.intern(n): sys.intern(v) for n, v in request.initial_resource_versions.items()
            }
            if type_url in WILDCARD_TYPES and not subscribe:
                ts.wildcard = True
        else:
            if request.response_nonce and request.response_nonce == ts.nonce:
                self._on_reply(stream, ts, type_url, request)
            for name in subscribe:
                # A (re-)subscribed name is sent again even if the client once held it.
                ts.held.pop(name, None)
        if subscribe or unsubscribe:
            ts.dirty = True
        names = ts.names
        assert isinstance(names, set)
        for name in subscribe:
            if name == "*":
                ts.wildcard = True
            else:
                names.add(sys.intern(name))
        for name in unsubscribe:
            if name == "*":
                ts.wildcard = False
            else:
                names.discard(name)
                ts.held.pop(name, None)
        if ts.nonce is not None or subscribe or unsubscribe:
            self._subscription_changed(stream, ts, type_url)

    def _delta_response(
        self, stream: _Stream, ts: _TypeState, type_url: str, snapshot: Snapshot
    ) -> bytes | None:
        tr = snapshot.types.get(type_url)
        version = tr.version if tr is not None else EMPTY_VERSION
        first = ts.nonce is None
        if not first and not ts.dirty and ts.synced == version:
            return None
        all_entries: Mapping[str, ResourceEntry] = tr.entries if tr is not None else {}
        held = ts.held
        changes = None
        if not first and not ts.dirty and ts.synced is not None and tr is not None:
            changes = tr.changes_since(ts.synced)
        changed: list[ResourceEntry] = []
        removed: list[str] = []
        if changes is not None:
            for name in changes:
                if not ts.wildcard and name not in ts.names:
                    continue
                entry = all_entries.get(name)
                if entry is None:
                    if name in held:
                        removed.append(name)
                elif held.get(name) != entry.version:
                    changed.append(entry)
        else:
            if ts.wildcard:
                scope: Any = all_entries
                removed = [n for n in held if n not in all_entries]
            else:
                scope = ts.names
                removed = [n for n in held if n not in all_entries and n in ts.names]
            changed = [
                e
                for n in scope
                if (e := all_entries.get(n)) is not None and held.get(n) != e.version
            ]
        ts.synced, ts.dirty = version, False
        # The first request of a type always gets an answer (maybe empty): it completes Envoy's
        # initial fetch and, after a reconnect, confirms the versions the client holds.
        if not changed and not removed and not first:
            return None
        mix = 0
        for entry in changed:
            mix ^= entry.mix
            held[entry.name] = entry.version
        for name in removed:
            del held[name]
        cache_key = (type_url, version, mix, "delta", *removed)
        found = self._bodies.get(cache_key)
        if found is None:
            response = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version, type_url=type_url, removed_resources=removed
            )
            add = response.resources.add
            for entry in changed:
                resource = add(name=entry.name, version=entry.version)
                resource.resource.type_url = type_url
                resource.resource.value = entry.value
            found = (response.SerializeToString(), len(changed), sum(len(e.value) for e in changed))
            self._bodies[cache_key] = found
            if len(self._bodies) > _BODY_CACHE_SIZE:
                self._bodies.popitem(last=False)
        else:
            self._bodies.move_to_end(cache_key)
        nonce = stream.next_nonce()
        ts.sent_version = version
        ts.nonce = nonce
        tm = self.metrics.for_type(type_url)
        tm.resources_sent.inc(found[1])
        tm.bytes_sent.inc(found[2])
        # Same content for every stream with the same diff; the nonce field is appended.
        return found[0] + _nonce_field(nonce)
