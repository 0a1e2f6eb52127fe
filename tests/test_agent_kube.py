"""Pods prove who they are with projected service-account tokens, checked by a real apiserver.

A real kube-apiserver (smc.testing.kube) issues audience-bound, pod-bound service-account tokens
(the TokenRequest API, as the kubelet does for a projected volume). An SMC agent with such a
token gets its pod's certificate from the control plane's certificate service, which checks the
token with a TokenReview. From the attacker's side: a token for another audience, a token bound
to no pod, a token of pod A presented for pod B, a replayed token (another key), an expired token
(signed with the cluster's real service-account key), a token whose pod was deleted and one whose
service account was deleted are all refused, and counted per kind; the agent's retry of its own
request (same key) is not a replay.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from smc.agent import Agent, AgentConfig, CertificateClient, SigningRefused, SignRequest
from smc.auth import TokenReviewer
from smc.ca import verify_certificate
from smc.events import ProxyCertificateRevoked, deterministic_id, make_event
from smc.informers import KubeEndpoint
from smc.projections import CertsProjection
from smc.testing.kube import KubeAPIServer, kube_apiserver_fixture
from smc.testing.mesh import ControlPlane

pytestmark = [pytest.mark.asyncio(loop_scope="session")]

NS = "shop"
AUDIENCE = "smc"


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeAPIServer]:
    yield from kube_apiserver_fixture(smi_crds=False, watch_cache=False)


def api(kube: KubeAPIServer, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        kube.host + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {kube.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, context=kube.ssl_context(), timeout=10) as resp:
        return json.loads(resp.read())


def make_pod(kube: KubeAPIServer, name: str, sa: str) -> str:
    pod = api(
        kube,
        "POST",
        f"/api/v1/namespaces/{NS}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": sa,
                "automountServiceAccountToken": False,
                "containers": [{"name": "app", "image": "example/app"}],
            },
        },
    )
    return str(pod["metadata"]["uid"])


def token_for(
    kube: KubeAPIServer, sa: str, *, pod: str | None, uid: str | None, audience: str = AUDIENCE
) -> str:
    spec: dict[str, Any] = {"audiences": [audience], "expirationSeconds": 3600}
    if pod is not None:
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}
    out = api(
        kube,
        "POST",
        f"/api/v1/namespaces/{NS}/serviceaccounts/{sa}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    return str(out["status"]["token"])


def expired_token(kube: KubeAPIServer, token: str) -> str:
    """The claims of a real token, with an expiry in the past, signed with the cluster's real
    service-account key (what an old, leaked token looks like)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header_b64, claims_b64, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
    now = int(time.time())
    claims.update(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    key = serialization.load_pem_private_key((kube.folder / "pki" / "sa.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signing_input = (
        b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    ).encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input.decode() + "." + b64(sig)


def csr_of(key: ec.EllipticCurvePrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
async def cp(kube: KubeAPIServer, tmp_path_factory: Any) -> AsyncIterator[ControlPlane]:
    api(kube, "POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
    for sa in ("web", "gone"):
        api(kube, "POST", f"/api/v1/namespaces/{NS}/serviceaccounts", {"metadata": {"name": sa}})
    endpoint = KubeEndpoint(host=kube.host, token=kube.token, ca_file=str(kube.ca_path))
    reviewer = TokenReviewer(endpoint, audiences=(AUDIENCE,))
    plane = ControlPlane(
        workdir=tmp_path_factory.mktemp("agent-kube"), agents=True, reviewer=reviewer
    )
    await plane.start()
    yield plane
    await plane.stop()
    await reviewer.close()
    plane.close()


async def test_pod_agent_gets_its_certificate_with_its_projected_token(
    kube: KubeAPIServer, cp: ControlPlane, tmp_path: Path
) -> None:
    uid = make_pod(kube, "web-1", "web")
    token_file = tmp_path / "token"
    token_file.write_text(token_for(kube, "web", pod="web-1", uid=uid))
    agent = Agent(
        AgentConfig(
            proxy=f"{NS}/web-1",
            ca_address=f"127.0.0.1:{cp.ca_port}",
            ca_bundle_pem=cp.ca_bundle(),
            proxy_dir=tmp_path / "agent",
            token_file=token_file,
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop=stop))
    try:
        await asyncio.wait_for(agent.ready.wait(), timeout=30)
        assert agent.current is not None and agent.first_certificate_at is not None
        assert agent.first_certificate_at - agent.started_at < 5.0
        sid = verify_certificate(cert_pem=agent.current.cert_pem, trust_bundle=[cp.ca_bundle()])
        assert sid.uri == f"spiffe://cluster.local/ns/{NS}/sa/web"
        certs = next(p for p in cp.runner.projections if isinstance(p, CertsProjection))
        deadline = time.monotonic() + 15
        while (rec := certs.proxy_cert(f"pod/{NS}/web-1")) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)  # the runner applies what the service appended
        assert rec is not None and rec.proof == "service-account-token"
        assert rec.serial == agent.current.serial
        # the key's file and its directory are the agent's user's and group's only
        assert (tmp_path / "agent" / "smc-sds").stat().st_mode & 0o007 == 0
        assert (tmp_path / "agent" / "smc-sds" / "default.json").stat().st_mode & 0o037 == 0
        # its certificate revoked (say, by mistake): the renewal with it is refused, and the pod
        # proves itself again with its token once the kubelet rotated it
        revoked = agent.current.serial
        await asyncio.to_thread(cp.issuer.revoke, serial=revoked)
        await asyncio.to_thread(
            cp.log.append,
            [
                make_event(
                    ProxyCertificateRevoked,
                    source="test",
                    actor="ca",
                    event_id=deterministic_id("test", "revoke", revoked),
                    proxy=f"pod/{NS}/web-1",
                    serial=revoked,
                    identity=f"spiffe://cluster.local/ns/{NS}/sa/web",
                    reason="test",
                )
            ],
        )
        deadline = time.monotonic() + 15
        while certs.proxy_cert(f"pod/{NS}/web-1") is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        with pytest.raises(SigningRefused, match="certificate-revoked"):
            await agent.request()
        token_file.write_text(token_for(kube, "web", pod="web-1", uid=uid))  # rotated
        again = await agent.request()
        assert again.serial != revoked
        deadline = time.monotonic() + 15
        while (rec := certs.proxy_cert(f"pod/{NS}/web-1")) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert rec.proof == "service-account-token" and rec.serial == again.serial
    finally:
        stop.set()
        await task


async def test_forged_and_stolen_tokens_are_refused_and_counted(
    kube: KubeAPIServer, cp: ControlPlane
) -> None:
    svc = cp.identity
    assert svc is not None
    uid2 = make_pod(kube, "web-2", "web")
    uid3 = make_pod(kube, "web-3", "web")
    uid4 = make_pod(kube, "gone-1", "gone")
    good = token_for(kube, "web", pod="web-2", uid=uid2)
    other_audience = token_for(kube, "web", pod="web-2", uid=uid2, audience="vault")
    unbound = token_for(kube, "web", pod=None, uid=None)
    pod_deleted = token_for(kube, "web", pod="web-3", uid=uid3)
    sa_deleted = token_for(kube, "gone", pod="gone-1", uid=uid4)
    expired = expired_token(kube, good)
    api(kube, "DELETE", f"/api/v1/namespaces/{NS}/pods/web-3")
    api(kube, "DELETE", f"/api/v1/namespaces/{NS}/serviceaccounts/gone")
    client = CertificateClient(address=f"127.0.0.1:{cp.ca_port}", ca_pem=cp.ca_bundle())
    key, thief = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    before = dict(svc.refused)

    async def refused(proxy: str, token: str, k: ec.EllipticCurvePrivateKey = key) -> str:
        with pytest.raises(SigningRefused) as err:
            await client.sign(SignRequest(proxy=proxy, csr_pem=csr_of(k), token=token))
        assert err.value.code == "UNAUTHENTICATED", err.value
        return str(err.value)

    try:
        assert "token-audience" in await refused(f"{NS}/web-2", other_audience)
        assert "not-pod-bound" in await refused(f"{NS}/web-2", unbound)
        assert "token-expired" in await refused(f"{NS}/web-2", expired)
        # the apiserver refuses tokens of deleted pods and service accounts
        assert "pod-deleted" in await refused(f"{NS}/web-3", pod_deleted)
        assert "service-account-deleted" in await refused(f"{NS}/gone-1", sa_deleted)
        # a token of pod web-2 claiming pod web-1's proxy id
        assert "proxy-mismatch" in await refused(f"{NS}/web-1", good)
        # the real pod gets its certificate; its own retry (same key) is served again...
        first = await client.sign(SignRequest(proxy=f"{NS}/web-2", csr_pem=csr_of(key), token=good))
        assert cp.reviewer is not None
        reviews = cp.reviewer.calls
        again = await client.sign(SignRequest(proxy=f"{NS}/web-2", csr_pem=csr_of(key), token=good))
        assert cp.reviewer.calls == reviews  # the answer for this token is cached
        assert first.serial != again.serial
        # ...but whoever copied the token gets nothing for their own key
        assert "token-replayed" in await refused(f"{NS}/web-2", good, thief)
    finally:
        await client.close()
    after = svc.refused
    for kind in (
        "pod-deleted",
        "service-account-deleted",
        "token-audience",
        "not-pod-bound",
        "token-expired",
        "proxy-mismatch",
        "token-replayed",
    ):
        assert after.get(kind, 0) > before.get(kind, 0), kind
    total_before, total_after = sum(before.values()), sum(after.values())
    assert total_after - total_before == 7, after
    # nothing signed for the thief: every certificate of web-2 carries the pod's key
    certs = next(p for p in cp.runner.projections if isinstance(p, CertsProjection))
    deadline = time.monotonic() + 15
    while set(certs.proxy_certs.get(f"pod/{NS}/web-2", {})) != {first.serial, again.serial}:
        assert time.monotonic() < deadline, certs.proxy_certs.get(f"pod/{NS}/web-2")
        await asyncio.sleep(0.05)  # the runner applies what the service appended
    assert f"pod/{NS}/web-3" not in certs.proxy_certs
    assert f"pod/{NS}/gone-1" not in certs.proxy_certs
