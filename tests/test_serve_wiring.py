"""``smc serve`` wiring, each test against a real ``smc serve`` subprocess.

1. An unreachable log during ``POST /v1/apply`` answers 503 with a JSON error (the serve process
   is given a file-size limit of 0 bytes with ``prlimit``, so every SQLite write fails with
   EFBIG); once the limit is lifted the same apply succeeds.
2. ``--xds-tls``: a real Envoy whose bootstrap carries the certificate its VM's real SMC agent
   got from the serve CA (its key made by the agent, on the test's host) gets its listener over
   mTLS ADS, and the control plane's snapshot and key directory hold no key; a raw gRPC client without a client
   certificate cannot connect; a follower without ``--xds-cert`` is refused with a clear error.
3. ``--kube KUBECONFIG`` against a real kube-apiserver: a Service in a labelled namespace shows in
   ``GET /v1/services``; SIGTERM stops serve (informers included) with exit status 0.
4. A follower's :class:`KeyStoreCertSource` (no issuer) over the issuing replica's key directory
   serves the same trust bundle, CRLs included, after a revocation.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from smc.agent._files import read_secret
from smc.ca import KeyStore, LocalIssuer
from smc.testing.envoy import AdsTLS, EnvoyProcess, ads_bootstrap
from smc.testing.kube import KubeAPIServer, KubeBuildError
from smc.testing.ports import free_port
from smc.testing.serve import ServeProcess
from smc.xds import CLUSTER
from smc.xds._certs import KeyStoreCertSource

pytestmark = pytest.mark.timeout(180)

SERVICE = """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: web, namespace: wire}
spec:
  backing: vm
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


class Serve(ServeProcess):
    """One ``smc serve`` subprocess with only the arguments a test gives; its output goes to
    a file for diagnostics."""

    def __init__(self, tmp: Path, *args: str, log_url: str | None = None) -> None:
        super().__init__(tmp, args=args, xds_host=None, log_url=log_url)

    def stderr(self) -> str:
        return self.tail(None)


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for a in started:
        a.terminate()
        a.wait(timeout=20)


@pytest.fixture
def serves(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        s.stop()


def test_apply_while_log_unwritable_answers_503(tmp_path: Path, serves: list[Serve]) -> None:
    s = Serve(tmp_path, "--xds", "off")
    serves.append(s)
    s.wait_ready()
    soft, hard = resource.prlimit(s.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(s.proc.pid, resource.RLIMIT_FSIZE, (0, hard))
    try:
        status, body = s.request("/v1/apply", method="POST", body=SERVICE.encode(), timeout=60)
    finally:
        resource.prlimit(s.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert status == 503, body
    assert isinstance(body, dict) and len(body["errors"]) == 1, body
    reason = body["errors"][0]["reason"]
    assert "event log is unavailable" in reason and "retry" in reason, reason
    assert "Traceback" not in s.stderr()
    assert s.proc.poll() is None
    status, body = s.request("/v1/apply", method="POST", body=SERVICE.encode(), timeout=60)
    assert status == 200, body
    _, services = s.request("/v1/services", timeout=60)
    assert [(i["namespace"], i["name"]) for i in services["items"]] == [("wire", "web")], services
    assert s.stop() == 0


VM = """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: web-1
  namespace: wire
  labels: {app: web}
spec:
  address: 127.0.0.1
  serviceAccount: web
"""


async def first_cds(port: int, creds: grpc.ChannelCredentials, node_id: str) -> Any:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as chan:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(chan)
        req = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id=node_id))
        call = stub.StreamAggregatedResources(iter([req]))
        try:
            return await asyncio.wait_for(call.read(), 10.0)
        finally:
            call.cancel()


@pytest.mark.envoy
async def test_xds_tls_serves_envoy_with_mesh_certificate(
    tmp_path: Path, serves: list[Serve], agents: list[subprocess.Popen[bytes]]
) -> None:
    keys, ca_dir = tmp_path / "keys", tmp_path / "ca"
    xds_port = free_port()
    s = Serve(
        tmp_path,
        "--xds",
        f"127.0.0.1:{xds_port}",
        "--xds-tls",
        "--ca",
        f"local:{ca_dir}",
        "--keys",
        str(keys),
    )
    serves.append(s)
    await asyncio.to_thread(s.wait_ready)
    status, body = s.request("/v1/apply", method="POST", body=VM.encode(), timeout=60)
    assert status == 200, body
    # the test as the VM's host: its SMC agent makes the key here, the serve CA signs its CSR
    s.xds_port = xds_port
    vm_dir = tmp_path / "vm"
    agent = await asyncio.to_thread(
        s.start_vm_agent, namespace="wire", name="web-1", folder=vm_dir
    )
    agents.append(agent)
    held = read_secret(vm_dir)
    assert held is not None
    chain, key = held
    roots = "".join(p.read_text("ascii") for p in sorted((ca_dir / "roots").glob("*.pem")))
    assert roots, "no CA root written"
    assert "over mTLS" in s.stderr()

    # no client certificate: the TLS handshake fails, nothing is served
    bare = grpc.ssl_channel_credentials(root_certificates=roots.encode())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await first_cds(xds_port, bare, "wire/web-1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # cleartext: refused as well
    with pytest.raises(grpc.aio.AioRpcError):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{xds_port}") as chan:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(chan)
            req = discovery_pb2.DiscoveryRequest(
                type_url=CLUSTER, node=base_pb2.Node(id="wire/web-1")
            )
            call = stub.StreamAggregatedResources(iter([req]))
            await asyncio.wait_for(call.read(), 10.0)

    boot = ads_bootstrap(
        node_id="wire/web-1",
        cluster="web",
        ads_host="127.0.0.1",
        ads_port=xds_port,
        delta=False,
        admin_port=free_port(),
        tls=AdsTLS(cert_pem=chain, key_pem=key, ca_pem=roots, server_san="127.0.0.1"),
    )
    # Envoy's working directory is the VM's: the listeners read its key from the agent's file
    envoy = EnvoyProcess(
        bootstrap=boot, workdir=tmp_path / "envoy", log_level="warning", cwd=vm_dir
    )
    try:
        envoy.start()
        await envoy.wait_listener("outbound")
        stats = envoy.stats()
        assert stats.get("control_plane.connected_state") == 1
        assert stats.get("cluster.smc_xds.ssl.handshake", 0) >= 1
        # the control plane's snapshot of the proxy carries the roots and no key at all
        status, dump = s.request("/debug/config_dump?node=wire/web-1", timeout=60)
        assert status == 200, dump
        assert [x["name"] for x in dump["resources"].get("Secret", [])] == ["ROOTCA"], dump
        assert "PRIVATE KEY" not in json.dumps(dump) and key not in json.dumps(dump)
        assert not any(
            key in p.read_text(errors="replace") for p in keys.rglob("*") if p.is_file()
        )
    finally:
        envoy.close()
    assert s.stop() == 0


def tls_serve(tmp_path: Path, serves: list[Serve], xds_port: int, *args: str) -> Serve:
    """``smc serve --xds-tls`` on ``xds_port`` (TLS material re-checked every 0.2 s, keys in
    ``tmp_path/keys``) plus ``args``; registered in ``serves`` to be stopped."""
    s = Serve(
        tmp_path,
        "--xds",
        f"127.0.0.1:{xds_port}",
        "--xds-tls",
        "--xds-tls-refresh",
        "0.2",
        "--keys",
        str(tmp_path / "keys"),
        *args,
    )
    serves.append(s)
    return s


def wait_serving_mtls(*serves: Serve, timeout: float = 60.0) -> None:
    """Until every serve says it answers ADS over mTLS (each alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while not all("over mTLS" in s.stderr() for s in serves):
        logs = "".join(s.stderr() for s in serves)
        assert all(s.proc.poll() is None for s in serves), logs
        assert time.monotonic() < deadline, logs
        time.sleep(0.1)


def _served_certificate(port: int, ca_pem: str) -> x509.Certificate:
    """The certificate the ADS port presents to a new TLS connection (checked against
    ``ca_pem``; no client certificate is needed to see it)."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _serial(cert: Any) -> int:
    return x509.load_pem_x509_certificate(cert.cert_pem.encode()).serial_number


def test_xds_tls_material_is_reloaded_from_files(tmp_path: Path, serves: list[Serve]) -> None:
    """``--xds-cert/--xds-key`` rewritten in place (as a mounted Secret is updated) reach new
    connections within ``--xds-tls-refresh``, without a restart."""
    from smc.injector._tls import issue_serving_certificate

    ca_dir = tmp_path / "ca"
    issuer = LocalIssuer(directory=ca_dir, trust_domain="cluster.local")
    roots = "".join(issuer.trust_bundle())
    cert_file, key_file = tmp_path / "ads.pem", tmp_path / "ads.key"

    def write(cert: Any) -> None:
        for path, text in ((key_file, cert.private_key_pem), (cert_file, cert.cert_pem)):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)

    first = issue_serving_certificate(issuer, ip_addresses=["127.0.0.1"])
    write(first)
    xds_port = free_port()
    s = tls_serve(
        tmp_path,
        serves,
        xds_port,
        "--xds-cert",
        str(cert_file),
        "--xds-key",
        str(key_file),
        "--ca",
        f"local:{ca_dir}",
    )
    wait_serving_mtls(s)
    assert _served_certificate(xds_port, roots).serial_number == _serial(first)
    second = issue_serving_certificate(issuer, ip_addresses=["127.0.0.1"])
    write(second)
    deadline = time.monotonic() + 20
    while _served_certificate(xds_port, roots).serial_number != _serial(second):
        assert time.monotonic() < deadline, s.stderr()
        time.sleep(0.1)
    assert "TLS material rotated" in s.stderr()
    # A half-written pair (key of one, certificate unreadable) keeps the current material.
    cert_file.write_text("not a certificate")
    time.sleep(1.0)
    assert _served_certificate(xds_port, roots).serial_number == _serial(second)
    assert "keeping the current material" in s.stderr()
    assert s.stop() == 0


def test_issued_xds_certificate_is_renewed_before_it_expires(
    tmp_path: Path, serves: list[Serve]
) -> None:
    """The ADS certificate the serve CA issues (here for 3.6 s) is replaced after 2/3 of its
    life, while serve runs."""
    ca_dir = tmp_path / "ca"
    xds_port = free_port()
    s = tls_serve(
        tmp_path, serves, xds_port, "--xds-cert-hours", "0.001", "--ca", f"local:{ca_dir}"
    )
    wait_serving_mtls(s)
    roots = "".join(p.read_text("ascii") for p in sorted((ca_dir / "roots").glob("*.pem")))
    first = _served_certificate(xds_port, roots)
    assert (first.not_valid_after_utc - datetime.now(UTC)).total_seconds() <= 4
    deadline = time.monotonic() + 20
    while (current := _served_certificate(xds_port, roots)).serial_number == first.serial_number:
        assert time.monotonic() < deadline, s.stderr()
        time.sleep(0.2)
    assert current.not_valid_after_utc > first.not_valid_after_utc
    assert s.stop() == 0


def test_followers_serve_the_ads_certificate_the_issuer_exports(
    tmp_path: Path, serves: list[Serve]
) -> None:
    """The issuing replica writes its ADS certificate (``--xds-cert-out``) and each renewal;
    a follower started at the same time waits for the files, serves them, and follows the
    renewal (``--xds-tls-refresh``), as the replicas of deploy/k8s/smc.yaml do."""
    out, ca_dir = tmp_path / "ads", tmp_path / "ca"
    issuer_port, follower_port = free_port(), free_port()
    issuing = tls_serve(
        tmp_path,
        serves,
        issuer_port,
        "--xds-cert-out",
        str(out),
        "--xds-cert-hours",
        "0.003",  # 10.8 s, renewed with 3.6 s left
        "--ca",
        f"local:{ca_dir}",
    )
    follower = tls_serve(
        tmp_path,
        serves,
        follower_port,
        "--xds-cert",
        str(out / "tls.crt"),
        "--xds-key",
        str(out / "tls.key"),
        "--ca",
        "follow",
    )
    wait_serving_mtls(issuing, follower)
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600
    roots = "".join(p.read_text("ascii") for p in sorted((ca_dir / "roots").glob("*.pem")))
    exported = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    first = _served_certificate(issuer_port, roots).serial_number
    assert first == exported.serial_number
    assert _served_certificate(follower_port, roots).serial_number == first
    deadline = time.monotonic() + 30
    while (renewed := _served_certificate(issuer_port, roots).serial_number) == first:
        assert time.monotonic() < deadline, issuing.stderr()
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while _served_certificate(follower_port, roots).serial_number != renewed:
        assert time.monotonic() < deadline, follower.stderr()
        time.sleep(0.1)
    assert follower.stop() == 0 and issuing.stop() == 0


def test_xds_tls_follower_needs_a_server_certificate(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smc.cli",
            "--log",
            f"sqlite:///{tmp_path / 'log.db'}",
            "serve",
            "--http",
            "off",
            "--xds",
            f"127.0.0.1:{free_port()}",
            "--xds-tls",
            "--ca",
            "follow",
            "--keys",
            str(tmp_path / "keys"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--xds-cert FILE --xds-key FILE" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.kube
@pytest.mark.timeout(900)
def test_kube_informers_feed_serve(tmp_path: Path, serves: list[Serve]) -> None:
    from kubernetes import client

    kube = KubeAPIServer(watch_cache=False)
    try:
        kube.start()
    except KubeBuildError as exc:
        pytest.skip(f"kube-apiserver could not be built on this machine: {exc}")
    try:
        kube.install_smi_crds()
        with kube.api_client() as api:
            core = client.CoreV1Api(api)
            ns = "wire-kube"
            core.create_namespace(
                {"metadata": {"name": ns, "labels": {"smc.dev/monitored": "true"}}}
            )
            core.create_namespaced_service_account(ns, {"metadata": {"name": "api"}})
            core.create_namespaced_service(
                ns,
                {
                    "metadata": {"name": "api"},
                    "spec": {"selector": {"app": "api"}, "ports": [{"name": "http", "port": 80}]},
                },
            )
        s = Serve(tmp_path, "--xds", "off", "--kube", str(kube.kubeconfig_path))
        serves.append(s)
        s.wait_ready()
        deadline = time.monotonic() + 60
        names: list[tuple[str, str]] = []
        while time.monotonic() < deadline:
            _, body = s.request("/v1/services", timeout=60)
            names = [(i["namespace"], i["name"]) for i in body["items"]]
            if (ns, "api") in names:
                break
            time.sleep(0.3)
        assert (ns, "api") in names, (names, s.stderr())
        assert "Kubernetes informers watching" in s.stderr()
        t0 = time.monotonic()
        assert s.stop() == 0, s.stderr()
        assert time.monotonic() - t0 < 15
        assert "Traceback" not in s.stderr()
    finally:
        kube.stop()


def test_follower_cert_source_serves_the_issuers_crls(tmp_path: Path) -> None:
    from datetime import timedelta

    keys = tmp_path / "keys"
    issuer = LocalIssuer(directory=tmp_path / "ca", trust_domain="mesh.local")
    issuing_store, following_store = KeyStore(directory=keys), KeyStore(directory=keys)
    for store in (issuing_store, following_store):
        store.set_trust_bundle(issuer.trust_bundle())  # what the log records
    issuing = KeyStoreCertSource(keystore=issuing_store, issuer=lambda: issuer)
    following = KeyStoreCertSource(keystore=following_store, issuer=lambda: None)
    assert issuing.refresh() is False and following.refresh() is False
    assert issuing.trust_bundle() == following.trust_bundle() == issuer.trust_bundle()

    cert = issuer.issue(identity="spiffe://mesh.local/ns/a/sa/b", lifetime=timedelta(hours=1))
    issuer.revoke(serial=cert.serial)
    assert issuing.refresh() is True
    bundle = issuing.trust_bundle()
    assert len(bundle) == len(issuer.trust_bundle()) + 1 and "X509 CRL" in bundle[-1]
    assert (keys / "crls.json").is_file()
    assert following.refresh() is True
    assert following.trust_bundle() == bundle  # identical bytes
    assert following.refresh() is False  # nothing new: no change reported
    # a fresh follower (a restart) serves the same bundle on its first refresh
    again = KeyStoreCertSource(keystore=following_store, issuer=lambda: None)
    again.refresh()
    assert again.trust_bundle() == bundle
