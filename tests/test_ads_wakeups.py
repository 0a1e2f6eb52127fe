"""gRPC completions reach the ADS server's loop in batches (smc.xds._grpc_wakeups).

grpc.aio's poller thread writes one wake-up byte per completion and its loop reader reads one
per loop turn; the server makes one turn read all but one of them, so a burst of completions
(a change pushed to every stream, then every ACK) costs a few loop turns, not one per
completion. Real grpc.aio server and clients on one loop (so the client's completions share the
same wake-up socket); the turns are counted by wrapping the loop's selector.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from smc.xds import CLUSTER, AdsServer, Snapshot, SnapshotCache, make_entry
from smc.xds._grpc_wakeups import coalesce_grpc_wakeups

STREAMS = 200
METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def _snapshot(timeout_s: int) -> Snapshot:
    cluster = cluster_pb2.Cluster(name="svc", type=cluster_pb2.Cluster.STATIC)
    cluster.connect_timeout.seconds = timeout_s
    return Snapshot.from_entries([make_entry(cluster)])


@contextlib.contextmanager
def _counting_turns(loop: asyncio.AbstractEventLoop) -> Iterator[list[int]]:
    selector: Any = loop._selector  # type: ignore[attr-defined]
    real = selector.select
    turns = [0]

    def select(timeout: float | None = None) -> Any:
        turns[0] += 1
        return real(timeout)

    selector.select = select
    try:
        yield turns
    finally:
        selector.select = real


async def _push_to_all(coalesce: bool) -> tuple[int, bool]:
    """Start a server (coalescing or not), open STREAMS streams, push one change to all and
    wait for every stream to get it and the server to see every ACK: (loop turns, applied)."""
    cache = SnapshotCache()
    nodes = [f"ns/n{k}" for k in range(STREAMS)]
    for node in nodes:
        cache.set_snapshot(node_id=node, snapshot=_snapshot(1))
    server = AdsServer(cache=cache)
    port = await server.start()
    applied = server.wakeups_coalesced
    loop = asyncio.get_running_loop()
    if not coalesce and applied:  # undo: gRPC's own reader back on its socket
        from smc.xds._grpc_wakeups import _poller_reader

        sock, wrapper = _poller_reader(loop)
        loop.remove_reader(sock)
        loop.add_reader(sock, wrapper.__wrapped__)  # type: ignore[attr-defined]
    server.mark_ready()
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    try:
        calls = []
        for k, node in enumerate(nodes):
            call = channels[k % 4].stream_stream(
                METHOD,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )()
            await call.write(
                discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node), type_url=CLUSTER)
            )
            calls.append(call)

        async def ack_next(call: Any) -> str:
            resp = await call.read()
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=CLUSTER, version_info=resp.version_info, response_nonce=resp.nonce
                )
            )
            return str(resp.version_info)

        first = await asyncio.wait_for(asyncio.gather(*map(ack_next, calls)), 30)
        assert set(first) == {_snapshot(1).version(CLUSTER)}

        def acked(version: str) -> bool:
            return all(p.types[CLUSTER].acked_version == version for p in server.proxies())

        while not acked(first[0]):
            await asyncio.sleep(0.01)
        changed = _snapshot(2)
        with _counting_turns(loop) as turns:
            pending = [asyncio.ensure_future(ack_next(c)) for c in calls]
            for node in nodes:
                cache.set_snapshot(node_id=node, snapshot=changed)
            got = await asyncio.wait_for(asyncio.gather(*pending), 30)
            while not acked(changed.version(CLUSTER)):
                await asyncio.sleep(0)
        assert set(got) == {changed.version(CLUSTER)}
        for call in calls:
            call.cancel()
        return turns[0], applied
    finally:
        for channel in channels:
            await channel.close()
        await server.stop(grace=0)


async def test_a_burst_of_completions_takes_a_few_loop_turns() -> None:
    turns, applied = await _push_to_all(coalesce=True)
    assert applied
    # Each stream: the server's write and read, the client's read and write complete (4 x 200
    # wake-up bytes). With one turn per byte that is >= 800 turns; batched, a handful per hop.
    assert turns < STREAMS, turns
    plain, _ = await _push_to_all(coalesce=False)
    assert plain > 2 * STREAMS, plain  # the same burst with gRPC's own reader: a turn per byte


async def test_coalescing_is_idempotent_and_a_no_op_without_grpc() -> None:
    cache = SnapshotCache()
    server = AdsServer(cache=cache)
    await server.start()
    try:
        loop = asyncio.get_running_loop()
        assert server.wakeups_coalesced
        assert coalesce_grpc_wakeups(loop)  # already wrapped: still True, not wrapped twice
    finally:
        await server.stop(grace=0)
    other = asyncio.new_event_loop()
    try:
        assert not coalesce_grpc_wakeups(other)  # no gRPC reader on that loop
    finally:
        other.close()
