"""Several ADS servers sharing one port (SO_REUSEPORT), as replicas of one log on one host do.

``AdsServer.start(reuse_port=True)`` binds with SO_REUSEPORT: the kernel spreads new connections
over the servers bound to the port, so the streams of a connect storm and the pushes of a change
are shared by several processes (cores). Each server holds its own cache of the same snapshots
(replicas of the log build identical ones). Without the flag a taken port stays an error.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

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
