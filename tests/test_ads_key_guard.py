"""The ADS server never sends a private key to a stream it has not verified (attacker's side).

A node's snapshot holds a workload Secret with an inline private key (what a control plane in
the older ``control-plane`` key mode serves) and a trust bundle without a key. Real grpc.aio
clients claim the node id:

- on a cleartext ADS server (no client certificates at all), SotW and delta: the stream gets
  the trust bundle and nothing else of SDS; no answer carries the key bytes; the refusal is
  recorded (``refusals()`` and ``/debug/proxies``, reason ``key_withheld``), counted
  (``smc_xds_refused_streams_total``) and logged, naming the Secret, never the key;
- over mTLS with the node identity's certificate: the key Secret is served (that is the one
  door the control-plane mode still has);
- the in-process test harness (``ControlPlane``, agents or control-plane keys) does not
  serve cleartext ADS at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from smc.ca import LocalIssuer
from smc.injector._tls import issue_serving_certificate
from smc.projections import Workload
from smc.testing.mesh import ControlPlane
from smc.xds import SECRET, AdsServer, Snapshot, SnapshotCache
from smc.xds._debug import proxies_view
from smc.xds._key_guard import carries_private_key
from smc.xds._server import ServerTLS, workload_authorizer

pytestmark = pytest.mark.asyncio(loop_scope="session")

TD = "cluster.local"
NODE = "demo/web-1"
WEB = f"spiffe://{TD}/ns/demo/sa/web"
KEY_NAMES = ["default", "ROOTCA"]


def _secret(body: dict[str, Any]) -> secret_pb2.Secret:
    return json_format.ParseDict(body, secret_pb2.Secret())


def _snapshot(cert_pem: str, key_pem: str, ca_pem: str) -> Snapshot:
    return Snapshot.build(
        secrets=[
            _secret(
                {
                    "name": "default",
                    "tls_certificate": {
                        "certificate_chain": {"inline_string": cert_pem},
                        "private_key": {"inline_string": key_pem},
                    },
                }
            ),
            _secret(
                {"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": ca_pem}}}
            ),
        ]
    )


class World:
    def __init__(self, base: Path) -> None:
        self.issuer = LocalIssuer(directory=base / "ca", trust_domain=TD)
        self.ca_pem = "".join(self.issuer.trust_bundle())
        self.web = self.issuer.issue(identity=WEB, lifetime=timedelta(hours=1))
        self.served = issue_serving_certificate(
            self.issuer, ip_addresses=["127.0.0.1"], dns_names=["localhost"]
        )
        self.cache = SnapshotCache()
        self.cache.set_snapshot(
            node_id=NODE,
            snapshot=_snapshot(self.web.cert_pem, self.web.private_key_pem, self.ca_pem),
        )
        workloads = [
            Workload(
                kind="vm",
                namespace="demo",
                name="web-1",
                address="127.0.0.1",
                service_account="web",
                labels=(),
                ports=(),
            )
        ]
        self.plain = AdsServer(cache=self.cache, registry=CollectorRegistry())
        self.mtls = AdsServer(
            cache=self.cache,
            registry=CollectorRegistry(),
            authorize=workload_authorizer(workloads=lambda: workloads),
        )
        self.plain_port = 0
        self.mtls_port = 0


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    w = World(tmp_path_factory.mktemp("keyguard"))
    w.plain_port = await w.plain.start()
    tls = ServerTLS.of(
        cert_pem=w.served.cert_pem + w.served.chain_pem,
        key_pem=w.served.private_key_pem,
        client_ca_pems=[w.ca_pem],
        trust_domain=TD,
    )
    w.mtls_port = await w.mtls.start(tls=tls)
    w.plain.mark_ready()
    w.mtls.mark_ready()
    yield w
    await w.plain.stop(grace=0)
    await w.mtls.stop(grace=0)


async def _until_quiet(call: Any, answer: Callable[[Any], None] | None = None) -> list[Any]:
    """The responses of ``call`` until it is silent for 2 s (``answer`` hears each first)."""
    got: list[Any] = []
    try:
        while True:
            response = await asyncio.wait_for(call.read(), 2.0)
            assert response is not grpc.aio.EOF
            got.append(response)
            if answer is not None:
                answer(response)
    except TimeoutError:
        pass
    finally:
        call.cancel()
    return got


async def _sotw_secrets(chan: grpc.aio.Channel) -> list[discovery_pb2.DiscoveryResponse]:
    """Ask for both Secrets by name (SotW), ACK as Envoy does; every answer within 2 s."""
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(chan)
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
    node = base_pb2.Node(id=NODE)
    requests.put_nowait(
        discovery_pb2.DiscoveryRequest(node=node, type_url=SECRET, resource_names=KEY_NAMES)
    )

    async def gen() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (r := await requests.get()) is not None:
            yield r

    def ack(response: discovery_pb2.DiscoveryResponse) -> None:
        requests.put_nowait(
            discovery_pb2.DiscoveryRequest(
                node=node,
                type_url=SECRET,
                resource_names=KEY_NAMES,
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        )

    try:
        return await _until_quiet(stub.StreamAggregatedResources(gen()), ack)
    finally:
        requests.put_nowait(None)


async def _delta_secrets(chan: grpc.aio.Channel) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(chan)
    first = discovery_pb2.DeltaDiscoveryRequest(
        node=base_pb2.Node(id=NODE), type_url=SECRET, resource_names_subscribe=KEY_NAMES
    )
    done = asyncio.Event()

    async def gen() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        yield first
        await done.wait()

    try:
        return await _until_quiet(stub.DeltaAggregatedResources(gen()))
    finally:
        done.set()


def _names(responses: list[Any]) -> set[str]:
    out: set[str] = set()
    for r in responses:
        for res in r.resources:
            any_ = res if hasattr(res, "value") else res.resource
            out.add(secret_pb2.Secret.FromString(any_.value).name)
    return out


def _refused(ads: AdsServer) -> float:
    value = ads.metrics.registry.get_sample_value(
        "smc_xds_refused_streams_total", {"reason": "key_withheld"}
    )
    return 0.0 if value is None else value


async def test_cleartext_stream_claiming_the_node_gets_no_key(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    key_bytes = world.web.private_key_pem.encode()
    key_body = b"".join(world.web.private_key_pem.encode().splitlines()[1:-1])
    before = _refused(world.plain)
    with caplog.at_level(logging.DEBUG, logger="smc.xds"):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{world.plain_port}") as chan:
            sotw = await _sotw_secrets(chan)
            delta = await _delta_secrets(chan)
    assert sotw and delta, "the stream is served (roots), not ended"
    assert _names(sotw) == {"ROOTCA"} and _names(delta) == {"ROOTCA"}
    for response in [*sotw, *delta]:
        raw = response.SerializeToString()
        assert key_bytes not in raw and key_body[:64] not in raw
    refusals = [r for r in world.plain.refusals(node_id=NODE) if r.reason == "key_withheld"]
    assert len(refusals) == 2  # one per stream
    assert all("default" in r.message and r.peer_identity == "" for r in refusals)
    assert _refused(world.plain) - before == 2
    shown = [r for r in proxies_view(world.plain, None)["refused"] if r["reason"] == "key_withheld"]
    assert len(shown) == 2 and all(r["node_id"] == NODE for r in shown)  # /debug/proxies
    logged = caplog.text
    assert "withheld" in logged and key_body[:64].decode() not in logged
    assert world.web.private_key_pem not in "".join(r.message for r in refusals)


async def test_mtls_stream_with_the_node_identity_gets_its_key(world: World) -> None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=world.ca_pem.encode(),
        private_key=world.web.private_key_pem.encode(),
        certificate_chain=world.web.cert_pem.encode(),
    )
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{world.mtls_port}", creds, options=options
    ) as chan:
        sotw = await _sotw_secrets(chan)
    assert _names(sotw) == {"default", "ROOTCA"}
    assert any(world.web.private_key_pem.encode() in r.SerializeToString() for r in sotw)
    assert [r for r in world.mtls.refusals() if r.reason == "key_withheld"] == []


async def test_which_secrets_carry_a_key() -> None:
    keyed = _secret({"name": "a", "tls_certificate": {"private_key": {"inline_bytes": "AAAA"}}})
    pkcs12 = _secret({"name": "b", "tls_certificate": {"pkcs12": {"inline_string": "x"}}})
    on_host = _secret({"name": "c", "tls_certificate": {"private_key": {"filename": "/k.pem"}}})
    roots = _secret({"name": "d", "validation_context": {"trusted_ca": {"inline_string": "x"}}})
    assert carries_private_key(keyed.SerializeToString())
    assert carries_private_key(pkcs12.SerializeToString())
    assert not carries_private_key(on_host.SerializeToString())
    assert not carries_private_key(roots.SerializeToString())
    assert carries_private_key(b"\xff\xff\xff")  # unparsable: withheld, not risked


@pytest.mark.parametrize("agents", [True, False], ids=["agents", "control-plane-keys"])
async def test_the_test_harness_serves_no_cleartext_ads(tmp_path: Path, agents: bool) -> None:
    """smc.testing.mesh.ControlPlane, in both key modes: a cleartext client claiming a
    registered node id cannot open an ADS stream (mTLS only), so no key can reach it."""
    cp = ControlPlane(workdir=tmp_path, agents=agents)
    await cp.start()
    try:
        await cp.apply(
            "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
            "metadata: {name: web-1, namespace: demo}\n"
            "spec: {address: 127.0.0.1, serviceAccount: web}\n"
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.port}") as chan:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _sotw_secrets(chan)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert cp.server.proxies() == []
    finally:
        await cp.stop()
        cp.close()
