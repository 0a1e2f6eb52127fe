"""Benchmark: many lightweight ADS streams against one AdsServer (SotW and delta).

Role: prints and writes as JSON, for N gRPC client streams (one node id each) over a mesh of S
services with E endpoints each: server memory per stream (RSS growth from connecting and syncing
every stream, over the RSS with all per-proxy snapshots published; the RSS after the changes is
also given), convergence time of an endpoint change
(publish of new per-proxy snapshots -> every stream received it; p50/p99/max), server CPU time per
change and resource bytes sent per change. Not part of the test run.

Concurrency: the server runs in a child process (its own asyncio loop and grpc.aio server), so its
RSS and CPU are measured alone; the parent drives it over a pipe and runs all client streams on
one asyncio loop over a few channels.

Usage: python benchmarks/ads_streams.py [--streams 1000] [--services 1000] [--endpoints 10]
       [--changes 5] [--mode sotw|delta|both] [--traffic-policy]
       [--out benchmarks/results/ads_streams.json]
``--traffic-policy``: every cluster carries an UpstreamTrafficSetting's circuit breakers and
outlier detection and the observability digest, every route a Retry's retry policy, every
listener its traffic direction, the JSON access log and Zipkin tracing, plus the tracing
cluster (as SMC's builder makes them, smc.xds._traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from smc.xds import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    AdsServer,
    ResourceEntry,
    Snapshot,
    SnapshotCache,
    make_entry,
)

# ---------------------------------------------------------------------- resources


def _cluster(name: str) -> Any:
    from envoy.config.cluster.v3 import cluster_pb2

    return json_format.ParseDict(
        {
            **_cluster_extra(),
            "name": name,
            "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        },
        cluster_pb2.Cluster(),
    )


def _cluster_extra() -> dict[str, Any]:
    if not _TRAFFIC:
        return {"connect_timeout": "1s"}
    from smc.xds._traffic import cluster_settings, observe_cluster

    tp, uts = _traffic_policy()
    return observe_cluster(tp, cluster_settings(uts))


def _cla(name: str, index: int, endpoints: int, extra: int = 0) -> Any:
    from envoy.config.endpoint.v3 import endpoint_pb2

    eps = [
        {
            "endpoint": {
                "address": {
                    "socket_address": {
                        "address": f"10.{index // 250 % 250}.{index % 250}.{e + 1}",
                        "port_value": 8080,
                    }
                }
            }
        }
        for e in range(endpoints + extra)
    ]
    return json_format.ParseDict(
        {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]},
        endpoint_pb2.ClusterLoadAssignment(),
    )


def _retry() -> dict[str, Any]:
    if not _TRAFFIC:
        return {}
    return {
        "retry_policy": {
            "retry_on": "5xx",
            "num_retries": 3,
            "per_try_timeout": "1s",
            "retry_back_off": {"base_interval": "0.010s"},
        }
    }


def _route(services: list[str]) -> Any:
    from envoy.config.route.v3 import route_pb2

    return json_format.ParseDict(
        {
            "name": "outbound",
            "virtual_hosts": [
                {
                    "name": s,
                    "domains": [f"{s}.mesh.local"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": s, **_retry()}}],
                }
                for s in services
            ],
        },
        route_pb2.RouteConfiguration(),
    )


def _listener(node: str) -> Any:
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
        http_connection_manager_pb2,
    )

    hcm: dict[str, Any] = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": node,
            "rds": {
                "route_config_name": "outbound",
                "config_source": {"ads": {}, "resource_api_version": "V3"},
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        },
    }
    if _TRAFFIC:
        from smc.xds._traffic import observe_hcm

        hcm = observe_hcm(_traffic_policy()[0], hcm, node=node, direction="outbound")
    return json_format.ParseDict(
        {
            "name": "outbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15001}},
            "filter_chains": [{"filters": [hcm]}],
            "traffic_direction": "OUTBOUND",
        },
        listener_pb2.Listener(),
    )


def _publish_change(cache: SnapshotCache, nodes: list[str], entry: Any) -> None:
    """Publish one changed resource to every node's snapshot, as the controller does per proxy
    (``replace`` + ``set_snapshot``): the change both ADS benchmarks time."""
    for node in nodes:
        snap = cache.get(node)
        assert snap is not None
        cache.set_snapshot(node_id=node, snapshot=snap.replace(upsert=[entry]))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


#: Cyclic garbage collections in the server process: per generation, [count, seconds].
GC_STATS: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}


def _track_gc() -> None:
    import gc

    started = [0.0]

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            entry = GC_STATS[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - started[0]

    gc.callbacks.append(note)


def _tune_gc() -> None:
    """ADS_GC=freeze,thr=A:B:C (experiments): gc.freeze() and/or gc.set_threshold(A, B, C)."""
    import gc

    for part in filter(None, os.environ.get("ADS_GC", "").split(",")):
        if part == "freeze":
            gc.freeze()
        elif part.startswith("thr="):
            gc.set_threshold(*[int(x) for x in part[4:].split(":")])


def _batch_io_threads() -> bool:
    """Whether the server process runs gRPC's I/O threads as SCHED_BATCH, as AdsServer.start
    does by default (``ads_scale.py --io-threads default``: the normal policy instead)."""
    return os.environ.get("SMC_BENCH_IO_THREADS", "batch") == "batch"


def _gc_seconds() -> float:
    return sum(v[1] for v in GC_STATS.values())


# ---------------------------------------------------------------------- server process


_PROFILE: Any = None  # cProfile.Profile while profiling


#: Set in the server process by ``--traffic-policy`` (see the module docstring).
_TRAFFIC = False
#: (port, reuse_port) of the server process (see _server_main).
_PORT = (0, False)


def _traffic_policy() -> Any:
    from smc.smi import parse_manifest
    from smc.xds._traffic import Observability, TrafficPolicy

    uts = parse_manifest(
        {
            "apiVersion": "policy.openservicemesh.io/v1alpha1",
            "kind": "UpstreamTrafficSetting",
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": {
                "host": "svc",
                "connectionSettings": {
                    "tcp": {"maxConnections": 100, "connectTimeout": "2s"},
                    "http": {"maxPendingRequests": 50, "maxRequests": 100, "maxRetries": 10},
                },
                "outlierDetection": {"consecutive5xxErrors": 5, "baseEjectionTime": "10s"},
            },
        },
        document="bench",
    )
    tp = TrafficPolicy(
        observability=Observability(
            access_log={"enabled": True, "format": "json", "path": "/dev/stdout"},
            tracing={
                "enabled": True,
                "provider": "zipkin",
                "address": "127.0.0.1",
                "port": 9411,
                "endpoint": "/api/v2/spans",
                "sampling": 1.0,
            },
        )
    )
    return tp, uts


def _server_main(
    conn: Connection,
    streams: int,
    services: int,
    endpoints: int,
    traffic: bool = False,
    port: int = 0,
    reuse_port: bool = False,
) -> None:
    """Entry point of the server process. ``port``/``reuse_port``: several server processes
    share one port (SO_REUSEPORT), each publishing to the proxies connected to it, as replicas
    of one log do (benchmarks/ads_scale.py --procs)."""
    global _TRAFFIC, _PORT
    _TRAFFIC = traffic
    _PORT = (port, reuse_port)
    # SMC_BENCH_PROFILE=PATH: write the server's cProfile stats there; from the first change
    # only (the connect storm left out) when SMC_BENCH_PROFILE_CHANGES is set too.
    global _PROFILE
    profile = os.environ.get("SMC_BENCH_PROFILE")
    if not profile:
        asyncio.run(_serve(conn, streams, services, endpoints))
        return
    import cProfile

    _PROFILE = cProfile.Profile()
    if not os.environ.get("SMC_BENCH_PROFILE_CHANGES"):
        _PROFILE.enable()
    try:
        asyncio.run(_serve(conn, streams, services, endpoints))
    finally:
        _PROFILE.disable()
        _PROFILE.dump_stats(profile)


async def _serve(conn: Connection, streams: int, services: int, endpoints: int) -> None:
    loop = asyncio.get_running_loop()
    rss_start = _rss_bytes()
    names = [f"svc-{i}" for i in range(services)]
    shared: list[ResourceEntry] = [make_entry(_route(names))]
    for i, n in enumerate(names):
        shared.append(make_entry(_cluster(n)))
        shared.append(make_entry(_cla(n, i, endpoints)))
    if _TRAFFIC:
        from smc.xds._traffic import tracing_cluster

        tp, _ = _traffic_policy()
        tracer = tracing_cluster(tp)
        assert tracer is not None
        shared.append(tracer)
    base = Snapshot.from_entries(shared)
    cache = SnapshotCache()
    nodes = [f"node-{n}" for n in range(streams)]
    t0 = time.monotonic()
    for node in nodes:
        cache.set_snapshot(
            node_id=node, snapshot=base.replace(upsert=[make_entry(_listener(node))])
        )
    publish_all_s = time.monotonic() - t0
    # The server's CPU from the publish of a change to the last EDS ACK of it (``on_ack``, as
    # the controller's ACK tracking hears every ACK in production): the change's cost without
    # the idle serving and stats calls of the benchmark's polling window.
    acks: dict[str, Any] = {"version": None, "want": 0, "got": 0, "cpu0": 0.0, "cpu": None}

    def on_ack(node_id: str, type_url: str, version: str, at: float) -> None:
        if type_url == ENDPOINT and version == acks["version"]:
            acks["got"] += 1
            if acks["got"] == acks["want"]:
                acks["cpu"] = _cpu() - acks["cpu0"]

    server = AdsServer(cache=cache, on_ack=on_ack)
    _track_gc()
    port = await server.start(  # applies smc.xds.tune_gc()
        port=_PORT[0],
        reuse_port=_PORT[1],
        batch_io_threads=_batch_io_threads(),
    )
    _tune_gc()
    server.mark_ready()
    rss_snapshots = _rss_bytes()
    conn.send(
        {
            "port": port,
            "names": names,
            "rss_start": rss_start,
            "rss_snapshots": rss_snapshots,
            "initial_publish_s": publish_all_s,
        }
    )
    extra = 0
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd == "stop":
            await server.stop(grace=0)
            conn.send("stopped")
            return
        if cmd == "cpu":
            # the benchmark's polling of a change's window: CPU figures only, so that the
            # polling itself (a registry collection per call) is not counted as the change's
            conn.send(
                {
                    "cpu": _cpu(),
                    "loop_cpu": time.thread_time(),
                    "cpu_to_last_ack": acks["cpu"],
                    "gc_s": _gc_seconds(),
                }
            )
        elif cmd == "stats":
            bytes_sent = sum(
                s.value
                for fam in server.metrics.registry.collect()
                if fam.name == "smc_xds_resource_bytes_sent"
                for s in fam.samples
                if s.name.endswith("_total")
            )
            conn.send(
                {
                    "rss": _rss_bytes(),
                    "cpu": _cpu(),
                    "loop_cpu": time.thread_time(),  # the event loop's thread alone
                    "bytes_sent": bytes_sent,
                    "gc_s": _gc_seconds(),
                    "cpu_to_last_ack": acks["cpu"],
                    "gc": {g: list(v) for g, v in GC_STATS.items()},
                }
            )
        elif isinstance(cmd, tuple) and cmd[0] == "change":
            index = cmd[1] % services
            if _PROFILE is not None and os.environ.get("SMC_BENCH_PROFILE_CHANGES"):
                _PROFILE.enable()
            extra += 1
            cpu0 = _cpu()
            t_ns = time.time_ns()
            t = time.monotonic()
            entry = make_entry(_cla(names[index], index, endpoints, extra=extra))
            # Sharing the port with other processes: only the proxies connected here, as a
            # replica's controller builds only for the node ids that connected to it.
            targets = [n for n in nodes if cache.watched(n)] if _PORT[1] else nodes
            targets = targets or nodes[:1]  # (the EDS version reported below comes from it)
            _publish_change(cache, targets, entry)
            publish_s = time.monotonic() - t
            version = cache.get(targets[0]).version(ENDPOINT)  # type: ignore[union-attr]
            connected = sum(1 for n in targets if cache.watched(n))
            acks.update(version=version, want=connected, got=0, cpu0=cpu0, cpu=None)
            conn.send(
                {
                    "t0": t,
                    "t0_ns": t_ns,
                    "cpu0": cpu0,
                    "publish_s": publish_s,
                    "eds_version": version,
                }
            )


# ---------------------------------------------------------------------- clients


class _Client:
    def __init__(self, channel: grpc.aio.Channel, node: str, names: list[str], delta: bool) -> None:
        self.node = node
        self.names = names
        self.delta = delta
        self.stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.eds_seen: dict[str, float] = {}
        self.waiters: list[tuple[str, asyncio.Future[float]]] = []
        self.ready = asyncio.get_running_loop().create_future()
        self.got: set[str] = set()

    async def _requests(self) -> Any:
        while True:
            item = await self.requests.get()
            if item is None:
                return
            yield item

    def _initial(self) -> None:
        node = base_pb2.Node(id=self.node, cluster="bench")
        if self.delta:
            req = discovery_pb2.DeltaDiscoveryRequest
            self.requests.put_nowait(req(node=node, type_url=CLUSTER))
            self.requests.put_nowait(req(type_url=ENDPOINT, resource_names_subscribe=self.names))
            self.requests.put_nowait(req(type_url=LISTENER))
            self.requests.put_nowait(req(type_url=ROUTE, resource_names_subscribe=["outbound"]))
        else:
            req2 = discovery_pb2.DiscoveryRequest
            self.requests.put_nowait(req2(node=node, type_url=CLUSTER))
            self.requests.put_nowait(req2(type_url=ENDPOINT, resource_names=self.names))
            self.requests.put_nowait(req2(type_url=LISTENER))
            self.requests.put_nowait(req2(type_url=ROUTE, resource_names=["outbound"]))

    def _names_for(self, type_url: str) -> list[str]:
        return self.names if type_url == ENDPOINT else ["outbound"] if type_url == ROUTE else []

    async def run(self) -> None:
        method = (
            self.stub.DeltaAggregatedResources
            if self.delta
            else self.stub.StreamAggregatedResources
        )
        call = method(self._requests())
        self._initial()
        async for resp in call:
            now = time.monotonic()
            if self.delta:
                version = resp.system_version_info
                self.requests.put_nowait(
                    discovery_pb2.DeltaDiscoveryRequest(
                        type_url=resp.type_url, response_nonce=resp.nonce
                    )
                )
            else:
                version = resp.version_info
                self.requests.put_nowait(
                    discovery_pb2.DiscoveryRequest(
                        type_url=resp.type_url,
                        response_nonce=resp.nonce,
                        version_info=version,
                        resource_names=self._names_for(resp.type_url),
                    )
                )
            self.got.add(resp.type_url)
            if resp.type_url == ENDPOINT:
                self.eds_seen.setdefault(version, now)
            if len(self.got) == 4 and not self.ready.done():
                self.ready.set_result(now)

    def close(self) -> None:
        self.requests.put_nowait(None)


async def _run_mode(args: argparse.Namespace, delta: bool) -> dict[str, Any]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=_server_main,
        args=(child, args.streams, args.services, args.endpoints, args.traffic_policy),
    )
    proc.start()
    info = await asyncio.to_thread(parent.recv)
    port, names = info["port"], info["names"]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(args.channels)]
    clients = [
        _Client(channels[n % len(channels)], f"node-{n}", names, delta) for n in range(args.streams)
    ]
    t_connect = time.monotonic()
    tasks = [asyncio.create_task(c.run()) for c in clients]
    await asyncio.wait_for(asyncio.gather(*(c.ready for c in clients)), timeout=600)
    connect_s = time.monotonic() - t_connect
    await asyncio.sleep(1.0)
    parent.send("stats")
    connected = await asyncio.to_thread(parent.recv)
    rss_connected = connected["rss"]
    rss_per_stream = (rss_connected - info["rss_snapshots"]) / args.streams
    changes = []
    for k in range(args.changes):
        parent.send(("change", k * 7919))
        change = await asyncio.to_thread(parent.recv)
        version = change["eds_version"]
        deadline = time.monotonic() + 120
        while not all(version in c.eds_seen for c in clients):
            if time.monotonic() > deadline:
                raise TimeoutError(f"change {k} did not reach every stream in 120 s")
            await asyncio.sleep(0.005)
        lat = sorted(c.eds_seen[version] - change["t0"] for c in clients)
        await asyncio.sleep(0.3)  # let ACKs land before reading CPU
        parent.send("stats")
        after = await asyncio.to_thread(parent.recv)
        changes.append(
            {
                "publish_s": change["publish_s"],
                "p50_s": statistics.median(lat),
                "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                "max_s": lat[-1],
                "server_cpu_s": after["cpu"] - change["cpu0"],
                "bytes_sent": after["bytes_sent"] - connected["bytes_sent"],
            }
        )
        connected = after
    for c in clients:
        c.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    parent.send("stop")
    await asyncio.to_thread(parent.recv)
    proc.join(10)

    def med(key: str) -> float:
        return float(statistics.median(c[key] for c in changes))

    return {
        "mode": "delta" if delta else "sotw",
        "streams": args.streams,
        "services": args.services,
        "endpoints": args.services * args.endpoints,
        "initial_connect_all_acked_s": connect_s,
        "server_rss_snapshots_mb": info["rss_snapshots"] / 2**20,
        "server_rss_with_streams_mb": rss_connected / 2**20,
        "server_rss_after_changes_mb": connected["rss"] / 2**20,
        "memory_per_stream_mb": rss_per_stream / 2**20,
        "change_convergence_p50_s": med("p50_s"),
        "change_convergence_p99_s": med("p99_s"),
        "change_convergence_max_s": med("max_s"),
        "change_publish_s": med("publish_s"),
        "change_server_cpu_s": med("server_cpu_s"),
        "change_bytes_sent": med("bytes_sent"),
        "changes": changes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--mode", choices=["sotw", "delta", "both"], default="both")
    parser.add_argument(
        "--traffic-policy",
        action="store_true",
        help="traffic settings, retries, access logs and tracing in every resource",
    )
    parser.add_argument("--out", default="benchmarks/results/ads_streams.json")
    args = parser.parse_args()
    results = []
    for delta in [False, True] if args.mode == "both" else [args.mode == "delta"]:
        result = asyncio.run(_run_mode(args, delta))
        results.append(result)
        print(
            f"{result['mode']:5} streams={result['streams']} services={result['services']} "
            f"endpoints={result['endpoints']}: mem/stream={result['memory_per_stream_mb']:.3f} MB, "
            f"connect+ack all={result['initial_connect_all_acked_s']:.2f} s, change p50="
            f"{result['change_convergence_p50_s'] * 1000:.0f} ms p99="
            f"{result['change_convergence_p99_s'] * 1000:.0f} ms, server CPU/change="
            f"{result['change_server_cpu_s']:.3f} s, bytes/change={result['change_bytes_sent']:.0f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pid": os.getpid(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
