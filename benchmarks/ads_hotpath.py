"""Benchmark: SMC's own CPU per stream per change, without gRPC (the ADS server's hot path).

Role: ``ads_scale.py`` measures the whole server process (gRPC core's I/O threads, the kernel's
TCP on loopback, the Python binding and SMC's work together) and scatters by +-15% from run to
run on a shared machine. This benchmark isolates SMC's part: the same 1,000 per-proxy
snapshots as ``ads_streams.py`` (1,000 services, 10 endpoints each), published with the same
``replace`` + ``set_snapshot`` loop, served by the real :class:`~smc.xds.AdsServer` stream
handler (``StreamAggregatedResources``: its mailbox, reader, push, plain-ACK path), but each
stream's gRPC context is an in-process stand-in on the same event loop: ``write`` hands the
response to a client that answers it at once with the plain ACK an xDS client sends (its
version, the same names, the type and the nonce), ``read`` returns the next request. The
client's own work (decoding a response head, encoding its ACK) is timed and subtracted.

Prints, per change, the CPU time of the loop's thread per stream: publishing, pushing and
ACKing together, and the publish alone; the median over the changes; writes JSON.

Concurrency: one process, one asyncio loop, no threads but the interpreter's.

Usage: python benchmarks/ads_hotpath.py [--streams 1000] [--services 1000] [--endpoints 10]
       [--changes 20] [--out benchmarks/results/ads_hotpath.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import grpc  # noqa: E402
from ads_streams import _cla, _cluster, _listener, _publish_change, _route  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402

from smc.xds import (  # noqa: E402
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    AdsServer,
    Snapshot,
    SnapshotCache,
    make_entry,
)
from smc.xds._gc import tune_gc  # noqa: E402
from smc.xds._server_stream import _string_field  # noqa: E402

_CLIENT_CPU = [0.0]  # the stand-in clients' own CPU, subtracted


class _Client:
    """One proxy's xDS client as the server's gRPC context: requests out, responses in."""

    def __init__(self, node: str, names: list[str]) -> None:
        self.requests: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.names_field = {
            CLUSTER: b"",
            LISTENER: b"",
            ENDPOINT: b"".join(_string_field(3, n) for n in names),
            ROUTE: _string_field(3, "outbound"),
        }
        self.versions: dict[str, str] = {}
        self.eds_version = ""
        for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            request = discovery_pb2.DiscoveryRequest(type_url=type_url)
            if type_url in (ENDPOINT, ROUTE):
                request.resource_names.extend(names if type_url == ENDPOINT else ["outbound"])
            if type_url == CLUSTER:
                request.node.CopyFrom(base_pb2.Node(id=node))
            self.requests.append(request.SerializeToString())

    # --- the parts of grpc.aio.ServicerContext the ADS handler uses
    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def read(self) -> Any:
        while not self.requests:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.requests.popleft()

    async def write(self, data: bytes) -> None:
        t = time.thread_time()
        head = discovery_pb2.DiscoveryResponse.FromString(data)  # (a client decodes it)
        type_url, version, nonce = head.type_url, head.version_info, head.nonce
        self.versions[type_url] = version
        if type_url == ENDPOINT:
            self.eds_version = version
        self.requests.append(
            _string_field(1, version)
            + self.names_field[type_url]
            + _string_field(4, type_url)
            + _string_field(5, nonce)
        )
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        _CLIENT_CPU[0] += time.thread_time() - t

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"stream aborted: {code} {details}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tune_gc()
    names = [f"svc-{i}" for i in range(args.services)]
    shared = [make_entry(_route(names))]
    for i, n in enumerate(names):
        shared.append(make_entry(_cluster(n)))
        shared.append(make_entry(_cla(n, i, args.endpoints)))
    base = Snapshot.from_entries(shared)
    cache = SnapshotCache()
    nodes = [f"node-{n}" for n in range(args.streams)]
    for node in nodes:
        cache.set_snapshot(
            node_id=node, snapshot=base.replace(upsert=[make_entry(_listener(node))])
        )
    server = AdsServer(cache=cache)
    server.mark_ready()
    clients = [_Client(node, names) for node in nodes]
    tasks = [
        asyncio.create_task(server.StreamAggregatedResources(iter(()), c))  # type: ignore[arg-type]
        for c in clients
    ]

    async def settled(version: str | None) -> None:
        # every stream holds the EDS version and has no request left to read
        while True:
            await asyncio.sleep(0)
            for t in tasks:
                if t.done():
                    t.result()  # a stream that ended raises here
                    raise RuntimeError("a stream ended")
            if all(
                not c.requests and (version is None or c.eds_version == version) for c in clients
            ) and all(len(c.versions) == 4 for c in clients):
                for _ in range(5):  # let the last ACKs be applied
                    await asyncio.sleep(0)
                return

    await settled(None)
    changes = []
    for k in range(args.changes):
        index = (k * 7919) % args.services
        entry = make_entry(_cla(names[index], index, args.endpoints, extra=k + 1))
        _CLIENT_CPU[0] = 0.0
        t0 = time.thread_time()
        _publish_change(cache, nodes, entry)
        publish = time.thread_time() - t0
        version = cache.get(nodes[0]).version(ENDPOINT)  # type: ignore[union-attr]
        await settled(version)
        total = time.thread_time() - t0 - _CLIENT_CPU[0]
        changes.append({"cpu_s": total, "publish_cpu_s": publish})
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    n = args.streams
    per = [c["cpu_s"] / n * 1e6 for c in changes]
    pub = [c["publish_cpu_s"] / n * 1e6 for c in changes]
    return {
        "streams": n,
        "services": args.services,
        "endpoints": args.services * args.endpoints,
        "changes": changes,
        "us_per_stream_per_change_median": statistics.median(per),
        "us_per_stream_per_change_best": min(per),
        "publish_us_per_stream_median": statistics.median(pub),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--out", default=str(BENCH / "results" / "ads_hotpath.json"))
    args = parser.parse_args()
    r = asyncio.run(run(args))
    print(
        f"{r['streams']} streams ({r['services']} services, {r['endpoints']} endpoints): SMC's "
        f"CPU per stream per change (publish, push, ACK; no gRPC) median "
        f"{r['us_per_stream_per_change_median']:.1f} us, best "
        f"{r['us_per_stream_per_change_best']:.1f} us; of which publish "
        f"{r['publish_us_per_stream_median']:.1f} us",
        flush=True,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "ads_hotpath", "result": r}, indent=2) + "\n")


if __name__ == "__main__":
    main()
