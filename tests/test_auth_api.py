"""The control plane's API from the attacker's side: a real ``smc serve`` process over HTTPS.

Probes without credentials, with forged actors, bad tokens, client certificates from another
CA or expired, a revoked mesh certificate, and principals without grants are each refused
(401/403, counted in /metrics, nothing appended to the log); the legitimate paths (the local
admin credential found without flags, grants recorded on the log, impersonation with both
names recorded, client certificates from ``--admin-ca``, mesh certificates, the CLI's client
path) work.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smc.agent._files import read_secret
from smc.events import Position, SqliteLog, default_codec
from smc.testing.serve import ServeProcess, eventually, http_json

pytestmark = pytest.mark.timeout(180)

PERMISSIVE = b"""
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: smc-system}
spec: {permissiveTrafficMode: true}
"""
SERVICE = b"""
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: web, namespace: shop}
spec:
  backing: vm
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
VM = b"""
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
spec: {address: 127.0.0.1, serviceAccount: web}
"""
PROTECTED = [
    ("GET", "/v1/services"),
    ("GET", "/v1/workloads"),
    ("GET", "/v1/policies"),
    ("GET", "/v1/meshconfig"),
    ("GET", "/v1/policy/check?from=a/b&to=c/d"),
    ("POST", "/v1/apply"),
    ("POST", "/v1/delete"),
    ("GET", "/v1/grants"),
    ("PUT", "/v1/grants/x"),
    ("GET", "/v1/whoami"),
    ("GET", "/v1/certs"),
    ("GET", "/debug/proxies"),
    ("GET", "/debug/config_dump?node=shop/web-1"),
    ("GET", "/debug/events/x"),
    ("GET", "/debug/state"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/route"),
]


def grant(name: str, subjects: list[str], verbs: list[str], **extra: list[str]) -> bytes:
    spec = {
        "subjects": subjects,
        "verbs": verbs,
        "resources": extra.get("resources", ["*"]),
        "namespaces": extra.get("namespaces", ["*"]),
    }
    doc = {
        "apiVersion": "smc.dev/v1alpha1",
        "kind": "AccessGrant",
        "metadata": {"name": name},
        "spec": spec,
    }
    return json.dumps(doc).encode()


# -- a CA of the test's own (the --admin-ca bundle, and an attacker's CA) ---------------------


class OwnCA:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def client(
        self, folder: Path, cn: str, *, org: str = "ops", expired: bool = False
    ) -> tuple[str, str]:
        """A client certificate and key file for ``CN=cn,O=org``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        start, end = (
            (now - timedelta(days=2), now - timedelta(days=1))
            if expired
            else (now - timedelta(minutes=5), now + timedelta(hours=1))
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .sign(self.key, hashes.SHA256())
        )
        crt, kf = folder / f"{cn}.crt", folder / f"{cn}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kf.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(crt), str(kf)


def tls(serve: ServeProcess, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    """Verifies the server (its CA from the credential file), presents ``cert`` if given,
    and carries no token."""
    ctx = ssl.create_default_context(cadata=serve.credentials.ca_pem)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def call(
    serve: ServeProcess,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    ctx: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    return http_json(
        serve.base + path,
        method=method,
        body=body,
        headers=headers,
        context=ctx or tls(serve),
    )


def refused_by_tls(serve: ServeProcess, ctx: ssl.SSLContext) -> str:
    """The handshake (or the first read) fails: the error text. Fails if anything answers."""
    try:
        status, body = call(serve, "/v1/whoami", ctx=ctx)
    except OSError as exc:  # URLError, SSLError, ConnectionResetError
        return str(exc)
    raise AssertionError(f"answered {status}: {body}")


def actors(serve: ServeProcess, tmp: Path) -> list[str]:
    """The actors of the changes made through the API, in log order (one per request: the
    CA's own events are left out)."""
    log = SqliteLog(tmp / "log.db")
    try:
        codec = default_codec()
        envs = [codec.decode(r.value, where=r.where).envelope for r in log.read(start=Position())]
    finally:
        log.close()
    out: list[str] = []
    for env in envs:
        if env.source == "api" and (not out or out[-1] != env.actor):
            out.append(env.actor)
    return out


def metric(serve: ServeProcess, series: str) -> float:
    """The value of one Prometheus series (``name{labels}``), 0 when absent."""
    _, text = serve.request("/metrics")
    for line in str(text).splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def admin_ca() -> OwnCA:
    return OwnCA("test admin CA")


@pytest.fixture
def serve(tmp_path: Path, admin_ca: OwnCA) -> Iterator[ServeProcess]:
    bundle = tmp_path / "admin-ca.pem"
    bundle.write_text(admin_ca.pem())
    # xDS over mTLS, local CA and the certificate service: the mesh certificate a test
    # presents to the API is a VM's, made by its agent
    s = ServeProcess(tmp_path, args=["--admin-ca", str(bundle), "--xds-tls"])
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_every_route_but_the_probes_needs_a_credential(serve: ServeProcess, tmp_path: Path) -> None:
    for path in ("/healthz", "/readyz"):
        assert call(serve, path)[0] == 200
    for method, path in PROTECTED:
        body = PERMISSIVE if method in ("POST", "PUT") else None
        status, answer = call(serve, path, method=method, body=body)
        assert status == 401, (method, path, status, answer)
        assert "authentication required" in answer["errors"][0]["reason"]
    # a forged actor, a token that is not the admin's, a malformed header: still 401
    for headers in (
        {"X-SMC-Actor": "alice@security-team"},
        {"Authorization": "Bearer smc-local-" + "A" * 43},
        {"Authorization": "Bearer not-a-kubernetes-token"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer"},
    ):
        status, _ = call(serve, "/v1/apply", method="POST", body=PERMISSIVE, headers=headers)
        assert status == 401, headers
    # plain HTTP on the API port is not served at all
    with pytest.raises(OSError):
        http_json(f"http://127.0.0.1:{serve.http_port}/v1/services", timeout=5)
    # nothing reached the log; every refusal was counted and logged
    assert actors(serve, tmp_path) == []
    assert (
        metric(serve, 'smc_api_auth_refusals_total{reason="unauthenticated"}') >= len(PROTECTED) + 5
    )
    assert "refused POST /v1/apply" in serve.tail(None)
    assert serve.credentials.token is not None
    assert serve.credentials.token not in serve.tail(None)


def test_local_admin_credential_is_private(
    serve: ServeProcess, tmp_path: Path
) -> None:
    folder = serve.credentials_path.parent
    for name in ("admin.token", "credentials.json", "api-ca.key", "tls.key"):
        assert (folder / name).stat().st_mode & 0o777 == 0o600, name
    assert (folder.parent.stat().st_mode & 0o077) == 0
    status, me = serve.request("/v1/whoami")
    assert status == 200 and me["name"] == "local:admin" and "smc:admins" in me["groups"]


def test_grants_impersonation_and_forbidden_answers(
    serve: ServeProcess, tmp_path: Path, admin_ca: OwnCA
) -> None:
    alice = admin_ca.client(tmp_path, "alice")
    ctx = tls(serve, alice)
    status, me = call(serve, "/v1/whoami", ctx=ctx)
    assert status == 200 and me["name"] == "CN=alice,O=ops", me
    assert "ops" in me["groups"] and me["method"] == "client-certificate"
    alice_name = me["name"]
    # no grant yet: 403 naming principal, verb and resource; nothing appended
    status, body = call(serve, "/v1/apply", method="POST", body=SERVICE, ctx=ctx)
    assert status == 403, body
    err = body["errors"][0]
    assert (err["principal"], err["verb"], err["resource"], err["namespace"]) == (
        alice_name,
        "apply",
        "meshservices",
        "shop",
    )
    assert f"{alice_name} may not apply meshservices" in err["reason"]
    for path in ("/v1/services", "/debug/proxies", "/metrics", "/v1/certs", "/v1/grants"):
        assert call(serve, path, ctx=ctx)[0] == 403, path
    # she cannot grant herself anything
    status, _ = call(
        serve,
        "/v1/grants/self",
        method="PUT",
        body=grant("self", [alice_name], ["*"]),
        ctx=ctx,
    )
    assert status == 403
    assert actors(serve, tmp_path) == []
    # the admin grants the group "ops" apply in namespace shop only (recorded on the log)
    status, body = serve.request(
        "/v1/grants/ops-shop",
        method="PUT",
        body=grant("ops-shop", ["group:ops"], ["apply", "get"], namespaces=["shop"]),
    )
    assert status == 200, body
    status, body = call(serve, "/v1/apply", method="POST", body=SERVICE, ctx=ctx)
    assert status == 200 and body["actor"] == alice_name, body
    status, body = call(serve, "/v1/apply", method="POST", body=PERMISSIVE, ctx=ctx)
    assert status == 403 and body["errors"][0]["namespace"] == "smc-system"
    # reading every namespace needs a grant on every namespace
    assert call(serve, "/v1/services", ctx=ctx)[0] == 403
    # impersonation without the impersonate grant: 403, nothing recorded under bob's name
    status, body = call(
        serve,
        "/v1/apply",
        method="POST",
        body=SERVICE,
        ctx=ctx,
        headers={"X-SMC-Actor": "bob"},
    )
    assert status == 403 and body["errors"][0]["verb"] == "impersonate", body
    assert body["errors"][0]["resource"] == "users/bob"
    # the admin may impersonate; the impersonated name needs its own grant
    status, body = serve.request(
        "/v1/apply", method="POST", body=SERVICE, headers={"X-SMC-Actor": "bob"}
    )
    assert status == 403 and body["errors"][0]["principal"] == "local:admin as bob"
    assert (
        serve.request("/v1/grants/bob", method="PUT", body=grant("bob", ["bob"], ["apply"]))[0]
        == 200
    )
    status, body = serve.request(
        "/v1/apply", method="POST", body=PERMISSIVE, headers={"X-SMC-Actor": "bob"}
    )
    assert status == 200 and body["actor"] == "local:admin as bob"
    recorded = actors(serve, tmp_path)
    assert recorded == ["local:admin", alice_name, "local:admin", "local:admin as bob"]
    # revoking a grant takes effect at once
    assert serve.request("/v1/grants/ops-shop", method="DELETE")[0] == 200
    assert call(serve, "/v1/apply", method="POST", body=SERVICE, ctx=ctx)[0] == 403
    # the audit shows who granted and who changed what, impersonation included
    out = subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{tmp_path / 'log.db'}", "audit",
         "--actor", "bob", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert {e["actor"] for e in json.loads(out.stdout)["events"]} == {"local:admin as bob"}
    # refusals are counted
    assert metric(serve, 'smc_api_auth_refusals_total{reason="forbidden"}') >= 10
    # a bad grant is refused naming the field
    status, body = serve.request(
        "/v1/grants/bad", method="PUT", body=grant("bad", ["x"], ["steal"])
    )
    assert status == 422 and body["errors"][0]["field"] == "spec.verbs[0]"


def test_client_certificates_from_another_ca_or_expired_fail_the_handshake(
    serve: ServeProcess, tmp_path: Path, admin_ca: OwnCA
) -> None:
    attacker = OwnCA("test admin CA")  # same name, other key
    forged = attacker.client(tmp_path, "root", org="smc:admins")
    refused_by_tls(serve, tls(serve, forged))
    expired = admin_ca.client(tmp_path, "old", expired=True)
    refused_by_tls(serve, tls(serve, expired))
    # a server that is not the real one: the client refuses it (its CA is not the API's)
    ctx = ssl.create_default_context(cadata=attacker.pem())
    with pytest.raises(OSError):
        call(serve, "/readyz", ctx=ctx)
    assert actors(serve, tmp_path) == []


def test_mesh_certificate_authenticates_until_revoked(serve: ServeProcess, tmp_path: Path) -> None:
    assert serve.request("/v1/apply", method="POST", body=SERVICE + b"---\n" + VM)[0] == 200
    spiffe = "spiffe://cluster.local/ns/shop/sa/web"
    # the test as the VM's host: its agent makes the VM's key here and gets it certified
    vm_dir = tmp_path / "vm-web-1"
    agent = serve.start_vm_agent(namespace="shop", name="web-1", folder=vm_dir)
    try:
        held = read_secret(vm_dir)
    finally:
        agent.terminate()
        agent.wait(timeout=20)
    assert held is not None
    pair = (str(tmp_path / "stolen.crt"), str(tmp_path / "stolen.key"))  # kept after it left
    for text, dst in zip(held, pair, strict=True):
        Path(dst).write_text(text)

    def whoami() -> Any:
        try:
            status, body = call(serve, "/v1/whoami", ctx=tls(serve, pair))
        except OSError:
            return None  # the mesh roots are not trusted yet
        return body if status == 200 else None

    me = eventually(whoami, what="the mesh certificate accepted", diag=serve.tail)
    assert me["name"] == spiffe and me["method"] == "client-certificate"
    status, body = call(serve, "/v1/apply", method="POST", body=PERMISSIVE, ctx=tls(serve, pair))
    assert status == 403 and body["errors"][0]["principal"] == spiffe
    status, certs = serve.request("/v1/certs")
    assert "key" not in json.dumps(certs).lower().replace("keyusage", "")
    # the VM is deleted: its certificate is revoked, and the API refuses it from then on
    assert serve.request("/v1/delete", method="POST", body=VM)[0] == 200

    def refused() -> Any:
        status, body = call(serve, "/v1/whoami", ctx=tls(serve, pair))
        return body if status == 401 else None

    body = eventually(refused, what="the revoked certificate refused", diag=serve.tail)
    assert "revoked" in body["errors"][0]["reason"]


def test_cli_talks_to_the_server_with_the_local_credential(
    serve: ServeProcess, tmp_path: Path
) -> None:
    manifest = tmp_path / "svc.yaml"
    manifest.write_bytes(SERVICE)
    env = {**serve.env(), "SMC_SERVER": serve.base}
    env.pop("SMC_TOKEN", None)

    def smc(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "smc.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra},
        )

    out = smc("apply", "-f", str(manifest))
    assert out.returncode == 0, out.stderr
    assert "MeshService/shop/web created" in out.stdout
    out = smc("get", "services", "-o", "json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["name"] == "web", out.stderr
    assert actors(serve, tmp_path) == ["local:admin"]
    # --as without a grant for that name: refused by the server, exit 1, one clear line
    out = smc("delete", "-f", str(manifest), "--as", "mallory")
    assert out.returncode == 1 and "HTTP 403" in out.stderr and "Traceback" not in out.stderr
    # a wrong token: 401
    token = tmp_path / "token"
    token.write_text("smc-local-" + "B" * 43)
    out = smc("--token-file", str(token), "get", "services")
    assert out.returncode == 1 and "HTTP 401" in out.stderr
    out = smc("get", "services", SMC_TOKEN="stolen")
    assert out.returncode == 1 and "HTTP 401" in out.stderr
    # proxy status finds the credential too
    out = smc("proxy", "status", "--server", serve.base, "--json")
    assert out.returncode == 0 and "proxies" in json.loads(out.stdout), out.stderr
    # from another machine (no credential file) it says what to give
    out = smc("get", "services", SMC_CONFIG_DIR=str(tmp_path / "elsewhere"))
    assert out.returncode == 1 and "no credential" in out.stderr
    assert actors(serve, tmp_path) == ["local:admin"]


def test_public_metrics_option(tmp_path: Path) -> None:
    s = ServeProcess(tmp_path, args=["--public-metrics"])
    try:
        s.wait_ready()
        status, text = call(s, "/metrics")
        assert status == 200 and "smc_api_auth_refusals" in str(text)
        assert call(s, "/debug/proxies")[0] == 401
    finally:
        s.stop()


def test_admin_token_is_kept_across_restarts_and_must_stay_private(tmp_path: Path) -> None:
    s = ServeProcess(tmp_path, args=["--xds", "off", "--auth-dir", str(tmp_path / "auth")])
    try:
        s.wait_ready()
        first = s.credentials.token
    finally:
        s.stop()
    token = tmp_path / "auth" / "admin.token"
    assert token.read_text().strip() == first
    s = ServeProcess(tmp_path, args=["--xds", "off", "--auth-dir", str(tmp_path / "auth")])
    try:
        s.wait_ready()
        assert s.credentials.token == first
        assert s.request("/v1/whoami")[1]["name"] == "local:admin"
    finally:
        s.stop()
    os.chmod(token, 0o644)
    s = ServeProcess(tmp_path, args=["--xds", "off", "--auth-dir", str(tmp_path / "auth")])
    deadline = time.monotonic() + 60
    while s.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    s.stop()
    assert s.proc.returncode == 1 and "chmod 600" in s.tail(), s.tail()
