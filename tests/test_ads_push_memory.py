"""A stream keeps no written response alive (smc.xds._server: the handler's push).

Each stream's response is the shared serialised body plus the stream's nonce, a new bytes
object as large as the body. The handler computes a push's responses before writing them; once
written they must be dropped, or every stream holds its last response until its next push (at
1,000 streams the first LDS/RDS of a connect storm, tens of KB each, doubled the server's
memory per stream). Real grpc.aio server and clients on one loop; Python allocations traced
with tracemalloc, the clients' received bytes dropped as they arrive.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from smc.xds import CLUSTER, AdsServer, Snapshot, SnapshotCache, make_entry

STREAMS = 20
CLUSTERS = 2000  # a CDS response of about 100 KB
METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def _snapshot() -> Snapshot:
    entries = []
    for i in range(CLUSTERS):
        cluster = cluster_pb2.Cluster(
            name=f"cluster-with-a-long-name-{i:05d}", type=cluster_pb2.Cluster.STATIC
        )
        cluster.connect_timeout.seconds = 1
        entries.append(make_entry(cluster))
    return Snapshot.from_entries(entries)


async def test_written_responses_are_not_kept_per_stream() -> None:
    cache = SnapshotCache()
    snapshot = _snapshot()
    nodes = [f"ns/n{k}" for k in range(STREAMS)]
    for node in nodes:
        cache.set_snapshot(node_id=node, snapshot=snapshot)
    acked: list[str] = []
    server = AdsServer(cache=cache, on_ack=lambda node, *_: acked.append(node))
    port = await server.start()
    server.mark_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    calls = []
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        sizes = []
        for node in nodes:
            call = channel.stream_stream(
                METHOD,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=None,  # bytes, dropped below
            )()
            await call.write(
                discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node), type_url=CLUSTER)
            )
            raw = await call.read()
            head = discovery_pb2.DiscoveryResponse.FromString(raw)
            sizes.append(len(raw))
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=CLUSTER,
                    version_info=head.version_info,
                    response_nonce=head.nonce,
                )
            )
            del raw, head
            calls.append(call)
        async with asyncio.timeout(30):
            while len(acked) < STREAMS:
                await asyncio.sleep(0.01)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        for call in calls:
            call.cancel()
        await channel.close()
        await server.stop(grace=0)
    body = min(sizes)
    assert body > 80_000
    # Without the fix each stream keeps its last response (body + nonce): grown > STREAMS x
    # body. What a stream rightly keeps (its state, gRPC's call objects) is a few KB.
    assert grown < STREAMS * body / 4, (grown, STREAMS * body)
