"""mTLS end to end: the CA's certificates, served over SDS, secure real Envoy sidecars.

The control plane (smc.testing.mesh.ControlPlane) runs the CA next to the projections: it issues
a certificate per registry identity into a KeyStore, records the lifecycle on the log and the
xDS controller serves each proxy its own certificate plus the trust bundle (with the issuer's
CRLs once something was revoked). Two issuers: a LocalIssuer, and a VaultIssuer on a real
OpenBao dev server. Per issuer, real Envoys carry client -> server traffic over mTLS; direct TLS
clients (Python ssl) play the wrong identity, the missing certificate, plain HTTP and the
revoked identity against the server sidecar's inbound listener. With the local issuer also:
forced renewal under a steady request stream, revocation, root rotation (both roots trusted,
leaves moved, old root retired) with traffic throughout, a control-plane restart that rebuilds
the certificate state from the log without issuing anything, and a scan of every log record
for key bytes. This is the in-process harness's ``ControlPlane(agents=False)`` mode (one
certificate per identity, made by the control plane), a test-harness mode only: ``smc serve``
has no such mode (its proxies' keys are made by SMC agents, tested in tests/test_agent_e2e.py,
tests/test_vm_bootstrap.py and tests/test_serve_wiring.py).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.ca import IssuedCertificate, Issuer, LocalIssuer, VaultIssuer, certificate_event
from smc.events import (
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    Position,
    ServiceAccountRemoved,
    SqliteLog,
    make_event,
)
from smc.projections import CertsProjection
from smc.testing.manifests import client_server_yaml
from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml
from smc.testing.vault import OpenBaoServer, setup_pki
from smc.testing.wait import wait_until
from smc.xds import ROOT_SECRET, SECRET, WORKLOAD_SECRET

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.envoy]

NS = "demo"
TD = "cluster.local"

SETUP = client_server_yaml("demo", sources=("client", "evict"))


def spiffe(sa: str) -> str:
    return f"spiffe://{TD}/ns/{NS}/sa/{sa}"


def serial_of(pem: str) -> int:
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


class Mesh:
    """One control plane, a client and a server sidecar (real Envoys), and an "evict"
    workload that only exists in the registry (its certificate is used by a direct client)."""

    def __init__(self, cp: ControlPlane, client: Sidecar, server: Sidecar, evict: Sidecar) -> None:
        self.cp = cp
        self.client = client
        self.server = server
        self.evict = evict
        self.session: aiohttp.ClientSession
        self.tmp = Path(tempfile.mkdtemp(prefix="smc-mtls-"))
        self.seen_keys: list[str] = []  # every private key PEM the test saw (for the scan)

    async def request(self, path: str = "/api/x") -> tuple[int, dict[str, Any] | None]:
        async with self.session.get(
            self.client.outbound + path, headers={"Host": "server.demo"}
        ) as resp:
            body = await resp.json() if resp.status == 200 else None
            return resp.status, body

    def ssl_context(
        self, *, cert: tuple[str, str, str] | None, roots: list[str] | None = None
    ) -> ssl.SSLContext:
        """A TLS client context trusting the mesh roots, presenting ``cert`` (or none)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        bundle = roots if roots is not None else self.cp.keystore.trust_bundle()
        ctx.load_verify_locations(cadata="".join(r for r in bundle if "CERTIFICATE" in r))
        if cert is not None:
            cert_pem, chain_pem, key_pem = cert
            self.seen_keys.append(key_pem)
            fd, path = tempfile.mkstemp(dir=self.tmp, suffix=".pem")
            with os.fdopen(fd, "w") as f:
                f.write(cert_pem.rstrip("\n") + "\n" + chain_pem + "\n" + key_pem)
            ctx.load_cert_chain(path)
        return ctx

    async def direct(
        self, *, cert: tuple[str, str, str] | None, roots: list[str] | None = None
    ) -> int | str:
        """GET /api/direct straight to the server sidecar's inbound listener over TLS with
        ``cert`` as client certificate: the HTTP status, or the error class when refused."""
        ctx = self.ssl_context(cert=cert, roots=roots)
        url = f"https://{self.server.address}:8080/api/direct"
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx, force_close=True),
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as s,
                s.get(url, headers={"Host": "server.demo"}) as resp,
            ):
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
            return type(exc).__name__

    async def plain_http(self) -> int | str:
        url = f"http://{self.server.address}:8080/api/plain"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
                s.get(url, headers={"Host": "server.demo"}) as resp,
            ):
                return resp.status
        except (aiohttp.ClientError, ConnectionError) as exc:
            return type(exc).__name__

    def issue(self, identity: str, issuer: Issuer | None = None) -> IssuedCertificate:
        cert = (issuer or self.cp.issuer).issue(identity=identity, lifetime=timedelta(hours=1))
        self.seen_keys.append(cert.private_key_pem)
        return cert

    def material(self, sa: str) -> tuple[str, str, str]:
        found = self.cp.keystore.get(f"{NS}/{sa}")
        assert found is not None, f"no certificate served for {sa}"
        self.seen_keys.append(found.key_pem)
        return (found.cert_pem, found.chain_pem, found.key_pem)

    async def remove_identity(self, sidecar: Sidecar, sa: str) -> None:
        """The identity leaves the registry: its VM is deleted (API) and its service account
        removed (as the Kubernetes informer records it)."""
        await self.cp.apply(vm_yaml(sidecar, service_account=sa), delete=True)
        gone = make_event(ServiceAccountRemoved, source="test", actor="test", namespace=NS, name=sa)
        await asyncio.to_thread(self.cp.log.append, [gone])

    async def force_renew(self, sa: str) -> IssuedCertificate:
        """What ``smc certs rotate`` does: issue, keep the key in the key store directory,
        append CertificateRenewed; the running CA then serves it."""
        uri = spiffe(sa)
        certs = next(p for p in self.cp.runner.projections if isinstance(p, CertsProjection))
        cur = certs.current_cert(uri)
        assert cur is not None
        cert = await asyncio.to_thread(self.issue, uri)
        self.cp.keystore.put(cert, durable=True)
        event = certificate_event(cert, previous_serial=cur.serial, source="test", actor="test")
        await asyncio.to_thread(self.cp.log.append, [event])
        return cert

    def served_secret_acked(self, node_id: str, needle: Callable[[str], bool]) -> bool:
        """The proxy ACKed the Secret version it is meant to have, and that snapshot's SDS
        secrets satisfy ``needle`` (given the PEM text of ``default`` + ``ROOTCA``)."""
        snap = self.cp.controller.cache.get(node_id)
        if snap is None:
            return False
        text = ""
        for name in (WORKLOAD_SECRET, ROOT_SECRET):
            res = snap.resource(SECRET, name)
            if res is None:
                return False
            text += str(res)
        if not needle(text):
            return False
        for p in self.cp.server.proxies():
            if p.node_id == node_id:
                ts = p.types.get(SECRET)
                return (
                    ts is not None and not ts.pending and ts.acked_version == snap.version(SECRET)
                )
        return False

    def roots_served(self, node_id: str) -> list[int]:
        snap = self.cp.controller.cache.get(node_id)
        assert snap is not None
        res = snap.resource(SECRET, ROOT_SECRET)
        assert res is not None
        pem = res.validation_context.trusted_ca.inline_string  # type: ignore[attr-defined]
        return [
            c.serial_number
            for c in x509.load_pem_x509_certificates(pem.encode())
            if "CERTIFICATE" in pem
        ]


class Traffic:
    """A steady stream of requests client -> server through the sidecars."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.ok = 0
        self.failures: list[Any] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _ = await self.mesh.request("/api/stream")
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = type(exc).__name__  # type: ignore[assignment]
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(status)
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        await wait_until(lambda: self.ok > 0, what="first request of the stream")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def make_mesh(
    workdir: Path, *, issuer: Issuer | None, octet: int
) -> tuple[Mesh, Callable[[], Awaitable[None]]]:
    # the control-plane key mode (identity keys in the key directory) over mTLS ADS
    cp = ControlPlane(
        workdir=workdir, issuer=issuer, trust_interval=0.3, crl_refresh=0.3, agents=False
    )
    await cp.start()
    client = Sidecar(namespace=NS, name="client-1", address=f"127.0.{octet}.1", workdir=workdir)
    server = Sidecar(namespace=NS, name="server-1", address=f"127.0.{octet}.2", workdir=workdir)
    evict = Sidecar(namespace=NS, name="evict-1", address=f"127.0.{octet}.3", workdir=workdir)
    for s in (client, server):
        await s.start_app()
    docs = [
        SETUP,
        vm_yaml(client, service_account="client"),
        vm_yaml(server, service_account="server", labels={"app": "server"}),
        vm_yaml(evict, service_account="evict"),
    ]
    await cp.apply("\n---\n".join(docs))
    for s in (client, server):
        await cp.start_proxy(s, delta=False)
    for s in (client, server):
        assert s.envoy is not None
        await s.envoy.wait_live()
    mesh = Mesh(cp, client, server, evict)

    async def close() -> None:
        for s in (client, server):
            await s.stop()
        await cp.stop()
        cp.close()

    return mesh, close


@pytest.fixture(scope="module")
async def local(tmp_path_factory: Any) -> AsyncIterator[Mesh]:
    mesh, close = await make_mesh(tmp_path_factory.mktemp("mtls-local"), issuer=None, octet=51)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=5),
    ) as session:
        mesh.session = session
        await wait_until(lambda: _ok(mesh), timeout=20, what="first mTLS request client -> server")
        yield mesh
    await close()


async def _ok(mesh: Mesh) -> bool:
    try:
        status, _ = await mesh.request()
    except (aiohttp.ClientError, TimeoutError):
        return False
    return status == 200


async def refused_soon(mesh: Mesh, cert: tuple[str, str, str], timeout: float = 5.0) -> None:
    """A direct TLS client with ``cert`` is refused at the connection (the proxy ACKed the
    change already; its workers pick up the new TLS context a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await mesh.direct(cert=cert)
        if isinstance(got, str):
            return
        assert time.monotonic() < deadline, f"still accepted: {got}"
        await asyncio.sleep(0.1)


def assert_no_nacks(mesh: Mesh) -> None:
    for s in (mesh.client, mesh.server):
        if s.envoy is not None:
            assert s.rejected() == {}, f"{s.name} rejected config"
    assert mesh.cp.server.nacks() == []


async def check_mtls_and_refusals(mesh: Mesh, issuer_root_subject: x509.Name) -> None:
    status, body = await mesh.request()
    assert status == 200 and body is not None
    assert body["app"] == "server-1"
    # The server sidecar verified the client's certificate and forwards its SPIFFE id.
    assert f"URI={spiffe('client')}" in body["xfcc"]
    # Each Envoy runs exactly the certificate the key store serves for its identity, and
    # that certificate chains to the issuer's root.
    for sc, sa in ((mesh.client, "client"), (mesh.server, "server")):
        cert_pem = mesh.material(sa)[0]
        await wait_until(
            lambda sc=sc, cert_pem=cert_pem: serial_of(cert_pem) in sc.cert_serials(),
            what=f"{sa} certificate loaded by Envoy",
        )
        leaf = x509.load_pem_x509_certificate(cert_pem.encode())
        assert leaf.issuer == issuer_root_subject
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe(sa)]
    # Straight to the inbound listener: an allowed identity passes ...
    assert await mesh.direct(cert=mesh.material("client")) == 200
    # ... a valid certificate of the mesh CA for an identity the policy does not allow is
    # refused by the RBAC filter ...
    intruder = await asyncio.to_thread(mesh.issue, spiffe("intruder"))
    assert (
        await mesh.direct(cert=(intruder.cert_pem, intruder.chain_pem, intruder.private_key_pem))
        == 403
    )
    # ... and no client certificate, or no TLS at all, is refused at the connection.
    refused = await mesh.direct(cert=None)
    assert isinstance(refused, str), refused
    plain = await mesh.plain_http()
    assert isinstance(plain, str), plain


async def test_mtls_with_local_issuer_wrong_identity_and_no_cert_refused(local: Mesh) -> None:
    issuer = local.cp.issuer
    assert isinstance(issuer, LocalIssuer)
    root = x509.load_pem_x509_certificate(issuer.trust_bundle()[0].encode())
    await check_mtls_and_refusals(local, root.subject)
    # A certificate naming the allowed identity but signed by a foreign CA is refused too.
    other = LocalIssuer(directory=local.tmp / "other-ca", trust_domain=TD)
    forged = await asyncio.to_thread(local.issue, spiffe("client"), other)
    refused = await local.direct(cert=(forged.cert_pem, forged.chain_pem, forged.private_key_pem))
    assert isinstance(refused, str), refused
    assert_no_nacks(local)


async def test_forced_renewal_under_steady_traffic_loses_no_request(local: Mesh) -> None:
    async with Traffic(local) as traffic:
        for round_ in range(2):
            old = {sa: serial_of(local.material(sa)[0]) for sa in ("client", "server")}
            new = {sa: (await local.force_renew(sa)).serial for sa in ("client", "server")}
            for sc, sa in ((local.client, "client"), (local.server, "server")):
                want = int(new[sa], 16)
                await wait_until(
                    lambda sc=sc, want=want: want in sc.cert_serials(),
                    what=f"renewed {sa} certificate in Envoy (round {round_})",
                )
                assert old[sa] not in sc.cert_serials()
            await asyncio.sleep(0.3)
        ok_before_end = traffic.ok
    assert traffic.failures == [], traffic.failures
    assert ok_before_end > 10
    # Requests still carry the client's identity after the renewals.
    status, body = await local.request()
    assert status == 200 and body is not None and f"URI={spiffe('client')}" in body["xfcc"]
    assert_no_nacks(local)


async def test_revocation_stops_new_connections_of_the_identity(local: Mesh) -> None:
    evict = local.material("evict")
    assert await local.direct(cert=evict) == 200  # allowed by policy while it is current
    serial = serial_of(evict[0])
    async with Traffic(local) as traffic:
        # The identity leaves the registry: the CA revokes its certificate, the issuer's CRL
        # joins the trust bundle, and SDS pushes it to every proxy.
        await local.remove_identity(local.evict, "evict")
        await wait_until(
            lambda: local.cp.keystore.get(f"{NS}/evict") is None, what="evict certificate dropped"
        )
        await wait_until(
            lambda: local.served_secret_acked("demo/server-1", lambda t: "X509 CRL" in t),
            what="server-1 ACKed a trust bundle with the CRL",
        )
        await refused_soon(local, evict)
        # The good identities are unaffected (the CRL lists only the revoked serial).
        assert await local.direct(cert=local.material("client")) == 200
    assert traffic.failures == [], traffic.failures
    revoked = [
        r
        for r in local.cp.log.read(start=Position(), max_records=100_000)
        if r.event_type == CertificateRevoked.TYPE
    ]
    assert len(revoked) == 1
    issuer = local.cp.issuer
    assert isinstance(issuer, LocalIssuer)
    crl = x509.load_pem_x509_crl(issuer.crl_pem().encode())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert_no_nacks(local)


async def test_root_rotation_trusts_both_then_retires_old_with_traffic(local: Mesh) -> None:
    issuer = local.cp.issuer
    assert isinstance(issuer, LocalIssuer)
    (old_root,) = issuer.trusted_root_serials()
    old_root_int = int(old_root, 16)
    # A client certificate from the old root, to check its retirement at the end.
    old_client = await asyncio.to_thread(local.issue, spiffe("client"))
    old_cert = (old_client.cert_pem, old_client.chain_pem, old_client.private_key_pem)
    async with Traffic(local) as traffic:
        new_root = await asyncio.to_thread(issuer.rotate_root)
        new_root_int = int(new_root, 16)
        # 1. The bundle carries both roots on every proxy before any leaf moves.
        for node in ("demo/client-1", "demo/server-1"):
            await wait_until(
                lambda node=node: (
                    sorted(local.roots_served(node)) == sorted([old_root_int, new_root_int])
                    and local.served_secret_acked(node, lambda t: True)
                ),
                what=f"{node} trusts both roots",
            )
        for sa in ("client", "server"):
            leaf = x509.load_pem_x509_certificate(local.material(sa)[0].encode())
            assert leaf.issuer != _root_subject(issuer, new_root)  # leaves not moved yet
        # 2. Leaves move to the new root.
        for sa, sc in (("server", local.server), ("client", local.client)):
            cert = await local.force_renew(sa)
            assert x509.load_pem_x509_certificate(cert.cert_pem.encode()).issuer == (
                _root_subject(issuer, new_root)
            )
            await wait_until(
                lambda sc=sc, cert=cert: int(cert.serial, 16) in sc.cert_serials(),
                what=f"{sa} leaf from the new root in Envoy",
            )
        assert await local.direct(cert=old_cert) == 200  # old root still trusted
        # 3. The old root is retired: bundle holds only the new one.
        await asyncio.to_thread(issuer.retire_root, old_root)
        for node in ("demo/client-1", "demo/server-1"):
            await wait_until(
                lambda node=node: (
                    local.roots_served(node) == [new_root_int]
                    and local.served_secret_acked(node, lambda t: True)
                ),
                what=f"{node} trusts only the new root",
            )
        await refused_soon(local, old_cert)
    assert traffic.failures == [], traffic.failures
    assert traffic.ok > 20
    assert_no_nacks(local)


def _root_subject(issuer: LocalIssuer, serial: str) -> x509.Name:
    for pem in issuer.trust_bundle():
        cert = x509.load_pem_x509_certificate(pem.encode())
        if cert.serial_number == int(serial, 16):
            return cert.subject
    raise AssertionError(f"root {serial} not trusted")


def _cert_events(log: SqliteLog) -> int:
    names = {CertificateIssued.TYPE, CertificateRenewed.TYPE}
    return sum(1 for r in log.read(start=Position(), max_records=100_000) if r.event_type in names)


async def test_restart_rebuilds_certificate_state_from_the_log(local: Mesh) -> None:
    def certs_digest() -> str:
        return next(
            p for p in local.cp.runner.projections if isinstance(p, CertsProjection)
        ).digest()

    await asyncio.sleep(0.5)  # let the CA settle (no pass in flight)
    digest = certs_digest()
    events = _cert_events(local.cp.log)

    def secret_version(node: str) -> str | None:
        snap = local.cp.controller.cache.get(node)
        return snap.version(SECRET) if snap is not None else None

    secret_versions = {n: secret_version(n) for n in ("demo/client-1", "demo/server-1")}
    serials = {sc.name: sc.cert_serials() for sc in (local.client, local.server)}
    await local.cp.restart()
    assert certs_digest() == digest
    for node, version in secret_versions.items():
        await wait_until(
            lambda node=node, version=version: (
                local.served_secret_acked(node, lambda t: True) and secret_version(node) == version
            ),
            what=f"{node} back on the same secrets",
        )
    await asyncio.sleep(1.0)  # several CA passes (trust_interval 0.3 s)
    assert _cert_events(local.cp.log) == events, "the restarted CA issued certificates"
    assert certs_digest() == digest
    for sc in (local.client, local.server):
        assert sc.cert_serials() == serials[sc.name]
    status, _ = await local.request()
    assert status == 200
    assert_no_nacks(local)


def _key_secrets(key_pem: str) -> list[bytes]:
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    body = "".join(ln for ln in key_pem.splitlines() if ln and not ln.startswith("-----"))
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    raw = key.private_numbers().private_value.to_bytes(32, "big")
    return [body.encode(), body[:48].encode(), der, raw]


async def test_no_key_bytes_on_the_log(local: Mesh) -> None:
    keys = set(local.seen_keys)
    keys.update(p.read_text() for p in local.cp.keys_dir.glob("*.key"))
    issuer = local.cp.issuer
    assert isinstance(issuer, LocalIssuer)
    keys.update(p.read_text() for p in (issuer.directory / "roots").glob("*.key"))
    assert len(keys) >= 8
    secrets = [s for k in keys for s in _key_secrets(k)]
    records = local.cp.log.read(start=Position(), max_records=100_000)
    assert len(records) > 10
    for rec in records:
        assert b"PRIVATE KEY" not in rec.value
        for s in secrets:
            assert s not in rec.value, f"key material in record {rec.stream}:{rec.offset}"


# ---------------------------------------------------------------------- Vault (OpenBao)


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with OpenBaoServer() as server:
        yield server


@pytest.fixture(scope="module")
async def vault(bao: OpenBaoServer, tmp_path_factory: Any) -> AsyncIterator[tuple[Mesh, str]]:
    pki = setup_pki(bao.client(), mount="pki", trust_domain=TD)
    issuer = VaultIssuer(
        url=bao.url, token=bao.token, mount=pki.mount, role=pki.role, trust_domain=TD
    )
    mesh, close = await make_mesh(tmp_path_factory.mktemp("mtls-vault"), issuer=issuer, octet=52)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=5),
    ) as session:
        mesh.session = session
        await wait_until(lambda: _ok(mesh), timeout=20, what="first mTLS request (Vault)")
        yield mesh, pki.root_pem
    await close()
    issuer.close()


async def test_vault_issuer_mtls_renewal_and_revocation(vault: tuple[Mesh, str]) -> None:
    mesh, root_pem = vault
    root = x509.load_pem_x509_certificate(root_pem.encode())
    await check_mtls_and_refusals(mesh, root.subject)
    # Forced renewal with Vault-signed certificates under a steady stream.
    async with Traffic(mesh) as traffic:
        for sa, sc in (("server", mesh.server), ("client", mesh.client)):
            cert = await mesh.force_renew(sa)
            await wait_until(
                lambda sc=sc, cert=cert: int(cert.serial, 16) in sc.cert_serials(),
                what=f"renewed {sa} (Vault) in Envoy",
            )
        # Revocation at Vault: its CRL joins the bundle and the identity is refused.
        evict = mesh.material("evict")
        assert await mesh.direct(cert=evict) == 200
        await mesh.remove_identity(mesh.evict, "evict")
        await wait_until(
            lambda: mesh.served_secret_acked("demo/server-1", lambda t: "X509 CRL" in t),
            what="server-1 ACKed a trust bundle with Vault's CRL",
        )
        await refused_soon(mesh, evict)
        assert await mesh.direct(cert=mesh.material("client")) == 200
    assert traffic.failures == [], traffic.failures
    records = mesh.cp.log.read(start=Position(), max_records=100_000)
    secrets = [s for k in set(mesh.seen_keys) for s in _key_secrets(k)]
    for rec in records:
        assert b"PRIVATE KEY" not in rec.value
        assert not any(s in rec.value for s in secrets)
    assert_no_nacks(mesh)


# ---------------------------------------------------------------------- smc serve
