"""Tests of the ADS server over mTLS: client certificates checked against the node id's identity.

A LocalIssuer CA signs the proxies' SPIFFE certificates and (through the webhook's serving
certificate helper) the server's certificate for 127.0.0.1. Real Envoy connects over mTLS ADS:
with a certificate of its node's identity it gets its config; with another identity's
certificate the server refuses the stream (PERMISSION_DENIED), records and counts it. Raw
grpc.aio clients check what cannot connect at all (no client certificate, a foreign CA,
cleartext) and that a node id whose workload joins later is served once it joins.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401  (registers the type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from smc.ca import IssuedCertificate, LocalIssuer, SpiffeId
from smc.injector._bootstrap import AdsAddress, TlsSources, envoy_bootstrap, watched_tls_files
from smc.injector._tls import issue_serving_certificate
from smc.projections import Workload
from smc.testing.envoy import AdsTLS, EnvoyProcess, ads_bootstrap
from smc.testing.files import write_projected
from smc.testing.ports import free_port
from smc.testing.wait import wait_until
from smc.xds import CLUSTER, LISTENER, AdsServer, Snapshot, SnapshotCache, XdsError
from smc.xds._server import ServerTLS, workload_authorizer

pytestmark = pytest.mark.asyncio(loop_scope="session")

TRUST_DOMAIN = "mesh.local"
NODE = "default/web-1"  # runs as default/web
WEB = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
OTHER = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/other"


# ---------------------------------------------------------------------- PKI and resources


@dataclass(frozen=True, kw_only=True, slots=True)
class Pki:
    issuer: LocalIssuer  # the mesh CA
    ca_pem: str  # trust bundle of the mesh CA
    server: IssuedCertificate  # IP SAN 127.0.0.1, signed by the mesh CA
    web: IssuedCertificate
    other: IssuedCertificate
    foreign_web: IssuedCertificate  # same identity as ``web``, another CA
    elsewhere_pem: str  # CA of trust domain "elsewhere.local"
    elsewhere_web: IssuedCertificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    issuer = LocalIssuer(directory=base / "ca", trust_domain=TRUST_DOMAIN)
    foreign = LocalIssuer(directory=base / "foreign", trust_domain=TRUST_DOMAIN)
    elsewhere = LocalIssuer(directory=base / "elsewhere", trust_domain="elsewhere.local")
    hour = timedelta(hours=1)
    return Pki(
        issuer=issuer,
        ca_pem="".join(issuer.trust_bundle()),
        server=issue_serving_certificate(
            issuer, ip_addresses=["127.0.0.1"], dns_names=["ads.mesh.test"], lifetime=hour
        ),
        web=issuer.issue(identity=WEB, lifetime=hour),
        other=issuer.issue(identity=OTHER, lifetime=hour),
        foreign_web=foreign.issue(identity=WEB, lifetime=hour),
        elsewhere_pem="".join(elsewhere.trust_bundle()),
        elsewhere_web=elsewhere.issue(
            identity="spiffe://elsewhere.local/ns/default/sa/web", lifetime=hour
        ),
    )


def workload(name: str, *, sa: str) -> Workload:
    return Workload(
        kind="pod",
        namespace="default",
        name=name,
        address="10.0.0.1",
        service_account=sa,
        labels=(),
        ports=(),
    )


def direct_listener(*, port: int, body: str) -> listener_pb2.Listener:
    """A listener answering every HTTP request with ``body`` (no upstream needed)."""
    return json_format.ParseDict(
        {
            "name": "inbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                "http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "inbound",
                                "route_config": {
                                    "name": "local",
                                    "virtual_hosts": [
                                        {
                                            "name": "all",
                                            "domains": ["*"],
                                            "routes": [
                                                {
                                                    "match": {"prefix": "/"},
                                                    "direct_response": {
                                                        "status": 200,
                                                        "body": {"inline_string": body},
                                                    },
                                                }
                                            ],
                                        }
                                    ],
                                },
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.extensions."
                                            "filters.http.router.v3.Router"
                                        },
                                    }
                                ],
                            },
                        }
                    ]
                }
            ],
        },
        listener_pb2.Listener(),
    )


def static_cluster(name: str) -> cluster_pb2.Cluster:
    return json_format.ParseDict(
        {"name": name, "type": "STATIC", "connect_timeout": "1s"}, cluster_pb2.Cluster()
    )


def snapshot(*, port: int, body: str = "over-mtls") -> Snapshot:
    return Snapshot.build(
        listeners=[direct_listener(port=port, body=body)], clusters=[static_cluster("web")]
    )


# ---------------------------------------------------------------------- server fixture


@dataclass(kw_only=True)
class TlsAds:
    pki: Pki
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    workloads: list[Workload] = field(default_factory=list)
    server: AdsServer | None = None
    port: int = 0

    @property
    def ads(self) -> AdsServer:
        assert self.server is not None
        return self.server

    def metric(self, name: str, **labels: str) -> float:
        value = self.ads.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)


@pytest.fixture
async def tls_ads(pki: Pki) -> AsyncIterator[TlsAds]:
    t = TlsAds(pki=pki, workloads=[workload("web-1", sa="web")])
    t.server = AdsServer(
        cache=t.cache,
        registry=CollectorRegistry(),
        authorize=workload_authorizer(workloads=lambda: t.workloads),
    )
    tls = ServerTLS.of(
        cert_pem=pki.server.cert_pem,
        key_pem=pki.server.private_key_pem,
        client_ca_pems=[pki.ca_pem],
        trust_domain=TRUST_DOMAIN,
    )
    t.port = await t.server.start(tls=tls)
    t.server.mark_ready()
    yield t
    await t.server.stop(grace=0)


# ---------------------------------------------------------------------- real Envoy


@pytest.fixture
def envoys() -> Iterator[list[EnvoyProcess]]:
    started: list[EnvoyProcess] = []
    yield started
    for envoy in started:
        envoy.close()


def start_envoy(
    t: TlsAds, cert: IssuedCertificate, *, delta: bool, workdir: Path, envoys: list[EnvoyProcess]
) -> EnvoyProcess:
    boot = ads_bootstrap(
        node_id=NODE,
        cluster="web",
        ads_host="127.0.0.1",
        ads_port=t.port,
        delta=delta,
        admin_port=free_port(),
        tls=AdsTLS(
            cert_pem=cert.cert_pem,
            key_pem=cert.private_key_pem,
            ca_pem=t.pki.ca_pem,
            server_san="127.0.0.1",
        ),
    )
    envoy = EnvoyProcess(bootstrap=boot, workdir=workdir, log_level="warning")
    envoys.append(envoy)
    envoy.start()
    return envoy


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_envoy_with_its_identity_certificate_gets_config_over_mtls(
    tls_ads: TlsAds, delta: bool, tmp_path: Path, envoys: list[EnvoyProcess]
) -> None:
    lport = free_port()
    tls_ads.cache.set_snapshot(node_id=NODE, snapshot=snapshot(port=lport))
    envoy = start_envoy(tls_ads, tls_ads.pki.web, delta=delta, workdir=tmp_path, envoys=envoys)
    await envoy.wait_listener("inbound")
    await envoy.wait_live()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{lport}/") as resp,
    ):
        assert (resp.status, await resp.text()) == (200, "over-mtls")
    stats = envoy.stats()
    assert stats.get("control_plane.connected_state") == 1
    assert stats.get("cluster.smc_xds.ssl.handshake", 0) >= 1
    (proxy,) = tls_ads.ads.proxies()
    assert proxy.node_id == NODE
    served = tls_ads.cache.get(NODE)
    assert served is not None
    assert proxy.types[LISTENER].acked_version == served.version(LISTENER)
    assert tls_ads.ads.refusals() == []
    kind = "delta" if delta else "sotw"
    assert tls_ads.metric("smc_xds_pushes_total", type="Listener", kind=kind) >= 1


@pytest.mark.envoy
async def test_envoy_whose_certificate_is_another_identity_is_refused(
    tls_ads: TlsAds, tmp_path: Path, envoys: list[EnvoyProcess]
) -> None:
    lport = free_port()
    tls_ads.cache.set_snapshot(node_id=NODE, snapshot=snapshot(port=lport))
    envoy = start_envoy(tls_ads, tls_ads.pki.other, delta=False, workdir=tmp_path, envoys=envoys)
    await wait_until(lambda: tls_ads.ads.refusals(), what="the refusal to be recorded")
    refusal = tls_ads.ads.refusals()[0]
    assert refusal.node_id == NODE
    assert refusal.peer_identity == OTHER
    assert refusal.reason == "identity_mismatch"
    assert NODE in refusal.message and OTHER in refusal.message
    # Envoy retries (and is refused again) but never gets any resource.
    await wait_until(lambda: len(tls_ads.ads.refusals()) >= 2, what="Envoy's retry refused too")
    assert tls_ads.metric("smc_xds_refused_streams_total", reason="identity_mismatch") >= 2
    for type_name in ("Listener", "Cluster"):
        assert tls_ads.metric("smc_xds_pushes_total", type=type_name, kind="sotw") == 0
    assert envoy.active_listeners() == set()
    clusters = envoy.config_dump(resource="dynamic_active_clusters").get("configs", [])
    assert clusters == []
    # The mTLS handshake succeeded; the refusal came from the identity check on the stream.
    assert envoy.stats().get("cluster.smc_xds.ssl.handshake", 0) >= 1
    # No node-id label anywhere in the refusal metric.
    families = {m.name: m for m in tls_ads.ads.metrics.registry.collect()}
    for sample in families["smc_xds_refused_streams"].samples:
        assert set(sample.labels) == {"reason"}


# ---------------------------------------------------------------------- raw gRPC clients


class RawClient:
    """One SotW ADS stream over a given channel."""

    def __init__(self, channel: grpc.aio.Channel, *, node_id: str) -> None:
        self.channel = channel
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.requests.put_nowait(
            discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id=node_id))
        )

        async def gen() -> AsyncIterator[Any]:
            while (item := await self.requests.get()) is not None:
                yield item

        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.call = stub.StreamAggregatedResources(gen())
        self.responses: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for response in self.call:
                    self.responses.put_nowait(response)
            except BaseException as exc:  # handed to the reader of the queue
                self.responses.put_nowait(exc)

        self.pump = asyncio.create_task(pump())

    async def recv(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        got = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(got, BaseException):
            raise got
        response: discovery_pb2.DiscoveryResponse = got
        return response

    async def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()
        self.pump.cancel()
        await self.channel.close()


def channel(
    t: TlsAds, *, cert: IssuedCertificate | None = None, ca_pem: str | None = None
) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca_pem or t.pki.ca_pem).encode(),
        private_key=cert.private_key_pem.encode() if cert else None,
        certificate_chain=cert.cert_pem.encode() if cert else None,
    )
    # A channel of its own connection: never a subchannel shared with an earlier channel.
    options = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.aio.secure_channel(f"127.0.0.1:{t.port}", creds, options=options)


async def test_client_without_a_mesh_certificate_cannot_connect(tls_ads: TlsAds) -> None:
    tls_ads.cache.set_snapshot(node_id=NODE, snapshot=snapshot(port=free_port()))
    attempts = {
        "no client certificate": channel(tls_ads),
        "certificate of a foreign CA": channel(tls_ads, cert=tls_ads.pki.foreign_web),
        "cleartext": grpc.aio.insecure_channel(f"127.0.0.1:{tls_ads.port}"),
    }
    for what, chan in attempts.items():
        client = RawClient(chan, node_id=NODE)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.recv()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what
        finally:
            await client.close()
    # The handshake failed: no stream reached the server, nothing was pushed.
    assert tls_ads.ads.proxies() == []
    assert tls_ads.metric("smc_xds_pushes_total", type="Cluster", kind="sotw") == 0
    # The same client with its mesh certificate is served.
    client = RawClient(channel(tls_ads, cert=tls_ads.pki.web), node_id=NODE)
    try:
        cds = await client.recv()
        assert cds.type_url == CLUSTER and len(cds.resources) == 1
    finally:
        await client.close()


async def test_raw_client_claiming_another_identity_gets_permission_denied(
    tls_ads: TlsAds,
) -> None:
    tls_ads.cache.set_snapshot(node_id=NODE, snapshot=snapshot(port=free_port()))
    client = RawClient(channel(tls_ads, cert=tls_ads.pki.other), node_id=NODE)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.recv()
    finally:
        await client.close()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = err.value.details() or ""
    assert NODE in details and OTHER in details
    assert [r.reason for r in tls_ads.ads.refusals(node_id=NODE)] == ["identity_mismatch"]
    assert tls_ads.metric("smc_xds_pushes_total", type="Cluster", kind="sotw") == 0


async def test_node_whose_workload_joins_later_is_checked_then_served(tls_ads: TlsAds) -> None:
    """A node id naming no workload yet has no snapshot: the stream stays open and is checked
    (and served) once the workload joined and its snapshot exists."""
    late = "default/web-2"
    client = RawClient(channel(tls_ads, cert=tls_ads.pki.web), node_id=late)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await client.recv(timeout=0.5)
        assert [p.node_id for p in tls_ads.ads.proxies()] == [late]
        tls_ads.workloads.append(workload("web-2", sa="web"))
        tls_ads.cache.set_snapshot(node_id=late, snapshot=snapshot(port=free_port()))
        cds = await client.recv()
        assert len(cds.resources) == 1
    finally:
        await client.close()
    # A workload running as another service account is refused the same way once it has a
    # snapshot.
    tls_ads.workloads.append(workload("db-1", sa="db"))
    client = RawClient(channel(tls_ads, cert=tls_ads.pki.web), node_id="default/db-1")
    try:
        tls_ads.cache.set_snapshot(node_id="default/db-1", snapshot=snapshot(port=free_port()))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.recv()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await client.close()
    assert tls_ads.ads.refusals()[0].node_id == "default/db-1"


async def test_certificate_of_another_trust_domain_is_unauthenticated(pki: Pki) -> None:
    """Both CAs are trusted by TLS, but the server only takes identities of its trust domain."""
    cache = SnapshotCache()
    cache.set_snapshot(node_id=NODE, snapshot=snapshot(port=free_port()))
    t = TlsAds(pki=pki, cache=cache, workloads=[workload("web-1", sa="web")])
    t.server = AdsServer(
        cache=cache,
        registry=CollectorRegistry(),
        authorize=workload_authorizer(workloads=lambda: t.workloads),
    )
    tls = ServerTLS.of(
        cert_pem=pki.server.cert_pem,
        key_pem=pki.server.private_key_pem,
        client_ca_pems=[pki.ca_pem, pki.elsewhere_pem],
        trust_domain=TRUST_DOMAIN,
    )
    t.port = await t.server.start(tls=tls)
    t.server.mark_ready()
    try:
        client = RawClient(channel(t, cert=pki.elsewhere_web), node_id=NODE)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.recv()
        finally:
            await client.close()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "elsewhere.local" in (err.value.details() or "")
        (refusal,) = t.ads.refusals()
        assert refusal.reason == "bad_identity" and refusal.node_id == ""
        assert t.metric("smc_xds_refused_streams_total", reason="bad_identity") == 1
        # The mesh's own certificate is still served.
        client = RawClient(channel(t, cert=pki.web), node_id=NODE)
        try:
            assert len((await client.recv()).resources) == 1
        finally:
            await client.close()
    finally:
        await t.ads.stop(grace=0)


async def test_authorize_on_a_cleartext_port_refuses_streams_without_certificate() -> None:
    """An ADS service mounted with ``add_to`` on a caller's cleartext server: with an
    authorize hook every stream needs a client certificate, so none is served."""
    cache = SnapshotCache()
    cache.set_snapshot(node_id=NODE, snapshot=snapshot(port=free_port()))
    calls: list[str] = []

    def allow_all(node_id: str, _peer: SpiffeId) -> bool:
        calls.append(node_id)
        return True

    ads = AdsServer(cache=cache, registry=CollectorRegistry(), authorize=allow_all)
    ads.mark_ready()
    server = grpc.aio.server()
    ads.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        client = RawClient(grpc.aio.insecure_channel(f"127.0.0.1:{port}"), node_id=NODE)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.recv()
        finally:
            await client.close()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no client certificate" in (err.value.details() or "")
        assert [r.reason for r in ads.refusals()] == ["no_client_certificate"]
        assert calls == []  # refused before any node id was looked at
    finally:
        await server.stop(0)


async def test_tls_configuration_errors_are_clear(pki: Pki) -> None:
    server = AdsServer(cache=SnapshotCache(), registry=CollectorRegistry())
    tls = ServerTLS.of(
        cert_pem=pki.server.cert_pem,
        key_pem=pki.server.private_key_pem,
        client_ca_pems=[pki.ca_pem],
    )
    with pytest.raises(XdsError, match="authorize hook"):
        await server.start(tls=tls)
    with pytest.raises(XdsError, match="client_ca_pems: empty"):
        ServerTLS.of(
            cert_pem=pki.server.cert_pem, key_pem=pki.server.private_key_pem, client_ca_pems=[]
        )
    with pytest.raises(XdsError, match=r"client_ca_pems\[0\]"):
        ServerTLS.of(
            cert_pem=pki.server.cert_pem,
            key_pem=pki.server.private_key_pem,
            client_ca_pems=["not a certificate"],
        )
    with pytest.raises(XdsError, match="key_pem"):
        ServerTLS.of(cert_pem=pki.server.cert_pem, key_pem="", client_ca_pems=[pki.ca_pem])


async def test_tls_material_rotates_for_new_connections(tls_ads: TlsAds, tmp_path: Path) -> None:
    """A new server certificate and client CA bundle (a CA rotation: the new root is trusted
    beside the old one) apply to connections made after ``update_tls``."""
    tls_ads.cache.set_snapshot(node_id=NODE, snapshot=snapshot(port=free_port()))
    rotated = LocalIssuer(directory=tmp_path / "rotated", trust_domain=TRUST_DOMAIN)
    new_ca = "".join(rotated.trust_bundle())
    hour = timedelta(hours=1)
    new_web = rotated.issue(identity=WEB, lifetime=hour)
    new_server = issue_serving_certificate(rotated, ip_addresses=["127.0.0.1"], lifetime=hour)

    async def served(chan: grpc.aio.Channel) -> bool:
        client = RawClient(chan, node_id=NODE)
        try:
            return len((await client.recv()).resources) == 1
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            return False
        finally:
            await client.close()

    assert await served(channel(tls_ads, cert=tls_ads.pki.web))
    assert not await served(channel(tls_ads, cert=new_web, ca_pem=new_ca))
    tls = ServerTLS.of(
        cert_pem=new_server.cert_pem,
        key_pem=new_server.private_key_pem,
        client_ca_pems=[tls_ads.pki.ca_pem, new_ca],
        trust_domain=TRUST_DOMAIN,
    )
    assert tls_ads.ads.update_tls(tls) is True
    assert tls_ads.ads.update_tls(tls) is False  # same material: nothing to do
    assert tls_ads.ads.tls == tls
    # The new CA's client is served by the new certificate; the old CA's client certificate
    # is still accepted (both roots trusted) when it trusts the new server certificate.
    assert await served(channel(tls_ads, cert=new_web, ca_pem=new_ca))
    assert await served(channel(tls_ads, cert=tls_ads.pki.web, ca_pem=new_ca))
    # A client that trusts only the old root no longer accepts the server.
    assert not await served(channel(tls_ads, cert=tls_ads.pki.web))
    with pytest.raises(XdsError, match="trust domain"):
        tls_ads.ads.update_tls(
            ServerTLS.of(
                cert_pem=new_server.cert_pem,
                key_pem=new_server.private_key_pem,
                client_ca_pems=[new_ca],
                trust_domain="elsewhere.local",
            )
        )


@pytest.mark.envoy
async def test_bootstrap_certificate_renewed_in_a_watched_directory_outlives_the_first(
    tls_ads: TlsAds, tmp_path: Path, envoys: list[EnvoyProcess]
) -> None:
    """A pod's bootstrap credentials as a mounted Secret (file-based SDS in a watched
    directory, swapped the kubelet's way): the renewed certificate is loaded by the running
    Envoy, so after the first one expired a reconnect to the control plane still succeeds.
    An Envoy whose bootstrap certificate is inline cannot reconnect once it expired."""
    lport = free_port()
    tls_ads.cache.set_snapshot(node_id=NODE, snapshot=snapshot(port=lport))
    short = tls_ads.pki.issuer.issue(identity=WEB, lifetime=timedelta(seconds=12))
    folder = tmp_path / "bootstrap"
    write_projected(
        folder,
        watched_tls_files(
            cert_pem=short.cert_pem, key_pem=short.private_key_pem, ca_pem=tls_ads.pki.ca_pem
        ),
    )
    boot = envoy_bootstrap(
        node_id=NODE,
        cluster="web",
        ads=AdsAddress(host="127.0.0.1", port=tls_ads.port),
        tls=TlsSources.watched(folder),
        admin_port=free_port(),
        server_name="ads.mesh.test",  # SNI, and the DNS SAN the server must carry
    )
    watched = EnvoyProcess(bootstrap=boot, workdir=tmp_path / "watched", log_level="warning")
    envoys.append(watched)
    watched.start()
    inline = start_envoy(tls_ads, short, delta=False, workdir=tmp_path / "inline", envoys=envoys)
    await watched.wait_listener("inbound")
    await inline.wait_live()

    def serials(envoy: EnvoyProcess) -> set[str]:
        status, body = envoy._get("/certs")
        assert status == 200
        return {
            c["serial_number"].lower().lstrip("0")
            for entry in json.loads(body).get("certificates", [])
            for c in entry.get("cert_chain", [])
        }

    renewed = tls_ads.pki.issuer.issue(identity=WEB, lifetime=timedelta(hours=1))
    assert short.serial.lower().lstrip("0") in serials(watched)
    write_projected(
        folder,
        watched_tls_files(
            cert_pem=renewed.cert_pem, key_pem=renewed.private_key_pem, ca_pem=tls_ads.pki.ca_pem
        ),
    )
    await wait_until(
        lambda: renewed.serial.lower().lstrip("0") in serials(watched),
        what="the watched Envoy to load the renewed certificate",
    )
    # Past the first certificate's end, the control plane restarts: both Envoys reconnect.
    wait = (short.not_after - datetime.now(UTC)).total_seconds() + 1
    await asyncio.sleep(max(wait, 0))
    tls = tls_ads.ads.tls
    assert tls is not None
    await tls_ads.ads.stop(grace=0)
    await tls_ads.ads.start(port=tls_ads.port, tls=tls)

    def connected(envoy: EnvoyProcess) -> bool:
        return envoy.stats().get("control_plane.connected_state") == 1

    await wait_until(lambda: connected(watched), what="the watched Envoy to reconnect")
    await asyncio.sleep(1.0)
    assert not connected(inline)
    assert [p.node_id for p in tls_ads.ads.proxies()] == [NODE]  # the watched one only
    assert inline.stats().get("cluster.smc_xds.upstream_cx_connect_fail", 0) >= 1
