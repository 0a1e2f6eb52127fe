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
the names (:mod:`smc.xds._requests`), so an ACK costs no work per name. Delta sends only what
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
handler coroutine plus one reader task feeding a queue; snapshot changes arrive as a callback from
the cache that enqueues a single coalesced wake-up. Per-stream state is a few slotted objects:
per type the subscription (names interned), the last nonce, the version sent and ACKed, and (SotW)
one content key or (delta) the ``name -> version`` map the client holds.

Cost: a stream that follows a type through :meth:`Snapshot.replace` steps diffs in O(changes) via
the type's change history (it rescans only after a subscription change or a long lag); responses
are serialised once per distinct content into a small LRU and shared by every stream sent the
same content, each getting only its own nonce field appended.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from smc.ca import InvalidIdentity, SpiffeId, parse_spiffe_id
from smc.projections import Workload
from smc.xds._cache import SnapshotSource, Unwatch
from smc.xds._errors import XdsError
from smc.xds._identity import InvalidNodeId, find_workload, parse_node_id
from smc.xds._notfound import by_name_key, with_missing
from smc.xds._requests import RequestHead, names_bytes, names_digest, names_of
from smc.xds._snapshot import ResourceEntry, Snapshot, TypeResources
from smc.xds._types import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    WILDCARD_TYPES,
    short_name,
)

__all__ = [
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

StreamKind = Literal["sotw", "delta"]

#: ``on_ack(node_id, type_url, version, acked_at)``: a proxy ACKed ``version`` of ``type_url``
#: (``acked_at``: wall-clock seconds).
AckCallback = Callable[[str, str, str, float], None]
#: ``on_subscription(node_id, type_url, watched)``: a proxy started (True) or stopped (False)
#: watching a named type (EDS/RDS/SDS) at all.
SubscriptionCallback = Callable[[str, str, bool], None]
#: ``authorize(node_id, peer_identity)``: may a proxy whose client certificate carries
#: ``peer_identity`` be served the config of ``node_id``? Called on the server's loop, at most
#: once per stream, once the node has a snapshot; must not block.
Authorize = Callable[[str, SpiffeId], bool]
#: ``placement(node_id)``: None when SMC can place the node id (it names a registry workload),
#: else why not. Asked on the server's loop while a ready server has no snapshot for the node.
Placement = Callable[[str], str | None]

RefusalReason = Literal[
    "no_client_certificate", "bad_identity", "identity_mismatch", "invalid_node_id", "unplaced"
]
#: How long a well-formed node id naming no workload waits (the workload may be joining) before
#: its stream ends with NOT_FOUND.
UNPLACED_GRACE = 5.0
_REFUSALS_KEPT = 256

_EOF = object()
_CHANGED = object()

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
EMPTY_VERSION = "0" * 32  # the version of a type with no resources
_BODY_CACHE_SIZE = 32  # response bodies shared between streams sent the same content
_NAME_SETS_KEPT = 4096  # distinct SotW subscriptions shared between streams
# How many new streams gRPC core may hold before the server's loop picks them up, and for how
# long (its defaults, 1,000 / 3,000 and 30 s, cancel streams in a connect storm).
_MAX_PENDING_STREAMS = 1_000_000
_MAX_PENDING_SECONDS = 86_400  # no time limit in practice: a stream waits, never cancelled

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# ---------------------------------------------------------------------- public records


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerTLS:
    """TLS material of the ADS server: its certificate chain and key (PEM), the CA bundle
    client certificates must chain to, and optionally the trust domain their SPIFFE ids must
    be in. Build it with :meth:`of` to get the PEMs checked with clear errors."""

    cert_pem: str
    key_pem: str
    client_ca_pems: tuple[str, ...]
    trust_domain: str | None = None

    @classmethod
    def of(
        cls,
        *,
        cert_pem: str,
        key_pem: str,
        client_ca_pems: Iterable[str],
        trust_domain: str | None = None,
    ) -> ServerTLS:
        """Check the PEMs parse (raises :class:`XdsError` naming the field) and build."""
        cas = tuple(client_ca_pems)
        leaf = _check_pem_certs(cert_pem, field="cert_pem")
        if "PRIVATE KEY-----" not in key_pem:
            raise XdsError("ServerTLS.key_pem: no PEM private key found")
        try:
            key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise XdsError(f"ServerTLS.key_pem: not a usable private key: {exc}") from exc
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise XdsError("ServerTLS.key_pem: does not match the certificate of cert_pem")
        if not cas:
            raise XdsError("ServerTLS.client_ca_pems: empty (client certificates cannot verify)")
        for i, pem in enumerate(cas):
            _check_pem_certs(pem, field=f"client_ca_pems[{i}]")
        return cls(
            cert_pem=cert_pem, key_pem=key_pem, client_ca_pems=cas, trust_domain=trust_domain
        )

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        """The material as a configuration for dynamic (rotatable) gRPC server credentials."""
        roots = "".join(p if p.endswith("\n") else p + "\n" for p in self.client_ca_pems)
        pairs = [(self.key_pem.encode("ascii"), self.cert_pem.encode("ascii"))]
        return grpc.ssl_server_certificate_configuration(
            pairs, root_certificates=roots.encode("ascii")
        )


def _check_pem_certs(pem: str, *, field: str) -> x509.Certificate:
    """The first certificate of ``pem``; raises :class:`XdsError` naming ``field``."""
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise XdsError(f"ServerTLS.{field}: not PEM certificates: {exc}") from exc
    if not certs:
        raise XdsError(f"ServerTLS.{field}: no certificate found")
    return certs[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class RefusalRecord:
    """One stream refused by the identity check: why, for which claimed node id (empty when
    refused before the first request), and the certificate identity presented (empty if none)."""

    node_id: str
    peer_identity: str
    peer: str
    reason: RefusalReason
    message: str
    at: float  # wall-clock seconds (time.time())


@dataclass(frozen=True, kw_only=True, slots=True)
class NackRecord:
    """One NACK: which node rejected which version of which type, when, and why."""

    node_id: str
    type_url: str
    version: str
    nonce: str
    message: str
    code: int
    at: float  # wall-clock seconds (time.time())


@dataclass(frozen=True, kw_only=True, slots=True)
class TypeStatus:
    """Debug view of one type on one stream."""

    type_url: str
    wildcard: bool
    names: tuple[str, ...]
    sent_version: str | None
    acked_version: str | None
    last_nonce: str | None
    pending: bool
    last_nack: NackRecord | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ProxyStatus:
    """Debug view of one connected ADS stream."""

    node_id: str
    stream_id: int
    kind: StreamKind
    peer: str
    connected_at: float
    types: Mapping[str, TypeStatus]


class XdsMetrics:
    """Prometheus metrics of the ADS server, registered in the given registry. Labels carry only
    the resource type and stream kind, never node ids."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.pushes = Counter(
            "smc_xds_pushes", "xDS responses sent", ["type", "kind"], registry=registry
        )
        self.resources_sent = Counter(
            "smc_xds_resources_sent",
            "Resources carried by xDS responses",
            ["type"],
            registry=registry,
        )
        self.bytes_sent = Counter(
            "smc_xds_resource_bytes_sent",
            "Serialised resource bytes sent",
            ["type"],
            registry=registry,
        )
        self.push_latency = Histogram(
            "smc_xds_push_latency_seconds",
            "Time from a snapshot change (or request) to the response being written",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ack_latency = Histogram(
            "smc_xds_ack_latency_seconds",
            "Time from a response being written to its ACK or NACK",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.nacks = Counter("smc_xds_nacks", "NACKs received", ["type"], registry=registry)
        self.connected = Gauge(
            "smc_xds_connected_proxies", "Open ADS streams", ["kind"], registry=registry
        )
        self.refused = Counter(
            "smc_xds_refused_streams",
            "ADS streams refused by the client-certificate identity check",
            ["reason"],
            registry=registry,
        )
        self._by_type: dict[str, _TypeMetrics] = {}

    def for_type(self, type_url: str) -> _TypeMetrics:
        """The label children of one type, cached (``labels()`` is too slow per push)."""
        found = self._by_type.get(type_url)
        if found is None:
            found = self._by_type[type_url] = _TypeMetrics(self, short_name(type_url))
        return found


class _TypeMetrics:
    __slots__ = (
        "ack_latency",
        "bytes_sent",
        "nacks",
        "push_latency",
        "pushes_delta",
        "pushes_sotw",
        "resources_sent",
    )

    def __init__(self, m: XdsMetrics, label: str) -> None:
        self.pushes_sotw = m.pushes.labels(label, "sotw")
        self.pushes_delta = m.pushes.labels(label, "delta")
        self.resources_sent = m.resources_sent.labels(label)
        self.bytes_sent = m.bytes_sent.labels(label)
        self.push_latency = m.push_latency.labels(label)
        self.ack_latency = m.ack_latency.labels(label)
        self.nacks = m.nacks.labels(label)


# ---------------------------------------------------------------------- per-stream state


class _TypeState:
    __slots__ = (
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
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.changed = False
        # Whether the next turn must compute responses (a change, a new or changed
        # subscription, or an answer to a response the last push held something back for).
        self.due = True
        self.blocked = False
        self.since: float | None = None
        self.nonces = 0
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


class AdsServer:
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
        self._port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def add_to(self, server: grpc.aio.Server) -> None:
        """Mount the ADS service on a caller-owned grpc.aio server."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=RequestHead.FromString,
                response_serializer=_serialize,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),)
        )

    async def start(
        self, *, host: str = "127.0.0.1", port: int = 0, tls: ServerTLS | None = None
    ) -> int:
        """Start an own grpc.aio server on ``host:port`` (0: any free port); returns the port.

        With ``tls`` the port speaks TLS only and requires a client certificate from
        ``tls.client_ca_pems``; the server must have an ``authorize`` hook."""
        if self._server is not None:
            raise RuntimeError("AdsServer already started")
        if tls is not None and self._authorize is None:
            raise XdsError(
                "AdsServer.start(tls=...) needs an authorize hook: without it any mesh "
                "certificate could claim any node id"
            )
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                # A connect storm (every proxy of a restarted replica at once): gRPC core holds
                # the streams this loop has not picked up yet in a pending queue and, by
                # default, cancels those past 1,000 (3,000 hard) or 30 s old. They wait
                # instead: picking them up is fair (one queue, in arrival order) and each is
                # served as soon as the loop gets to it.
                ("grpc.server.max_pending_requests", _MAX_PENDING_STREAMS),
                ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_STREAMS),
                ("grpc.server_max_unrequested_time_in_server", _MAX_PENDING_SECONDS),
            ]
        )
        self.add_to(server)
        for mount in self.services:
            mount(server)
        if tls is None:
            bound: int = server.add_insecure_port(f"{host}:{port}")
        else:
            self._trust_domain = tls.trust_domain
            self._tls = tls
            creds = grpc.dynamic_ssl_server_credentials(
                tls.certificate_configuration(),
                self._fetch_tls,
                require_client_authentication=True,
            )
            bound = server.add_secure_port(f"{host}:{port}", creds)
        if bound == 0:
            raise OSError(f"cannot bind the ADS server to {host}:{port}")
        await server.start()
        self._server, self._port = server, bound
        return bound

    async def check_peer(self, node_id: str, context: grpc.aio.ServicerContext) -> str | None:
        """Why the TLS peer of ``context`` may not speak for ``node_id`` (None: it may), by the
        rule ADS streams follow; always None on a cleartext server. For services mounted
        beside ADS (:attr:`services`)."""
        if self._authorize is None:
            return None
        found = _peer_identity(context, trust_domain=self._trust_domain)
        if not isinstance(found, SpiffeId):
            return found[1]
        try:
            allowed = bool(self._authorize(node_id, found))
        except Exception:
            _log.exception("authorize hook failed for node %s", node_id)
            allowed = False
        if allowed:
            return None
        return (
            f"node id {node_id!r} does not run as the identity of the client certificate "
            f"({found.uri})"
        )

    def _fetch_tls(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each TLS handshake (on its own threads): the new material
        # once after update_tls, else None (keep the current one).
        with self._tls_lock:
            pending, self._tls_pending = self._tls_pending, None
        return None if pending is None else pending.certificate_configuration()

    @property
    def tls(self) -> ServerTLS | None:
        """The TLS material new connections get (None: cleartext)."""
        return self._tls

    def update_tls(self, tls: ServerTLS) -> bool:
        """Rotate the server certificate and/or the client CA bundle: connections made from
        now on use ``tls``; open streams keep theirs. Returns False when nothing changed.
        Raises :class:`XdsError` on a cleartext server or a different trust domain."""
        if self._tls is None:
            raise XdsError("update_tls: the ADS server does not serve TLS")
        if tls.trust_domain != self._trust_domain:
            raise XdsError(
                f"update_tls: trust domain {tls.trust_domain!r} differs from the served "
                f"{self._trust_domain!r}; restart to change it"
            )
        if tls == self._tls:
            return False
        with self._tls_lock:
            self._tls = self._tls_pending = tls
        _log.info("ADS server TLS material rotated")
        return True

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop the own server; open streams end (Envoy keeps its config and reconnects)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)

    @property
    def port(self) -> int | None:
        return self._port

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

    # ------------------------------------------------------------------ debug

    def proxies(self) -> list[ProxyStatus]:
        """One entry per open stream (a node may have several), sorted by node id."""
        out = []
        for s in self._streams.values():
            types = {
                t: TypeStatus(
                    type_url=t,
                    wildcard=ts.wildcard,
                    names=tuple(sorted(ts.names)),
                    sent_version=ts.sent_version,
                    acked_version=ts.acked_version,
                    last_nonce=ts.nonce,
                    pending=ts.pending,
                    last_nack=ts.last_nack,
                )
                for t, ts in s.types.items()
            }
            out.append(
                ProxyStatus(
                    node_id=s.node_id,
                    stream_id=s.id,
                    kind=s.kind,
                    peer=s.peer,
                    connected_at=s.connected_at,
                    types=types,
                )
            )
        out.sort(key=lambda p: (p.node_id, p.stream_id))
        return out

    def refusals(self, *, node_id: str | None = None) -> list[RefusalRecord]:
        """The last streams refused (identity check, unplaceable node id; at most 256), newest
        first."""
        found = [r for r in self._refusals if node_id is None or r.node_id == node_id]
        found.reverse()
        return found

    def nacks(self, *, node_id: str | None = None) -> list[NackRecord]:
        """The last NACK per (node, type), kept after the stream closes; newest first."""
        found = [r for (n, _), r in self._nacks.items() if node_id is None or n == node_id]
        found.sort(key=lambda r: r.at, reverse=True)
        return found

    # ------------------------------------------------------------------ gRPC methods

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._serve(request_iterator, context, "sotw")

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._serve(request_iterator, context, "delta")

    # ------------------------------------------------------------------ stream loop

    async def _serve(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, kind: StreamKind
    ) -> None:
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

        async def read() -> None:
            try:
                async for request in requests:
                    queue.put_nowait(request)
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                queue.put_nowait(_EOF)

        reader = asyncio.create_task(read())
        self._streams[stream.id] = stream
        self.metrics.connected.labels(kind).inc()
        try:
            while True:
                item = await queue.get()
                if item is _EOF:
                    return
                closed = await self._handle(stream, item, context)
                while not closed and not queue.empty():
                    item = queue.get_nowait()
                    if item is _EOF:
                        closed = True
                        break
                    closed = await self._handle(stream, item, context)
                if stream.due:
                    await self._push(stream, context)
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
        return False

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

    # ------------------------------------------------------------------ pushing

    async def _refuse(
        self,
        stream: _Stream,
        context: grpc.aio.ServicerContext,
        reason: RefusalReason,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """Record and count a refusal, then end the stream with ``code`` (raises)."""
        record = RefusalRecord(
            node_id=stream.node_id,
            peer_identity=stream.identity.uri if stream.identity is not None else "",
            peer=stream.peer,
            reason=reason,
            message=message,
            at=time.time(),
        )
        self._refusals.append(record)
        self.metrics.refused.labels(reason).inc()
        _log.warning("refused ADS stream from %s: %s", stream.peer, message)
        await context.abort(code, message)

    async def _check_identity(self, stream: _Stream, context: grpc.aio.ServicerContext) -> None:
        """Ask the authorize hook whether the stream's certificate may speak for its node id;
        refuse the stream (raises) if not."""
        identity = stream.identity
        assert identity is not None and self._authorize is not None
        try:
            allowed = bool(self._authorize(stream.node_id, identity))
        except Exception:
            _log.exception("authorize hook failed for node %s", stream.node_id)
            allowed = False
        if allowed:
            stream.authorized = True
            return
        await self._refuse(
            stream,
            context,
            "identity_mismatch",
            grpc.StatusCode.PERMISSION_DENIED,
            f"node id {stream.node_id!r} does not run as the identity of the client "
            f"certificate ({identity.uri}): a proxy is only served the config of its own "
            "identity",
        )

    async def _check_placement(self, stream: _Stream, context: grpc.aio.ServicerContext) -> None:
        """A ready server has no snapshot for the stream's node: end the stream (raises) when
        the node id is malformed, or names no workload for longer than the grace period."""
        assert self._placement is not None
        problem = self._placement(stream.node_id)
        if problem is None:
            stream.unplaced_since = None
            return
        try:
            parse_node_id(stream.node_id)
        except InvalidNodeId as exc:
            await self._refuse(
                stream,
                context,
                "invalid_node_id",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{exc}: SMC serves node ids naming a registry workload",
            )
        now = time.monotonic()
        if stream.unplaced_since is None:
            stream.unplaced_since = now
            asyncio.get_running_loop().call_later(self._unplaced_grace, stream.wake)
            return
        if now - stream.unplaced_since < self._unplaced_grace:
            return
        await self._refuse(
            stream,
            context,
            "unplaced",
            grpc.StatusCode.NOT_FOUND,
            f"node id {stream.node_id!r}: {problem} (register the workload, or use the node id "
            "<namespace>/<workload> of a registered one)",
        )

    async def _push(self, stream: _Stream, context: grpc.aio.ServicerContext) -> None:
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
        in_flight = False
        for type_url in PUSH_ORDER:
            ts = stream.types.get(type_url)
            if ts is None:
                continue
            if ts.pending:
                in_flight = stream.blocked = True
                continue
            held_for = HOLD_FOR.get(type_url)
            if held_for is not None and (
                _pending(stream, held_for[0]) or _pending(stream, held_for[1])
            ):
                in_flight = stream.blocked = True
                continue
            if stream.kind == "sotw":
                response: Any = self._sotw_response(stream, ts, type_url, snapshot)
            else:
                response = self._delta_response(stream, ts, type_url, snapshot)
            if response is None:
                continue
            await context.write(response)
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(
                    "sent %s %s nonce %s to %s",
                    stream.kind,
                    short_name(type_url),
                    ts.nonce,
                    stream.node_id,
                )
            now = time.monotonic()
            tm = self.metrics.for_type(type_url)
            (tm.pushes_sotw if stream.kind == "sotw" else tm.pushes_delta).inc()
            if stream.since is not None:
                tm.push_latency.observe(now - stream.since)
            ts.pending = True
            ts.sent_at = now
            in_flight = True
        if not in_flight:
            stream.since = None

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
            chosen = self._named_changes(ts, tr, version)
            if chosen is not None:
                # Incremental: the client holds the requested resources as of ``synced`` (no
                # per-stream copy of their versions is kept), whose mix is the new key.
                key = self._named_key(ts, tr)
                ts.cur_key, ts.sent_key, ts.synced, ts.dirty = key, key, version, False
                ts.added = None
                if not chosen:
                    return None
                mix = 0
                for entry in chosen:
                    mix ^= entry.mix
                cache_key = (type_url, version, "changed", mix)
                found = self._bodies.get(cache_key)
                if found is None:
                    found = self._sotw_encode(cache_key, type_url, version, chosen)
                else:
                    self._bodies.move_to_end(cache_key)
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
        tm = self.metrics.for_type(type_url)
        tm.resources_sent.inc(count)
        tm.bytes_sent.inc(size)
        # A serialised message followed by more fields parses as their merge: append the nonce.
        return data + _string_field(5, nonce)

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
        return found[0] + _string_field(5, nonce)


def _peer_identity(
    context: grpc.aio.ServicerContext, *, trust_domain: str | None
) -> SpiffeId | tuple[RefusalReason, str]:
    """The SPIFFE identity of the (TLS-verified) client certificate of ``context``'s peer: its
    one ``spiffe://`` URI SAN, in ``trust_domain`` when given; else ``(reason, message)``."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return (
            "no_client_certificate",
            "no client certificate: the ADS port requires mTLS with a mesh certificate",
        )
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "bad_identity", "client certificate has no subjectAltName (expected a SPIFFE URI)"
    except ValueError as exc:
        return "bad_identity", f"client certificate does not parse: {exc}"
    spiffe = [
        u
        for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
    if len(spiffe) != 1:
        return "bad_identity", (
            f"client certificate must carry exactly one spiffe:// URI SAN, found {len(spiffe)}"
            + (f": {spiffe}" if spiffe else "")
        )
    try:
        return parse_spiffe_id(spiffe[0], trust_domain=trust_domain)
    except InvalidIdentity as exc:
        return "bad_identity", f"client certificate identity is not valid: {exc}"


def workload_authorizer(
    *,
    workloads: Callable[[], Mapping[tuple[str, str, str], Workload] | Iterable[Workload]],
) -> Authorize:
    """An :data:`Authorize` hook over the registry: a certificate for ``ns/sa`` may speak for
    node id ``<ns>/<workload>`` (or ``<kind>/<ns>/<workload>``) when that workload exists and
    runs as service account ``sa`` in ``ns``. ``workloads`` returns the registry's current
    workloads (a mapping keyed ``(kind, ns, name)`` or any iterable); it is called per check."""

    def authorize(node_id: str, peer: SpiffeId) -> bool:
        try:
            ref = parse_node_id(node_id)
        except InvalidNodeId:
            return False
        workload = find_workload(ref, workloads())
        return (
            workload is not None
            and workload.namespace == peer.namespace
            and workload.service_account == peer.service_account
        )

    return authorize


def _string_field(number: int, value: str) -> bytes:
    data = value.encode()
    out = bytearray([(number << 3) | 2])
    n = len(data)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


def _serialize(message: Any) -> bytes:
    if isinstance(message, bytes):
        return message
    data: bytes = message.SerializeToString()
    return data
