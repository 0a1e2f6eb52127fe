"""The xDS controller: projections -> per-proxy snapshots in the cache, incrementally.

Role: registered as a :class:`~smc.projections.ProjectionRunner` listener, it turns applied
events into *changed dependency keys* (see :mod:`smc.xds._builder`), waits a short debounce,
then rebuilds only the proxies whose last build read one of those keys (policy and mesh
changes, and trust-bundle changes, rebuild every proxy) in one :class:`BuildPass`, and
publishes each snapshot with :meth:`Snapshot.replace` (so the server diffs in O(changes)).
Proxies are built for the node ids that connected (:attr:`XdsController.source` is the
:class:`~smc.xds.SnapshotSource` handed to the :class:`~smc.xds.AdsServer`; its ``watch``
registers the node); nodes that connect meanwhile are built together after the debounce, in
one :class:`BuildPass`, so a reconnect storm shares the per-identity and per-service work. It
also records the causal chain: for each event, the runner position
and the snapshot versions (per node and type) that carried it, and, from the server's ACKs,
when each proxy acknowledged them (:meth:`XdsController.trace`).

Make-before-break for removals: clusters and endpoints a rebuild drops *linger* in the
published snapshot of a connected proxy (unreferenced, so still consistent) until the proxy
has ACKed the listeners and routes of that snapshot, which no longer point at them; only then
are they removed (or after ``linger_timeout`` seconds, e.g. for a proxy that never ACKs). With
the server's push order (CDS -> EDS -> LDS -> RDS, LDS/RDS held while CDS/EDS are in flight)
this gives the add order CDS -> EDS -> LDS -> RDS and the remove order LDS/RDS -> CDS -> EDS:
a route never points at a cluster Envoy no longer has (no transient 503).

The ADS server (made by :meth:`XdsController.make_server`) reports ACKs and watch changes
through its ``on_ack`` / ``on_subscription`` callbacks (causal chain, lingering).

Serving starts only after the projections caught up: :meth:`XdsController.run` waits for
``runner.caught_up``, builds every registered node, then calls ``server.mark_ready()``.

Concurrency: everything runs on the asyncio loop that runs the projection runner (the
listener is called there, builds read the projections there); :meth:`on_certs_changed` may be
called from any thread (it hops onto the loop).

Layout: this module holds :class:`XdsController` (wiring, inputs, the rebuild loop, debug);
:mod:`smc.xds._controller_publish` publishing and lingering removals, and
:mod:`smc.xds._controller_acks` ACK tracking and traces (its bases).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from smc.events import (
    POLICY,
    EndpointsChanged,
    Event,
    ServiceRemoved,
    ServiceUpserted,
    WorkloadJoined,
    WorkloadLeft,
)
from smc.projections import PolicyProjection, PolicyView, ProjectionRunner, RegistryProjection
from smc.xds._builder import INBOUND_PORT, OUTBOUND_PORT, BuildPass, ProxyBuild
from smc.xds._cache import SnapshotCache, Unwatch
from smc.xds._certs import CertSource
from smc.xds._controller_acks import AckTracking
from smc.xds._controller_publish import Publication, _Node
from smc.xds._grpc import proxyless_node_key
from smc.xds._server import AdsServer, Authorize
from smc.xds._snapshot import Snapshot
from smc.xds._types import short_name

__all__ = ["Publication", "XdsController"]

log = logging.getLogger("smc.xds.controller")

_ALL = "*"
_TRACE_LIMIT = 20_000


class _Source:
    """The :class:`~smc.xds.SnapshotSource` the server reads: the cache, plus node tracking."""

    def __init__(self, controller: XdsController) -> None:
        self._c = controller

    def get(self, node_id: str) -> Snapshot | None:
        return self._c.cache.get(node_id)

    def watch(self, node_id: str, callback: Callable[[], None]) -> Unwatch:
        unwatch = self._c.cache.watch(node_id, callback)
        self._c._register(node_id)

        def done() -> None:
            unwatch()
            self._c._unregister(node_id)

        return done


class XdsController(AckTracking):
    """Keeps the snapshot cache in step with the projections (see the module docstring)."""

    def __init__(
        self,
        *,
        runner: ProjectionRunner,
        certs: CertSource,
        cache: SnapshotCache | None = None,
        registry: CollectorRegistry | None = None,
        debounce: float = 0.02,
        outbound_port: int = OUTBOUND_PORT,
        inbound_port: int = INBOUND_PORT,
        linger_timeout: float = 10.0,
    ) -> None:
        self.runner = runner
        self.linger_timeout = linger_timeout
        self.registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
        self.policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
        self.view = PolicyView(registry=self.registry, policy=self.policy)
        self.certs = certs
        self.cache = cache if cache is not None else SnapshotCache()
        self.debounce = debounce
        self.outbound_port = outbound_port
        self.inbound_port = inbound_port
        self.source = _Source(self)
        self.server: AdsServer | None = None
        self.metrics_registry = registry if registry is not None else CollectorRegistry()
        self._builds = Counter(
            "smc_xds_proxy_builds", "Proxy snapshots built", registry=self.metrics_registry
        )
        self._publishes = Counter(
            "smc_xds_snapshot_publishes",
            "Proxy snapshots published with changed content",
            registry=self.metrics_registry,
        )
        self._rebuild_seconds = Histogram(
            "smc_xds_rebuild_seconds",
            "Time to rebuild and publish the proxies affected by one batch of changes",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.metrics_registry,
        )
        self._tracked_gauge = Gauge(
            "smc_xds_tracked_proxies",
            "Node ids the controller builds for",
            registry=self.metrics_registry,
        )
        self._nodes: dict[str, _Node] = {}
        self._dirty_keys: set[str] = set()
        self._dirty_nodes: set[str] = set()
        self._pending_events: list[str] = []
        self._pending_since: float | None = None
        self._wake = asyncio.Event()
        self._ready = False
        # Previous answers, to know what a registry change used to affect.
        self._svc_ids: dict[str, tuple[str, ...]] = {}
        self._wl_backs: dict[str, tuple[str, ...]] = {}  # "ns/name" -> services backed
        self._wl_identity: dict[str, str] = {}
        # Causal chain.
        self._seq = 0
        self._traces: OrderedDict[str, Publication] = OrderedDict()
        self._published: dict[tuple[str, str], deque[tuple[int, str]]] = {}
        self._acks: dict[tuple[str, str], deque[tuple[int, float]]] = {}
        self._ack_waiters: list[asyncio.Future[None]] = []
        self._unsubscribed: set[tuple[str, str]] = set()
        self._acked: dict[tuple[str, str], str] = {}  # (node, type) -> latest ACKed version
        self._loop: asyncio.AbstractEventLoop | None = None
        runner.listeners.append(self._on_events)

    # ------------------------------------------------------------------ wiring

    def make_server(
        self,
        *,
        metrics_registry: CollectorRegistry | None = None,
        authorize: Authorize | None = None,
    ) -> AdsServer:
        """An ADS server over this controller's source, reporting ACKs here (the controller
        marks it ready once the projections caught up). Metrics go to ``metrics_registry``
        (default: the controller's); ``authorize`` checks each stream's node id against its
        client certificate (for ADS over mTLS)."""
        server = AdsServer(
            cache=self.source,
            registry=metrics_registry if metrics_registry is not None else self.metrics_registry,
            on_ack=self._on_ack,
            on_subscription=self._on_subscription,
            authorize=authorize,
            placement=self.placement_problem,
            node_key=proxyless_node_key,
        )
        self.attach_server(server)
        return server

    def placement_problem(self, node_id: str) -> str | None:
        """Why SMC cannot place ``node_id`` (malformed, or naming no registry workload), or
        None: it can, or it is not known yet (a node with a workload but no certificate yet
        is placed, just not served yet)."""
        node = self._nodes.get(node_id)
        if node is None or not self._ready or node.identity is not None:
            return None
        return node.reason or None

    def attach_server(self, server: AdsServer) -> None:
        """Serve through ``server`` (marked ready now if the controller is ready)."""
        self.server = server
        if self._ready:
            server.mark_ready()

    @property
    def ready(self) -> bool:
        return self._ready

    def idle(self) -> bool:
        """True when no applied change is waiting to be built (after the debounce)."""
        return (
            not self._dirty_keys
            and not self._dirty_nodes
            and not self._pending_events
            and not self._wake.is_set()
        )

    def node_ids(self) -> list[str]:
        return sorted(self._nodes)

    # ------------------------------------------------------------------ inputs

    def _register(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node(node_id=node_id)
            self._tracked_gauge.set(len(self._nodes))
            if self._ready:
                # Built by the loop with every other node that connected meanwhile, in one
                # BuildPass (a reconnect storm shares the per-identity and per-service work).
                self._dirty_nodes.add(node_id)
                self._wake.set()
        node.watchers += 1

    def _unregister(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is not None:
            node.watchers = max(0, node.watchers - 1)

    def track(self, node_id: str) -> ProxyBuild | None:
        """Build ``node_id`` now (also when no Envoy is connected) and keep it current;
        returns the build (None before the controller is ready)."""
        if node_id not in self._nodes:
            self._nodes[node_id] = _Node(node_id=node_id)
            self._tracked_gauge.set(len(self._nodes))
        if not self._ready:
            return None
        return self._rebuild({node_id}, pub=None).get(node_id)

    def _on_events(self, events: list[Event]) -> None:
        if not events or not self._ready:
            # Before the first full build (projections still catching up) nothing is served
            # yet: the full build after catch-up covers these events, at no cost per event.
            return
        now = time.time()
        if self._pending_since is None:
            self._pending_since = now
        for e in events:
            self._pending_events.append(e.event_id)
            self._dirty_keys.update(self._keys_of(e))
        self._wake.set()

    def on_certs_changed(self, identities: Iterable[str], trust_changed: bool) -> None:
        """Key-store listener: certificates of ``identities`` (SPIFFE URIs or ``ns/sa``)
        changed, and/or the trust bundle. Thread-safe."""
        keys = set()
        for ident in identities:
            if ident.startswith("spiffe://"):
                ns, sep, sa = ident.split("/ns/", 1)[-1].partition("/sa/")
                if sep:
                    keys.add(f"id:{ns}/{sa}")
            else:
                keys.add(f"id:{ident}")
        if trust_changed:
            keys.add(_ALL)

        def mark() -> None:
            if self._pending_since is None:
                self._pending_since = time.time()
            self._dirty_keys.update(keys)
            self._wake.set()

        loop = self._loop
        if loop is None:
            mark()
            return
        if loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            mark()
        else:
            loop.call_soon_threadsafe(mark)

    def _keys_of(self, e: Event) -> set[str]:
        if e.STREAM == POLICY:
            return {_ALL}
        if isinstance(e, EndpointsChanged):
            return {f"svc:{e.namespace}/{e.service}"}
        if isinstance(e, ServiceUpserted | ServiceRemoved):
            key = f"{e.namespace}/{e.name}"
            keys = {f"svc:{key}", "svc-all", f"svcns:{e.namespace}"}
            old = self._svc_ids.get(key, ())
            new = self.view.service_identities(key)
            self._svc_ids[key] = new
            keys.update(f"dst:{i}" for i in (*old, *new))
            return keys
        if isinstance(e, WorkloadJoined | WorkloadLeft):
            key = f"{e.namespace}/{e.name}"
            keys = {f"wl:{key}"}
            w = self.registry.workloads.get((e.kind, e.namespace, e.name))
            old_backs = self._wl_backs.get(key, ())
            old_id = self._wl_identity.get(key)
            if w is not None:
                bp = self.build_pass()
                new_backs = bp.services_backed_by(w)
                self._wl_backs[key] = new_backs
                self._wl_identity[key] = w.identity
                new_id: str | None = w.identity
            else:
                new_backs = ()
                self._wl_backs.pop(key, None)
                self._wl_identity.pop(key, None)
                new_id = None
            for s in (*old_backs, *new_backs):
                keys.add(f"svc:{s}")
                ids = self.view.service_identities(s)
                self._svc_ids[s] = ids
            keys.update(f"dst:{i}" for i in (old_id, new_id) if i is not None)
            return keys
        return set()

    # ------------------------------------------------------------------ the loop

    async def run(self, *, stop: asyncio.Event) -> None:
        """Wait for the projections to catch up, build every registered node, open the
        server's gate, then rebuild affected proxies after each debounced batch."""
        self._loop = asyncio.get_running_loop()
        caught = asyncio.ensure_future(self.runner.caught_up.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({caught, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            caught.cancel()
            return
        stopping.cancel()
        self._prime()
        self._dirty_keys.add(_ALL)
        self._flush()
        self._ready = True
        if self.server is not None:
            self.server.mark_ready()
        log.info("xDS controller ready: %d proxies registered", len(self._nodes))
        while not stop.is_set():
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return
            if self.debounce > 0:
                await asyncio.sleep(self.debounce)
            self._flush()

    def _prime(self) -> None:
        """Record what each service / workload currently means (for later diffs)."""
        bp = self.build_pass()
        for s in bp.services():
            self._svc_ids[s] = bp.service_identities(s)
        for w in self.registry.workloads.values():
            key = f"{w.namespace}/{w.name}"
            self._wl_backs[key] = bp.services_backed_by(w)
            self._wl_identity[key] = w.identity

    def _flush(self) -> None:
        self._wake.clear()
        new_nodes, self._dirty_nodes = self._dirty_nodes, set()
        if new_nodes:
            self._rebuild(new_nodes, pub=None)
        keys, self._dirty_keys = self._dirty_keys, set()
        events, self._pending_events = self._pending_events, []
        since, self._pending_since = self._pending_since, None
        if not keys and not events:
            return
        if _ALL in keys:
            affected = set(self._nodes)
        else:
            affected = {n for n, st in self._nodes.items() if st.deps & keys}
        self._seq += 1
        pub = Publication(
            seq=self._seq,
            position=self.runner.position.to_json(),
            first_event_at=since if since is not None else time.time(),
            event_ids=events,
        )
        self._rebuild(affected, pub=pub)
        for eid in events:
            self._traces[eid] = pub
            if len(self._traces) > _TRACE_LIMIT:
                self._traces.popitem(last=False)

    def rebuild_all(self) -> None:
        """Rebuild every registered node now (e.g. after an out-of-band change)."""
        self._dirty_keys.add(_ALL)
        self._flush()

    def build_pass(self) -> BuildPass:
        """A fresh :class:`BuildPass` over the current projections (on the loop's thread)."""
        return BuildPass(
            view=self.view,
            certs=self.certs,
            outbound_port=self.outbound_port,
            inbound_port=self.inbound_port,
        )

    def _rebuild(
        self, node_ids: Iterable[str], *, pub: Publication | None
    ) -> dict[str, ProxyBuild]:
        started = time.perf_counter()
        bp = self.build_pass()
        builds: dict[str, ProxyBuild] = {}
        for node_id in sorted(node_ids):
            node = self._nodes.get(node_id)
            if node is None:
                continue
            try:
                build = bp.build(node_id)
            except Exception:
                log.exception(
                    "building the snapshot of %s failed; keeping the previous one", node_id
                )
                continue
            self._builds.inc()
            builds[node_id] = build
            node.deps, node.identity, node.reason = build.deps, build.identity, build.reason
            if build.snapshot is None:
                if build.workload is None:
                    self.cache.clear(node_id=node_id)
                if node.logged != build.reason:
                    log.warning("no snapshot for proxy %s: %s", node_id, build.reason)
                    node.logged = build.reason
                    if build.workload is None:
                        # its streams learn why (placement_problem): an error, not silence
                        self.cache.poke(node_id=node_id)
                continue
            node.logged = ""
            self._publish(node_id, build.snapshot, pub)
        if pub is not None:
            pub.published_at = time.time()
        self._rebuild_seconds.observe(time.perf_counter() - started)
        return builds

    # ------------------------------------------------------------------ debug

    def node_status(self) -> list[dict[str, Any]]:
        """Registered nodes: identity, watchers, why they have no snapshot (if so), versions."""
        out = []
        for node_id in sorted(self._nodes):
            st = self._nodes[node_id]
            snap = self.cache.get(node_id)
            out.append(
                {
                    "node_id": node_id,
                    "identity": st.identity,
                    "connected_streams": st.watchers,
                    "problem": st.reason or None,
                    "versions": {short_name(t): v for t, v in snap.versions().items()}
                    if snap is not None
                    else None,
                }
            )
        return out
