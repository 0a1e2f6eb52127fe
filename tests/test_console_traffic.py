"""Traffic edges of the console's map from real Envoys' stats: three sidecars stream their stats
to the control plane (the metrics service on the ADS port); the map shows the client's edge with
its request rate and no denials, the thief's edge fully denied (403 from the server's RBAC),
and a forged stats stream for another node is refused on an mTLS server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2

from smc.console import mesh_graph
from smc.projections._policyview import PolicyView
from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml
from smc.xds._metrics_sink import (
    METRICS_SERVICE,
    MetricsSink,
    StreamMetricsMessage,
    StreamMetricsResponse,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.envoy]

MESH = """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: store, namespace: traffic}
spec:
  backing: vm
  selector: {app: store}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: routes, namespace: traffic}
spec:
  matches:
  - {name: books, pathRegex: /books, methods: [GET]}
  - {name: sell, pathRegex: /books, methods: [POST]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: buyer-to-store, namespace: traffic}
spec:
  destination: {kind: ServiceAccount, name: store, namespace: traffic}
  rules: [{kind: HTTPRouteGroup, name: routes, matches: [books]}]
  sources: [{kind: ServiceAccount, name: buyer, namespace: traffic}]
---
# the thief may only sell: its GETs reach the store and are denied there (403)
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: thief-sells, namespace: traffic}
spec:
  destination: {kind: ServiceAccount, name: store, namespace: traffic}
  rules: [{kind: HTTPRouteGroup, name: routes, matches: [sell]}]
  sources: [{kind: ServiceAccount, name: thief, namespace: traffic}]
"""


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: Any) -> AsyncIterator[tuple[ControlPlane, dict[str, Sidecar]]]:
    workdir: Path = tmp_path_factory.mktemp("traffic")
    cp = ControlPlane(workdir=workdir)
    await cp.start()
    sidecars = {
        n: Sidecar(namespace="traffic", name=n, address=f"127.0.61.{i}", workdir=workdir)
        for i, n in enumerate(("buyer-1", "thief-1", "store-1"), start=1)
    }
    for s in sidecars.values():
        await s.start_app()
    docs = [
        MESH,
        vm_yaml(sidecars["buyer-1"], service_account="buyer"),
        vm_yaml(sidecars["thief-1"], service_account="thief"),
        vm_yaml(sidecars["store-1"], service_account="store", labels={"app": "store"}),
    ]
    await cp.apply("\n---\n".join(docs))
    for s in sidecars.values():
        await cp.start_proxy(s, delta=False, stats_sink=True)
    for s in sidecars.values():
        assert s.envoy is not None
        await s.envoy.wait_live()
    try:
        yield cp, sidecars
    finally:
        for s in sidecars.values():
            await s.stop()
        await cp.stop()
        cp.close()


async def test_map_shows_request_rate_and_deny_ratio(
    mesh: tuple[ControlPlane, dict[str, Sidecar]],
) -> None:
    cp, sc = mesh
    registry = next(p for p in cp.runner.projections if p.name == "registry")
    policy = next(p for p in cp.runner.projections if p.name == "policy")
    view = PolicyView(registry=registry, policy=policy)  # type: ignore[arg-type]
    codes: dict[str, list[int]] = {"buyer-1": [], "thief-1": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def call(source: str) -> None:
            url = sc[source].outbound + "/books"
            async with session.get(url, headers={"Host": "store.traffic"}) as resp:
                codes[source].append(resp.status)

        deadline = time.monotonic() + 30
        while codes["buyer-1"][-1:] != [200] or codes["thief-1"][-1:] != [403]:
            assert time.monotonic() < deadline, codes  # the policy is in effect
            await asyncio.gather(call("buyer-1"), call("thief-1"))
            await asyncio.sleep(0.1)
        codes = {"buyer-1": [], "thief-1": []}
        found: dict[str, Any] = {}
        while time.monotonic() < deadline:
            await asyncio.gather(*(call(s) for s in ("buyer-1", "thief-1") for _ in range(5)))
            g = mesh_graph(view, traffic=cp.traffic.edges())
            found = {e["id"]: e for e in g["edges"] if "traffic" in e}
            if len(found) >= 2 and all(e["traffic"]["requests"] >= 20 for e in found.values()):
                break
            await asyncio.sleep(0.2)
    assert set(codes["buyer-1"]) == {200} and set(codes["thief-1"]) == {403}, codes
    buyer = found["allow:id:traffic/buyer->svc:traffic/store"]["traffic"]
    assert buyer["rps"] > 0 and buyer["denyRatio"] == 0.0 and buyer["errorRatio"] == 0.0
    # the thief's GETs all reach the store and are denied by its RBAC
    thief = found["allow:id:traffic/thief->svc:traffic/store"]["traffic"]
    assert thief["denyRatio"] == 1.0 and thief["rps"] > 0


async def test_stats_for_another_node_are_refused_over_mtls(tmp_path: Path) -> None:
    """On an mTLS server the metrics stream is checked like ADS: a certificate for one
    identity cannot report traffic as a node of another (here: no certificate at all)."""

    async def refuse(node_id: str, context: grpc.aio.ServicerContext) -> str | None:
        return None if node_id == "traffic/buyer-1" else f"{node_id} is not yours"

    sink = MetricsSink(authorize=refuse)
    server = grpc.aio.server()
    sink.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.stream_unary(
                f"/{METRICS_SERVICE}/StreamMetrics",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=StreamMetricsResponse.FromString,
            )

            def forged(node: str) -> Any:
                msg = StreamMetricsMessage()
                msg.identifier.node = base_pb2.Node(id=node).SerializeToString()
                fam = msg.envoy_metrics.add(
                    name="cluster.outbound|traffic/store|80.upstream_rq_2xx"
                )
                fam.metric.add().counter.value = 1e6
                return msg

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(iter([forged("traffic/store-1")]))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert sink.refused == 1 and sink.edges() == []
            await call(iter([forged("traffic/buyer-1")]))  # its own node: accepted
    finally:
        await server.stop(None)
