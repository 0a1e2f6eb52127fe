"""The ADS server under a connect storm: thousands of streams opened at once, none lost.

The server runs in its own process (as in production, its loop is not the clients'); the
clients are raw gRPC streams on a few channels of this process, opened all at once (no ramp),
each asking for its node's clusters and waiting for the answer. gRPC core's defaults cancel
streams beyond 1,000 waiting to be picked up by the server's loop; the server must hold them
instead, and answer every one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from smc.xds import CLUSTER, ENDPOINT

STREAMS = 3000
CHANNELS = 10

SERVER = r"""
import asyncio, sys
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from smc.xds import AdsServer, Snapshot, SnapshotCache, make_entry

async def main(n, services):
    cache = SnapshotCache()
    entries = []
    for i in range(services):
        c = cluster_pb2.Cluster(name=f"svc-{i}", type=cluster_pb2.Cluster.EDS)
        c.eds_cluster_config.eds_config.ads.SetInParent()
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=f"svc-{i}")
        for e in range(10):
            ep = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
            ep.address, ep.port_value = f"10.0.{i % 250}.{e + 1}", 8080
        entries += [make_entry(c), make_entry(cla)]
    base = Snapshot.from_entries(entries)
    for k in range(n):
        cache.set_snapshot(node_id=f"node-{k}", snapshot=base)
    server = AdsServer(cache=cache)
    port = await server.start()
    server.mark_ready()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(grace=0)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


async def _storm(port: int, services: int) -> tuple[Counter[str], float]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
    outcomes: Counter[str] = Counter()
    names = [f"svc-{i}" for i in range(services)]

    async def one(k: int) -> None:
        channel = channels[k % CHANNELS]
        call = channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        try:
            node = base_pb2.Node(id=f"node-{k}")
            await call.write(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))
            await call.write(
                discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names)
            )
            got: set[str] = set()
            while len(got) < 2:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    outcomes["ended"] += 1
                    return
                got.add(resp.type_url)
                assert len(resp.resources) == services
            outcomes["served"] += 1
        except grpc.aio.AioRpcError as exc:
            outcomes[exc.code().name] += 1
        finally:
            call.cancel()

    began = time.monotonic()
    await asyncio.gather(*(one(k) for k in range(STREAMS)))
    took = time.monotonic() - began
    for ch in channels:
        await ch.close()
    return outcomes, took


@pytest.mark.timeout(300)
def test_connect_storm_loses_no_stream() -> None:
    services = 50
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(STREAMS), str(services)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        outcomes, took = asyncio.run(_storm(port, services))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert outcomes == Counter(served=STREAMS), f"{outcomes} in {took:.1f}s"


async def test_a_stalled_proxy_delays_nobody() -> None:
    """A proxy that stops reading (its HTTP/2 window full mid-response) holds only its own
    stream: every other proxy still gets the initial config and later changes at once."""
    from envoy.config.cluster.v3 import cluster_pb2

    from smc.xds import AdsServer, Snapshot, SnapshotCache, make_entry

    def clusters(tag: str) -> Snapshot:
        # ~150 KB of clusters: far more than the stalled client's flow-control window.
        return Snapshot.from_entries(
            make_entry(cluster_pb2.Cluster(name=f"c{i}-{tag}-" + "x" * 40)) for i in range(3000)
        )

    cache = SnapshotCache()
    nodes = [f"node-{k}" for k in range(20)]
    for node in ["stalled", *nodes]:
        cache.set_snapshot(node_id=node, snapshot=clusters("a"))
    server = AdsServer(cache=cache)
    port = await server.start()
    server.mark_ready()
    method = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    stalled_ch = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.http2.lookahead_bytes", 1024)]
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    calls: list[Any] = []
    try:
        stalled = stalled_ch.stream_stream(
            method, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString
        )()
        calls.append(stalled)
        await stalled.write(
            discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="stalled"), type_url=CLUSTER)
        )  # ... and never reads
        loop = asyncio.get_running_loop()

        async def follow(node: str, seen: dict[str, float]) -> None:
            call = channel.stream_stream(
                method,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )()
            calls.append(call)
            await call.write(
                discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node), type_url=CLUSTER)
            )
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                seen.setdefault(resp.version_info, loop.time())
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        type_url=CLUSTER,
                        version_info=resp.version_info,
                        response_nonce=resp.nonce,
                    )
                )

        seen: dict[str, dict[str, float]] = {n: {} for n in nodes}
        tasks = [asyncio.create_task(follow(n, seen[n])) for n in nodes]
        first = clusters("a").version(CLUSTER)
        second = clusters("b").version(CLUSTER)

        async def everyone_has(version: str) -> None:
            while not all(version in seen[n] for n in nodes):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(everyone_has(first), timeout=60)
        stalled_status = next(p for p in server.proxies() if p.node_id == "stalled")
        assert stalled_status.types[CLUSTER].pending  # its response is stuck in flight
        changed_at = loop.time()
        for node in ["stalled", *nodes]:
            cache.set_snapshot(node_id=node, snapshot=clusters("b"))
        await asyncio.wait_for(everyone_has(second), timeout=60)
        slowest = max(seen[n][second] for n in nodes) - changed_at
        assert slowest < 30, f"the change took {slowest:.1f}s to reach every live proxy"
        stalled_status = next(p for p in server.proxies() if p.node_id == "stalled")
        assert stalled_status.types[CLUSTER].acked_version is None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for call in calls:
            call.cancel()
        await channel.close()
        await stalled_ch.close()
        await server.stop(grace=0)
