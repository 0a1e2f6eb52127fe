"""The garbage collector's young threshold of a serving process (smc.xds._gc).

``AdsServer.start()`` raises it to 50,000 and then, as streams open, to 50 per open stream
(at 10,000 streams the fixed 50,000 let collections take 0.06-0.5 s of every change). It is
only ever raised: never lowered when streams go, never over an operator's higher setting, and
a collector disabled on purpose stays disabled.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from smc.xds import CLUSTER, AdsServer, SnapshotCache
from smc.xds import _gc as xds_gc
from smc.xds._gc import YOUNG_THRESHOLD, tune_gc, tune_gc_for_streams


@pytest.fixture
def thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_the_threshold_follows_the_streams_and_is_never_lowered(thresholds: None) -> None:
    gc.set_threshold(700, 10, 10)
    assert tune_gc_for_streams(10) == (YOUNG_THRESHOLD, 10, 10)
    assert tune_gc_for_streams(10_000) == (500_000, 10, 10)
    assert tune_gc_for_streams(100) == (500_000, 10, 10)  # streams went: kept
    assert tune_gc() == (500_000, 10, 10)
    gc.set_threshold(2_000_000, 10, 10)  # an operator's higher setting
    assert tune_gc_for_streams(10_000) == (2_000_000, 10, 10)
    gc.set_threshold(0, 10, 10)  # disabled on purpose
    assert tune_gc_for_streams(10_000)[0] == 0


async def _open_stream(port: int, node: str) -> tuple[grpc.aio.Channel, object]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.stream_stream(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )()
    await call.write(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node), type_url=CLUSTER))
    return channel, call


@pytest.mark.asyncio(loop_scope="session")
async def test_a_started_server_raises_the_threshold_as_streams_open(
    thresholds: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 60,000 per stream and a first step at 2 streams: 3 streams stand for 3,600 at 50 each
    monkeypatch.setattr(xds_gc, "YOUNG_PER_STREAM", 60_000)
    gc.set_threshold(700, 10, 10)
    server = AdsServer(cache=SnapshotCache())
    opened: list[tuple[grpc.aio.Channel, object]] = []
    try:
        port = await server.start()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        server._gc_mark = 2
        for i in range(3):
            opened.append(await _open_stream(port, f"node-{i}"))
        for _ in range(500):
            if len(server._streams) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(server._streams) == 3
        assert gc.get_threshold()[0] == 2 * 60_000  # raised at the 2nd stream, next at 502
    finally:
        for channel, _ in opened:
            await channel.close()
        await server.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_server_never_started_leaves_the_collector_alone(thresholds: None) -> None:
    gc.set_threshold(700, 10, 10)
    server = AdsServer(cache=SnapshotCache())
    grpc_server = grpc.aio.server()
    server.add_to(grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        channel, _ = await _open_stream(port, "node-a")
        try:
            for _ in range(500):
                if server._streams:
                    break
                await asyncio.sleep(0.01)
            assert server._streams
            assert gc.get_threshold()[0] == 700
        finally:
            await channel.close()
    finally:
        await grpc_server.stop(None)
