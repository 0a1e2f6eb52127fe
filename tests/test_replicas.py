"""Control-plane replicas on one Kafka log: identical snapshots, failover, crashes.

Two real ``smc serve`` processes follow the same (freshly prefixed) topics of the session
Kafka broker: replica 1 issues certificates (``--ca local:DIR --keys K``) and serves the
certificate service, replica 2 follows (``--ca follow --keys K``, serving the issuer's ADS
certificate). A small mesh (client and server VMs, each a real Envoy sidecar with an aiohttp
app behind it, a MeshService and an SMI TrafficTarget) is applied through replica 1's HTTP API;
each VM's real SMC agent (``smc vm bootstrap``, ``python -m smc.agent``, the test being the
VM's host) makes its key and gets it signed by replica 1, and its Envoy uses that certificate
for ADS over mTLS and reads its key from the agent's file. The tests, in file order on one module fixture:

1. both replicas reach the same log position and serve, for each node, the same snapshot
   (same per-type versions, same resources, same roots; no key in either);
2. the Envoys (ADS cluster: replica 1 at priority 0, replica 2 at priority 1, TCP health
   checks) fail over to replica 2 when replica 1 is killed with SIGKILL, and get no config
   change (versions, ``last_updated`` and add/modify/remove counters unchanged); traffic keeps
   flowing; replica 1 restarted on the same keys serves the same snapshots again;
3. the broker is killed with SIGKILL (and restarted) while events are appended directly and
   through the API; every acknowledged append is on the log and applied exactly once, and
   both replicas converge to the digests of a fresh rebuild. The broker is left healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from smc.agent._files import read_secret
from smc.api import LiveMeshChanges, MeshChanges
from smc.auth import ClientCredentials, CredentialError, server_dir
from smc.ca import KeyStore, LocalIssuer, run_ca
from smc.ca._controller import CertificateFollower, follow_ca
from smc.errors import SMCError
from smc.events import (
    LogUnavailable,
    ServicePort,
    ServiceUpserted,
    SqliteLog,
    deterministic_id,
    make_event,
)
from smc.events._kafka import KafkaLog
from smc.projections import (
    CertsProjection,
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
)
from smc.smi import load_documents
from smc.testing.envoy import AdsTLS, EnvoyProcess, ads_bootstrap
from smc.testing.kafka import KafkaBroker
from smc.testing.manifests import client_server_yaml, mesh_service_yaml
from smc.testing.mesh import Sidecar, vm_yaml
from smc.testing.ports import free_port
from smc.testing.serve import http_json, start_vm_agent
from smc.xds import CLUSTER
from tests.conftest import new_kafka_log

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(240)]

NS = "rep"

MESH = client_server_yaml(NS, matches=[("api", "/api.*", ["GET"])], target="client-to-server")


# ---------------------------------------------------------------------------- helpers


def _http(
    method: str,
    url: str,
    body: bytes | None = None,
    *,
    creds: ClientCredentials,
    **headers: str,
) -> tuple[int, Any]:
    """Blocking JSON request with ``creds``; (status, parsed body or text)."""
    return http_json(url, method=method, body=body, headers=headers, timeout=30, creds=creds)


class Replica:
    """One ``smc serve`` child process on the test's Kafka topics."""

    def __init__(self, *, name: str, log_url: str, ca: str, keys: Path, workdir: Path) -> None:
        self.name = name
        self.log_url = log_url
        self.ca = ca
        self.keys = keys
        self.tls_dir = workdir / "xds-tls"  # the issuer's ADS certificate, for the follower
        self.http_port = free_port()
        self.xds_port = free_port()
        self.ca_port = free_port()  # the issuer's certificate service (agents' CSRs)
        self.out = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_dir = workdir / f"{name}-config"
        self._creds: ClientCredentials | None = None

    @property
    def api(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    @property
    def creds(self) -> ClientCredentials:
        """The admin credentials this replica wrote (its API CA and admin token)."""
        if self._creds is None:
            path = server_dir("127.0.0.1", self.http_port, root=self.config_dir)
            self._creds = ClientCredentials.load(path / "credentials.json")
        return self._creds

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An aiohttp session that verifies this replica and carries its admin token."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.creds.ssl_context()),
            headers=self.creds.headers(),
            **kwargs,
        )

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "smc.cli",
            "--log",
            self.log_url,
            "-v",
            "serve",
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--xds",
            f"127.0.0.1:{self.xds_port}",
            "--ca",
            self.ca,
            "--keys",
            str(self.keys),
            # ADS over mTLS (agents' certificates). The issuer writes its ADS certificate for
            # the follower to serve with, and runs the certificate service.
            "--xds-tls",
            *(
                [
                    "--xds-cert",
                    str(self.tls_dir / "tls.crt"),
                    "--xds-key",
                    str(self.tls_dir / "tls.key"),
                ]
                if self.ca == "follow"
                else [
                    "--xds-cert-out",
                    str(self.tls_dir),
                    "--ca-listen",
                    f"127.0.0.1:{self.ca_port}",
                ]
            ),
        ]
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "SMC_CONFIG_DIR": str(self.config_dir)},
            )

    def tail(self, n: int = 3000) -> str:
        try:
            return self.out.read_text(errors="replace")[-n:]
        except OSError:
            return "(no output)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str) -> tuple[int, Any]:
        return _http("GET", self.api + path, creds=self.creds)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.tail()}")
            with contextlib.suppress(OSError, CredentialError):
                status, _ = self.get("/readyz")
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready in {timeout}s:\n{self.tail()}")
            time.sleep(0.1)

    def state(self) -> dict[str, Any]:
        status, body = self.get("/debug/state")
        assert status == 200, (status, body)
        assert isinstance(body, dict)
        return body

    def dump(self, node: str) -> dict[str, Any] | None:
        status, body = self.get(f"/debug/config_dump?node={node}")
        return body if status == 200 and isinstance(body, dict) else None

    def proxies(self) -> dict[str, Any]:
        status, body = self.get("/debug/proxies")
        assert status == 200, (status, body)
        assert isinstance(body, dict)
        return body

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def failover_bootstrap(
    *, node_id: str, cluster: str, primary: int, backup: int, delta: bool, tls: AdsTLS
) -> dict[str, Any]:
    """An ADS bootstrap (mTLS with ``tls``) whose xDS cluster has the primary replica at
    priority 0 and the backup at priority 1, TCP health-checked, so a dead primary sends ADS
    to the backup."""
    boot = ads_bootstrap(
        node_id=node_id,
        cluster=cluster,
        ads_host="127.0.0.1",
        ads_port=primary,
        delta=delta,
        admin_port=free_port(),
        tls=tls,
    )
    xds = boot["static_resources"]["clusters"][0]

    def endpoint(port: int, priority: int) -> dict[str, Any]:
        addr = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
        return {"priority": priority, "lb_endpoints": [{"endpoint": {"address": addr}}]}

    xds["load_assignment"]["endpoints"] = [endpoint(primary, 0), endpoint(backup, 1)]
    xds["health_checks"] = [
        {
            "timeout": "0.5s",
            "interval": "0.3s",
            "no_traffic_interval": "0.3s",
            "no_traffic_healthy_interval": "0.3s",
            "unhealthy_interval": "0.3s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "tcp_health_check": {},
        }
    ]
    return boot


async def probe_node(port: int, node_id: str, tls: AdsTLS, timeout: float = 20.0) -> None:
    """Open an ADS stream to ``port`` as ``node_id`` (mTLS with ``tls``, the node's identity)
    and read one CDS answer, so the replica builds (and from then on keeps current) that
    node's snapshot."""
    assert tls.cert_pem and tls.key_pem and tls.ca_pem
    # /readyz says the replica caught up with the log, not that its ADS port is bound yet (serve
    # binds it after starting the runner): wait until the port accepts connections.
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            break
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_pem.encode(),
        private_key=tls.key_pem.encode(),
        certificate_chain=tls.cert_pem.encode(),
    )
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
    try:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        done = asyncio.Event()

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            yield discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id=node_id, cluster="probe"), type_url=CLUSTER
            )
            await done.wait()

        call = stub.StreamAggregatedResources(requests())
        resp = await asyncio.wait_for(call.read(), timeout=timeout)
        assert resp is not grpc.aio.EOF and resp.version_info, resp
        done.set()
        call.cancel()
    finally:
        await channel.close(grace=None)


def envoy_state(envoy: EnvoyProcess) -> dict[str, Any]:
    """What must not change when Envoy switches replica: every dynamic resource's version
    and last update time, and the add/modify/remove counters."""
    dump = envoy.config_dump()
    out: dict[str, Any] = {}
    for section in dump["configs"]:
        for c in section.get("dynamic_active_clusters", []):
            out[f"cluster:{c['cluster']['name']}"] = (c.get("version_info"), c.get("last_updated"))
        for listener in section.get("dynamic_listeners", []):
            st = listener.get("active_state", {})
            out[f"listener:{listener['name']}"] = (st.get("version_info"), st.get("last_updated"))
        for rc in section.get("dynamic_route_configs", []):
            name = rc["route_config"]["name"]
            out[f"route:{name}"] = (rc.get("version_info"), rc.get("last_updated"))
        for s in section.get("dynamic_active_secrets", []):
            out[f"secret:{s['name']}"] = (s.get("version_info"), s.get("last_updated"))
    stats = envoy.stats()
    for name in (
        "cluster_manager.cluster_added",
        "cluster_manager.cluster_modified",
        "cluster_manager.cluster_removed",
        "listener_manager.listener_added",
        "listener_manager.listener_modified",
        "listener_manager.listener_removed",
        "listener_manager.listener_in_place_updated",
    ):
        out[name] = stats.get(name)
    return out


def acked_snapshots(replica: Replica, snaps: dict[str, dict[str, Any]]) -> bool:
    """True when every node of ``snaps`` has an Envoy stream on ``replica`` that ACKed
    exactly the snapshot versions of every type it watches (listeners at least)."""
    best: dict[str, dict[str, Any]] = {}
    for p in replica.proxies()["proxies"]:
        types = {t: v for t, v in p["types"].items() if v["acked_version"] is not None}
        if len(types) > len(best.get(p["node_id"], {})):
            best[p["node_id"]] = types
    for node, snap in snaps.items():
        seen = best.get(node)
        if not seen or "Listener" not in seen:
            return False
        for t, v in seen.items():
            if v["pending"] or v["acked_version"] != snap["versions"].get(t):
                return False
    return True


def rejected(envoy: EnvoyProcess) -> dict[str, int]:
    return {k: v for k, v in envoy.stats().items() if k.endswith("update_rejected") and v}


async def eventually(
    check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``check`` (in a worker thread) until it returns a truthy value; return it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await asyncio.to_thread(check)
        except (OSError, AssertionError, SMCError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


@dataclass
class Cluster:
    broker: KafkaBroker
    log: KafkaLog
    workdir: Path
    r1: Replica
    r2: Replica
    client: Sidecar
    server: Sidecar
    session: aiohttp.ClientSession
    notes: dict[str, Any] = field(default_factory=dict)
    #: each sidecar's mTLS to ADS (the certificate its VM's agent got)
    tls: dict[str, AdsTLS] = field(default_factory=dict)
    #: the VMs' SMC agents (stopped with the cluster)
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def sidecars(self) -> list[Sidecar]:
        return [self.client, self.server]

    def envoys(self) -> list[EnvoyProcess]:
        out = []
        for s in self.sidecars:
            assert s.envoy is not None
            out.append(s.envoy)
        return out

    async def call(self, path: str = "/api/items") -> int:
        async with self.session.get(
            self.client.outbound + path, headers={"Host": "server.rep"}
        ) as resp:
            return resp.status

    def same_position(self) -> dict[str, Any] | None:
        """Both replicas caught up at the same position as the log's end: that position."""
        s1, s2 = self.r1.state(), self.r2.state()
        end = self.log.end_position().to_json()
        if s1["caught_up"] and s2["caught_up"] and s1["position"] == s2["position"] == end:
            return s1["position"]  # type: ignore[no-any-return]
        return None

    def same_snapshots(self) -> dict[str, dict[str, Any]] | None:
        """Per node, the config dump both replicas agree on (None while they differ)."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.sidecars:
            d1, d2 = self.r1.dump(s.node_id), self.r2.dump(s.node_id)
            if d1 is None or d2 is None or d1 != d2:
                return None
            if "Secret" not in d1["versions"] or not d1["resources"]["Secret"]:
                return None  # certificates not issued / followed yet
            out[s.node_id] = d1
        return out


@pytest.fixture(scope="module")
async def cluster(
    kafka_broker: KafkaBroker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    workdir = tmp_path_factory.mktemp("replicas")
    log = new_kafka_log(kafka_broker)
    url = f"kafka://{kafka_broker.bootstrap}?prefix={log.prefix}"
    keys = workdir / "keys"  # created 0700 by the key store
    r1 = Replica(name="r1", log_url=url, ca=f"local:{workdir / 'ca'}", keys=keys, workdir=workdir)
    r2 = Replica(name="r2", log_url=url, ca="follow", keys=keys, workdir=workdir)
    client = Sidecar(namespace=NS, name="client-1", address="127.0.77.1", workdir=workdir)
    server = Sidecar(namespace=NS, name="server-1", address="127.0.77.2", workdir=workdir)
    made: Cluster | None = None
    try:
        r1.start()
        await asyncio.to_thread(r1.wait_ready)
        deadline = time.monotonic() + 60
        while not (r1.tls_dir / "tls.key").exists():  # the follower serves the issuer's
            assert time.monotonic() < deadline, "the issuer wrote no ADS certificate"
            await asyncio.sleep(0.1)
        r2.start()
        await asyncio.to_thread(r2.wait_ready)
        for s in (client, server):
            await s.start_app()
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as session:
            made = Cluster(
                broker=kafka_broker,
                log=log,
                workdir=workdir,
                r1=r1,
                r2=r2,
                client=client,
                server=server,
                session=session,
            )
            yield made
    finally:
        for s in (client, server):
            await s.stop()
        for agent in made.agents if made is not None else []:
            agent.terminate()
            agent.wait(timeout=20)
        for r in (r1, r2):
            await asyncio.to_thread(r.stop)
        log.close()
        if not kafka_broker.is_running():  # a failed broker test must not break the session
            await asyncio.to_thread(kafka_broker.restart)


# ---------------------------------------------------------------------------- 1


@pytest.mark.kafka
@pytest.mark.envoy
async def test_replicas_serve_identical_snapshots(cluster: Cluster) -> None:
    c = cluster
    docs = [
        MESH,
        vm_yaml(c.client, service_account="client", labels={"app": "client"}),
        vm_yaml(c.server, service_account="server", labels={"app": "server"}),
    ]
    status, body = await asyncio.to_thread(
        _http,
        "POST",
        c.r1.api + "/v1/apply",
        "\n---\n".join(docs).encode(),
        creds=c.r1.creds,
        **{"Content-Type": "application/yaml"},
    )
    assert status == 200, body
    assert body["ok"] and body["events"] >= 5, body

    # Each VM's agent (the test as its host) makes its key and gets it signed by replica 1.
    # Envoys: ADS (mTLS, each with its agent's certificate) on replica 1 (priority 0),
    # replica 2 as the backup (priority 1); each reads its key from its agent's file.
    roots = "".join(
        p.read_text("ascii") for p in sorted((c.workdir / "ca" / "roots").glob("*.pem"))
    )
    vm_dirs: dict[str, Path] = {}
    for s in c.sidecars:
        vm_dirs[s.node_id] = c.workdir / f"vm-{s.name}"
        agent = await asyncio.to_thread(
            start_vm_agent,
            log_url=c.r1.log_url,
            env={**os.environ, "SMC_CONFIG_DIR": str(c.r1.config_dir)},
            ads=f"127.0.0.1:{c.r1.xds_port}",
            ca_address=f"127.0.0.1:{c.r1.ca_port}",
            namespace=NS,
            name=s.name,
            folder=vm_dirs[s.node_id],
        )
        c.agents.append(agent)
        held = read_secret(vm_dirs[s.node_id])
        assert held is not None, s.node_id
        chain, key = held
        c.tls[s.node_id] = AdsTLS(cert_pem=chain, key_pem=key, ca_pem=roots, server_san="127.0.0.1")
    for s, delta in ((c.client, True), (c.server, False)):
        boot = failover_bootstrap(
            node_id=s.node_id,
            cluster=s.name,
            primary=c.r1.xds_port,
            backup=c.r2.xds_port,
            delta=delta,
            tls=c.tls[s.node_id],
        )
        s.envoy = EnvoyProcess(
            bootstrap=boot, workdir=c.workdir / f"envoy-{s.name}", cwd=vm_dirs[s.node_id]
        )
        s.envoy.start()
    # Replica 2 builds a node's snapshot once a proxy of that node asked it for config:
    # ask it as each node (a one-shot ADS stream), so both replicas build both nodes.
    for s in c.sidecars:
        await probe_node(c.r2.xds_port, s.node_id, c.tls[s.node_id])
    for e in c.envoys():
        await e.wait_live(timeout=30)

    # Same log position -> same snapshots (same versions, same resources, same certs).
    snaps = await eventually(c.same_snapshots, timeout=30, what="replicas to agree")
    position = await eventually(c.same_position, timeout=30, what="the same log position")
    again = await asyncio.to_thread(c.same_snapshots)
    assert again == snaps, "snapshots moved while the log did not"
    for node, dump in snaps.items():
        assert set(dump["versions"]) >= {"Cluster", "Listener", "Secret"}, (node, dump)
        secrets = {r["name"] for r in dump["resources"]["Secret"]}
        assert secrets == {"ROOTCA"}, (node, secrets)  # the roots; the key is the agent's
        assert "PRIVATE KEY" not in json.dumps(dump), node
    s1, s2 = c.r1.state(), c.r2.state()
    assert s1["digests"] == s2["digests"] and s1["position"] == s2["position"] == position

    # Envoy is on replica 1, ACKed exactly that snapshot, and traffic flows over mTLS.
    await eventually(
        lambda: acked_snapshots(c.r1, snaps), timeout=20, what="Envoys to ACK replica 1"
    )
    assert await _wait_status(c, 200) == 200
    assert await c.call("/other") == 403  # RBAC on the server sidecar: only GET /api.*
    for e in c.envoys():
        assert rejected(e) == {}
    c.notes["snapshots"] = snaps


async def _wait_status(c: Cluster, want: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    last = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            last = await c.call()
            if last == want:
                return last
        await asyncio.sleep(0.1)
    return last


# ---------------------------------------------------------------------------- 2


@pytest.mark.kafka
@pytest.mark.envoy
async def test_envoy_switching_replica_gets_no_config_change(cluster: Cluster) -> None:
    c = cluster
    if "snapshots" not in c.notes:
        pytest.skip("needs the mesh of test_replicas_serve_identical_snapshots")
    snaps: dict[str, dict[str, Any]] = c.notes["snapshots"]
    before = {e.admin_port: await asyncio.to_thread(envoy_state, e) for e in c.envoys()}

    # Traffic keeps flowing while replica 1 dies and Envoy moves to replica 2.
    failures: list[str] = []
    calls = 0
    stop = asyncio.Event()

    async def traffic() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                status = await c.call()
            except (TimeoutError, aiohttp.ClientError) as exc:
                failures.append(repr(exc))
            else:
                calls += 1
                if status != 200:
                    failures.append(str(status))
            await asyncio.sleep(0.02)

    load = asyncio.create_task(traffic())
    t0 = time.monotonic()
    await asyncio.to_thread(c.r1.kill9)

    await eventually(
        lambda: acked_snapshots(c.r2, snaps),
        timeout=30,
        what="Envoys to reconnect to replica 2 and ACK",
    )
    switched = time.monotonic() - t0
    await asyncio.sleep(1.0)  # let any (unexpected) push land
    stop.set()
    await load
    after = {e.admin_port: await asyncio.to_thread(envoy_state, e) for e in c.envoys()}
    assert after == before, "Envoy's config changed when it switched replica"
    assert failures == [], f"{len(failures)} of {calls} requests failed: {failures[:5]}"
    assert calls > 10
    for e in c.envoys():
        assert rejected(e) == {}
        assert e.stats().get("control_plane.connected_state") == 1
    # The snapshots replica 2 serves are still the ones both replicas served before.
    for node, snap in snaps.items():
        assert c.r2.dump(node) == snap
    c.notes["switch_seconds"] = switched

    # Replica 1 back after its SIGKILL (same keys and CA): same snapshots, no re-issue.
    applied_before = c.r2.state()["applied"]
    c.r1.start()
    await asyncio.to_thread(c.r1.wait_ready)
    for s in c.sidecars:
        await probe_node(c.r1.xds_port, s.node_id, c.tls[s.node_id])
    agreed = await eventually(c.same_snapshots, timeout=30, what="restarted replica to agree")
    assert agreed == snaps, "a restarted replica serves other snapshots (re-issued?)"
    assert c.r2.state()["applied"] == applied_before, "the restart appended events"
    print(f"\nEnvoy switched replica in {switched:.2f}s with {calls} requests, 0 failed")


# ---------------------------------------------------------------------------- 3


def _service_event(run: str, i: int) -> ServiceUpserted:
    return make_event(
        ServiceUpserted,
        source="replica-test",
        actor="replica-test",
        event_id=deterministic_id("replica-test", run, str(i)),
        namespace="churn",
        name=f"direct-{i}",
        ports=(ServicePort(name="http", port=80, protocol="TCP", target_port=8080),),
        backing="vm",
        selector={"app": f"direct-{i}"},
    )


class Appender(threading.Thread):
    """Appends one event at a time with its own producer; records acknowledged ids."""

    def __init__(self, *, bootstrap: str, prefix: str, run: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.prefix, self.run_id = bootstrap, prefix, run
        self.acked: dict[str, str] = {}  # event id -> service name
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        log = KafkaLog(self.bootstrap, topic_prefix=self.prefix, timeout=4.0)
        i = 0
        try:
            while not self.stop.is_set():
                ev = _service_event(self.run_id, i)
                try:
                    appended = log.append([ev])
                except LogUnavailable as exc:
                    self.failed.append(f"{ev.envelope.event_id}: {exc}")
                    log.close()
                    log = KafkaLog(self.bootstrap, topic_prefix=self.prefix, timeout=4.0)
                else:
                    assert appended and appended[0].event_id == ev.envelope.event_id
                    self.acked[ev.envelope.event_id] = ev.name
                i += 1
                time.sleep(0.01)
        finally:
            log.close()


@pytest.mark.kafka
@pytest.mark.envoy
async def test_broker_kill9_mid_change_loses_no_acknowledged_event(cluster: Cluster) -> None:
    c = cluster
    if "snapshots" not in c.notes:
        pytest.skip("needs the mesh of test_replicas_serve_identical_snapshots")
    broker = c.broker
    run = uuid.uuid4().hex[:8]
    appender = Appender(bootstrap=broker.bootstrap, prefix=c.log.prefix, run=run)
    api_acked: list[str] = []
    api_failed: list[str] = []
    stop = asyncio.Event()

    async def api_changes() -> None:
        """MeshService changes through replica 2's API; 200 means appended and applied."""
        i = 0
        async with c.r2.session(timeout=aiohttp.ClientTimeout(total=20)) as session:
            while not stop.is_set():
                name = f"api-{run}-{i}"
                doc = mesh_service_yaml("churn", name, app="x")
                try:
                    async with session.post(
                        c.r2.api + "/v1/apply",
                        data=doc.encode(),
                        headers={"Content-Type": "application/yaml", "X-Request-Id": name},
                    ) as resp:
                        if resp.status == 200:
                            api_acked.append(name)
                        else:
                            api_failed.append(f"{name}: {resp.status}")
                except (TimeoutError, aiohttp.ClientError) as exc:
                    api_failed.append(f"{name}: {exc!r}")
                i += 1
                await asyncio.sleep(0.05)

    api = asyncio.create_task(api_changes())
    appender.start()
    try:
        await eventually(
            lambda: len(appender.acked) >= 10 and len(api_acked) >= 2,
            timeout=30,
            what="direct and API changes to be acknowledged",
        )
        acked_before_kill = len(appender.acked)
        await asyncio.to_thread(broker.kill9)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(broker.restart)
        restart_seconds = broker.last_startup_seconds
        # keep changing until appends are acknowledged again, then a little more
        await eventually(
            lambda: len(appender.acked) > acked_before_kill + 20,
            timeout=45,
            what="appends to be acknowledged after the broker restart",
        )
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        appender.stop.set()
        await asyncio.to_thread(appender.join, 30)
        await api
        if not broker.is_running():
            await asyncio.to_thread(broker.restart)
    assert acked_before_kill > 0 and appender.acked

    # Both replicas catch up to the end of the log and agree on every digest.
    position = await eventually(c.same_position, timeout=45, what="replicas to catch up")
    s1, s2 = c.r1.state(), c.r2.state()
    assert s1["digests"] == s2["digests"]

    # A fresh rebuild from the log: every acknowledged event exactly once.
    rebuild_log = KafkaLog(broker.bootstrap, topic_prefix=c.log.prefix)
    try:
        runner = ProjectionRunner(log=rebuild_log, projections=all_projections())
        applied: Counter[str] = Counter()
        runner.listeners.append(lambda evs: applied.update(e.event_id for e in evs))
        await asyncio.to_thread(runner.catch_up)
    finally:
        rebuild_log.close()
    assert runner.position.to_json() == position
    assert runner.digests() == s1["digests"], "replicas differ from a rebuild from the log"
    lost = [eid for eid in appender.acked if applied[eid] != 1]
    assert lost == [], f"acknowledged events not applied exactly once: {lost[:5]}"
    registry = next(p for p in runner.projections if p.name == "registry")
    services = {name for (ns, name) in registry.services if ns == "churn"}  # type: ignore[attr-defined]
    assert set(appender.acked.values()) <= services
    assert set(api_acked) <= services, "a change the API acknowledged is missing"
    for r in (c.r1, c.r2):
        _, body = r.get("/v1/services")
        names = {s["name"] for s in body["items"] if s["namespace"] == "churn"}
        assert names == services

    # The mesh still works and the broker is healthy for the rest of the session.
    assert await _wait_status(c, 200) == 200
    for e in c.envoys():
        assert rejected(e) == {}
    check = new_kafka_log(broker)
    try:
        ev = _service_event(run + "-health", 0)
        assert check.append([ev])[0].event_id == ev.envelope.event_id
    finally:
        check.close()
    print(
        f"\nbroker SIGKILL: {len(appender.acked)} direct appends acknowledged "
        f"({len(appender.failed)} not), {len(api_acked)} API changes acknowledged "
        f"({len(api_failed)} not), {runner.duplicates} duplicate records dropped, "
        f"broker restart {restart_seconds:.1f}s"
    )


# ---------------------------------------------------------------------------- 4


@pytest.mark.kafka
@pytest.mark.envoy
async def test_replica_kill9_mid_change_loses_no_acknowledged_event(cluster: Cluster) -> None:
    """Changes through replica 1's API while it is killed with SIGKILL: every change it
    acknowledged is served by replica 2; restarted, replica 1 agrees with replica 2 again."""
    c = cluster
    if "snapshots" not in c.notes:
        pytest.skip("needs the mesh of test_replicas_serve_identical_snapshots")
    if not c.r1.alive():
        c.r1.start()
    await asyncio.to_thread(c.r1.wait_ready)
    run = uuid.uuid4().hex[:8]
    acked: list[str] = []
    failed: list[str] = []
    stop = asyncio.Event()

    async def changes() -> None:
        i = 0
        async with c.r1.session(timeout=aiohttp.ClientTimeout(total=20)) as session:
            while not stop.is_set():
                name = f"crash-{run}-{i}"
                doc = mesh_service_yaml("crash", name, app="x")
                try:
                    async with session.post(
                        c.r1.api + "/v1/apply",
                        data=doc.encode(),
                        headers={"Content-Type": "application/yaml", "X-Request-Id": name},
                    ) as resp:
                        (acked if resp.status == 200 else failed).append(name)
                except (TimeoutError, aiohttp.ClientError):
                    failed.append(name)  # cut off by the SIGKILL: may or may not be on the log
                    return
                i += 1

    task = asyncio.create_task(changes())
    await eventually(lambda: len(acked) >= 10, timeout=20, what="changes through replica 1")
    await asyncio.to_thread(c.r1.kill9)
    await asyncio.wait_for(task, timeout=30)
    stop.set()
    assert len(failed) == 1, failed

    def served_by_r2() -> set[str] | None:
        if c.r2.state()["position"] != c.log.end_position().to_json():
            return None
        _, body = c.r2.get("/v1/services")
        return {s["name"] for s in body["items"] if s["namespace"] == "crash"}

    names = await eventually(served_by_r2, timeout=30, what="replica 2 to reach the log end")
    assert set(acked) <= names, f"acknowledged but lost: {sorted(set(acked) - names)[:5]}"

    c.r1.start()
    await asyncio.to_thread(c.r1.wait_ready)
    for s in c.sidecars:
        await probe_node(c.r1.xds_port, s.node_id, c.tls[s.node_id])
    await eventually(c.same_position, timeout=30, what="both replicas at the log end")
    assert c.r1.state()["digests"] == c.r2.state()["digests"]
    await eventually(c.same_snapshots, timeout=30, what="both replicas to agree again")
    print(
        f"\nreplica SIGKILL: {len(acked)} changes acknowledged, all served; {len(failed)} cut off"
    )


async def test_follow_needs_the_shared_key_directory() -> None:
    """``--ca follow`` without ``--keys`` is refused with a message naming the option."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "smc.cli", "serve", "--ca", "follow", "--http", "off"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--ca" in done.stderr and "--keys DIR" in done.stderr


# ---------------------------------------------------------------------------- the follower


async def test_follower_serves_what_the_issuer_recorded(tmp_path: Path) -> None:
    """In one process, on one SQLite log: the issuing CA and a follower on the same key
    directory serve the same certificates, keys and trust bundle; a follower whose
    directory lacks the keys serves nothing and reports them missing."""
    keys, other = tmp_path / "keys", tmp_path / "other-keys"
    logs = [SqliteLog(tmp_path / "log.db") for _ in range(3)]
    runners = [ProjectionRunner(log=lg, projections=all_projections()) for lg in logs]
    issuing = KeyStore(directory=keys)
    following = KeyStore(directory=keys)
    lacking = KeyStore(directory=other)
    blind = CertificateFollower(runner=runners[2], keystore=lacking, retry_interval=0.05)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop=stop)) for r in runners]
    tasks += [
        asyncio.create_task(
            run_ca(
                runner=runners[0],
                log=logs[0],
                issuer=LocalIssuer(directory=tmp_path / "ca", trust_domain="cluster.local"),
                keystore=issuing,
                stop=stop,
            )
        ),
        asyncio.create_task(
            follow_ca(runner=runners[1], keystore=following, stop=stop, retry_interval=0.05)
        ),
        asyncio.create_task(blind.run(stop=stop)),
    ]
    try:
        await asyncio.wait_for(runners[0].caught_up.wait(), timeout=10)
        registry = next(p for p in runners[0].projections if isinstance(p, RegistryProjection))
        policy = next(p for p in runners[0].projections if isinstance(p, PolicyProjection))
        live = LiveMeshChanges(
            changes=MeshChanges(log=logs[0], registry=registry, policy=policy), runner=runners[0]
        )
        vms = "\n---\n".join(
            "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
            f"metadata: {{name: vm-{i}, namespace: f}}\n"
            f"spec: {{address: 127.0.88.{i + 1}, serviceAccount: sa-{i}}}\n"
            for i in range(3)
        )
        loaded = load_documents(vms, source="test")
        report = await live.apply(
            loaded.resources, actor="test", source="test", request_id=uuid.uuid4().hex
        )
        assert report.ok, report.as_dict()

        def agree() -> bool:
            cur = issuing.current()
            return (
                len(cur) == 3
                and following.current() == cur
                and bool(issuing.trust_bundle())
                and following.trust_bundle() == issuing.trust_bundle()
            )

        await eventually(agree, timeout=15, what="the follower to serve the issued certs")
        for identity in issuing.current():
            assert following.get(identity) == issuing.get(identity)
        await eventually(lambda: len(blind.missing) == 3, timeout=5, what="missing keys")
        assert lacking.current() == {} and lacking.get("f/sa-0") is None
        assert lacking.trust_bundle() == issuing.trust_bundle()
        # The follower never appended: every certificate event came from the issuing CA.
        certs = next(p for p in runners[1].projections if isinstance(p, CertsProjection))
        assert {r.fingerprint for r in certs.all_certs()} == set(issuing.current().values())
    finally:
        stop.set()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(t, timeout=5)
        for lg in logs:
            lg.close()
