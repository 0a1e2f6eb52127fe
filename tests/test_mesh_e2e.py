"""End-to-end mesh tests: the real control plane programs real Envoy sidecars; real traffic.

The mesh is built through the real write path (manifests -> LiveMeshChanges -> SqliteLog ->
ProjectionRunner -> XdsController -> ADS server), with certificates from a LocalIssuer. Each
workload is a VirtualMachine with its own loopback address (127.0.N.x) where its Envoy sidecar
listens (inbound on the service target port, outbound on 15001) and an aiohttp application on
127.0.0.1 (label smc.dev/app-port). Every scenario runs with state-of-the-world and delta
bootstraps (module-scoped parametrised fixture, Envoys reused across the scenarios), and every
scenario ends by checking that no Envoy rejected (NACKed) anything.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smc.events import deterministic_id
from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml
from smc.testing.serve import admin_session
from smc.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.envoy]

NS = "demo"
SERVER = f"{NS}/server"
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

SERVICES = """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: server, namespace: demo}
spec:
  backing: vm
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: server-v2, namespace: demo}
spec:
  backing: vm
  selector: {app: server-v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: routes, namespace: demo}
spec:
  matches:
  - {name: get-api, pathRegex: "/api", methods: [GET]}
  - {name: post-admin, pathRegex: "/admin", methods: [POST]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: canary, namespace: demo}
spec:
  matches:
  - {name: canary-header, headers: {x-canary: "yes"}}
"""

POLICY_1 = """
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-server, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: server, namespace: demo}
  rules: [{kind: HTTPRouteGroup, name: routes, matches: [get-api]}]
  sources: [{kind: ServiceAccount, name: client, namespace: demo}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: thief-to-server, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: server, namespace: demo}
  rules: [{kind: HTTPRouteGroup, name: routes, matches: [post-admin]}]
  sources: [{kind: ServiceAccount, name: thief, namespace: demo}]
"""

# The change: client may now also POST /admin; thief loses its grant entirely.
POLICY_2 = """
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-server, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: server, namespace: demo}
  rules: [{kind: HTTPRouteGroup, name: routes}]
  sources: [{kind: ServiceAccount, name: client, namespace: demo}]
"""
POLICY_2_DELETE = """
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: thief-to-server, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: server, namespace: demo}
  rules: [{kind: HTTPRouteGroup, name: routes, matches: [post-admin]}]
  sources: [{kind: ServiceAccount, name: thief, namespace: demo}]
"""

SPLIT = """
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: server-split, namespace: demo}
spec:
  service: server
  backends: [{service: server, weight: 90}, {service: server-v2, weight: 10}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: server-canary, namespace: demo}
spec:
  service: server
  matches: [{kind: HTTPRouteGroup, name: canary}]
  backends: [{service: server-v2, weight: 100}]
"""

REQUESTS = (("GET", "/api/items"), ("POST", "/api/items"), ("POST", "/admin"), ("GET", "/admin"))


class Mesh:
    def __init__(self, cp: ControlPlane, sidecars: dict[str, Sidecar], delta: bool) -> None:
        self.cp = cp
        self.sc = sidecars
        self.delta = delta
        self.session: aiohttp.ClientSession

    async def request(
        self,
        source: str,
        method: str,
        path: str,
        *,
        host: str = "server.demo",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        url = self.sc[source].outbound + path
        async with self.session.request(
            method, url, headers={"Host": host, **(headers or {})}
        ) as resp:
            body = await resp.json() if resp.status == 200 else None
            return resp.status, body

    def expected(self, source: str, method: str, path: str) -> bool:
        return self.cp.controller.view.is_allowed(
            source=f"{NS}/{source}", destination=SERVER, method=method, path=path, port=8080
        )

    async def matrix(self) -> dict[tuple[str, str, str], bool]:
        out = {}
        for source in ("client", "thief"):
            for method, path in REQUESTS:
                status, _ = await self.request(source + "-1", method, path)
                out[(source, method, path)] = status == 200
        return out

    def policy_matrix(self) -> dict[tuple[str, str, str], bool]:
        return {(s, m, p): self.expected(s, m, p) for s in ("client", "thief") for m, p in REQUESTS}

    async def converge(self, what: str, timeout: float = 5.0) -> float:
        """Poll the allow/deny matrix until it equals the policy's; returns the seconds taken."""
        start = time.monotonic()
        while True:
            got = await self.matrix()
            want = self.policy_matrix()
            if got == want:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what}: matrix {got} != policy {want} after {timeout}s")
            await asyncio.sleep(0.05)

    def assert_no_nacks(self) -> None:
        for name, s in self.sc.items():
            if s.envoy is not None:
                assert s.rejected() == {}, f"{name} rejected config"
        assert self.cp.server.nacks() == []

    def acked(self) -> dict[str, dict[str, str | None]]:
        """Per node, the ACKed version of every type it watches."""
        out: dict[str, dict[str, str | None]] = {}
        for p in self.cp.server.proxies():
            out[p.node_id] = {
                t: ts.acked_version for t, ts in p.types.items() if ts.wildcard or ts.names
            }
        return out

    def in_sync(self) -> bool:
        """Every connected proxy ACKed exactly its current snapshot, nothing pending."""
        proxies = self.cp.server.proxies()
        if len(proxies) < sum(1 for s in self.sc.values() if s.envoy is not None):
            return False
        for p in proxies:
            snap = self.cp.controller.cache.get(p.node_id)
            if snap is None:
                return False
            for t in TYPES:
                ts = p.types.get(t)
                if ts is None or (not ts.wildcard and not ts.names):
                    if t in (LISTENER, CLUSTER) and snap.entries(t):
                        return False
                    continue  # e.g. no EDS cluster: Envoy does not subscribe to EDS
                if ts.pending or ts.acked_version != snap.version(t):
                    return False
        return True

    async def wait_sync(self, timeout: float = 30.0) -> None:
        """Wait until :meth:`in_sync` (a removal takes two rounds of ACKs: routes, then the
        lingering clusters; on a loaded 2-core machine that can take well over 10 s)."""
        deadline = time.monotonic() + timeout
        while not self.in_sync():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"proxies not in sync after {timeout}s: acked {self.acked()}\n"
                    f"{self.cp.diagnosis()}"
                )
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module", params=[False, True], ids=["sotw", "delta"])
async def mesh(request: pytest.FixtureRequest, tmp_path_factory: Any) -> AsyncIterator[Mesh]:
    delta: bool = request.param
    workdir: Path = tmp_path_factory.mktemp("delta" if delta else "sotw")
    octet = 21 if delta else 11
    cp = ControlPlane(workdir=workdir)
    await cp.start()
    sidecars = {
        "client-1": Sidecar(
            namespace=NS, name="client-1", address=f"127.0.{octet}.1", workdir=workdir
        ),
        "thief-1": Sidecar(
            namespace=NS, name="thief-1", address=f"127.0.{octet}.2", workdir=workdir
        ),
        "server-1": Sidecar(
            namespace=NS, name="server-1", address=f"127.0.{octet}.3", workdir=workdir
        ),
        "server-2": Sidecar(
            namespace=NS, name="server-2", address=f"127.0.{octet}.4", workdir=workdir
        ),
        "server-3": Sidecar(
            namespace=NS, name="server-3", address=f"127.0.{octet}.5", workdir=workdir
        ),
    }
    accounts = {
        "client-1": "client",
        "thief-1": "thief",
        "server-1": "server",
        "server-2": "server",
    }
    labels = {"server-1": {"app": "server"}, "server-2": {"app": "server-v2"}}
    for s in sidecars.values():
        await s.start_app()
    docs = [SERVICES, POLICY_1]
    docs += [
        vm_yaml(sidecars[n], service_account=sa, labels=labels.get(n)) for n, sa in accounts.items()
    ]
    await cp.apply("\n---\n".join(docs))
    for n in accounts:
        await cp.start_proxy(sidecars[n], delta=delta)
    m = Mesh(cp, sidecars, delta)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=5),
    ) as session:
        m.session = session
        for n in accounts:
            env = sidecars[n].envoy
            assert env is not None
            await env.wait_live()
        yield m
    for s in sidecars.values():
        await s.stop()
    await cp.stop()
    cp.close()


async def test_allow_deny_matrix_follows_policy(mesh: Mesh) -> None:
    await mesh.wait_sync()
    # Phase 1: client may GET /api, thief may POST /admin; all else denied.
    await mesh.converge("initial policy")
    got = await mesh.matrix()
    assert got == {
        ("client", "GET", "/api/items"): True,
        ("client", "POST", "/api/items"): False,
        ("client", "POST", "/admin"): False,
        ("client", "GET", "/admin"): False,
        ("thief", "GET", "/api/items"): False,
        ("thief", "POST", "/api/items"): False,
        ("thief", "POST", "/admin"): True,
        ("thief", "GET", "/admin"): False,
    }
    # The server app sees the caller's SPIFFE identity (mTLS, XFCC set by the server sidecar).
    status, body = await mesh.request("client-1", "GET", "/api/x")
    assert status == 200 and body is not None
    assert body["app"] == "server-1"
    assert "URI=spiffe://cluster.local/ns/demo/sa/client" in body["xfcc"]
    status, _ = await mesh.request("client-1", "POST", "/api/x")
    assert status == 403  # denied by the server sidecar's RBAC filter

    # Phase 2: an SMI change; the real traffic matrix must follow within 5 s.
    ids = await mesh.cp.apply(POLICY_2)
    ids += await mesh.cp.apply(POLICY_2_DELETE, delete=True)
    took = await mesh.converge("after SMI change", timeout=5.0)
    assert took < 5.0
    got = await mesh.matrix()
    assert got[("client", "POST", "/admin")] and not got[("client", "GET", "/admin")]
    assert not any(v for (s, _, _), v in got.items() if s == "thief")
    # thief ends with no route to server at all (its outbound lost the virtual host): 404.
    deadline = time.monotonic() + 5
    while (await mesh.request("thief-1", "POST", "/admin"))[0] != 404:
        assert time.monotonic() < deadline, "thief still has a route to server"
        await asyncio.sleep(0.05)
    # Causal chain: the change was carried by a config version every affected proxy ACKed.
    at = await mesh.cp.controller.wait_acked(ids[-1], timeout=5.0)
    trace = mesh.cp.controller.trace(ids[-1])
    assert trace is not None and trace["proxies"]
    assert all(p["acked_at"] is not None and p["acked_at"] <= at for p in trace["proxies"].values())
    await mesh.wait_sync()
    mesh.assert_no_nacks()


def _binomial_interval(n: int, p: float, confidence: float) -> tuple[int, int]:
    """Smallest central interval [lo, hi] holding ``confidence`` of Binomial(n, p)."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    tail = (1 - confidence) / 2
    acc, lo = 0.0, 0
    while acc + pmf[lo] < tail:
        acc += pmf[lo]
        lo += 1
    acc, hi = 0.0, n
    while acc + pmf[hi] < tail:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


async def test_traffic_split_90_10_and_ab_header(mesh: Mesh) -> None:
    await mesh.cp.apply(SPLIT)
    # Wait for the split to be in effect: the canary header goes to v2 only.
    deadline = time.monotonic() + 5
    while True:
        status, body = await mesh.request("client-1", "GET", "/api/ab", headers={"x-canary": "yes"})
        if status == 200 and body is not None and body["app"] == "server-2":
            break
        assert time.monotonic() < deadline, "A/B route not in effect after 5 s"
        await asyncio.sleep(0.05)
    await mesh.wait_sync()
    for _ in range(20):
        status, body = await mesh.request("client-1", "GET", "/api/ab", headers={"x-canary": "yes"})
        assert status == 200 and body is not None and body["app"] == "server-2"
    n = 400
    sem = asyncio.Semaphore(16)

    async def one() -> str:
        async with sem:
            status, body = await mesh.request("client-1", "GET", "/api/split")
            assert status == 200 and body is not None
            return str(body["app"])

    counts = Counter(await asyncio.gather(*(one() for _ in range(n))))
    assert set(counts) <= {"server-1", "server-2"}
    lo, hi = _binomial_interval(n, 0.10, 0.999)
    assert lo <= counts["server-2"] <= hi, (counts, (lo, hi))
    mesh.assert_no_nacks()


async def test_endpoint_added_and_removed(mesh: Mesh) -> None:
    await mesh.cp.apply(SPLIT, delete=True)
    new = mesh.sc["server-3"]
    await mesh.cp.apply(vm_yaml(new, service_account="server", labels={"app": "server"}))
    await mesh.cp.start_proxy(new, delta=mesh.delta)
    assert new.envoy is not None
    await new.envoy.wait_live()
    failures: list[int] = []
    seen: Counter[str] = Counter()
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            try:
                status, body = await mesh.request("client-1", "GET", "/api/ep")
            except (aiohttp.ClientError, TimeoutError):
                status, body = -1, None
            if status != 200 or body is None:
                failures.append(status)
            else:
                seen[str(body["app"])] += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(traffic())
    try:
        deadline = time.monotonic() + 5
        while seen["server-3"] < 5:
            assert time.monotonic() < deadline, f"new endpoint got no traffic: {seen}"
            await asyncio.sleep(0.05)
        # Remove server-1 from the mesh; once traffic left it, its sidecar and app stop.
        old = mesh.sc["server-1"]
        await mesh.cp.apply(
            vm_yaml(old, service_account="server", labels={"app": "server"}), delete=True
        )
        await asyncio.sleep(0.3)
        seen.clear()
        await asyncio.sleep(0.5)
        assert seen["server-3"] > 0 and seen["server-1"] == 0, seen
        await old.stop()
        seen.clear()
        await asyncio.sleep(0.5)
        assert seen["server-3"] > 0 and set(seen) == {"server-3"}, seen
    finally:
        stop.set()
        await task
    assert failures == [], failures
    mesh.assert_no_nacks()


async def test_control_plane_restart_keeps_config(mesh: Mesh) -> None:
    await mesh.wait_sync()
    before = mesh.acked()
    snaps_before = {n: mesh.cp.controller.cache.get(n) for n in before}
    pushes = {s: (s_.envoy.stats() if s_.envoy else {}) for s, s_ in mesh.sc.items()}
    await mesh.cp.restart()
    # Traffic keeps working while and after the control plane restarts.
    status, _ = await mesh.request("client-1", "GET", "/api/after-restart")
    assert status == 200
    await mesh.wait_sync(timeout=20)
    after = mesh.acked()
    assert after == before
    for n, snap in snaps_before.items():
        new = mesh.cp.controller.cache.get(n)
        assert snap is not None and new is not None
        assert {t: new.version(t) for t in TYPES} == {t: snap.version(t) for t in TYPES}
    # Envoy saw no config change: no listener was added, modified or removed.
    for name, s in mesh.sc.items():
        if s.envoy is None:
            continue
        stats = s.envoy.stats()
        for key in ("listener_manager.listener_modified", "listener_manager.listener_added"):
            assert stats.get(key, 0) == pushes[name].get(key, 0), (name, key)
    await mesh.converge("after restart")
    mesh.assert_no_nacks()


SERVER_V2 = SERVICES.split("---")[1]


async def test_service_removed_routes_go_before_clusters(mesh: Mesh) -> None:
    """Make-before-break for removals: when a service goes away, the client's route stops
    pointing at its cluster before the cluster is removed, so a steady request stream sees
    200 then 404 (no route), never 503 (a route to a cluster Envoy no longer has)."""
    await mesh.wait_sync()
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            try:
                status, _ = await mesh.request("client-1", "GET", "/api/v2", host="server-v2.demo")
            except (aiohttp.ClientError, TimeoutError):
                status = -1
            statuses.append(status)
            await asyncio.sleep(0.002)

    for round_ in range(3):
        statuses.clear()
        task = asyncio.create_task(traffic())
        try:
            deadline = time.monotonic() + 5
            while 200 not in statuses:
                assert time.monotonic() < deadline, f"server-v2 unreachable: {statuses[-5:]}"
                await asyncio.sleep(0.02)
            await mesh.cp.apply(SERVER_V2, delete=True)
            deadline = time.monotonic() + 5
            while statuses[-1] != 404:
                assert time.monotonic() < deadline, f"route to server-v2 still there ({round_})"
                await asyncio.sleep(0.02)
            await mesh.wait_sync()
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await task
            stop.clear()
        assert set(statuses) <= {200, 404}, Counter(statuses)
        # The removal finished: no cluster of server-v2 lingers in the published config.
        snap = mesh.cp.controller.cache.get("demo/client-1")
        assert snap is not None and not any("server-v2" in n for n in snap.names(CLUSTER))
        await mesh.cp.apply(SERVER_V2)
        await mesh.wait_sync()
    mesh.assert_no_nacks()


async def test_smc_serve_xds_debug_endpoints_and_proxy_status(tmp_path: Path) -> None:
    """``smc serve --xds ... --ca local:DIR`` as a real process (agents make the keys, cleartext
    ADS carries none): an Envoy gets its config; the debug endpoints, /metrics and ``smc proxy
    status`` show it."""
    import os
    import subprocess
    import sys

    from smc.testing.ports import free_port

    http_port, xds_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent.parent),
        "SMC_CONFIG_DIR": str(tmp_path / "cfg"),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from smc.cli import main; main()",
        "--log",
        f"sqlite:///{tmp_path / 'smc.db'}",
        "serve",
        "--http",
        f"127.0.0.1:{http_port}",
        "--xds",
        f"127.0.0.1:{xds_port}",
        "--ca",
        f"local:{tmp_path / 'ca'}",
        "--ca-listen",
        f"127.0.0.1:{free_port()}",
        "--xds-plaintext",  # agents (serve's default): no key on ADS
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    url = f"https://127.0.0.1:{http_port}"
    sidecar = Sidecar(namespace=NS, name="client-1", address="127.0.41.1", workdir=tmp_path)
    try:
        async with await admin_session(tmp_path / "cfg", http_port) as s:
            deadline = time.monotonic() + 30
            while True:
                assert time.monotonic() < deadline, "serve did not come up"
                try:
                    async with s.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            server_vm = Sidecar(
                namespace=NS, name="server-1", address="127.0.41.2", workdir=tmp_path
            )
            body = "\n---\n".join(
                [
                    SERVICES,
                    vm_yaml(sidecar, service_account="client"),
                    vm_yaml(server_vm, service_account="server", labels={"app": "server"}),
                ]
            )
            async with s.post(url + "/v1/apply", data=body) as r:
                assert r.status == 200, await r.text()
                applied = await r.json()
            # the test is the proxy's host: its own throwaway key where an agent would write
            sidecar.start_envoy(ads_port=xds_port, delta=False, own_secret=True)
            assert sidecar.envoy is not None
            await sidecar.envoy.wait_live()
            await sidecar.envoy.wait_listener("outbound")
            # /debug/proxies: the stream, ACKed versions, no NACK.
            while True:
                async with s.get(url + "/debug/proxies") as r:
                    view = await r.json()
                rows = [p for p in view["proxies"] if p["node_id"] == "demo/client-1"]
                if rows and rows[0]["types"].get("Listener", {}).get("acked_version"):
                    break
                assert time.monotonic() < deadline + 30, view
                await asyncio.sleep(0.05)
            assert view["ready"] is True and view["nacks"] == []
            assert rows[0]["kind"] == "sotw"
            # /debug/config_dump: the snapshot, private key redacted.
            async with s.get(url + "/debug/config_dump", params={"node": "demo/client-1"}) as r:
                assert r.status == 200
                dump = await r.json()
            listeners = {x["name"] for x in dump["resources"]["Listener"]}
            assert "outbound" in listeners
            # agents make the keys: the control plane's snapshot holds the roots, no key
            assert {x["name"] for x in dump["resources"]["Secret"]} == {"ROOTCA"}
            assert "PRIVATE KEY" not in json.dumps(dump)
            assert dump["versions"]["Listener"] == rows[0]["types"]["Listener"]["acked_version"]
            async with s.get(url + "/debug/config_dump", params={"node": "demo/nope"}) as r:
                assert r.status == 404
            async with s.get(url + "/debug/config_dump") as r:
                assert r.status == 400
            # /debug/events/<id>: an event's causal chain. Granting client access to server
            # changes client-1's outbound config; the trace names the versions and the ACK.
            assert applied["events"] >= 1
            grant = POLICY_1.split("---")[0]
            async with s.post(
                url + "/v1/apply", data=grant, headers={"X-Request-Id": "grant-1"}
            ) as r:
                assert r.status == 200, await r.text()
            event_id = deterministic_id("api", "grant-1", "TrafficTarget/demo/client-to-server")
            while True:
                async with s.get(url + f"/debug/events/{event_id}") as r:
                    trace = await r.json() if r.status == 200 else {}
                node = trace.get("proxies", {}).get("demo/client-1")
                if node is not None and node["acked_at"] is not None:
                    break
                assert time.monotonic() < deadline + 60, trace
                await asyncio.sleep(0.05)
            assert node["acked_at"] >= trace["published_at"] >= trace["received_at"]
            assert set(node["types"]) >= {"RouteConfiguration", "Cluster"}
            assert trace["position"]["smc.policy:0"] >= 1
            async with s.get(url + "/debug/events/not-an-event") as r:
                assert r.status == 404
            # /metrics: Prometheus text with the xDS series.
            async with s.get(url + "/metrics") as r:
                text = await r.text()
            assert "smc_xds_connected_proxies" in text and "smc_xds_pushes_total" in text
            assert "smc_xds_proxy_builds_total" in text
        # smc proxy status, as a user runs it.
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "smc.cli", "proxy", "status", "--server", url],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["NODE", "KIND", "CDS"]
        row = next(line for line in lines if line.startswith("demo/client-1"))
        assert row.split()[1] == "sotw" and row.split()[-1] == "-"
        assert sidecar.rejected() == {}
        bad = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "smc.cli", "proxy", "status", "--server", "http://127.0.0.1:1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert bad.returncode == 1 and "cannot reach" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        await sidecar.stop()
        proc.send_signal(__import__("signal").SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert b"xDS (ADS) on" in err
