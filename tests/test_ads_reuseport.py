"""Several ADS servers sharing one port (SO_REUSEPORT), as replicas of one log on one host do.

``AdsServer.start(reuse_port=True)`` binds with SO_REUSEPORT: the kernel spreads new connections
over the servers bound to the port, so the streams of a connect storm and the pushes of a change
are shared by several processes (cores). Each server holds its own cache of the same snapshots
(replicas of the log build identical ones). Without the flag a taken port stays an error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from smc.testing.manifests import one_vm_service_yaml
from smc.testing.serve import ServeProcess
from smc.xds import CLUSTER, AdsServer, Snapshot, SnapshotCache, make_entry

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Connections opened; the chance that the kernel's hash puts all of them on one server's socket
# is 2 * 2**-24.
CONNECTIONS = 24


def _snapshot() -> Snapshot:
    c = cluster_pb2.Cluster(name="svc", type=cluster_pb2.Cluster.STATIC)
    return Snapshot.from_entries([make_entry(c)])


async def _cds_version(port: int, node: str) -> str:
    # Its own subchannel pool: one TCP connection per channel (else channels share one).
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        call = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        await call.write(
            discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node), type_url=CLUSTER)
        )
        resp = await asyncio.wait_for(call.read(), 10)
        assert resp is not grpc.aio.EOF
        return str(resp.version_info)


async def test_servers_sharing_a_port_split_the_streams() -> None:
    snapshot = _snapshot()
    servers: list[AdsServer] = []
    try:
        for _ in range(2):
            cache = SnapshotCache()
            for k in range(CONNECTIONS):
                cache.set_snapshot(node_id=f"node-{k}", snapshot=snapshot)
            servers.append(AdsServer(cache=cache))
        port = await servers[0].start(reuse_port=True)
        assert await servers[1].start(port=port, reuse_port=True) == port
        for s in servers:
            s.mark_ready()
        versions = await asyncio.gather(
            *(_cds_version(port, f"node-{k}") for k in range(CONNECTIONS))
        )
        assert set(versions) == {snapshot.version(CLUSTER)}
        served = [
            s.metrics.registry.get_sample_value(
                "smc_xds_pushes_total", {"type": "Cluster", "kind": "sotw"}
            )
            for s in servers
        ]
        assert sum(v or 0 for v in served) == CONNECTIONS
        assert all(v and v > 0 for v in served), f"one server got every connection: {served}"
    finally:
        for s in servers:
            await s.stop(grace=0)


async def test_a_taken_port_is_an_error_without_reuse_port() -> None:
    first = AdsServer(cache=SnapshotCache())
    port = await first.start()
    try:
        for reuse in (False, True):  # the first socket did not allow sharing either way
            with pytest.raises((OSError, RuntimeError)):
                await AdsServer(cache=SnapshotCache()).start(port=port, reuse_port=reuse)
    finally:
        await first.stop(grace=0)


VM = one_vm_service_yaml()


async def test_serve_replicas_share_the_ads_port(tmp_path: Path) -> None:
    """Two ``smc serve`` on one log, both with --xds-reuseport on the same --xds port: the
    proxies' connections are spread over both, and every proxy gets the same versions."""
    first = ServeProcess(tmp_path, args=["--xds-reuseport"])
    second: ServeProcess | None = None
    try:
        first.wait_ready()
        second = ServeProcess(
            tmp_path,
            xds_host=None,
            log_url=f"sqlite:///{tmp_path / 'log.db'}",
            args=[
                "--xds",
                f"127.0.0.1:{first.xds_port}",
                "--xds-reuseport",
                "--xds-plaintext",
                "--ca",
                "follow",
                "--keys",
                str(tmp_path / "keys"),
                "--ca-listen",
                "off",
            ],
        )
        second.wait_ready()
        status, body = await asyncio.to_thread(
            first.request,
            "/v1/apply",
            method="POST",
            body=VM,
            headers={"Content-Type": "application/yaml"},
        )
        assert status == 200, body
        opened: list[tuple[grpc.aio.Channel, Any]] = []
        try:
            for _ in range(CONNECTIONS):
                channel = grpc.aio.insecure_channel(
                    f"127.0.0.1:{first.xds_port}",
                    options=[("grpc.use_local_subchannel_pool", 1)],
                )
                call = channel.stream_stream(
                    "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
                    "StreamAggregatedResources",
                    request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                    response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
                )()
                opened.append((channel, call))
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        node=base_pb2.Node(id="demo/web-1"), type_url=CLUSTER
                    )
                )
            answers = await asyncio.gather(
                *(asyncio.wait_for(call.read(), 60) for _, call in opened)
            )
            assert len({a.version_info for a in answers}) == 1, answers
            served = []
            for replica in (first, second):
                status, body = await asyncio.to_thread(replica.request, "/debug/proxies")
                assert status == 200, body
                served.append(sum(1 for p in body["proxies"] if p["node_id"] == "demo/web-1"))
            assert sum(served) == CONNECTIONS, served
            assert all(served), f"one replica got every connection: {served}"
        finally:
            for channel, call in opened:
                call.cancel()
                await channel.close()
    finally:
        if second is not None:
            second.stop()
        first.stop()
