"""Time travel: a proxy's past config rebuilt by replay equals what a real Envoy ACKed then;
``policy check --at`` answers as of then; ``audit why`` lists what granted, widened, narrowed
and revoked access, with verified writers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from smc.audit import CheckpointDir, access_history, issue_writer, load_trust, proxy_config_at
from smc.ca import LocalIssuer
from smc.events import ChainVerifier, Position, Signer, SqliteLog
from smc.projections import ProjectionRunner, all_projections
from smc.testing.manifests import mesh_service_yaml, route_group_yaml, traffic_target_yaml
from smc.testing.mesh import Sidecar, vm_yaml
from smc.testing.serve import ServeProcess

TD = "cluster.local"

SERVICES = "---\n".join(
    [
        mesh_service_yaml("demo"),
        route_group_yaml(
            "demo", matches=[("get-api", "/api", ["GET"]), ("post-admin", "/admin", ["POST"])]
        ),
    ]
)
GRANT = traffic_target_yaml("demo", "client-to-server")
WIDEN = traffic_target_yaml("demo", "client-to-server", matches=("get-api", "post-admin"))
SERVER_V2 = """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: server-v2, namespace: demo}
spec:
  backing: vm
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def smc(db: Path, *args: str, writer: Path | None = None, stdin: str | None = None) -> Any:
    env = {**os.environ}
    if writer is not None:
        env["SMC_WRITER"] = str(writer)
    return subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{db}", *args],
        capture_output=True, text=True, timeout=120, input=stdin, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("op")
    ca = LocalIssuer(directory=base / "ca", trust_domain=TD)
    issue_writer(ca, trust_domain=TD, role="operator", name="alice", directory=base / "w")
    return base / "w"


def apply(db: Path, text: str, writer: Path) -> None:
    out = smc(db, "apply", "-f", "-", writer=writer, stdin=text)
    assert out.returncode == 0, out.stderr


def delete(db: Path, text: str, writer: Path) -> None:
    out = smc(db, "delete", "-f", "-", writer=writer, stdin=text)
    assert out.returncode == 0, out.stderr


@pytest.mark.envoy
def test_past_configs_equal_what_envoy_acked(tmp_path: Path, operator: Path) -> None:
    db = tmp_path / "log.db"
    serve = ServeProcess(tmp_path)
    client = Sidecar(namespace="demo", name="client-1", address="127.0.61.1", workdir=tmp_path)
    server = Sidecar(namespace="demo", name="server-1", address="127.0.61.2", workdir=tmp_path)
    try:
        serve.wait_ready()
        apply(
            db,
            "\n---\n".join(
                [
                    SERVICES,
                    vm_yaml(client, service_account="client"),
                    vm_yaml(server, service_account="server", labels={"app": "server"}),
                ]
            ),
            operator,
        )
        # the test is the proxy's host: its own throwaway key (ADS is cleartext, no key on it)
        client.start_envoy(ads_port=serve.xds_port, delta=False, own_secret=True)
        assert client.envoy is not None
        acked: list[tuple[Position, dict[str, str], set[str]]] = []

        def settle() -> tuple[Position, dict[str, str]]:
            """Once serve applied everything on the log, the versions the Envoy ACKed after
            nothing was pending for a while, and the position they hold for."""
            deadline = time.monotonic() + 60
            stable_since, last = time.monotonic(), None
            while time.monotonic() < deadline:
                end = SqliteLog(db).end_position()
                _, state = serve.request("/debug/state")
                applied = Position.from_json(state.get("position", {}))
                _, view = serve.request("/debug/proxies")
                rows = [p for p in view.get("proxies", []) if p["node_id"] == client.node_id]
                types = rows[0]["types"] if rows else {}
                now = {t: s.get("acked_version") for t, s in types.items()}
                # what serve publishes for the proxy now: under load its rebuild can come
                # later than the runner's catch-up, and the old ACK would look settled
                nodes = [n for n in view.get("nodes", []) if n["node_id"] == client.node_id]
                current = (nodes[0].get("versions") or {}) if nodes else {}
                busy = (
                    any(s.get("pending") for s in types.values())
                    or not all(now.values())
                    or not applied.covers(end)
                    or any(current.get(t) != v for t, v in now.items() if t in current)
                )
                if busy or (now, current) != last:
                    stable_since, last = time.monotonic(), (now, current)
                elif time.monotonic() - stable_since > 1.0:
                    return end, now  # type: ignore[return-value]
                time.sleep(0.1)
            raise AssertionError(f"no settled ACK: {last}\n{serve.tail()}")

        def record() -> None:
            position, versions = settle()
            dump = client.envoy.config_dump(resource="dynamic_active_clusters")  # type: ignore[union-attr]
            names = {c["cluster"]["name"] for c in dump.get("configs", [])}
            acked.append((position, versions, names))

        record()
        for step in (GRANT, WIDEN, SERVER_V2):
            apply(db, step, operator)
            record()
        delete(db, SERVER_V2, operator)
        record()
        assert client.rejected() == {}
    finally:
        asyncio.run(client.stop())
        serve.stop()
    log = SqliteLog(db)
    keys = {"Cluster": "clusters", "ClusterLoadAssignment": "endpoints", "Listener": "listeners",
            "RouteConfiguration": "routes"}  # fmt: skip
    seen_versions = set()
    for position, versions, clusters in acked:
        past = proxy_config_at(log, client.node_id, position)
        assert past["reason"] == "", past
        for t, key in keys.items():
            if t in versions:
                assert past["versions"][key] == versions[t], (position, t)
            else:  # never asked for by the Envoy: nothing of that type then
                assert past[key] == [], (position, t)
        assert {c["name"] for c in past["clusters"]} == clusters
        # agents (serve's default): the roots from the control plane, `default` from the file
        assert past["secrets"] == ["ROOTCA"]
        seen_versions.add(past["versions"]["routes"])
    assert len(seen_versions) >= 3  # the steps really changed the config
    # the CLI, at one of those points, answers the same
    position, versions, _ = acked[1]
    at = ",".join(f"{s}:{p}={o}" for (s, p), o in position.items())
    out = smc(db, "proxy", "config", client.node_id, "--at", at)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["versions"]["routes"] == versions["RouteConfiguration"]
    assert "PRIVATE KEY" not in out.stdout


def test_policy_check_at_and_why(tmp_path: Path, operator: Path) -> None:
    db = tmp_path / "log.db"
    apply(db, SERVICES, operator)
    t0 = SqliteLog(db).end_position()
    apply(db, GRANT, operator)
    t1 = SqliteLog(db).end_position()
    apply(db, WIDEN, operator)
    delete(db, GRANT, operator)

    def check(at: Position, path: str, method: str) -> str:
        pos = ",".join(f"{s}:{p}={o}" for (s, p), o in at.items())
        out = smc(db, "policy", "check", "--from", "demo/client", "--to", "demo/server",
                  "--path", path, "--method", method, "--at", pos)  # fmt: skip
        decision = out.stdout.split(":")[0]
        assert out.returncode == (0 if decision == "allow" else 1), out.stderr  # as can-i
        return decision

    assert check(t0, "/api", "GET") == "deny"
    assert check(t1, "/api", "GET") == "allow"
    assert check(t1, "/admin", "POST") == "deny"
    now = smc(db, "policy", "check", "--from", "demo/client", "--to", "demo/server")
    assert now.stdout.startswith("deny")
    trust = load_trust(operator / "trust.pem")
    rows = access_history(
        SqliteLog(db),
        source="demo/client",
        destination="demo/server",
        verifier=ChainVerifier(trust=trust),
    )
    assert [r["effect"] for r in rows] == ["granted", "widened", "revoked"]
    assert all(r["verified"] for r in rows)
    assert {r["writer"] for r in rows} == {f"spiffe://{TD}/ns/smc-writers/sa/operator.alice"}
    # only the path asked about: /admin POST was granted by the widening, revoked by the delete
    admin = access_history(
        SqliteLog(db), source="demo/client", destination="demo/server", path="/admin",
        method="POST",
    )  # fmt: skip
    assert [r["effect"] for r in admin] == ["granted", "revoked"]
    out = smc(db, "audit", "why", "--from", "demo/client", "--to", "demo/server",
              "--trust", str(operator / "trust.pem"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "granted" in out.stdout and "operator.alice" in out.stdout


def test_at_starts_from_the_newest_checkpoint_before_it(tmp_path: Path, operator: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", signer=Signer.from_dir(operator))
    from eventgen import service

    cps = CheckpointDir(tmp_path / "cps")
    trust = load_trust(operator / "trust.pem")
    runner = ProjectionRunner(
        log=log, projections=all_projections(), verifier=ChainVerifier(trust=trust)
    )
    marks = []
    for i in range(3):
        log.append([service(j) for j in range(i * 10, i * 10 + 10)])
        runner.catch_up()
        cps.save(runner.checkpoint())
        marks.append(log.end_position())
    log.append([service(99)])
    mid = marks[1]
    assert cps.best_for(mid) is not None and cps.best_for(mid).position == mid  # type: ignore[union-attr]
    from smc.audit import state_at

    fast = state_at(log, mid, verifier=ChainVerifier(trust=trust), checkpoints=cps)
    slow = state_at(log, mid, verifier=ChainVerifier(trust=trust))
    assert fast.digests() == slow.digests()
    assert fast.applied == slow.applied == 20


@pytest.mark.parametrize("verified", [False, True])
def test_catch_up_until_a_point_before_another_streams_first_record(
    tmp_path: Path, operator: Path, verified: bool
) -> None:
    """A target that stops a stream before its first record (here: the certificate appended
    first) is reached on SQLite, whose reads follow one append order across streams."""
    from datetime import UTC, datetime, timedelta

    from eventgen import service

    from smc.events import CertificateIssued, make_event

    log = SqliteLog(tmp_path / "log.db", signer=Signer.from_dir(operator))
    now = datetime.now(UTC)
    log.append(
        [make_event(CertificateIssued, source="x", actor="x", identity=f"spiffe://{TD}/ns/a/sa/b",
                    serial="01", not_before=now, not_after=now + timedelta(days=1),
                    issuer="local", fingerprint="00" * 32)]
    )  # fmt: skip
    for i in range(0, 40, 10):
        log.append([service(j) for j in range(i, i + 10)])
    verifier = ChainVerifier(trust=load_trust(operator / "trust.pem")) if verified else None
    r = ProjectionRunner(log=log, projections=all_projections(), batch=7, verifier=verifier)
    r.catch_up(until=Position({("smc.certs", 0): 0, ("smc.registry", 0): 30}), stall_timeout=5)
    assert r.position.get(("smc.registry", 0)) == 30
    assert r.position.get(("smc.certs", 0)) == 0
