"""Per-stream bookkeeping of the ADS server, shared by its state-of-the-world and delta sides.

Role: the per-type state of one stream (:class:`_TypeState`: subscription, nonce, versions sent
and ACKed, content key or names held), the stream itself (:class:`_Stream`: its queue and
coalesced wake-up), the make-before-break hold rule (:data:`HOLD_FOR`), recording ACK/NACK
replies and watch transitions (:class:`StreamBookkeeping`, a base of
:class:`~smc.xds.AdsServer`), and the wire helpers that append a nonce to a pre-serialised
response. Concurrency: everything here runs on the grpc.aio server's one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from typing import Any

from smc.ca import SpiffeId
from smc.xds._cache import Unwatch
from smc.xds._server_records import (
    AckCallback,
    NackRecord,
    StreamKind,
    SubscriptionCallback,
    XdsMetrics,
)
from smc.xds._types import CLUSTER, ENDPOINT, LISTENER, ROUTE, WILDCARD_TYPES, short_name

__all__ = ["HOLD_FOR", "StreamBookkeeping"]

_log = logging.getLogger("smc.xds.server")

_EOF = object()
_CHANGED = object()

EMPTY_VERSION = "0" * 32  # the version of a type with no resources
_BODY_CACHE_SIZE = 32  # response bodies shared between streams sent the same content
_NAME_SETS_KEPT = 4096  # distinct SotW subscriptions shared between streams


class _TypeState:
    __slots__ = (
        "ack_head",
        "ack_tail",
        "acked_version",
        "added",
        "cur_key",
        "dirty",
        "held",
        "last_nack",
        "names",
        "names_digest",
        "nonce",
        "pending",
        "resync",
        "sent_at",
        "sent_key",
        "sent_version",
        "synced",
        "watched",
        "wildcard",
    )

    def __init__(self) -> None:
        self.wildcard = False
        self.watched: bool | None = None  # named types: last reported "watches something"
        self.names: frozenset[str] | set[str] = frozenset()
        # SotW: digest of the resource_names of the last request that set ``names`` (None: not
        # from a named request): an ACK repeating the same names skips building their set.
        self.names_digest: bytes | None = None
        self.nonce: str | None = None
        # SotW: the wire bytes a plain ACK of the last response starts with (its version_info)
        # and ends with (type_url, response_nonce); see SotwServer._plain_ack.
        self.ack_head = b""
        self.ack_tail = b""
        self.sent_version: str | None = None
        self.acked_version: str | None = None
        self.pending = False
        self.sent_at = 0.0
        self.last_nack: NackRecord | None = None
        # Type version the state below was last computed against, and whether the subscription
        # changed since (then the next push rescans instead of following the change history).
        self.synced: str | None = None
        self.dirty = True
        # SotW: XOR-mix of the wanted subset now (cur_key) and in the last response (sent_key;
        # None: nothing sent on this stream yet). For a named type sent incrementally the client
        # holds the requested subset as of ``synced``, so sent_key follows cur_key.
        self.cur_key = 0
        self.sent_key: int | None = None
        # SotW named types: the next response carries the whole requested set (first response,
        # after the client dropped its watch, after a removal or a history gap); otherwise only
        # what changed since ``synced`` plus the names requested since then (``added``).
        self.resync = True
        self.added: set[str] | None = None
        # Delta: name -> version the client holds (from initial_resource_versions and our sends).
        self.held: dict[str, str] = {}


class _Mailbox:
    """The stream's queue (requests the reader could not apply itself, wake-ups, the end): a
    deque and at most one waiter, which is all the handler needs (asyncio.Queue's bookkeeping
    of unfinished tasks, putters and size limits cost several calls per item). The handler
    (:meth:`~smc.xds.AdsServer._serve`) waits on ``waiter`` itself when ``items`` is empty
    (no coroutine per wake-up)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items


class _Stream:
    __slots__ = (
        "authorized",
        "blocked",
        "changed",
        "connected_at",
        "due",
        "id",
        "identity",
        "kind",
        "node_id",
        "nonces",
        "peer",
        "pushing",
        "queue",
        "since",
        "types",
        "unplaced_since",
        "unwatch",
    )

    def __init__(self, *, stream_id: int, kind: StreamKind, peer: str) -> None:
        self.id = stream_id
        self.kind: StreamKind = kind
        self.peer = peer
        # The client certificate's identity (mTLS with an authorize hook), and whether the hook
        # allowed it to speak for node_id (True at once when there is no hook).
        self.identity: SpiffeId | None = None
        self.authorized = True
        self.node_id = ""
        self.connected_at = time.time()
        self.types: dict[str, _TypeState] = {}
        self.queue = _Mailbox()
        self.changed = False
        # Whether the next turn must compute responses (a change, a new or changed
        # subscription, or an answer to a response the last push held something back for).
        self.due = True
        self.blocked = False
        self.since: float | None = None
        self.nonces = 0
        # The handler is inside a push (maybe waiting for a write): requests wait in the queue
        # until it is done, so a push computes every type against one state of the requests.
        self.pushing = False
        self.unwatch: Unwatch | None = None
        self.unplaced_since: float | None = None

    def wake(self) -> None:
        if not self.changed:
            self.changed = True
            if self.since is None:
                self.since = time.monotonic()
            self.queue.put_nowait(_CHANGED)

    def next_nonce(self) -> str:
        self.nonces += 1
        return f"{self.id}.{self.nonces}"


# ---------------------------------------------------------------------- server

#: Make-before-break: a listener or route push waits while a cluster or endpoint push is
#: un-ACKed. Envoy ACKs CDS only once the new clusters have warmed (got their EDS), so EDS must
#: never wait for the CDS ACK, and nothing CDS/EDS/SDS need waits for LDS/RDS (no cycle).
HOLD_FOR: dict[str, tuple[str, str]] = {
    LISTENER: (CLUSTER, ENDPOINT),
    ROUTE: (CLUSTER, ENDPOINT),
}


def _pending(stream: _Stream, type_url: str) -> bool:
    ts = stream.types.get(type_url)
    return ts is not None and ts.pending


class StreamBookkeeping:
    """What both protocol sides share: recording replies (ACK/NACK) and watch transitions."""

    metrics: XdsMetrics
    _nacks: dict[tuple[str, str], NackRecord]
    _on_ack: AckCallback | None
    _on_subscription: SubscriptionCallback | None
    # Serialised responses (without nonce) shared by streams sent the same content (LRU).
    _bodies: OrderedDict[tuple[Any, ...], tuple[bytes, int, int]]

    def _on_reply(self, stream: _Stream, ts: _TypeState, type_url: str, request: Any) -> None:
        """``request`` answers our latest response of ``type_url``: record the ACK or NACK."""
        if ts.pending:
            self.metrics.for_type(type_url).ack_latency.observe(time.monotonic() - ts.sent_at)
        ts.pending = False
        if request.HasField("error_detail"):
            record = NackRecord(
                node_id=stream.node_id,
                type_url=type_url,
                version=ts.sent_version or "",
                nonce=request.response_nonce,
                message=request.error_detail.message,
                code=request.error_detail.code,
                at=time.time(),
            )
            ts.last_nack = record
            self._nacks[(stream.node_id, type_url)] = record
            self.metrics.for_type(type_url).nacks.inc()
            _log.warning(
                "NACK from %s for %s version %s (nonce %s): %s",
                stream.node_id,
                short_name(type_url),
                record.version,
                record.nonce,
                record.message,
            )
            return
        if stream.kind == "sotw" and request.version_info != ts.sent_version:
            # Answered without taking the version (e.g. Envoy got resources of a type it no
            # longer watches): settled, but not an ACK.
            _log.debug(
                "%s answered %s nonce %s without applying version %s",
                stream.node_id,
                short_name(type_url),
                request.response_nonce,
                ts.sent_version,
            )
            return
        self._record_ack(stream, ts, type_url)

    def _record_ack(self, stream: _Stream, ts: _TypeState, type_url: str) -> None:
        """The client applied our latest response of ``type_url`` (its ``sent_version``)."""
        ts.acked_version = ts.sent_version
        if self._on_ack is not None and ts.acked_version is not None:
            try:
                self._on_ack(stream.node_id, type_url, ts.acked_version, time.time())
            except Exception:
                _log.exception("on_ack callback failed")

    def _subscription_changed(self, stream: _Stream, ts: _TypeState, type_url: str) -> None:
        """After a request of a named type: settle a type nobody watches any more, report
        watch/unwatch transitions."""
        if type_url in WILDCARD_TYPES:
            return
        watched = ts.wildcard or bool(ts.names)
        if not watched:
            # The client dropped its last watch of this type (e.g. its last EDS cluster went
            # away): it answers no response of it, in flight or to come, and holds none of its
            # resources any more.
            ts.pending = False
            if ts.sent_key is not None:
                ts.sent_key = 0
            ts.cur_key = 0
            ts.held.clear()
            ts.resync, ts.added = True, None
        if watched != ts.watched:
            ts.watched = watched
            if self._on_subscription is not None:
                try:
                    self._on_subscription(stream.node_id, type_url, watched)
                except Exception:
                    _log.exception("on_subscription callback failed")


def _string_field(number: int, value: str) -> bytes:
    data = value.encode()
    out = bytearray([(number << 3) | 2])
    n = len(data)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


# field 5 (response nonce), wire type 2, then a one-byte length: the head of every short nonce
_NONCE_HEADS = [bytes(((5 << 3) | 2, n)) for n in range(0x80)]


def _nonce_field(nonce: str) -> bytes:
    """``_string_field(5, nonce)``, without building it byte by byte (nonces are short)."""
    data = nonce.encode()
    if len(data) < 0x80:
        return _NONCE_HEADS[len(data)] + data
    return _string_field(5, nonce)
