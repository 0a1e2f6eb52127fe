"""Proxyless gRPC: real grpcio xDS clients and servers as mesh members, no Envoy.

The control plane (real write path, CA on the log) serves ADS. Two grpcio servers
(``xds=True``, xDS server credentials) back ``greeter-v1`` and ``greeter-v2``, split 50/50 by
a TrafficSplit of ``greeter``; grpcio clients call ``xds:///greeter.demo``. Each process has
its own bootstrap (:func:`smc.xds._grpc.grpc_bootstrap`): node id of its registered VM
workload, the ``file_watcher`` certificate provider on files holding its mesh certificate
(written from the control plane's key store, rewritten on rotation). Checked: an allowed RPC
succeeds over mTLS (the server sees the client's SPIFFE id), the split spreads calls,
an RPC the TrafficTarget does not grant is denied by the server (PERMISSION_DENIED, RBAC), a
client with no grant or a name no service has fails at once (LDS does not exist, no 15 s
wait), a rotated client certificate is picked up, and gRPC NACKs nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from smc.agent import Agent, AgentConfig
from smc.testing.mesh import ControlPlane
from smc.xds import LISTENER, ROUTE
from smc.xds._grpc import GRPC_PREFIX, grpc_bootstrap

pytestmark = [pytest.mark.asyncio(loop_scope="session")]  # the fixtures' loop

NS = "demo"
PORT = 50051
TRUST = "cluster.local"
LIFETIME = timedelta(seconds=12)

MESH = f"""
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {{name: greeter, namespace: {NS}}}
spec:
  backing: vm
  selector: {{app: greeter}}
  ports: [{{name: grpc, port: {PORT}, protocol: grpc}}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {{name: greeter-v1, namespace: {NS}}}
spec:
  backing: vm
  selector: {{app: greeter, version: v1}}
  ports: [{{name: grpc, port: {PORT}, protocol: grpc}}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {{name: greeter-v2, namespace: {NS}}}
spec:
  backing: vm
  selector: {{app: greeter, version: v2}}
  ports: [{{name: grpc, port: {PORT}, protocol: grpc}}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{name: greeter-split, namespace: {NS}}}
spec:
  service: greeter
  backends: [{{service: greeter-v1, weight: 50}}, {{service: greeter-v2, weight: 50}}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: greeter-rpcs, namespace: {NS}}}
spec:
  matches:
  - {{name: say-hello, pathRegex: "/demo.Greeter/SayHello"}}
  - {{name: say-goodbye, pathRegex: "/demo.Greeter/SayGoodbye"}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: client-greets, namespace: {NS}}}
spec:
  destination: {{kind: ServiceAccount, name: greeter, namespace: {NS}}}
  rules: [{{kind: HTTPRouteGroup, name: greeter-rpcs, matches: [say-hello]}}]
  sources: [{{kind: ServiceAccount, name: client, namespace: {NS}}}]
"""

# (workload, service account, address, labels)
WORKLOADS = [
    ("greeter-v1-1", "greeter", "127.0.41.1", {"app": "greeter", "version": "v1"}),
    ("greeter-v2-1", "greeter", "127.0.41.2", {"app": "greeter", "version": "v2"}),
    ("client-1", "client", "127.0.41.3", {"app": "client"}),
    ("thief-1", "thief", "127.0.41.4", {"app": "thief"}),
]


def vm(name: str, sa: str, address: str, labels: dict[str, str]) -> str:
    lines = "".join(f"\n    {k}: {v}" for k, v in labels.items())
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
        f"metadata:\n  name: {name}\n  namespace: {NS}\n  labels:{lines}\n"
        f"spec:\n  address: {address}\n  serviceAccount: {sa}\n"
    )


class Grpc:
    def __init__(self, cp: ControlPlane, workdir: Path) -> None:
        self.cp = cp
        self.workdir = workdir
        self.servers: list[subprocess.Popen[str]] = []
        self.agents: dict[str, Agent] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.stop_agents = asyncio.Event()

    def folder(self, workload: str) -> Path:
        return self.workdir / workload

    async def start_agent(self, workload: str, sa: str) -> Agent:
        """The workload's SMC agent: its key made here, a CSR with a one-time join token,
        the certificate, key and trust bundle written where the bootstrap's file_watcher
        provider reads them, renewed in place."""
        d = self.folder(workload)
        d.mkdir(exist_ok=True)
        token = await self.cp.join_token(namespace=NS, name=workload, service_account=sa)
        token_file = d / "join-token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        agent = Agent(
            AgentConfig(
                proxy=f"{NS}/{workload}",
                ca_address=f"127.0.0.1:{self.cp.ca_port}",
                ca_bundle_pem=self.cp.ca_bundle(),
                proxy_dir=d,
                join_token_file=token_file,
                retry_initial=0.1,
                cert_dir=d,
            )
        )
        self.agents[workload] = agent
        self.tasks.append(asyncio.create_task(agent.run(stop=self.stop_agents)))
        await asyncio.wait_for(agent.ready.wait(), timeout=30)
        return agent

    def serial(self, workload: str) -> str:
        """The serial of the certificate in the workload's cert.pem."""
        pem = (self.folder(workload) / "cert.pem").read_bytes()
        return format(x509.load_pem_x509_certificate(pem).serial_number, "x")

    def env(self, workload: str) -> dict[str, str]:
        d = self.folder(workload)
        boot = grpc_bootstrap(
            node_id=f"{NS}/{workload}",
            ads_address=f"127.0.0.1:{self.cp.port}",
            cert_file=str(d / "cert.pem"),
            key_file=str(d / "key.pem"),
            ca_file=str(d / "ca.pem"),
        )
        path = d / "bootstrap.json"
        path.write_text(json.dumps(boot))
        # gRPC 1.85 reads the server's per-resource errors (xRFC TP3) behind this switch;
        # without it a missing name still fails, after gRPC's own 15 s timer.
        return {
            **os.environ,
            "GRPC_XDS_BOOTSTRAP": str(path),
            "GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING": "true",
        }

    def start_server(self, workload: str, address: str) -> None:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smc.testing.grpcapp",
                "serve",
                "--name",
                workload,
                "--address",
                address,
                "--port",
                str(PORT),
            ],
            env=self.env(workload),
            stdout=subprocess.PIPE,
            stderr=(self.folder(workload) / "server.log").open("w"),
            text=True,
        )
        self.servers.append(proc)

    async def call(self, workload: str, *args: str) -> list[dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "smc.testing.grpcapp",
            "call",
            *args,
            env=self.env(workload),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        rows = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        assert proc.returncode == 0, (
            f"{workload} {args}: rc {proc.returncode} {rows} {err[-2000:]!r}"
        )
        return rows

    def stop(self) -> None:
        for p in self.servers:
            p.terminate()
        for p in self.servers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
async def grpc_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grpc]:
    workdir = tmp_path_factory.mktemp("grpc")
    # Agents make the keys beside the workloads; the control plane holds none. Proxy
    # certificates live 12 s, so agents renew them while the tests run.
    cp = ControlPlane(workdir=workdir, agents=True, proxy_cert_lifetime=LIFETIME)
    await cp.start()
    g = Grpc(cp, workdir)
    try:
        await cp.apply("\n---\n".join([MESH, *(vm(*w) for w in WORKLOADS)]))
        for name, sa, _, _ in WORKLOADS:
            await g.start_agent(name, sa)
        for name, _, address, _ in WORKLOADS[:2]:
            g.start_server(name, address)
        # An xDS server listens once its listener came over xDS: wait for both.
        for name, _, address, _ in WORKLOADS[:2]:
            deadline = time.monotonic() + 60
            while not await listening(address, PORT):
                assert time.monotonic() < deadline, (
                    f"{name} never listened: {(g.folder(name) / 'server.log').read_text()[-2000:]}"
                )
                await asyncio.sleep(0.1)
        yield g
    finally:
        g.stop()
        g.stop_agents.set()
        await asyncio.gather(*g.tasks, return_exceptions=True)
        await cp.stop()
        cp.close()


async def listening(address: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def assert_no_nacks(g: Grpc) -> None:
    assert g.cp.server.nacks() == []
    for p in g.cp.server.proxies():
        for t, ts in p.types.items():
            assert ts.last_nack is None, (p.node_id, t, ts.last_nack)


async def test_allowed_rpc_is_split_over_mtls(grpc_mesh: Grpc) -> None:
    rows = await grpc_mesh.call(
        "client-1",
        "--target",
        "xds:///greeter.demo",
        "--wait-for",
        "OK",
        "--within",
        "60",
        "--count",
        "40",
    )
    assert all(r["code"] == "OK" for r in rows), [r for r in rows if r["code"] != "OK"]
    seen = Counter(r["reply"]["server"] for r in rows)
    # P(a count < 8 of 40 at p = 0.5) < 1e-5
    assert seen["greeter-v1-1"] >= 8 and seen["greeter-v2-1"] >= 8, seen
    # mTLS: the server saw the client's SPIFFE id in its certificate
    assert {tuple(r["reply"]["peer"]["san"]) for r in rows} == {
        (f"spiffe://{TRUST}/ns/{NS}/sa/client",)
    }
    # every name form of the service resolves (LDS named as gRPC asks)
    for target in ("greeter.demo.svc.cluster.local", f"greeter.demo:{PORT}", "greeter.demo.svc"):
        rows = await grpc_mesh.call("client-1", "--target", f"xds:///{target}")
        assert rows[0]["code"] == "OK", (target, rows)
    proxies = {p.node_id for p in grpc_mesh.cp.server.proxies()}
    assert {GRPC_PREFIX + f"{NS}/greeter-v1-1", GRPC_PREFIX + f"{NS}/greeter-v2-1"} <= proxies
    assert_no_nacks(grpc_mesh)


async def test_rpc_not_granted_is_denied_by_the_server(grpc_mesh: Grpc) -> None:
    await grpc_mesh.call(
        "client-1", "--target", "xds:///greeter.demo", "--wait-for", "OK", "--within", "60"
    )
    rows = await grpc_mesh.call(
        "client-1", "--target", "xds:///greeter.demo", "--method", "SayGoodbye", "--count", "4"
    )
    assert {r["code"] for r in rows} == {"PERMISSION_DENIED"}, rows
    # granting it (a policy change) lets it through, without restarting anything
    await grpc_mesh.cp.apply(
        MESH.replace("matches: [say-hello]", "matches: [say-hello, say-goodbye]")
    )
    rows = await grpc_mesh.call(
        "client-1",
        "--target",
        "xds:///greeter.demo",
        "--method",
        "SayGoodbye",
        "--wait-for",
        "OK",
        "--within",
        "30",
        "--count",
        "4",
    )
    assert {r["code"] for r in rows} == {"OK"}, rows  # both servers took the new policy
    await grpc_mesh.cp.apply(MESH)
    rows = await grpc_mesh.call(
        "client-1",
        "--target",
        "xds:///greeter.demo",
        "--method",
        "SayGoodbye",
        "--wait-for",
        "PERMISSION_DENIED",
        "--within",
        "30",
        "--count",
        "0",
    )
    assert rows == []
    assert_no_nacks(grpc_mesh)


async def test_unknown_or_unreachable_name_fails_fast(grpc_mesh: Grpc) -> None:
    await grpc_mesh.call(
        "client-1", "--target", "xds:///greeter.demo", "--wait-for", "OK", "--within", "60"
    )
    # thief has no TrafficTarget: no listener for greeter; nope.demo exists nowhere
    for workload, target in (("thief-1", "greeter.demo"), ("client-1", "nope.demo")):
        rows = await grpc_mesh.call(workload, "--target", f"xds:///{target}", "--timeout", "30")
        assert rows[0]["code"] == "UNAVAILABLE", rows
        assert rows[0]["seconds"] < 10, rows  # gRPC's does-not-exist timer is 15 s
        assert "does not exist" in rows[0]["details"], rows
    assert_no_nacks(grpc_mesh)


async def test_renewed_certificates_are_used(grpc_mesh: Grpc) -> None:
    """The agents renew every certificate (fresh key, same identity) while the servers keep
    running: gRPC's file_watcher provider picks the new files up, calls keep succeeding, and
    the server sees the client's new certificate."""
    await grpc_mesh.call(
        "client-1", "--target", "xds:///greeter.demo", "--wait-for", "OK", "--within", "60"
    )
    client = grpc_mesh.agents["client-1"]
    servers = [grpc_mesh.agents[w] for w, _, _, _ in WORKLOADS[:2]]
    before = grpc_mesh.serial("client-1")
    renewed = {a: a.renewals for a in (client, *servers)}
    deadline = time.monotonic() + LIFETIME.total_seconds() * 2
    while any(a.renewals == n for a, n in renewed.items()):
        assert time.monotonic() < deadline, "agents did not renew"
        await asyncio.sleep(0.2)
    after = grpc_mesh.serial("client-1")
    assert after != before
    key = grpc_mesh.folder("client-1") / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    rows = await grpc_mesh.call(
        "client-1", "--target", "xds:///greeter.demo", "--count", "20", "--timeout", "10"
    )
    assert all(r["code"] == "OK" for r in rows), rows
    served = {r["reply"]["peer"]["serial"] for r in rows}
    assert served <= {after, grpc_mesh.serial("client-1")}, (served, before)
    assert {r["reply"]["server"] for r in rows} == {"greeter-v1-1", "greeter-v2-1"}
    assert_no_nacks(grpc_mesh)


async def test_named_lds_is_answered_at_once_with_not_found(grpc_mesh: Grpc) -> None:
    """At the protocol level, whatever the client: a gRPC node asking LDS for a name SMC does
    not have gets a response right away, carrying a NOT_FOUND resource error for it next to
    the names it does have."""
    d = grpc_mesh.folder("client-1")  # ADS is mTLS: the workload's own certificate
    creds = grpc.ssl_channel_credentials(
        root_certificates=(d / "ca.pem").read_bytes(),
        private_key=(d / "key.pem").read_bytes(),
        certificate_chain=(d / "cert.pem").read_bytes(),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{grpc_mesh.cp.port}", creds) as chan:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(chan)
        done = asyncio.Event()
        node = base_pb2.Node(id=f"{NS}/client-1", user_agent_name="gRPC C-core linux Python")

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            yield discovery_pb2.DiscoveryRequest(
                type_url=LISTENER, node=node, resource_names=["nope.demo", "greeter.demo"]
            )
            await done.wait()

        call = stub.StreamAggregatedResources(requests())
        t0 = time.monotonic()
        try:
            resp = await asyncio.wait_for(call.read(), 5)
        finally:
            done.set()
            call.cancel()
    assert time.monotonic() - t0 < 2
    assert [r.resource_name.name for r in resp.resource_errors] == ["nope.demo"]
    assert resp.resource_errors[0].error_detail.code == grpc.StatusCode.NOT_FOUND.value[0]
    names = []
    for any_ in resp.resources:
        lis = listener_pb2.Listener()
        any_.Unpack(lis)
        names.append(lis.name)
    assert names == ["greeter.demo"]


CANARY = f"""
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: canary, namespace: {NS}}}
spec:
  matches:
  - name: canary-users
    headers:
    - x-canary: "yes"
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{name: greeter-canary, namespace: {NS}}}
spec:
  service: greeter
  matches: [{{kind: HTTPRouteGroup, name: canary}}]
  backends: [{{service: greeter-v2, weight: 100}}]
"""


async def test_split_matches_route_by_metadata(grpc_mesh: Grpc) -> None:
    """A TrafficSplit with ``matches`` (A/B): RPCs carrying the metadata go to v2 only, the
    others keep the 50/50 split."""
    await grpc_mesh.cp.apply(CANARY)
    try:
        # the client's route configuration has the A/B route before a new client asks for it
        node, name = f"{GRPC_PREFIX}{NS}/client-1", f"grpc|{NS}/greeter|{PORT}"
        deadline = time.monotonic() + 10
        while True:
            snap = grpc_mesh.cp.controller.cache.get(node)
            route = snap.resource(ROUTE, name) if snap is not None else None
            if route is not None and len(route.virtual_hosts[0].routes) == 2:
                break
            assert time.monotonic() < deadline, f"no A/B route in {route}"
            await asyncio.sleep(0.05)
        rows = await grpc_mesh.call(
            "client-1",
            "--target",
            "xds:///greeter.demo",
            "--metadata",
            "x-canary=yes",
            "--count",
            "20",
        )
        assert {r["reply"]["server"] for r in rows} == {"greeter-v2-1"}, rows
        rows = await grpc_mesh.call("client-1", "--target", "xds:///greeter.demo", "--count", "30")
        assert {r["reply"]["server"] for r in rows} == {"greeter-v1-1", "greeter-v2-1"}, rows
    finally:
        await grpc_mesh.cp.apply(CANARY, delete=True)
    assert_no_nacks(grpc_mesh)
