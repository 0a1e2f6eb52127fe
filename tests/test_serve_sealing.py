"""``smc serve --writers DIR --trust ROOTS``: the CA and the API seal what they append with
their own role's writer key; the serving replica's projections skip a forged record (it never
changes state) and report it; ``smc audit verify`` names the writers and the forged record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from smc.audit import issue_writer, load_trust, verify_log
from smc.ca import LocalIssuer
from smc.events import (
    CertificateIssued,
    ChainVerifier,
    MeshConfigChanged,
    Position,
    Signer,
    SqliteLog,
    make_event,
)
from smc.projections import CheckpointDir, ProjectionRunner, all_projections
from smc.testing.serve import ServeProcess, eventually

TD = "cluster.local"

MESH = """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: web, namespace: shop}
spec:
  backing: vm
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {address: 127.0.71.1, serviceAccount: web}
"""


def policy(name: str) -> bytes:
    return (
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\n"
        f"metadata: {{name: {name}, namespace: shop}}\n"
        "spec:\n  destination: {kind: ServiceAccount, name: web, namespace: shop}\n"
        "  rules: [{kind: TCPRoute, name: tcp}]\n"
        "  sources: [{kind: ServiceAccount, name: client, namespace: shop}]\n"
    ).encode()


def test_serve_seals_per_role_and_skips_forgeries(tmp_path: Path) -> None:
    ca = LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)
    writers = tmp_path / "writers"
    for role in ("ca", "api", "informer"):
        issue_writer(ca, trust_domain=TD, role=role, name="replica-0", directory=writers / role)
    trust = writers / "api" / "trust.pem"
    history = tmp_path / "history"
    serve = ServeProcess(
        tmp_path,
        args=["--writers", str(writers), "--trust", str(trust), "--checkpoint",
              str(tmp_path / "cp.json"), "--checkpoint-every", "0.2",
              "--checkpoint-history", str(history)],
    )  # fmt: skip
    db = tmp_path / "log.db"
    try:
        serve.wait_ready()
        status, body = serve.request("/v1/apply", method="POST", body=MESH.encode())
        assert status == 200, body
        # policy through the API, as the admin and as a principal with a grant: the API
        # vouches for them in its seals, so the verifying projections apply both
        status, body = serve.request("/v1/apply", method="POST", body=policy("by-admin"))
        assert status == 200, body
        serve.grant(
            "bob-shop", ["bob"], ["apply"], resources=["traffictargets"], namespaces=["shop"]
        )
        status, body = serve.request(
            "/v1/apply", method="POST", body=policy("by-bob"), headers={"X-SMC-Actor": "bob"}
        )
        assert status == 200, body

        def applied() -> bool:
            _, got = serve.request("/v1/policies")
            return {"by-admin", "by-bob"} <= {p["name"] for p in got.get("items", got)}

        eventually(applied, what="both policies applied", diag=serve.tail, wait=30)
        log = SqliteLog(db)

        def certs_on_log() -> bool:
            return any(r.stream == "smc.certs" for r in log.read(start=Position(), max_records=500))

        eventually(certs_on_log, what="a certificate event", diag=serve.tail, wait=30)
        # an insider with an informer key (or anyone with file access) appends what only the
        # API or an operator may: a permissive mesh, and a certificate only the CA may record
        informer = Signer.from_dir(writers / "informer")
        forged = [
            make_event(MeshConfigChanged, source="k8s", actor="mallory", permissive=True,
                       trust_domain=TD, cert_lifetime_seconds=3600),
        ]  # fmt: skip
        log.append(forged, signer=informer)
        now = datetime.now(UTC)
        log.append(
            [make_event(CertificateIssued, source="k8s", actor="mallory",
                        identity=f"spiffe://{TD}/ns/shop/sa/web", serial="ff", not_before=now,
                        not_after=now + timedelta(days=1), issuer="local",
                        fingerprint="ab" * 32)],
            signer=informer,
        )  # fmt: skip

        def skipped() -> int:
            _, state = serve.request("/debug/state")
            return int(state.get("skipped", 0)) >= 2

        eventually(skipped, what="the forged records skipped", diag=serve.tail, wait=30)
        _, mesh = serve.request("/v1/meshconfig")
        assert mesh["permissiveTrafficMode"] is False  # the forgery never changed state
        _, state = serve.request("/debug/state")
        assert state["skipped"] == 2
    finally:
        serve.stop()
    # the checkpoints serve kept prove their chain heads to a verifying runner
    cps = CheckpointDir(history)
    saved = cps.best_for(SqliteLog(db).end_position())
    assert saved is not None and saved.integrity is not None
    runner = ProjectionRunner(
        log=SqliteLog(db), projections=all_projections(),
        verifier=ChainVerifier(trust=load_trust(trust)),
    )  # fmt: skip
    runner.restore(saved)
    runner.catch_up()
    fresh = ProjectionRunner(
        log=SqliteLog(db), projections=all_projections(),
        verifier=ChainVerifier(trust=load_trust(trust)),
    )  # fmt: skip
    fresh.catch_up()
    assert runner.digests() == fresh.digests()
    report = verify_log(SqliteLog(db), load_trust(trust))
    roles = {w["role"] for w in report.writers.values()}
    assert roles == {"ca", "api"}, report.writers
    assert [f.kind for f in report.findings] == ["not-entitled", "not-entitled"]
    assert report.verified == report.records - 2
