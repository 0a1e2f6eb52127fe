"""Node ids SMC cannot place get an error on their ADS stream (and a row in /debug/proxies).

Against a real ``smc serve`` child: a malformed node id (what a gRPC client with a made-up node
id sends) ends its stream with INVALID_ARGUMENT at once; a well-formed one naming no workload
ends with NOT_FOUND after the short grace (the workload may be joining), and one that joins
within the grace is served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from smc.testing.manifests import one_vm_service_yaml
from smc.testing.serve import ServeProcess
from smc.xds import CLUSTER
from smc.xds._server import UNPLACED_GRACE

VM = one_vm_service_yaml()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(tmp_path)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


async def first_answer(port: int, node_id: str, *, wait: float) -> tuple[float, object]:
    """Open a SotW stream as ``node_id`` asking for clusters; the first response or the
    RpcError that ends the stream, and how long it took (the request side stays open)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(chan)
        done = asyncio.Event()

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            yield discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id=node_id))
            await done.wait()

        call = stub.StreamAggregatedResources(requests())
        t0 = time.monotonic()
        try:
            got: object = await asyncio.wait_for(call.read(), wait)
        except grpc.aio.AioRpcError as err:
            got = err
        finally:
            done.set()
            call.cancel()
        return time.monotonic() - t0, got


async def test_malformed_and_unknown_node_ids_get_errors(serve: ServeProcess) -> None:
    took, got = await first_answer(serve.xds_port, "greeter-client", wait=10)
    assert isinstance(got, grpc.aio.AioRpcError), got
    assert got.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "greeter-client" in (got.details() or "") and "<namespace>/<workload>" in (
        got.details() or ""
    )
    assert took < UNPLACED_GRACE

    took, got = await first_answer(serve.xds_port, "demo/nobody", wait=UNPLACED_GRACE + 10)
    assert isinstance(got, grpc.aio.AioRpcError), got
    assert got.code() == grpc.StatusCode.NOT_FOUND
    assert "no workload 'demo/nobody'" in (got.details() or "")
    assert took >= UNPLACED_GRACE - 0.5

    status, body = serve.request("/debug/proxies")
    assert status == 200
    refused = {r["node_id"]: r for r in body["refused"]}
    assert refused["greeter-client"]["reason"] == "invalid_node_id"
    assert refused["demo/nobody"]["reason"] == "unplaced"
    assert "no workload" in refused["demo/nobody"]["message"]


async def test_workload_joining_within_the_grace_is_served(serve: ServeProcess) -> None:
    task = asyncio.create_task(first_answer(serve.xds_port, "demo/web-1", wait=30))
    await asyncio.sleep(0.5)  # the stream is open and waiting before the workload exists
    status, body = await asyncio.to_thread(
        serve.request,
        "/v1/apply",
        method="POST",
        body=VM,
        headers={"Content-Type": "application/yaml"},
    )
    assert status == 200, body
    _, got = await task
    assert isinstance(got, discovery_pb2.DiscoveryResponse), got
    assert got.type_url == CLUSTER
