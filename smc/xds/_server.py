"""The ADS server: state-of-the-world and delta xDS for Envoy on one grpc.aio port.

Role: serves ``envoy.service.discovery.v3.AggregatedDiscoveryService`` (both
``StreamAggregatedResources`` and ``DeltaAggregatedResources``) from a :class:`SnapshotSource`
keyed by node id. Protocol rules followed: a fresh nonce per response; a request whose
``response_nonce`` names the stream's latest response for that type is an ACK, or a NACK when
``error_detail`` is set (recorded per node and type, counted, logged, and never answered by
re-sending the rejected content; an ACK is reported to the ``on_ack`` callback). A request with
a stale nonce records no ACK/NACK but its ``resource_names`` still update the subscription (the
xDS rule for subscription changes racing a response); a named type (EDS/RDS/SDS) the client no
longer watches at all is never pending and gets no response (Envoy answers nothing for a type
it does not watch: waiting for that ACK would hold LDS/RDS forever). Per-type versions;
LDS/CDS wildcard and EDS/RDS/SDS named subscriptions (a name requested before it exists is sent
when it appears). SotW sends every resource of LDS/CDS in every response, but for the named types
(EDS/RDS/SDS) only the first response to a subscription carries every requested resource: later
ones carry just the resources that changed plus newly requested names, with a new version and
nonce (the xDS protocol's "Grouping Resources into Responses": only Listener and Cluster need the
complete state of the world; a named resource left out of a response is kept by the client, and
dropped when its subscription drops it). When a subscribed named resource is removed from the
snapshot, or the change history no longer reaches back to the last response (a long lag, or a
snapshot built afresh rather than by :meth:`Snapshot.replace`), the whole requested set of that
type is sent again unless its content is what the client holds. An ACK repeating the same
names is recognised by a digest of its serialised names: requests are parsed without decoding
the names (:mod:`smc.xds._requests`), so an ACK costs no work per name; a SotW request that is,
byte for byte, a plain ACK of the last response with the same names is not parsed at all
(:meth:`smc.xds._server_sotw.SotwServer._plain_ack`). Delta sends only what
changed plus ``removed_resources`` and honours ``initial_resource_versions``. Pushes go in
the order CDS -> EDS -> LDS -> RDS -> SDS and at most one response is in flight per stream and
type; LDS and RDS wait while a CDS or EDS response is un-ACKed (make-before-break: Envoy ACKs
CDS once the new clusters warmed, so a listener or route never points at a cluster Envoy
lacks). For removals the :class:`~smc.xds.XdsController` keeps dropped clusters in the
snapshot until the listeners and routes that stopped using them are ACKed, giving the remove
order LDS/RDS -> CDS -> EDS.
Streams are accepted at once but answered only after :meth:`AdsServer.mark_ready`.

mTLS: ``start(tls=ServerTLS(...))`` serves over TLS and requires a client certificate signed by
one of ``client_ca_pems``. Given an ``authorize(node_id, peer_identity) -> bool`` hook (required
with ``tls``), every stream must present a certificate whose single SPIFFE URI SAN parses (in
``ServerTLS.trust_domain`` when set), else it is refused at once (UNAUTHENTICATED); before the
first response carrying the node's snapshot the hook is asked whether the certificate's identity
may speak for the node id (the node id's workload runs as that service account, see
:func:`workload_authorizer`), and a refusal ends the stream with PERMISSION_DENIED. The check
waits for the snapshot because a node id whose workload is not yet registered gets none (the
stream stays open until it joins, as without TLS). Refusals are kept for debug
(:meth:`AdsServer.refusals`) and counted by reason (``smc_xds_refused_streams_total``, no
node-id label). Without ``tls`` and ``authorize`` nothing changes. With a ``placement`` hook a
node id SMC cannot place is an error on its stream, not silence: malformed, INVALID_ARGUMENT at
once; naming no workload, NOT_FOUND after a short grace (the workload may be joining). :meth:`AdsServer.update_tls`
rotates the server certificate and the client CA bundle (dynamic gRPC credentials, fetched
before each handshake): new connections get the new material, open streams keep theirs.

Concurrency: everything runs on the one event loop of the grpc.aio server. Each stream is one
handler coroutine plus one reader task, which applies requests itself when nothing is queued
ahead of them (they need no push, or it wakes the handler) and otherwise queues them for the
handler; snapshot changes arrive as a callback from the cache that enqueues a single coalesced
wake-up. A push computes all its responses (each marked pending, so its ACK may be applied by
the reader before the write's completion resumes the handler) and then writes them in order;
requests wait while it writes, and the handler drops the responses once written. ``start``
raises the garbage collector's young threshold (:mod:`smc.xds._gc`) and, with ``reuse_port``,
lets several server processes share the port. Per-stream state is a few slotted objects: per
type the subscription (names interned), the last nonce, the version sent and ACKed, and (SotW)
one content key or (delta) the ``name -> version`` map the client holds.

Cost: a stream that follows a type through :meth:`Snapshot.replace` steps diffs in O(changes) via
the type's change history (it rescans only after a subscription change or a long lag); responses
are serialised once per distinct content into a small LRU and shared by every stream sent the
same content, each getting only its own nonce field appended.

Layout (like go-control-plane's separate sotw and delta servers over shared stream state): this
module holds :class:`AdsServer` (mounting, the stream loop, push order); its mixins are
:mod:`smc.xds._server_sotw` and :mod:`smc.xds._server_delta` (the two protocol sides),
:mod:`smc.xds._server_grpc` (its own grpc.aio server: start, stop, TLS rotation),
:mod:`smc.xds._server_checks` (identity and placement checks, refusals) and
:mod:`smc.xds._server_status` (debug status); :mod:`smc.xds._server_stream` holds the per-stream
bookkeeping both sides share, :mod:`smc.xds._server_records` the public records, hook types and
metrics, :mod:`smc.xds._server_tls` the mTLS material and identity rule.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from smc.ca import SpiffeId
from smc.xds._cache import SnapshotSource
from smc.xds._gc import tune_gc_for_streams
from smc.xds._key_guard import KeyGuard
from smc.xds._requests import RequestHead
from smc.xds._server_checks import StreamChecks
from smc.xds._server_delta import DeltaServer
from smc.xds._server_grpc import (
    _MAX_PENDING_SECONDS as _MAX_PENDING_SECONDS,  # re-exported: the storm limits, named on the board
)
from smc.xds._server_grpc import (
    _MAX_PENDING_STREAMS as _MAX_PENDING_STREAMS,
)
from smc.xds._server_grpc import (
    ADS_SERVICE,
    ServerLifecycle,
)
from smc.xds._server_records import (
    UNPLACED_GRACE,
    AckCallback,
    Authorize,
    NackRecord,
    Placement,
    ProxyStatus,
    RefusalRecord,
    StreamKind,
    SubscriptionCallback,
    TypeStatus,
    XdsMetrics,
)
from smc.xds._server_sotw import SotwServer
from smc.xds._server_status import ServerStatus
from smc.xds._server_stream import (
    _CHANGED,
    _EOF,
    EMPTY_VERSION,
    HOLD_FOR,
    _pending,
    _Stream,
)
from smc.xds._server_tls import ServerTLS, _peer_identity, workload_authorizer
from smc.xds._types import PUSH_ORDER, short_name

__all__ = [
    "EMPTY_VERSION",
    "UNPLACED_GRACE",
    "AckCallback",
    "AdsServer",
    "Authorize",
    "NackRecord",
    "ProxyStatus",
    "RefusalRecord",
    "ServerTLS",
    "SubscriptionCallback",
    "TypeStatus",
    "XdsMetrics",
    "workload_authorizer",
]

_log = logging.getLogger("smc.xds.server")
# The collector's young threshold follows the open streams in steps of this many streams.
_GC_STEP = 500

_REFUSALS_KEPT = 256

# ---------------------------------------------------------------------- server


_UNPARSABLE = object()


class AdsServer(ServerLifecycle, StreamChecks, ServerStatus, SotwServer, DeltaServer):
    """Aggregated Discovery Service (SotW and delta) over a :class:`SnapshotSource`."""

    def __init__(
        self,
        *,
        cache: SnapshotSource,
        registry: CollectorRegistry | None = None,
        metrics: XdsMetrics | None = None,
        on_ack: AckCallback | None = None,
        on_subscription: SubscriptionCallback | None = None,
        authorize: Authorize | None = None,
        placement: Placement | None = None,
        unplaced_grace: float = UNPLACED_GRACE,
        node_key: Callable[[Any], str] | None = None,
    ) -> None:
        """``registry``: where to register new metrics (a private one if None); or pass the
        ``metrics`` of an earlier server (a restart in the same process) to keep counting.
        ``on_ack`` hears every ACK, ``on_subscription`` when a proxy starts or stops watching a
        named type; both are called on the server's loop and must not block. ``authorize``
        (required by ``start(tls=...)``) checks a stream's node id against its client
        certificate's identity; with it, a stream without a verified SPIFFE client certificate
        is refused. ``placement`` (see :data:`Placement`) turns silence into an error for node
        ids SMC cannot place: a malformed one ends its stream with INVALID_ARGUMENT at once, one
        naming no workload with NOT_FOUND after ``unplaced_grace`` seconds; both are recorded as
        refusals (:meth:`refusals`, ``/debug/proxies``)."""
        self._cache = cache
        self._placement = placement
        self._unplaced_grace = unplaced_grace
        # node -> the snapshot key of its stream (e.g. grpc:<id> for gRPC's xDS client)
        self._node_key = node_key
        self._authorize = authorize
        self._trust_domain: str | None = None
        self._tls: ServerTLS | None = None
        self._tls_pending: ServerTLS | None = None
        self._tls_lock = threading.Lock()
        self._refusals: deque[RefusalRecord] = deque(maxlen=_REFUSALS_KEPT)
        self._on_ack = on_ack
        self._on_subscription = on_subscription
        if metrics is None:
            metrics = XdsMetrics(registry if registry is not None else CollectorRegistry())
        self.metrics = metrics
        # No private key on a stream without a verified client certificate of its node
        self._key_guard = KeyGuard(refusals=self._refusals, metrics=metrics)
        self._ready = False
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._nacks: dict[tuple[str, str], NackRecord] = {}
        self._server: grpc.aio.Server | None = None
        #: More gRPC services mounted beside ADS when :meth:`start` runs (the metrics sink).
        self.services: list[Callable[[grpc.aio.Server], None]] = []
        # Serialised responses (without nonce) shared by streams sent the same content (LRU).
        self._bodies: OrderedDict[tuple[Any, ...], tuple[bytes, int, int]] = OrderedDict()
        # SotW subscriptions by digest of their names, shared between streams (LRU).
        self._name_sets: OrderedDict[bytes, tuple[bool, frozenset[str]]] = OrderedDict()
        # Incremental SotW steps shared by streams in the same state (LRU).
        self._steps: OrderedDict[tuple[Any, ...], tuple[frozenset[str], Any]] = OrderedDict()
        self._port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    # (start, stop, TLS rotation and check_peer: smc.xds._server_grpc.ServerLifecycle)

    def add_to(self, server: grpc.aio.Server) -> None:
        """Mount the ADS service on a caller-owned grpc.aio server."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                # None: bytes in and out, no Python call per message. Requests are parsed in
                # _serve after the plain-ACK check; responses are pre-serialised bytes.
                request_deserializer=None,
                response_serializer=None,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=None,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),)
        )

    @property
    def ready(self) -> bool:
        return self._ready

    def mark_ready(self) -> None:
        """Open the gate: from now on streams are answered (call once projections caught up)."""
        if self._ready:
            return
        self._ready = True
        for stream in list(self._streams.values()):
            stream.wake()

    # ------------------------------------------------------------------ gRPC methods

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._serve(context, "sotw")

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._serve(context, "delta")

    # ------------------------------------------------------------------ stream loop

    async def _serve(self, context: grpc.aio.ServicerContext, kind: StreamKind) -> None:
        """One stream (its requests are read with ``context.read()``, not the iterator)."""
        stream = _Stream(stream_id=next(self._ids), kind=kind, peer=str(context.peer()))
        if self._authorize is not None:
            found = _peer_identity(context, trust_domain=self._trust_domain)
            if not isinstance(found, SpiffeId):
                reason, message = found
                await self._refuse(
                    stream, context, reason, grpc.StatusCode.UNAUTHENTICATED, message
                )
                return
            stream.identity, stream.authorized = found, False
        queue = stream.queue

        sotw = kind == "sotw"

        async def read() -> None:
            # context.read() rather than the request iterator: the iterator is an async
            # generator around the same call, one more frame to resume per message.
            receive = context.read
            try:
                while (request := await receive()) is not grpc.aio.EOF:
                    if sotw:
                        # SotW requests arrive as bytes: a plain ACK is applied without parsing
                        # (see SotwServer._plain_ack), anything else is parsed here.
                        if (
                            not stream.pushing
                            and queue.empty()
                            and stream.node_id
                            and self._plain_ack(stream, request)
                        ):
                            if stream.due:
                                stream.wake()
                            continue
                        try:
                            request = RequestHead.FromString(request)
                        except DecodeError:
                            queue.put_nowait(_UNPARSABLE)
                            return
                    if not stream.pushing and queue.empty() and stream.node_id and request.type_url:
                        # Applied here, without a hop through the queue and the handler task
                        # (most requests are plain ACKs that need no push): nothing is queued
                        # ahead of it, the handler is not inside _handle (which never waits
                        # but to end the stream) nor inside a push (a request applied between
                        # two of its writes, e.g. an EDS unsubscribe answering its CDS, would
                        # change what the rest of the push sends). Only a push it makes due
                        # wakes the handler.
                        self._apply_request(stream, request)
                        if stream.due:
                            stream.wake()
                    else:
                        queue.put_nowait(request)
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                queue.put_nowait(_EOF)

        reader = asyncio.create_task(read())
        self._streams[stream.id] = stream
        if len(self._streams) >= self._gc_mark:  # (only once start() tuned the collector)
            self._gc_mark = len(self._streams) + _GC_STEP
            tune_gc_for_streams(len(self._streams))
        self.metrics.connected.labels(kind).inc()
        # The mailbox's wait, inlined (no coroutine per wake-up: one per stream per change).
        items = queue.items
        new_future = asyncio.get_running_loop().create_future
        try:
            while True:
                while not items:
                    waiter = queue.waiter = new_future()
                    try:
                        await waiter
                    finally:
                        if queue.waiter is waiter:
                            queue.waiter = None
                item = items.popleft()
                if item is _EOF:
                    return
                if item is _CHANGED:  # (what _handle does with it, without a coroutine)
                    stream.changed = False
                    stream.due = True
                    closed = False
                else:
                    closed = await self._handle(stream, item, context)
                while not closed and items:
                    item = items.popleft()
                    if item is _EOF:
                        closed = True
                        break
                    closed = await self._handle(stream, item, context)
                if stream.due:
                    stream.pushing = True
                    try:
                        # The common push (a ready server, an authorized stream with a
                        # snapshot) is computed here, without a coroutine; the rest (checks
                        # that may end the stream) goes through _push_types.
                        responses = self._push_now(stream)
                        if responses is None:
                            await self._push_types(stream, context)
                        elif len(responses) == 1:
                            # (most pushes: one write, awaited here, one coroutine fewer)
                            await context.write(responses[0][1])
                            self._written(stream, responses[0][0])
                        elif responses:
                            await self._write_all(stream, context, responses)
                    finally:
                        stream.pushing = False
                        # Written: let the responses go (each stream's last one would stay
                        # referenced until its next push: the first LDS/RDS of a storm is
                        # tens of KB per stream).
                        responses = None
                if closed:
                    return
        finally:
            reader.cancel()
            if stream.unwatch is not None:
                stream.unwatch()
            self._streams.pop(stream.id, None)
            self.metrics.connected.labels(kind).dec()

    async def _handle(self, stream: _Stream, item: Any, context: grpc.aio.ServicerContext) -> bool:
        """Apply one queue item; returns True when the stream must end."""
        if item is _CHANGED:
            stream.changed = False
            stream.due = True
            return False
        if item is _UNPARSABLE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "request is not a DiscoveryRequest"
            )
            return True
        if not item.type_url:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request has no type_url")
            return True
        if not stream.node_id:
            node_id = item.node.id if item.HasField("node") else ""
            if node_id and self._node_key is not None:
                node_id = self._node_key(item.node)
            if not node_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the first request of a stream must carry node.id",
                )
                return True
            stream.node_id = node_id
            stream.unwatch = self._cache.watch(node_id, stream.wake)
        self._apply_request(stream, item)
        return False

    def _apply_request(self, stream: _Stream, item: Any) -> None:
        """Apply a request (with a type_url, on a stream that knows its node id) to the stream's
        state; sets ``stream.due`` when a push must follow."""
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("request from %s: %s", stream.node_id, str(item).replace("\n", " ")[:300])
        type_url = item.type_url
        existed = type_url in stream.types
        if stream.kind == "sotw":
            self._on_sotw_request(stream, item)
        else:
            self._on_delta_request(stream, item)
        # A plain ACK needs no push: nothing to send changed since the last push (the snapshot
        # did not, or a wake-up would have said so; nor did the subscription) and the last push
        # held nothing back waiting for an answer.
        if not existed or stream.blocked or stream.types[type_url].dirty:
            stream.due = True
            if stream.since is None:
                stream.since = time.monotonic()

    # ------------------------------------------------------------------ pushing

    def _push_now(self, stream: _Stream) -> list[tuple[str, Any]] | None:
        """The push of a stream that needs no check (ready server, node id known, snapshot
        published, stream authorized): the responses to write, in push order. None: the push
        needs :meth:`_push_types` (not ready, no snapshot, an identity to check)."""
        if not self._ready or not stream.node_id or not stream.authorized:
            return None
        snapshot = self._cache.get(stream.node_id)
        if snapshot is None:
            return None
        stream.due = stream.blocked = False
        stream.unplaced_since = None
        if stream.identity is None:
            snapshot = self._key_guard.guard(stream, snapshot)
        return self._responses(stream, snapshot)

    async def _push_types(self, stream: _Stream, context: grpc.aio.ServicerContext) -> None:
        """The push (``stream.pushing`` is set meanwhile: requests wait in the queue)."""
        stream.due = stream.blocked = False
        if not self._ready or not stream.node_id:
            return
        snapshot = self._cache.get(stream.node_id)
        if snapshot is None:
            if self._placement is not None:
                await self._check_placement(stream, context)
            return
        stream.unplaced_since = None
        if not stream.authorized:
            await self._check_identity(stream, context)
        if stream.identity is None or not stream.authorized:
            snapshot = self._key_guard.guard(stream, snapshot)
        responses = self._responses(stream, snapshot)
        if responses:
            await self._write_all(stream, context, responses)

    def _responses(self, stream: _Stream, snapshot: Any) -> list[tuple[str, Any]]:
        """Compute every response of a push, in push order, marking each pending (a push runs
        with ``stream.pushing`` set, so no request is applied until its writes are done: the
        responses may all be computed before the first write). Sets ``stream.blocked`` when a
        type with something new is held (in flight, or make-before-break)."""
        types = snapshot.types
        stream_types = stream.types
        sotw = stream.kind == "sotw"
        out: list[tuple[str, Any]] = []
        for type_url in PUSH_ORDER:
            ts = stream_types.get(type_url)
            if ts is None:
                continue
            tr = types.get(type_url)
            if not ts.dirty and ts.synced == (tr.version if tr is not None else EMPTY_VERSION):
                # Nothing new since this type was last computed against this content with this
                # subscription (it was sent, or had nothing to send): no response, nothing held.
                continue
            held_for = HOLD_FOR.get(type_url)
            if ts.pending or (
                held_for is not None
                and (_pending(stream, held_for[0]) or _pending(stream, held_for[1]))
            ):
                # In flight, or held for make-before-break, with something new to send: push
                # again on the answer that settles it (a plain EDS change holds LDS/RDS with
                # nothing new, above: its ACK needs no push).
                stream.blocked = True
                continue
            if sotw:
                response: Any = self._sotw_response(stream, ts, type_url, snapshot)
            else:
                response = self._delta_response(stream, ts, type_url, snapshot)
            if response is None:
                continue
            # Pending before the write completes: its ACK may be read (and applied by the
            # reader task) before this coroutine resumes.
            ts.pending = True
            ts.sent_at = time.monotonic()
            out.append((type_url, response))
        if not out and not stream.blocked:
            stream.since = None
        return out

    async def _write_all(
        self,
        stream: _Stream,
        context: grpc.aio.ServicerContext,
        responses: list[tuple[str, Any]],
    ) -> None:
        """Write the responses of one push, in order, and count them."""
        write = context.write
        last = len(responses) - 1
        for i, (type_url, response) in enumerate(responses):
            await write(response)
            self._written(stream, type_url, last=i == last)

    def _written(self, stream: _Stream, type_url: str, *, last: bool = True) -> None:
        """Count the response of ``type_url`` just written (and log it at debug level); the
        push's latency is observed from the change that made it due (``stream.since``), which
        is cleared after the ``last`` write of the push."""
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "sent %s %s nonce %s to %s",
                stream.kind,
                short_name(type_url),
                stream.types[type_url].nonce,
                stream.node_id,
            )
        tm = self.metrics.for_type(type_url)
        (tm.pushes_sotw if stream.kind == "sotw" else tm.pushes_delta).value += 1
        if stream.since is not None:
            tm.push_latency.observe(time.monotonic() - stream.since)
        if last and not stream.blocked:
            stream.since = None
