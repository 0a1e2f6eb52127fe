"""OSM traffic policy with real Envoys and applications that misbehave on purpose.

One mesh per parameter set (module fixture, Envoys reused across scenarios), in both sidecar
models: the explicit model (loopback addresses 127.18.N.x, applications on 127.0.0.1 behind
each workload's Envoy) in state of the world + strict mode and delta + permissive mode, and the
transparent model (pods: network namespaces on a bridge whose TCP the injector's own iptables
rules send through an Envoy running in the pod as the proxy's UID; the application and a driver
acting for the test run inside the pod, see smc.testing.podapps) in delta + strict and state of
the world + permissive mode: both ADS flavours and both traffic modes run every scenario in both
models. Workloads: ``client-1``, ``mid-1`` (a relay), ``app-1`` and ``app-2`` backing service
``app`` (HTTP 80 -> 8080, TCP 9000). Each scenario applies OSM policies through the real write
path, waits until real traffic shows their effect, checks it, deletes them and checks the
effect is gone; every scenario ends with no NACK from any Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smc.testing.apps import AppSidecar, TcpEcho, tls_server_context
from smc.testing.jaeger import Jaeger
from smc.testing.mesh import ControlPlane, vm_yaml
from smc.testing.netns import NetnsError, PodNetwork
from smc.testing.podapps import SERVICE_VIP, PodAppSidecar
from smc.testing.ratelimit import RateLimitService
from smc.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.envoy]

NS = "traffic"
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
OSM = "apiVersion: policy.openservicemesh.io/v1alpha1"

BASE = """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: app, namespace: traffic}
spec:
  backing: vm
  selector: {app: app}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: raw, port: 9000, targetPort: 9000, protocol: tcp}
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: mid, namespace: traffic}
spec:
  backing: vm
  selector: {app: mid}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: everything, namespace: traffic}
spec:
  matches: [{name: all, pathRegex: ".*", methods: ["*"]}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: raw, namespace: traffic}
spec:
  matches: {ports: [9000]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: to-app, namespace: traffic}
spec:
  destination: {kind: ServiceAccount, name: app, namespace: traffic}
  rules: [{kind: HTTPRouteGroup, name: everything}]
  sources:
  - {kind: ServiceAccount, name: client, namespace: traffic}
  - {kind: ServiceAccount, name: mid, namespace: traffic}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: to-app-raw, namespace: traffic}
spec:
  destination: {kind: ServiceAccount, name: app, namespace: traffic}
  rules: [{kind: TCPRoute, name: raw}]
  sources: [{kind: ServiceAccount, name: client, namespace: traffic}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: to-mid, namespace: traffic}
spec:
  destination: {kind: ServiceAccount, name: mid, namespace: traffic}
  rules: [{kind: HTTPRouteGroup, name: everything}]
  sources: [{kind: ServiceAccount, name: client, namespace: traffic}]
"""


def mesh_config(*, permissive: bool, access_log: Path, enable_egress: bool = True) -> str:
    return f"""
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh, namespace: smc-system}}
spec:
  permissiveTrafficMode: {"true" if permissive else "false"}
  enableEgress: {"true" if enable_egress else "false"}
  observability:
    accessLog: {{format: json, path: {access_log}}}
"""


class Mesh:
    """The mesh of one parameter set; what differs between the sidecar models is here."""

    def __init__(
        self,
        cp: ControlPlane,
        sc: dict[str, Any],
        workdir: Path,
        *,
        net: PodNetwork | None = None,
    ) -> None:
        self.cp = cp
        self.sc = sc
        self.workdir = workdir  # where the sidecars write access logs
        self.net = net
        self.transparent = net is not None
        #: Where test-side services (collector, rate-limit service, egress destinations)
        #: listen so that sidecars reach them: the node (bridge) address for pods.
        self.host_ip = net.gateway if net is not None else "127.0.0.1"
        #: The egress destinations' host name (a name Envoy resolves to host_ip).
        self.external_host = net.gateway if net is not None else "localhost"
        #: What a request to a destination the sidecar has no way to gets: explicit sidecars
        #: have no route (404); transparent ones with enableEgress off close the connection.
        self.denied = 0 if net is not None else 404
        self.session: aiohttp.ClientSession

    def outside(self) -> tuple[str, str]:
        """Two addresses of callers outside the mesh (an ingress and a stranger)."""
        if self.net is not None:
            return self.net.add_address(200), self.net.add_address(201)
        octet = self.sc["app-1"].address.split(".")[2]
        return f"127.18.{octet}.200", f"127.18.{octet}.201"

    def service_url(self, source: str, port: int = 80) -> str:
        """The URL ``source``'s application calls a mesh service's HTTP port at."""
        if self.transparent:
            return f"http://{SERVICE_VIP}:{port}"
        return self.sc[source].outbound  # type: ignore[no-any-return]

    async def set_failing(self, name: str, on: bool) -> None:
        if self.transparent:
            await self.sc[name].set_failing(on)
        else:
            self.sc[name].app.failing = on

    async def tcp(
        self,
        source: str,
        port: int,
        data: bytes,
        *,
        dest: str | None = None,
        tls: tuple[str, str] | None = None,
    ) -> bytes | None:
        """``data`` sent on a connection ``source``'s application opens to ``port`` (of
        ``dest``, default a mesh service; explicit sidecars: the sidecar's listener on that
        port) and what came back until the peer closed; None: no connection or handshake.
        ``tls``: server name and CA file."""
        if self.transparent:
            got: bytes | None = await self.sc[source].tcp(dest or SERVICE_VIP, port, data, tls=tls)
            return got
        ctx = ssl.create_default_context(cafile=tls[1]) if tls else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.sc[source].address,
                    port,
                    ssl=ctx,
                    server_hostname=tls[0] if tls else None,
                ),
                3,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            return None
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 3)
        except (OSError, ssl.SSLError, TimeoutError):
            return b""
        finally:
            writer.close()

    async def get(
        self,
        source: str,
        path: str,
        *,
        host: str = "app.traffic",
        timeout: float = 5.0,
        method: str = "GET",
        dest: tuple[str, int] | None = None,
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        """A request ``source``'s application makes (to ``dest``, default a mesh service's
        port 80; status 0: no answer)."""
        if self.transparent:
            addr, port = dest or (SERVICE_VIP, 80)
            got: tuple[int, dict[str, Any] | None, dict[str, str]] = await self.sc[source].http(
                f"http://{addr}:{port}{path}", host=host, method=method, timeout=timeout
            )
            return got
        url = self.sc[source].outbound + path
        async with self.session.request(
            method, url, headers={"Host": host}, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.json(content_type=None) if resp.status == 200 else None
            return resp.status, body, dict(resp.headers)

    async def status(
        self,
        source: str,
        path: str,
        *,
        host: str = "app.traffic",
        dest: tuple[str, int] | None = None,
    ) -> int:
        return (await self.get(source, path, host=host, dest=dest))[0]

    async def apply(self, text: str, *, delete: bool = False) -> None:
        """Apply (or delete) through the mesh API and wait until every proxy ACKed it."""
        ids = await self.cp.apply(text, delete=delete)

        async def acked() -> bool:
            done = all(self.cp.controller.acked_by_all(i) is not None for i in ids)
            return done and await self.in_sync()

        await until("every proxy ACKed the change", acked)

    async def in_sync(self) -> bool:
        proxies = self.cp.server.proxies()
        if len(proxies) < len(self.sc):
            return False
        for p in proxies:
            snap = self.cp.controller.cache.get(p.node_id)
            if snap is None:
                return False
            for t in TYPES:
                ts = p.types.get(t)
                if ts is None or (not ts.wildcard and not ts.names):
                    continue
                if ts.pending or ts.acked_version != snap.version(t):
                    return False
        return True

    def assert_no_nacks(self) -> None:
        for name, s in self.sc.items():
            if s.envoy is not None:
                assert s.rejected() == {}, f"{name} rejected config"
        assert self.cp.server.nacks() == []


async def until(what: str, check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0) -> float:
    """Poll ``check`` until it is true; the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


#: Tracers send every span at once instead of batching them for up to 5 s (test speed only).
TRACER_FLUSH = {
    "tracing.zipkin.min_flush_spans": 1,
    "tracing.opentelemetry.min_flush_spans": 1,
    "tracing.opentelemetry.flush_interval_ms": 200,
}
#: Access-log files written within 100 ms instead of Envoy's default 10 s (test speed only).
FILE_FLUSH = ("--file-flush-interval-msec", "100")
MODELS = [
    pytest.param(("explicit", False, False), id="sotw-strict"),
    pytest.param(("explicit", True, True), id="delta-permissive"),
    pytest.param(("transparent", True, False), id="transparent-delta-strict"),
    pytest.param(("transparent", False, True), id="transparent-sotw-permissive"),
]
NAMES = {"client-1": "client", "mid-1": "mid", "app-1": "app", "app-2": "app"}
LABELS = {"mid-1": {"app": "mid"}, "app-1": {"app": "app"}, "app-2": {"app": "app"}}


@pytest.fixture(scope="module", params=MODELS)
async def mesh(request: pytest.FixtureRequest, tmp_path_factory: Any) -> AsyncIterator[Mesh]:
    model, delta, permissive = request.param
    workdir: Path = tmp_path_factory.mktemp("traffic")
    net: PodNetwork | None = None
    sc: dict[str, Any]
    if model == "transparent":
        try:
            net = PodNetwork()
        except NetnsError as exc:
            pytest.skip(f"no pod networks here: {exc}")
        logdir = net.workdir / "logs"  # the sidecars write here as the proxy's UID
        logdir.mkdir()
        logdir.chmod(0o777)
        cp = ControlPlane(workdir=workdir, ads_host=net.gateway)
        sc = {n: PodAppSidecar(net=net, namespace=NS, name=n, workdir=net.workdir) for n in NAMES}
    else:
        logdir = workdir
        octet = 2 if delta else 1
        cp = ControlPlane(workdir=workdir)
        sc = {
            n: AppSidecar(namespace=NS, name=n, address=f"127.18.{octet}.{i + 1}", workdir=workdir)
            for i, n in enumerate(NAMES)
        }
    try:
        await cp.start()
        for s in sc.values():
            await s.start_app()
        docs = [BASE, mesh_config(permissive=permissive, access_log=logdir / "access.log")]
        interception = {"smc.dev/interception": "iptables"} if net is not None else {}
        docs += [
            vm_yaml(sc[n], service_account=sa, labels={**LABELS.get(n, {}), **interception})
            for n, sa in NAMES.items()
        ]
        await cp.apply("\n---\n".join(docs))
        for s in sc.values():
            await cp.start_proxy(s, delta=delta, runtime=TRACER_FLUSH, args=FILE_FLUSH)
        m = Mesh(cp, sc, logdir, net=net)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as session:
            m.session = session
            for s in sc.values():
                assert s.envoy is not None
                await s.envoy.wait_live()

            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    return await m.status("client-1", "/") == 200
                return False

            await until("client reaches app", ready, timeout=30)
            if net is not None:  # the transparent model's listeners, on every sidecar
                for s in sc.values():
                    dump = await asyncio.to_thread(
                        s.envoy.config_dump, resource="dynamic_listeners"
                    )
                    names = {c["name"] for c in dump["configs"]}
                    assert {"inbound", "outbound"} <= names, (s.name, names)
            yield m
    finally:
        for s in sc.values():
            await s.stop()
        await cp.stop()
        cp.close()
        if net is not None:
            net.close()


RETRY = f"""
{OSM}
kind: Retry
metadata: {{name: client-retry, namespace: traffic}}
spec:
  source: {{kind: ServiceAccount, name: client, namespace: traffic}}
  destinations: [{{kind: Service, name: app, namespace: traffic}}]
  retryPolicy: {{retryOn: 5xx, numRetries: 10, perTryTimeout: 2s, retryBackoffBaseInterval: 1ms}}
"""


async def success_ratio(mesh: Mesh, source: str, n: int) -> float:
    ok = 0
    for _ in range(n):
        ok += await mesh.status(source, "/flaky") == 200
    return ok / n


async def test_retry_turns_half_failures_into_success(mesh: Mesh) -> None:
    # Without a Retry the app fails about half of the requests.
    assert await success_ratio(mesh, "client-1", 40) < 0.85
    await mesh.apply(RETRY)

    async def retried() -> bool:
        return await success_ratio(mesh, "client-1", 10) == 1.0

    await until("retry policy in effect", retried)
    assert await success_ratio(mesh, "client-1", 200) > 0.99
    # Only the Retry's source retries: mid still sees the failures.
    assert await success_ratio(mesh, "mid-1", 40) < 0.85
    await mesh.apply(RETRY, delete=True)

    async def gone() -> bool:
        return await success_ratio(mesh, "client-1", 20) < 0.9

    await until("retry policy removed", gone)
    mesh.assert_no_nacks()


def uts(spec: str) -> str:
    return f"""
{OSM}
kind: UpstreamTrafficSetting
metadata: {{name: app-settings, namespace: traffic}}
spec:
  host: app.traffic.svc.cluster.local
{spec}"""


async def test_per_route_timeout_cuts_slow_app(mesh: Mesh) -> None:
    assert await mesh.status("client-1", "/slow?ms=700") == 200
    await mesh.apply(uts("  httpRoutes: [{path: /slow, timeout: 300ms}]"))

    async def cut() -> bool:
        return await mesh.status("client-1", "/slow?ms=700") == 504

    await until("route timeout in effect", cut)
    start = time.monotonic()
    assert await mesh.status("client-1", "/slow?ms=2000") == 504
    assert 0.25 < time.monotonic() - start < 1.5
    assert await mesh.status("client-1", "/slow?ms=10") == 200  # fast enough
    assert await mesh.status("client-1", "/other") == 200  # other routes keep 30 s
    await mesh.apply(uts("  httpRoutes: [{path: /slow, timeout: 300ms}]"), delete=True)

    async def uncut() -> bool:
        return await mesh.status("client-1", "/slow?ms=700") == 200

    await until("route timeout removed", uncut)
    mesh.assert_no_nacks()


CIRCUIT = """  connectionSettings:
    tcp: {maxConnections: 1}
    http: {maxPendingRequests: 1, maxRequests: 1}"""


async def burst(mesh: Mesh, n: int, path: str) -> tuple[Counter[int], list[dict[str, str]]]:
    results = await asyncio.gather(*(mesh.get("client-1", path) for _ in range(n)))
    return Counter(r[0] for r in results), [r[2] for r in results if r[0] == 503]


async def test_circuit_breaking_answers_503_past_the_limits(mesh: Mesh) -> None:
    codes, _ = await burst(mesh, 8, "/slow?ms=600")
    assert codes == Counter({200: 8})
    await mesh.apply(uts(CIRCUIT))

    async def tripped() -> bool:
        codes, _ = await burst(mesh, 8, "/slow?ms=600")
        return codes[503] > 0

    await until("circuit breaker in effect", tripped)
    codes, overloaded = await burst(mesh, 8, "/slow?ms=600")
    # One connection, one request and one pending at a time: most of the burst overflows.
    assert 1 <= codes[200] <= 4 and codes[503] >= 4, codes
    assert all(h.get("x-envoy-overloaded") == "true" for h in overloaded)
    await mesh.apply(uts(CIRCUIT), delete=True)

    async def closed() -> bool:
        codes, _ = await burst(mesh, 8, "/slow?ms=300")
        return codes == Counter({200: 8})

    await until("circuit breaker removed", closed)
    mesh.assert_no_nacks()


OUTLIER = """  outlierDetection:
    consecutive5xxErrors: 2
    interval: 500ms
    baseEjectionTime: 2s
    maxEjectionPercent: 100"""


async def test_outlier_detection_ejects_and_brings_back(mesh: Mesh) -> None:
    await mesh.apply(uts(OUTLIER))

    async def apps_seen(n: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(n):
            status, body, _ = await mesh.get("client-1", "/who")
            seen[body["app"] if body else f"status-{status}"] += 1
        return seen

    async def configured() -> bool:  # the cluster has outlier detection once Envoy has it
        assert mesh.sc["client-1"].envoy is not None
        dump = await asyncio.to_thread(mesh.sc["client-1"].envoy.config_dump)
        return "outlier_detection" in str(dump)

    await until("outlier detection configured", configured)
    await mesh.set_failing("app-2", True)
    try:
        seen = await apps_seen(12)
        assert seen["status-500"] <= 4, seen  # ejected after 2 consecutive errors
        seen = await apps_seen(20)
        assert seen == Counter({"app-1": 20}), seen  # the bad endpoint is out
    finally:
        await mesh.set_failing("app-2", False)

    async def back() -> bool:
        return (await apps_seen(6))["app-2"] > 0

    took = await until("ejected endpoint brought back", back, timeout=15)
    assert took < 12
    await mesh.apply(uts(OUTLIER), delete=True)
    mesh.assert_no_nacks()


RATE = """  rateLimit:
    local:
      http:
        requests: 3
        unit: minute
        responseHeadersToAdd: [{name: x-limited, value: "yes"}]
      tcp: {connections: 2, unit: minute}
  httpRoutes:
  - path: /limited
    rateLimit:
      local: {requests: 1, unit: minute, responseStatusCode: 503}"""


async def tcp_roundtrip(mesh: Mesh) -> bool:
    """One connection from the client to app's raw TCP port (through both sidecars)."""
    data = await mesh.tcp(
        "client-1", 9000, b"GET /tcp HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    )
    return bool(data and data.startswith(b"HTTP/1.1 200"))


async def test_local_rate_limits_http_per_route_and_tcp(mesh: Mesh) -> None:
    assert await tcp_roundtrip(mesh)
    await mesh.apply(uts(RATE))

    async def limited() -> bool:
        return await mesh.status("client-1", "/limited") == 503

    await until("per-route limit in effect", limited)
    # The route's own bucket (1 a minute per app sidecar, 2 sidecars) is spent now: 503s.
    codes = Counter([await mesh.status("client-1", "/limited") for _ in range(4)])
    assert codes[503] >= 3 and codes[200] <= 1, codes
    # The virtual host's bucket: 3 a minute per sidecar, then 429 with the configured header.
    results = [await mesh.get("client-1", "/any") for _ in range(10)]
    codes = Counter(r[0] for r in results)
    assert codes[200] <= 6 and codes[429] >= 4, codes
    assert all(r[2].get("x-limited") == "yes" for r in results if r[0] == 429)
    # TCP: 2 connections a minute per sidecar, then the connection is closed.
    tcp = [await tcp_roundtrip(mesh) for _ in range(8)]
    assert tcp.count(True) <= 4 and tcp.count(False) >= 4, tcp
    await mesh.apply(uts(RATE), delete=True)

    async def unlimited() -> bool:
        return await mesh.status("client-1", "/any") == 200 and await tcp_roundtrip(mesh)

    await until("rate limits removed", unlimited)
    mesh.assert_no_nacks()


async def test_egress_by_host_sni_and_ip(mesh: Mesh, tmp_path: Path) -> None:
    """Egress by Host (HTTP), SNI (TLS) and IP range (TCP), per source, narrowed by matches.
    Transparent sidecars pass destinations outside the mesh through unless enableEgress is
    off, so there the scenario runs with it off (explicit sidecars never pass them)."""
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        if request.path.startswith("/slow"):
            await asyncio.sleep(0.6)
        return web.json_response({"app": "external", "tls": request.secure})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    from smc.testing.ports import free_port

    ext = mesh.external_host
    http_port, tls_port = free_port(), free_port()
    server_ctx, ca_file = tls_server_context(tmp_path, "localhost")
    await web.TCPSite(runner, mesh.host_ip, http_port).start()
    await web.TCPSite(runner, mesh.host_ip, tls_port, ssl_context=server_ctx).start()
    echo = TcpEcho(host=mesh.host_ip)
    await echo.start()
    hosts = ", ".join(sorted({"localhost", ext}))
    ports = f"  ports: [{{number: {http_port}, protocol: http}}, {{number: {tls_port}, protocol: https}}]\n"
    egress = f"""
{OSM}
kind: Egress
metadata: {{name: client-web, namespace: traffic}}
spec:
  sources: [{{kind: ServiceAccount, name: client, namespace: traffic}}]
  hosts: [{hosts}]
{ports}---
{OSM}
kind: Egress
metadata: {{name: client-echo, namespace: traffic}}
spec:
  sources: [{{kind: ServiceAccount, name: client, namespace: traffic}}]
  ipAddresses: [{mesh.host_ip}/32]
  ports: [{{number: {echo.port}, protocol: tcp}}]
"""
    egress_matches = (
        egress.replace(
            ports,
            ports
            + "  matches: [{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: ext-api}]\n",
        )
        + """
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: ext-api, namespace: traffic}
spec:
  matches: [{name: read, pathRegex: /allowed/, methods: [GET]}]
"""
    )
    assert "ext-api}]" in egress_matches
    limits = f"""
{OSM}
kind: UpstreamTrafficSetting
metadata: {{name: ext-limits, namespace: traffic}}
spec:
  host: api.external.example
  connectionSettings:
    tcp: {{maxConnections: 1}}
    http: {{maxPendingRequests: 1, maxRequests: 1}}
"""
    egress_limited = egress.replace(
        ports,
        ports + "  matches: [{apiGroup: policy.openservicemesh.io/v1alpha1,"
        " kind: UpstreamTrafficSetting, name: ext-limits}]\n",
    )
    assert "ext-limits}]" in egress_limited

    async def tls_get(sni: str) -> int | None:
        request = f"GET /tls HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
        data = await mesh.tcp(
            "client-1", tls_port, request.encode(), dest=ext, tls=(sni, str(ca_file))
        )
        return int(data.split(b" ", 2)[1]) if data else None

    echo_server = echo

    async def echo_via() -> bytes | None:
        return await mesh.tcp("client-1", echo_server.port, b"ping\n", dest=mesh.host_ip)

    host = f"{ext}:{http_port}"
    web_dest = (ext, http_port)
    permissive = mesh.cp.controller.view.permissive

    async def status(source: str, path: str) -> int:
        return await mesh.status(source, path, host=host, dest=web_dest)

    try:
        if mesh.transparent:
            await mesh.apply(
                mesh_config(
                    permissive=permissive,
                    access_log=mesh.workdir / "access.log",
                    enable_egress=False,
                )
            )
        # Deny: no Egress, no route for the host, no listener (chain) for TLS or TCP.
        assert await status("client-1", "/x") == mesh.denied
        assert await tls_get("localhost") is None
        assert not await echo_via()
        await mesh.apply(egress)

        async def allowed() -> bool:
            return await status("client-1", "/x") == 200

        await until("egress in effect", allowed)
        got, body, _ = await mesh.get("client-1", "/x", host=host, dest=web_dest)
        assert got == 200 and body == {"app": "external", "tls": False}
        assert await tls_get("localhost") == 200  # by SNI, end-to-end TLS to the host
        assert await tls_get("other.example") is None  # any other SNI: closed
        assert await echo_via() == b"echo:ping\n"  # TCP to the listed range
        # Egress is per source: mid may not leave the mesh.
        assert await status("mid-1", "/x") == mesh.denied
        # matches: only the HTTPRouteGroup's paths and methods reach the host.
        await mesh.apply(egress_matches)

        async def narrowed() -> bool:
            return await status("client-1", "/x") == 404

        await until("egress matches in effect", narrowed)
        got, body, _ = await mesh.get("client-1", "/allowed/1", host=host, dest=web_dest)
        assert got == 200 and body == {"app": "external", "tls": False}
        post = await mesh.get("client-1", "/allowed/1", host=host, dest=web_dest, method="POST")
        assert post[0] == 404
        assert await status("client-1", "/v2/allowed") == 404
        assert await tls_get("localhost") == 200  # matches are HTTP only
        # matches naming an UpstreamTrafficSetting (of an external host): its connection
        # settings on the Egress's clusters, i.e. circuit breaking towards the external host.
        await mesh.apply(limits + "---" + egress_limited)

        async def burst() -> tuple[Counter[int], list[dict[str, str]]]:
            results = await asyncio.gather(
                *(mesh.get("client-1", "/slow", host=host, dest=web_dest) for _ in range(8))
            )
            return Counter(r[0] for r in results), [r[2] for r in results if r[0] == 503]

        async def tripped() -> bool:
            return (await burst())[0][503] > 0

        await until("egress circuit breaker in effect", tripped)
        codes, overloaded = await burst()
        assert 1 <= codes[200] <= 4 and codes[503] >= 4, codes
        assert all(h.get("x-envoy-overloaded") == "true" for h in overloaded)
        await mesh.apply(egress_matches, delete=True)  # both Egresses and the group
        await mesh.apply(limits, delete=True)

        async def denied() -> bool:
            return await status("client-1", "/x") == mesh.denied

        await until("egress removed", denied)
        assert not await echo_via()
    finally:
        if mesh.transparent:
            await mesh.apply(
                mesh_config(permissive=permissive, access_log=mesh.workdir / "access.log")
            )
        await echo_server.stop()
        await runner.cleanup()
    mesh.assert_no_nacks()


async def test_ingress_backend_admits_only_the_named_ingress(mesh: Mesh, tmp_path: Path) -> None:
    app = mesh.sc["app-1"]
    url = f"http://{app.address}:8080/ingress"
    https_url = f"https://{app.address}:8080/ingress"
    ingress_ip, stranger_ip = mesh.outside()

    async def plain_from(source_ip: str) -> int | None:
        conn = aiohttp.TCPConnector(force_close=True, local_addr=(source_ip, 0))
        async with aiohttp.ClientSession(connector=conn) as s:
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                    return r.status
            except aiohttp.ClientError:
                return None

    issued = mesh.cp.issuer.issue(
        identity="spiffe://cluster.local/ns/ingress/sa/nginx", lifetime=timedelta(hours=1)
    )
    other = mesh.cp.issuer.issue(
        identity="spiffe://cluster.local/ns/ingress/sa/rogue", lifetime=timedelta(hours=1)
    )
    roots = "".join(mesh.cp.issuer.trust_bundle())

    def tls_context(cert: Any) -> ssl.SSLContext:
        d = tmp_path / cert.identity.replace("/", "_").replace(":", "_")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cert.pem").write_text(cert.cert_pem + cert.chain_pem)
        (d / "key.pem").write_text(cert.private_key_pem)
        ctx = ssl.create_default_context(cadata=roots)
        ctx.check_hostname = False  # the sidecar's certificate names its SPIFFE id
        ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
        return ctx

    async def tls_with(ctx: ssl.SSLContext) -> int | None:
        conn = aiohttp.TCPConnector(force_close=True, ssl=ctx)
        async with aiohttp.ClientSession(connector=conn) as s:
            try:
                async with s.get(https_url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                    return r.status
            except aiohttp.ClientError:
                return None

    policy = f"""
{OSM}
kind: IngressBackend
metadata: {{name: app-ingress, namespace: traffic}}
spec:
  backends: [{{name: app, port: {{number: 8080, protocol: http}}}}]
  sources: [{{kind: IPRange, name: {ingress_ip}/32}}]
"""
    # Without an IngressBackend the port speaks mTLS only.
    assert await plain_from(ingress_ip) is None
    await mesh.apply(policy)

    async def admitted() -> bool:
        return await plain_from(ingress_ip) == 200

    await until("http ingress admitted", admitted)
    assert await plain_from(stranger_ip) == 403
    # Mesh traffic still works over mTLS on the same port.
    assert await mesh.status("client-1", "/") == 200
    https = policy.replace("protocol: http}", "protocol: https}").replace(
        f"sources: [{{kind: IPRange, name: {ingress_ip}/32}}]",
        f"sources: [{{kind: AuthenticatedPrincipal, name: {issued.identity}}}]",
    )
    await mesh.apply(https)
    good, rogue = tls_context(issued), tls_context(other)

    async def over_mtls() -> bool:
        return await tls_with(good) == 200 and await plain_from(ingress_ip) is None

    await until("https ingress admitted", over_mtls)
    # In strict mode only the named principal gets in; permissive mode admits any mesh cert.
    expected = 200 if mesh.cp.controller.view.permissive else 403
    assert await tls_with(rogue) == expected
    # skipClientCertValidation: TLS without a client certificate, from the listed range only.
    skip = policy.replace(
        "protocol: http}}]",
        "protocol: https}, tls: {skipClientCertValidation: true}}]",
    )
    await mesh.apply(skip)
    anonymous = ssl.create_default_context(cadata=roots)
    anonymous.check_hostname = False

    async def tls_from(source_ip: str) -> int | None:
        conn = aiohttp.TCPConnector(force_close=True, ssl=anonymous, local_addr=(source_ip, 0))
        async with aiohttp.ClientSession(connector=conn) as s:
            try:
                async with s.get(https_url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                    return r.status
            except aiohttp.ClientError:
                return None

    async def anonymous_admitted() -> bool:
        return await tls_from(ingress_ip) == 200

    await until("TLS ingress without client certificate", anonymous_admitted)
    assert await tls_from(stranger_ip) is None  # the mTLS chain: no certificate, no handshake
    assert await mesh.status("client-1", "/") == 200
    await mesh.apply(skip, delete=True)
    mesh.assert_no_nacks()


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: Any) -> Iterator[Jaeger]:
    j = Jaeger(workdir=tmp_path_factory.mktemp("jaeger"), receiver_host="0.0.0.0")
    j.start()
    yield j
    j.stop()


def traced_config(mesh: Mesh, *, provider: str, port: int) -> str:
    permissive = mesh.cp.controller.view.permissive
    return mesh_config(permissive=permissive, access_log=mesh.workdir / "access.log") + (
        f"    tracing: {{provider: {provider}, address: {mesh.host_ip}, port: {port},"
        " sampling: 100}\n"
    )


def span_chain(trace: dict[str, Any]) -> list[tuple[str, str]]:
    """The trace's spans from the root down the CHILD_OF references, as (workload, kind)
    (Zipkin names a span's service by the proxy's cluster, ``client-1``; OpenTelemetry by
    its node id, ``traffic/client-1``)."""
    spans = {s["spanID"]: s for s in trace["spans"]}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in trace["spans"]:
        parents = [r["spanID"] for r in s.get("references", []) if r["spanID"] in spans]
        children.setdefault(parents[0] if parents else None, []).append(s)
    chain: list[tuple[str, str]] = []
    level = children.get(None, [])
    while len(level) == 1:
        span = level[0]
        tags = {t["key"]: t["value"] for t in span.get("tags", [])}
        service = trace["processes"][span["processID"]]["serviceName"]
        chain.append((service.rpartition("/")[2], str(tags.get("span.kind"))))
        level = children.get(span["spanID"], [])
    if level:  # more than one child: not a single chain
        chain.append(("several children", str(len(level))))
    return chain


async def traced_request(mesh: Mesh, jaeger: Jaeger, provider: str, port: int) -> None:
    """One request client -> mid -> app with tracing by ``provider``: its spans in Jaeger
    (one trace over the three sidecars) and its lines in every sidecar's JSON access log."""
    await mesh.apply(traced_config(mesh, provider=provider, port=port))
    marker = f"{provider}-{uuid.uuid4().hex[:8]}"
    # client -> mid (a relay) -> app: one request through three sidecars.
    path = f"/relay?to={mesh.service_url('mid-1')}/{marker}&host=app.traffic"
    status, body, _ = await mesh.get("client-1", path, host="mid.traffic")
    assert status == 200 and body is not None and body["upstream"]["path"] == f"/{marker}"
    served_by = body["upstream"]["app"]

    def trace_of_marker() -> dict[str, Any] | None:
        for service in jaeger.services():
            for trace in jaeger.traces(service):
                if marker in json.dumps(trace["spans"]):
                    return trace
        return None

    found: dict[str, Any] = {}

    async def collected() -> bool:
        trace = await asyncio.to_thread(trace_of_marker)
        if trace is None:
            return False
        names = {trace["processes"][s["processID"]]["serviceName"] for s in trace["spans"]}
        found.update(trace=trace, names=names)
        # Zipkin: a client and a server span per hop (4); OpenTelemetry: at least one
        # span per sidecar.
        return len(names) >= 3 and len(trace["spans"]) >= 4

    await until(f"{provider} spans in Jaeger", collected, timeout=20)
    trace = found["trace"]
    assert {s["traceID"] for s in trace["spans"]} == {trace["traceID"]}
    # One span per HTTP connection manager the request crossed, each the child of the one
    # before: the client's egress, mid's ingress and egress, the serving app's ingress.
    assert span_chain(trace) == [
        ("client-1", "client"),
        ("mid-1", "server"),
        ("mid-1", "client"),
        (served_by, "server"),
    ], (provider, span_chain(trace))

    # The same request in the JSON access logs of every sidecar it crossed.
    def logged() -> list[dict[str, Any]]:
        lines = (mesh.workdir / "access.log").read_text().splitlines()
        entries = [json.loads(line) for line in lines if marker in line]
        return entries

    async def all_logged() -> bool:
        return len(await asyncio.to_thread(logged)) >= 4

    await until("access log lines", all_logged)
    entries = logged()
    seen = {(e["node"], e["direction"]) for e in entries}
    assert {
        ("traffic/client-1", "outbound"),
        ("traffic/mid-1", "inbound"),
        ("traffic/mid-1", "outbound"),
        (f"traffic/{served_by}", "inbound"),
    } <= seen, seen
    assert len({e["request_id"] for e in entries}) == 1  # one request id end to end
    assert all(e["response_code"] == 200 for e in entries)
    inbound_app = next(e for e in entries if e["node"] == f"traffic/{served_by}")
    assert inbound_app["peer_identity"] == "spiffe://cluster.local/ns/traffic/sa/mid"


async def test_access_logs_tracing_and_stats(mesh: Mesh, jaeger: Jaeger) -> None:
    for provider, port in (("zipkin", jaeger.zipkin_port), ("opentelemetry", jaeger.otlp_port)):
        await traced_request(mesh, jaeger, provider, port)
    # Envoy's own Prometheus stats carry the mesh's labels.
    client = mesh.sc["client-1"].envoy
    assert client is not None
    text = await asyncio.to_thread(client.prometheus)
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("envoy_cluster_upstream_rq_total{")
        and 'envoy_cluster_name="outbound|traffic/mid|80"' in ln
    )
    assert 'smc_namespace="traffic"' in line and 'smc_workload="client-1"' in line
    assert float(line.rsplit(" ", 1)[1]) >= 2
    # Text access logs in the configured format, to the same file.
    text_log = mesh.workdir / "access-text.log"
    await mesh.apply(
        mesh_config(permissive=mesh.cp.controller.view.permissive, access_log=text_log).replace(
            "format: json", 'format: text, textFormat: "SMC %REQ(:PATH)% %RESPONSE_CODE%"'
        )
    )
    marker = uuid.uuid4().hex[:8]
    assert await mesh.status("client-1", f"/text-{marker}") == 200

    async def text_logged() -> bool:
        return text_log.exists() and f"SMC /text-{marker} 200" in text_log.read_text()

    await until("text access log line", text_logged)
    # Back to the fixture's config: tracing off, no collector cluster any more.
    await mesh.apply(
        mesh_config(
            permissive=mesh.cp.controller.view.permissive, access_log=mesh.workdir / "access.log"
        )
    )
    mesh.assert_no_nacks()


RLS_CONFIG = """
domain: smc-test
descriptors:
  - key: generic_key
    value: app
    rate_limit: {unit: hour, requests_per_unit: 4}
  - key: route
    value: burst
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: connection
    value: raw
    rate_limit: {unit: hour, requests_per_unit: 2}
"""


@pytest.fixture
def rls(tmp_path: Path) -> Iterator[RateLimitService]:
    service = RateLimitService(workdir=tmp_path / "rls", config=RLS_CONFIG, grpc_host="0.0.0.0")
    service.start()
    yield service
    service.stop()


def global_limits(port: int, host: str) -> str:
    # failOpen false refuses a request whose limit the service did not answer in time: a
    # 2 s timeout (the default is 20 ms) keeps a loaded machine from turning slow answers
    # into refusals the counts below do not expect.
    return f"""  rateLimit:
    global:
      http:
        rateLimitService: {{host: {host}, port: {port}}}
        domain: smc-test
        descriptors: [{{entries: [{{genericKey: {{value: app}}}}]}}]
        failOpen: false
        timeout: 2s
      tcp:
        rateLimitService: {{host: {host}, port: {port}}}
        domain: smc-test
        descriptors: [{{entries: [{{key: connection, value: raw}}]}}]
        failOpen: false
        timeout: 2s
  httpRoutes:
  - path: /burst
    rateLimit:
      global:
        descriptors: [{{entries: [{{genericKey: {{key: route, value: burst}}}}]}}]"""


async def test_global_rate_limit_through_the_rate_limit_service(
    mesh: Mesh, rls: RateLimitService
) -> None:
    """Counters in the rate-limit service (Redis) are shared by both app sidecars: the
    limits hold for the service as a whole, not per sidecar."""
    policy = uts(global_limits(rls.grpc_port, mesh.host_ip))
    await mesh.apply(policy)
    # 4 an hour for the whole service, whichever sidecar answers.
    codes = Counter([await mesh.status("client-1", "/any") for _ in range(10)])
    assert codes == Counter({200: 4, 429: 6}), codes
    # The route's own descriptor: 1 an hour.
    codes = Counter([await mesh.status("client-1", "/burst") for _ in range(4)])
    assert codes == Counter({200: 1, 429: 3}), codes
    # TCP: 2 connections an hour, over both sidecars.
    tcp = [await tcp_roundtrip(mesh) for _ in range(6)]
    assert tcp.count(True) == 2, tcp
    # failOpen false: with the service gone, requests are refused, not let through.
    rls.stop()
    assert await mesh.status("client-1", "/other") != 200
    await mesh.apply(policy, delete=True)
    assert await mesh.status("client-1", "/any") == 200 and await tcp_roundtrip(mesh)
    mesh.assert_no_nacks()
