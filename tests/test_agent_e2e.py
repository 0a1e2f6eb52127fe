"""Per-proxy identities end to end: SMC agents make the keys, real Envoys use them.

A control plane (smc.testing.mesh.ControlPlane with agents=True) runs the certificate
service; each VM sidecar has an SMC agent (smc.agent) that made its key in the test process,
got its certificate with a one-time join token, and writes it where a real Envoy reads it
(file-based SDS in the Envoy's working directory). Checked: traffic client -> server over mTLS with those certificates; two proxies
of one identity have their own keys and serials; the control plane's snapshots carry no key;
renewal with the current certificate swaps the secret in the running Envoy; the attacker's
probes (replayed join token, another proxy's id, a renewal signed by another key, a forged
certificate) are refused and counted; deleting a VM revokes its proxy certificate and the
CRL in ROOTCA makes its peer refuse it; no key byte is on the log or in the key directory.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.agent import (
    SIGN_METHOD,
    CertificateClient,
    SigningRefused,
    SignRequest,
    renewal_message,
)
from smc.agent._files import read_secret
from smc.projections import CertsProjection
from smc.testing.manifests import client_server_yaml
from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml
from smc.testing.wait import wait_until
from smc.xds import SECRET

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.envoy]

NS = "demo"

SETUP = client_server_yaml("demo")


class Mesh:
    def __init__(self, cp: ControlPlane, client: Sidecar, servers: list[Sidecar]) -> None:
        self.cp = cp
        self.client = client
        self.servers = servers
        self.session: aiohttp.ClientSession
        self.tmp = Path(tempfile.mkdtemp(prefix="smc-agent-"))

    async def request(self) -> int:
        async with self.session.get(
            self.client.outbound + "/api/x", headers={"Host": "server.demo"}
        ) as resp:
            await resp.read()
            return resp.status

    def agent_material(self, sc: Sidecar) -> tuple[str, str]:
        """(certificate chain, key) an attacker who took over ``sc``'s host would hold."""
        assert sc.agent is not None and sc.agent.current is not None
        found = read_secret(sc.proxy_dir)
        assert found is not None
        return found

    async def direct(self, target: Sidecar, material: tuple[str, str] | None) -> int | str:
        """GET straight to ``target``'s inbound listener presenting ``material``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=self.cp.ca_bundle())
        if material is not None:
            fd, path = tempfile.mkstemp(dir=self.tmp, suffix=".pem")
            with os.fdopen(fd, "w") as f:
                f.write(material[0] + material[1])
            ctx.load_cert_chain(path)
            os.unlink(path)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx, force_close=True),
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as s,
                s.get(
                    f"https://{target.address}:8080/api/direct", headers={"Host": "server.demo"}
                ) as resp,
            ):
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
            return type(exc).__name__


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: Any) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("agent-e2e")
    cp = ControlPlane(workdir=workdir, agents=True, crl_refresh=0.3, revoke_grace=600.0)
    await cp.start()
    client = Sidecar(namespace=NS, name="client-1", address="127.0.61.1", workdir=workdir)
    servers = [
        Sidecar(namespace=NS, name=f"server-{i}", address=f"127.0.61.{i + 1}", workdir=workdir)
        for i in (1, 2)
    ]
    everyone = [client, *servers]
    for s in everyone:
        await s.start_app()
    docs = [SETUP, vm_yaml(client, service_account="client")]
    docs += [vm_yaml(s, service_account="server", labels={"app": "server"}) for s in servers]
    await cp.apply("\n---\n".join(docs))
    await client.start_agent(cp, service_account="client")
    for s in servers:
        await s.start_agent(cp, service_account="server")
    for s in everyone:
        s.start_envoy(ads_port=cp.port, delta=False)
    for s in everyone:
        assert s.envoy is not None
        await s.envoy.wait_live()
    m = Mesh(cp, client, servers)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=5)
    ) as session:
        m.session = session

        async def ok() -> bool:
            try:
                return await m.request() == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_until(ok, timeout=30, what="first request client -> server over mTLS")
        yield m
    for s in everyone:
        await s.stop()
    await cp.stop()
    cp.close()


def certs_projection(cp: ControlPlane) -> CertsProjection:
    return next(p for p in cp.runner.projections if isinstance(p, CertsProjection))


async def test_each_proxy_has_its_own_key_and_certificate(mesh: Mesh) -> None:
    certs = certs_projection(mesh.cp)
    a, b = mesh.servers
    assert a.agent is not None and b.agent is not None
    assert a.agent.current is not None and b.agent.current is not None
    # same identity, two proxies: two keys, two serials, both on the log per proxy
    assert a.agent.current.serial != b.agent.current.serial
    ka = a.agent.current.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kb = b.agent.current.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ka != kb
    for sc in (a, b):
        rec = certs.proxy_cert(f"vm/{NS}/{sc.name}")
        assert rec is not None and rec.identity == f"spiffe://cluster.local/ns/{NS}/sa/server"
        assert rec.serial == sc.agent.current.serial  # type: ignore[union-attr]
        assert rec.proof.startswith("join-token:")
        # the Envoy loaded exactly its own agent's certificate
        assert int(rec.serial, 16) in sc.cert_serials()
    # the control plane's snapshots carry the roots only: no `default`, no key
    for sc in (mesh.client, a, b):
        snap = mesh.cp.controller.cache.get(sc.node_id)
        assert snap is not None
        secrets = snap.entries(SECRET)
        assert set(secrets) == {"ROOTCA"}
        assert b"PRIVATE KEY" not in b"".join(e.value for e in secrets.values())


async def test_attackers_probes_are_refused_and_counted(mesh: Mesh) -> None:
    client = CertificateClient(address=f"127.0.0.1:{mesh.cp.ca_port}", ca_pem=mesh.cp.ca_bundle())
    svc = mesh.cp.identity
    assert svc is not None
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    a, b = mesh.servers
    token_file = a.proxy_dir / "join-token"
    used = token_file.read_text()
    before = dict(svc.refused)
    try:
        # the join token a already used
        with pytest.raises(SigningRefused) as err:
            await client.sign(SignRequest(proxy=a.node_id, csr_pem=csr_pem, join_token=used))
        assert err.value.code == "UNAUTHENTICATED"
        # an unknown token
        with pytest.raises(SigningRefused):
            await client.sign(SignRequest(proxy=a.node_id, csr_pem=csr_pem, join_token="x" * 43))
        # a's certificate (stolen, without a's key) to renew as a: the signature is not a's
        chain, _ = mesh.agent_material(a)
        leaf = chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        forged = key.sign(
            renewal_message(proxy=a.node_id, csr_der=csr.public_bytes(serialization.Encoding.DER)),
            ec.ECDSA(hashes.SHA256()),
        )
        with pytest.raises(SigningRefused):
            await client.sign(
                SignRequest(
                    proxy=a.node_id,
                    csr_pem=csr_pem,
                    certificate_pem=leaf,
                    signature=base64.b64encode(forged).decode(),
                )
            )
        # b's certificate and key (b's host compromised) to get a certificate as a
        chain_b, key_b_pem = mesh.agent_material(b)
        key_b = serialization.load_pem_private_key(key_b_pem.encode(), None)
        assert isinstance(key_b, ec.EllipticCurvePrivateKey)
        leaf_b = chain_b.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        sig = key_b.sign(
            renewal_message(proxy=a.node_id, csr_der=csr.public_bytes(serialization.Encoding.DER)),
            ec.ECDSA(hashes.SHA256()),
        )
        with pytest.raises(SigningRefused) as err:
            await client.sign(
                SignRequest(
                    proxy=a.node_id,
                    csr_pem=csr_pem,
                    certificate_pem=leaf_b,
                    signature=base64.b64encode(sig).decode(),
                )
            )
        assert "proxy-mismatch" in str(err.value)
        # a self-made certificate claiming the identity
        fake_ca = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([])
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        fake = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(x509.Name.from_rfc4514_string("CN=evil"))
            .public_key(key.public_key())
            .serial_number(1234)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/{NS}/sa/server")]
                ),
                critical=True,
            )
            .sign(fake_ca, hashes.SHA256())
        )
        fsig = key.sign(
            renewal_message(proxy=a.node_id, csr_der=csr.public_bytes(serialization.Encoding.DER)),
            ec.ECDSA(hashes.SHA256()),
        )
        with pytest.raises(SigningRefused):
            await client.sign(
                SignRequest(
                    proxy=a.node_id,
                    csr_pem=csr_pem,
                    certificate_pem=fake.public_bytes(serialization.Encoding.PEM).decode(),
                    signature=base64.b64encode(fsig).decode(),
                )
            )
        # malformed requests: INVALID_ARGUMENT, naming the field
        with pytest.raises(SigningRefused) as err:
            await client.sign(SignRequest(proxy=a.node_id, csr_pem=csr_pem))
        assert err.value.code == "INVALID_ARGUMENT" and "proof" in str(err.value)
    finally:
        await client.close()
    after = svc.refused
    for kind in (
        "join-token-replayed",
        "join-token-unknown",
        "certificate-signature",
        "proxy-mismatch",
        "certificate-invalid",
    ):
        assert after.get(kind, 0) > before.get(kind, 0), kind
    # nothing was signed for the attacker
    certs = certs_projection(mesh.cp)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for m in certs.proxy_certs.values():
        for rec in m.values():
            assert rec.proxy in {f"vm/{NS}/{s.name}" for s in (mesh.client, *mesh.servers)}
    del spki


def _raw_post(
    port: int, ca_pem: str | None, *, method: str = "POST", path: str = SIGN_METHOD, body: bytes
) -> tuple[int, dict[str, Any]]:
    """One HTTPS request to the certificate service as any client could send it."""
    import http.client

    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = {"raw": data[:200].decode("latin-1")}
    return resp.status, parsed if isinstance(parsed, dict) else {"raw": parsed}


async def test_the_https_door_refuses_everything_but_a_proven_request(mesh: Mesh) -> None:
    """The certificate service's own door (HTTPS, one method), probed as an attacker would."""
    port, ca = mesh.cp.ca_port, mesh.cp.ca_bundle()
    svc = mesh.cp.identity
    assert svc is not None and port is not None
    before = dict(svc.refused)
    # not TLS at all: no answer
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST " + SIGN_METHOD.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    got = await asyncio.wait_for(reader.read(100), timeout=10)
    writer.close()
    assert b"HTTP/1.1 200" not in got and b"certificate_pem" not in got
    # a client that does not trust the mesh CA cannot even talk to it (server authenticated)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(_raw_post, port, None, body=b"{}")
    # other methods and paths; bodies that are not a SignRequest: refused, naming the field
    status, err = await asyncio.to_thread(_raw_post, port, ca, method="GET", body=b"")
    assert status == 405, (status, err)
    status, err = await asyncio.to_thread(_raw_post, port, ca, path="/admin", body=b"{}")
    assert status == 404 and err["code"] == "NOT_FOUND", (status, err)
    for body, field in (
        (b"not json", "SignRequest"),
        (b"[]", "SignRequest"),
        (b'{"proxy": "x", "csr_pem": "y", "token": "t", "key_pem": "k"}', "key_pem"),
        (b'{"proxy": 7, "csr_pem": "y", "token": "t"}', "SignRequest.proxy"),
        (b'{"proxy": "x", "csr_pem": "y"}', "proof"),
        (b'{"proxy": "x", "csr_pem": "' + b"A" * 300_000 + b'", "token": "t"}', "longer than"),
    ):
        status, err = await asyncio.to_thread(_raw_post, port, ca, body=body)
        assert status == 400 and err["code"] == "INVALID_ARGUMENT", (status, err)
        assert field in err["error"], (field, err)
    # a valid proof (a fresh join token of a) with a CSR that asks for another identity
    a = mesh.servers[0]
    token = await mesh.cp.join_token(namespace=a.namespace, name=a.name, service_account="server")
    key = ec.generate_private_key(ec.SECP256R1())
    other = f"spiffe://cluster.local/ns/{NS}/sa/client"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(other)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    req = SignRequest(
        proxy=a.node_id,
        csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
        join_token=token,
    )
    status, err = await asyncio.to_thread(_raw_post, port, ca, body=req.encode())
    assert status == 400 and err["code"] == "INVALID_ARGUMENT", (status, err)
    assert "subjectAltName" in err["error"], err
    assert svc.refused.get("csr-invalid", 0) > before.get("csr-invalid", 0)
    # a token-less, proof-less request for a's node id got nothing, and the service still works
    certs = certs_projection(mesh.cp)
    for m in certs.proxy_certs.values():
        for rec in m.values():
            assert rec.identity != other or rec.proxy == f"vm/{NS}/{mesh.client.name}"


async def test_renewal_with_the_current_certificate_reaches_envoy(mesh: Mesh) -> None:
    a = mesh.servers[0]
    assert a.agent is not None and a.agent.current is not None
    old = a.agent.current.serial
    resp = await a.agent.request()
    assert resp.serial != old
    certs = certs_projection(mesh.cp)
    await wait_until(
        lambda: (
            (rec := certs.proxy_cert(f"vm/{NS}/{a.name}")) is not None
            and rec.serial == resp.serial
            and rec.proof == f"certificate:{old}"
        ),
        what="renewal recorded",
    )
    assert certs.proxy_certs[f"vm/{NS}/{a.name}"][old].status == "superseded"
    await wait_until(
        lambda: int(resp.serial, 16) in a.cert_serials(), what="Envoy loaded the renewal"
    )
    await wait_until(lambda: mesh.request_ok(), what="traffic after renewal")


async def _request_ok(self: Mesh) -> bool:
    try:
        return await self.request() == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


Mesh.request_ok = _request_ok  # type: ignore[attr-defined]


async def test_one_proxys_key_does_not_open_another_identitys_door(mesh: Mesh) -> None:
    # b's material is accepted where its identity is allowed... (server -> server is not
    # allowed by policy: RBAC 403), while the client's material is allowed (200)
    a, b = mesh.servers
    assert await mesh.direct(a, mesh.agent_material(mesh.client)) == 200
    assert await mesh.direct(a, mesh.agent_material(b)) == 403
    assert await mesh.direct(a, None) != 200


async def _ads_first_answer(mesh: Mesh, *, node_id: str, material: tuple[str, str] | None) -> Any:
    """Open an ADS stream as ``node_id`` with ``material``: the first answer or the error."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    creds = grpc.ssl_channel_credentials(
        root_certificates=mesh.cp.ca_bundle().encode(),
        private_key=material[1].encode() if material else None,
        certificate_chain=material[0].encode() if material else None,
    )
    chan = grpc.aio.secure_channel(
        f"127.0.0.1:{mesh.cp.port}", creds, options=[("grpc.use_local_subchannel_pool", 1)]
    )
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(chan)

    async def requests() -> AsyncIterator[Any]:
        yield discovery_pb2.DiscoveryRequest(
            type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster",
            node=base_pb2.Node(id=node_id),
        )
        await asyncio.sleep(30)

    call = stub.StreamAggregatedResources(requests())
    try:
        return await asyncio.wait_for(call.read(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        call.cancel()
        await chan.close()


async def test_ads_is_mtls_and_a_stolen_node_id_gets_nothing(mesh: Mesh) -> None:
    import grpc

    a, b = mesh.servers
    # a's own certificate opens a's config
    own = await _ads_first_answer(mesh, node_id=a.node_id, material=mesh.agent_material(a))
    assert not isinstance(own, grpc.StatusCode) and len(own.resources) > 0
    # a's certificate claiming the client's node id (another identity): refused
    stolen = await _ads_first_answer(
        mesh,
        node_id=mesh.servers[1].node_id.replace("server-2", "client-1"),
        material=mesh.agent_material(a),
    )
    assert stolen == grpc.StatusCode.PERMISSION_DENIED
    # no client certificate: the handshake fails, nothing is served
    assert await _ads_first_answer(mesh, node_id=a.node_id, material=None) == (
        grpc.StatusCode.UNAVAILABLE
    )
    refusals = mesh.cp.server.refusals(node_id=mesh.client.node_id)
    assert [r.reason for r in refusals] == ["identity_mismatch"]
    # b, of a's identity, is served its own node only with its own certificate
    other = await _ads_first_answer(mesh, node_id=b.node_id, material=mesh.agent_material(b))
    assert not isinstance(other, grpc.StatusCode)


async def test_deleting_a_vm_revokes_its_proxy_certificate(mesh: Mesh) -> None:
    a, b = mesh.servers
    certs = certs_projection(mesh.cp)
    stolen = mesh.agent_material(mesh.client)
    assert await mesh.direct(a, stolen) == 200
    serial = certs.proxy_current[f"vm/{NS}/{mesh.client.name}"]
    await mesh.cp.apply(vm_yaml(mesh.client, service_account="client"), delete=True)
    await wait_until(
        lambda: certs.proxy_certs[f"vm/{NS}/{mesh.client.name}"][serial].status == "revoked",
        what="proxy certificate revoked on the log",
    )
    # the CRL reaches the server's Envoy through ROOTCA: the deleted VM's cert is refused
    await wait_until(
        lambda: _refused(mesh, a, stolen), timeout=20, what="peer refuses the revoked cert"
    )
    # b's own certificate still opens nothing it shouldn't and still works as a client of a
    assert await mesh.direct(a, mesh.agent_material(b)) == 403


async def _refused(mesh: Mesh, target: Sidecar, material: tuple[str, str]) -> bool:
    return await mesh.direct(target, material) != 200


async def test_no_key_bytes_on_the_log_or_in_the_key_directory(mesh: Mesh) -> None:
    keys: list[bytes] = []
    for sc in (mesh.client, *mesh.servers):
        assert sc.agent is not None and sc.agent.current is not None
        k = sc.agent.current.key
        keys.append(k.private_numbers().private_value.to_bytes(32, "big"))
        keys.append(
            k.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    raw = b"".join(f.read_bytes() for f in mesh.cp.workdir.glob("log.db*"))
    for k in keys:
        assert k not in raw
        assert base64.b64encode(k) not in raw
    assert b"PRIVATE KEY" not in raw
    key_dir = mesh.cp.keys_dir
    if key_dir.exists():
        for f in key_dir.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert b"PRIVATE KEY" not in data, f
                for k in keys:
                    assert k not in data
    # nor in the debug output of the control plane (config_dump of every proxy, metrics)
    from smc.xds._debug import config_dump

    for sc in (*mesh.servers,):
        dump = json.dumps(config_dump(mesh.cp.controller, sc.node_id))
        assert "ROOTCA" in dump and "PRIVATE KEY" not in dump
        for k in keys:
            assert base64.b64encode(k).decode() not in dump
    from prometheus_client import generate_latest

    metrics = generate_latest(mesh.cp.metrics)
    assert b"smc_identity_refusals_total" in metrics and b"PRIVATE KEY" not in metrics
    # the log names each proxy's certificates (issued, renewed, revoked), never a key
    certs = certs_projection(mesh.cp)
    statuses = {r.status for m in certs.proxy_certs.values() for r in m.values()}
    assert {"active", "superseded", "revoked"} <= statuses
