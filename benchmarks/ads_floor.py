"""Benchmark server: the floor of a Python gRPC ADS server (what gRPC alone costs per stream).

Role: a deliberately minimal ADS server, driven by ``benchmarks/ads_scale.py --server floor-*``
with the same Go load generator, pipe protocol and resources as the real one
(``ads_streams._server_main``): it answers the first request of each type on a stream with a
pre-serialised response, ignores every ACK, and on a change writes one pre-serialised EDS
response (the changed resource) to every stream. No snapshots, no subscriptions, no metrics: the
server CPU per stream per change it shows is what the gRPC binding and the event loop cost for
one write plus one read (the aio variants recognise an ACK of their last response by its
trailing nonce bytes and do not parse it, as SMC's server does with plain ACKs), so SMC's
server can be compared with it.

Variants (``kind``): ``aio`` (grpc.aio, asyncio's default loop: what SMC uses),
``aio-coalesced`` (the same, with gRPC's completions waking the loop once per batch as SMC's
server makes them, see :mod:`smc.xds._grpc_wakeups`), ``uvloop``
(grpc.aio on uvloop), ``sync`` (the thread-per-stream grpc server: one thread writes, one
reads each stream). gRPC compresses nothing unless asked (no compression is configured on
either side), so there is no compression to turn off.

Concurrency: runs in its own process (spawned by ads_scale.py); aio variants on one loop, the
sync variant on a thread pool of two threads per stream.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
from ads_streams import (
    _batch_io_threads,
    _cla,
    _cluster,
    _cpu,
    _listener,
    _route,
    _rss_bytes,
    _tune_gc,
)
from envoy.service.discovery.v3 import discovery_pb2

from smc.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot, make_entry
from smc.xds._gc import tune_gc
from smc.xds._grpc_threads import batch_grpc_io_threads
from smc.xds._grpc_wakeups import coalesce_grpc_wakeups
from smc.xds._requests import RequestHead

_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.server.max_pending_requests", 1_000_000),
    ("grpc.server.max_pending_requests_hard_limit", 1_000_000),
    ("grpc.server_max_unrequested_time_in_server", 86_400),
]


def _body(type_url: str, version: str, values: list[bytes]) -> bytes:
    response = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url)
    for value in values:
        response.resources.add(type_url=type_url, value=value)
    return bytes(response.SerializeToString())


def _nonce(n: int) -> bytes:
    data = str(n).encode()
    return bytes([(5 << 3) | 2, len(data)]) + data


class _Bodies:
    def __init__(self, services: int, endpoints: int) -> None:
        self.names = [f"svc-{i}" for i in range(services)]
        entries = [make_entry(_route(self.names))]
        for i, n in enumerate(self.names):
            entries.append(make_entry(_cluster(n)))
            entries.append(make_entry(_cla(n, i, endpoints)))
        entries.append(make_entry(_listener("node-0")))
        snap = Snapshot.from_entries(entries)
        self.initial = {
            t: _body(t, snap.version(t), [e.value for e in snap.entries(t).values()])
            for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
        }
        self.services, self.endpoints = services, endpoints
        self.extra = 0

    def change(self, index: int) -> tuple[bytes, str]:
        self.extra += 1
        entry = make_entry(_cla(self.names[index], index, self.endpoints, extra=self.extra))
        version = f"change-{self.extra}"
        return _body(ENDPOINT, version, [entry.value]), version


def _identity(data: bytes) -> bytes:
    return data


def floor_main(conn: Connection, streams: int, services: int, endpoints: int, kind: str) -> None:
    """Entry point of the server process (same pipe protocol as ``ads_streams._server_main``)."""
    bodies = _Bodies(services, endpoints)
    if kind == "sync":
        _sync_main(conn, bodies)
        return
    if kind == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(_aio_main(conn, bodies, coalesce=kind == "aio-coalesced"))


def _answer_stats(conn: Connection) -> None:
    conn.send({"rss": _rss_bytes(), "cpu": _cpu(), "loop_cpu": time.thread_time(), "bytes_sent": 0})


async def _aio_main(conn: Connection, bodies: _Bodies, coalesce: bool = False) -> None:
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue[bytes | None]] = []

    async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        queues.append(q)

        async def read() -> None:
            try:
                async for raw in requests:
                    if sent and raw.endswith(sent[-1]):
                        continue  # an ACK of the last response: nothing to do (not parsed)
                    request = RequestHead.FromString(raw)
                    if not request.response_nonce:
                        q.put_nowait(bodies.initial.get(request.type_url))
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                q.put_nowait(None)

        sent: list[bytes] = []  # the nonce field of the last response
        reader = asyncio.create_task(read())
        nonce = 0
        try:
            while True:
                body = await q.get()
                if body is None:
                    return
                nonce += 1
                field = _nonce(nonce)
                sent[:] = [field]
                await context.write(body + field)
        finally:
            reader.cancel()
            queues.remove(q)

    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                _SERVICE,
                {
                    "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        handler,
                        request_deserializer=_identity,
                        response_serializer=_identity,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if coalesce:  # as SMC's server does (smc.xds._grpc_wakeups)
        assert coalesce_grpc_wakeups(asyncio.get_running_loop())
    if _batch_io_threads():
        batch_grpc_io_threads()  # as SMC's server does (smc.xds._grpc_threads)
    rss = _rss_bytes()
    tune_gc()  # the garbage collector's settings of SMC's server (smc.xds._gc)
    _tune_gc()
    conn.send({"port": port, "rss_snapshots": rss, "rss_start": rss, "names": bodies.names})
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd == "stop":
            await server.stop(0)
            conn.send("stopped")
            return
        if cmd in ("stats", "cpu"):
            _answer_stats(conn)
        elif isinstance(cmd, tuple) and cmd[0] == "change":
            t_ns, t = time.time_ns(), time.monotonic()
            body, version = bodies.change(cmd[1] % bodies.services)
            for q in queues:
                q.put_nowait(body)
            conn.send(
                {"t0": t, "t0_ns": t_ns, "publish_s": time.monotonic() - t, "eds_version": version}
            )


def _sync_main(conn: Connection, bodies: _Bodies) -> None:
    queues: list[queue.SimpleQueue[bytes | None]] = []
    lock = threading.Lock()

    def handler(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[bytes]:
        q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        with lock:
            queues.append(q)

        def read() -> None:
            try:
                for request in requests:
                    if not request.response_nonce:
                        q.put(bodies.initial.get(request.type_url))
            except grpc.RpcError:
                pass
            finally:
                q.put(None)

        threading.Thread(target=read, daemon=True).start()
        nonce = 0
        try:
            while True:
                body = q.get()
                if body is None:
                    return
                nonce += 1
                yield body + _nonce(nonce)
        finally:
            with lock:
                queues.remove(q)

    streams = int(os.environ.get("ADS_FLOOR_STREAMS", "1000"))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=streams + 16),
        options=_OPTIONS,
        maximum_concurrent_rpcs=None,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                _SERVICE,
                {
                    "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        handler,
                        request_deserializer=RequestHead.FromString,
                        response_serializer=_identity,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rss = _rss_bytes()
    conn.send({"port": port, "rss_snapshots": rss, "rss_start": rss, "names": bodies.names})
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            server.stop(0)
            conn.send("stopped")
            return
        if cmd in ("stats", "cpu"):
            _answer_stats(conn)
        elif isinstance(cmd, tuple) and cmd[0] == "change":
            t_ns, t = time.time_ns(), time.monotonic()
            body, version = bodies.change(cmd[1] % bodies.services)
            with lock:
                for q in queues:
                    q.put(body)
            conn.send(
                {"t0": t, "t0_ns": t_ns, "publish_s": time.monotonic() - t, "eds_version": version}
            )
