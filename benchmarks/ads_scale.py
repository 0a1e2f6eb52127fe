"""Benchmark: the ADS server under a connect storm of 1,000 / 3,000 / 10,000 streams.

Role: for each size N, starts the server in a child process (the same server as
``ads_streams.py``: one AdsServer over a SnapshotCache holding N per-proxy snapshots of S
services with E endpoints each, plus a per-proxy listener), then the Go load generator
(``benchmarks/adsload``, built with the machine's ``go`` into ``~/.cache/smc/adsload``, outside
the repository), which opens all N streams at once (no ramp) over a few connections and ACKs
every response like an Envoy. Measures: storm time (all streams opened -> every stream has
received and ACKed CDS, EDS, LDS and RDS), streams lost (ended by the server or an error),
change -> all streams received p50/p99 (one endpoint change published to every proxy), server
CPU per stream per change (server process CPU time from the publish to every ACK, divided by
N), server memory per stream (RSS growth from connecting every stream over the RSS with all
snapshots published). Prints figures and writes JSON; not part of the test run.

The load generator is Go so that the clients are not the bottleneck: it encodes and decodes
only the fields a client needs (resources are skipped, not decoded). Its CPU time is reported
next to the server's.

Usage: python benchmarks/ads_scale.py [--sizes 1000,3000,10000] [--services 1000]
       [--endpoints 10] [--changes 5] [--conns 10] [--mode sotw|delta] [--procs 1]
       [--server smc|floor-aio|floor-aio-coalesced|floor-uvloop|floor-sync] [--pin] [--out benchmarks/results/ads_scale.json]
``--procs P``: P server processes share the port (SO_REUSEPORT; the kernel spreads the load
generator's connections over them), each a replica holding every proxy's snapshot and
publishing a change to the proxies connected to it; CPU and memory are summed over them.
``--server floor-*``: the minimal servers of ``ads_floor.py`` (what gRPC alone costs).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from ads_streams import _server_main  # noqa: E402  (the same server process)

LOADGEN_SRC = BENCH / "adsload"
CACHE = Path(os.environ.get("SMC_CACHE_DIR", Path.home() / ".cache" / "smc")) / "adsload"


def build_loadgen() -> Path:
    """Build the Go load generator (cached by a hash of its sources) and return its path."""
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if go is None:
        raise SystemExit("ads_scale.py needs Go (the `go` command) to build benchmarks/adsload")
    digest = hashlib.sha256()
    for f in sorted(LOADGEN_SRC.iterdir()):
        if f.is_file():
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    out = CACHE / f"adsload-{digest.hexdigest()[:16]}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOFLAGS": "-mod=mod", "GOCACHE": str(CACHE / "gocache")}
        subprocess.run([go, "build", "-o", str(out), "."], cwd=LOADGEN_SRC, env=env, check=True)
    return out


class LoadGen:
    """The Go load generator as a child process: commands in, JSON events out."""

    def __init__(self, binary: Path, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [str(binary), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        hello = self.event()
        assert hello["event"] == "hello", hello

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited ({self.proc.poll()})")
        data: dict[str, Any] = json.loads(line)
        return data

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


class _Servers:
    """The server process(es): one, or ``procs`` sharing one port with SO_REUSEPORT (each a
    replica holding every proxy's snapshot, publishing to the proxies connected to it)."""

    def __init__(self, n: int, procs: int, args: argparse.Namespace) -> None:
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        ctx = mp.get_context("spawn")
        port = 0
        for i in range(procs):
            parent, child = mp.Pipe()
            if args.server == "smc":
                target: Any = _server_main
                target_args: tuple[Any, ...] = (
                    child,
                    n,
                    args.services,
                    args.endpoints,
                    False,
                    port,
                    procs > 1,
                )
            else:
                from ads_floor import floor_main

                target = floor_main
                target_args = (
                    child,
                    n,
                    args.services,
                    args.endpoints,
                    args.server.split("-", 1)[1],
                )
                os.environ["ADS_FLOOR_STREAMS"] = str(n)
            proc = ctx.Process(target=target, args=target_args)
            proc.start()
            self.procs.append(proc)
            self.conns.append(parent)
            info = parent.recv()
            if i == 0:
                self.info = info
                port = info["port"]
            self.info_all = [info] if i == 0 else [*self.info_all, info]

    def _ask(self, command: str) -> list[dict[str, Any]]:
        for c in self.conns:
            c.send(command)
        return [c.recv() for c in self.conns]

    @staticmethod
    def _cpu_figures(got: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "cpu": sum(g["cpu"] for g in got),
            "loop_cpu": sum(g.get("loop_cpu", 0.0) for g in got),
            # publish -> last EDS ACK of the latest change, per process (SMC's server only)
            "cpu_to_last_ack": (
                sum(g["cpu_to_last_ack"] for g in got)
                if all(g.get("cpu_to_last_ack") is not None for g in got)
                else None
            ),
            "gc_s": sum(g.get("gc_s", 0.0) for g in got),
        }

    def stats(self) -> dict[str, Any]:
        got = self._ask("stats")
        return {
            **self._cpu_figures(got),
            "rss": sum(g["rss"] for g in got),
            "gc": got[0].get("gc"),
        }

    def cpu(self) -> dict[str, Any]:
        """The servers' CPU figures alone (what the polling of a change's window asks: a
        full :meth:`stats` collects the metrics registry, CPU the change would be charged)."""
        return self._cpu_figures(self._ask("cpu"))

    def change(self, index: int) -> dict[str, Any]:
        for c in self.conns:
            c.send(("change", index))
        got = [c.recv() for c in self.conns]
        versions = {g["eds_version"] for g in got}
        if len(versions) != 1:
            raise RuntimeError(f"server processes disagree on the EDS version: {versions}")
        return {
            "eds_version": got[0]["eds_version"],
            "t0_ns": min(g["t0_ns"] for g in got),
            "publish_s": max(g["publish_s"] for g in got),
        }

    def rss_snapshots(self) -> int:
        return int(sum(i["rss_snapshots"] for i in self.info_all))

    def stop(self) -> None:
        for c in self.conns:
            c.send("stop")
        for c in self.conns:
            if c.poll(30):
                c.recv()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def run_size(binary: Path, n: int, procs: int, args: argparse.Namespace) -> dict[str, Any]:
    servers = _Servers(n, procs, args)
    gen: LoadGen | None = None
    try:
        info = servers.info
        gen = LoadGen(
            binary,
            [
                f"-addr=127.0.0.1:{info['port']}",
                f"-streams={n}",
                f"-conns={args.conns}",
                f"-services={args.services}",
                f"-delta={'true' if args.mode == 'delta' else 'false'}",
                f"-ready-timeout={args.storm_timeout}s",
            ],
        )
        if args.pin:
            # The server process(es) on CPU 0, the load generator on the others: the load
            # generator does not take the server's core (or its caches) in the middle of a change.
            cpus = sorted(os.sched_getaffinity(0))
            for proc in servers.procs:
                _pin_tree(proc.pid, {cpus[0]})
            _pin_tree(gen.proc.pid, set(cpus[1:]) or {cpus[0]})
        before = servers.stats()
        gen_cpu0 = gen.cpu_s()
        gen.send("start")
        ready = gen.event()
        storm = servers.stats()
        gen.send("stats")
        stats = gen.event()
        rss_snapshots = servers.rss_snapshots()
        result: dict[str, Any] = {
            "streams": n,
            "mode": args.mode,
            "server": args.server,
            "server_processes": procs,
            "pinned": bool(args.pin),
            "io_threads": args.io_threads,
            "services": args.services,
            "endpoints": args.services * args.endpoints,
            "conns": args.conns,
            "storm_all_acked_s": ready["seconds"] if ready["ready"] == n else None,
            "storm_ready": ready["ready"],
            "storm_server_cpu_s": storm["cpu"] - before["cpu"],
            "storm_loadgen_cpu_s": gen.cpu_s() - gen_cpu0,
            "server_rss_snapshots_mb": rss_snapshots / 2**20,
            "server_rss_connected_mb": storm["rss"] / 2**20,
            "memory_per_stream_mb": (storm["rss"] - rss_snapshots) / n / 2**20,
            "streams_lost_in_storm": stats["lost"],
            "loss_codes": stats["codes"],
            "loss_errors": stats.get("errors", {}),
        }
        changes = []
        if ready["ready"] == n:
            time.sleep(1.0)
            for k in range(args.changes):
                pre = servers.cpu()
                gcpu = gen.cpu_s()
                change = servers.change(k * 7919)
                gen.send(f"wait {change['eds_version']} {change['t0_ns']} {args.change_timeout}")
                conv = gen.event()
                # CPU until every ACK is in: wait until the servers' CPU stops moving.
                cpu_prev = -1.0
                while True:
                    time.sleep(0.3)
                    after = servers.cpu()
                    if after["cpu"] - cpu_prev < 0.01:
                        break
                    cpu_prev = after["cpu"]
                changes.append(
                    {
                        "converged": conv["event"] == "converged",
                        "received": conv["received"],
                        "p50_s": conv.get("p50_s"),
                        "p99_s": conv.get("p99_s"),
                        "max_s": conv.get("max_s"),
                        "publish_s": change["publish_s"],
                        # the idle polling of this loop is counted too (tiny: the server idles)
                        "server_cpu_s": after["cpu"] - pre["cpu"],
                        # of which the event loop's thread (SMC's Python work, gRPC's
                        # Python binding); the rest is gRPC core's I/O threads and the kernel
                        "server_loop_cpu_s": after["loop_cpu"] - pre["loop_cpu"],
                        # from the publish to the last ACK applied (no idle, no stats calls)
                        "server_cpu_to_last_ack_s": after["cpu_to_last_ack"],
                        "server_gc_s": after["gc_s"] - pre["gc_s"],
                        "loadgen_cpu_s": gen.cpu_s() - gcpu,
                    }
                )
        gen.send("stats")
        final = gen.event()
        result["streams_lost_total"] = final["lost"]
        result["changes"] = changes
        ok = [c for c in changes if c["converged"]]
        if ok:
            cpu = statistics.median(c["server_cpu_s"] for c in ok)
            result.update(
                {
                    "changes_converged": len(ok),
                    "change_p50_s": statistics.median(c["p50_s"] for c in ok),
                    "change_p99_s": _pct([c["p99_s"] for c in ok], 0.5),
                    "change_p99_worst_s": max(c["p99_s"] for c in ok),
                    "change_server_cpu_s": cpu,
                    "server_cpu_ms_per_stream_per_change": cpu / n * 1000,
                    "server_cpu_to_last_ack_ms_per_stream_per_change": (
                        statistics.median(c["server_cpu_to_last_ack_s"] for c in ok) / n * 1000
                        if all(c["server_cpu_to_last_ack_s"] is not None for c in ok)
                        else None
                    ),
                    "server_loop_cpu_ms_per_stream_per_change": statistics.median(
                        c["server_loop_cpu_s"] for c in ok
                    )
                    / n
                    * 1000,
                    "change_loadgen_cpu_s": statistics.median(c["loadgen_cpu_s"] for c in ok),
                }
            )
        return result
    finally:
        if gen is not None:
            gen.close()
        servers.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,3000,10000")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per service")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--conns", type=int, default=10)
    parser.add_argument("--mode", choices=["sotw", "delta"], default="sotw")
    parser.add_argument("--storm-timeout", type=float, default=300.0)
    parser.add_argument("--change-timeout", type=float, default=60.0)
    parser.add_argument(
        "--procs",
        default="1",
        help="server processes sharing the port (SO_REUSEPORT), each a replica of the "
        "snapshots; a comma-separated list runs each",
    )
    parser.add_argument(
        "--server",
        default="smc",
        choices=["smc", "floor-aio", "floor-aio-coalesced", "floor-uvloop", "floor-sync"],
        help="smc: SMC's AdsServer; floor-*: the minimal server of ads_floor.py (gRPC's floor)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server process(es) to the first CPU and the load generator to the others "
        "(threads started later inherit it)",
    )
    parser.add_argument(
        "--io-threads",
        default="batch",
        choices=["batch", "default"],
        help="batch: the server's gRPC I/O threads run as SCHED_BATCH (what AdsServer.start "
        "does; the floor servers get it too); default: the normal policy, for comparison",
    )
    parser.add_argument("--out", default=str(BENCH / "results" / "ads_scale.json"))
    args = parser.parse_args()
    # read by the server processes (spawned: they inherit the environment)
    os.environ["SMC_BENCH_IO_THREADS"] = args.io_threads
    binary = build_loadgen()
    results = []
    for n in [int(x) for x in args.sizes.split(",") if x.strip()]:
        for procs in [int(x) for x in args.procs.split(",") if x.strip()]:
            load = os.getloadavg()[0]
            r = run_size(binary, n, procs, args)
            r["load_average_before"] = load
            results.append(r)
            storm = r["storm_all_acked_s"]
            storm_text = f"{storm:.1f} s" if storm is not None else f"NOT all ({r['storm_ready']})"
            print(
                f"{r['mode']} {n:>6} streams, {r['server_processes']} server process(es) "
                f"({r['services']} services, {r['endpoints']} endpoints, "
                f"{r['conns']} conns, load {load:.1f}{', pinned' if args.pin else ''}"
                f"{', io threads ' + args.io_threads if args.io_threads != 'batch' else ''}): "
                f"storm -> all ACKed "
                f"{storm_text}, "
                f"lost {r['streams_lost_total']} {r['loss_codes'] or ''}, mem/stream "
                f"{r['memory_per_stream_mb'] * 1024:.0f} KB"
                + (
                    f", change p50 {r['change_p50_s'] * 1000:.0f} ms p99 "
                    f"{r['change_p99_s'] * 1000:.0f} ms, server CPU/stream/change "
                    f"{r['server_cpu_ms_per_stream_per_change']:.3f} ms (event loop's thread "
                    f"{r['server_loop_cpu_ms_per_stream_per_change']:.3f} ms"
                    + (
                        f"; publish -> last ACK {r['server_cpu_to_last_ack_ms_per_stream_per_change']:.3f} ms"
                        if r.get("server_cpu_to_last_ack_ms_per_stream_per_change") is not None
                        else ""
                    )
                    + ")"
                    if "change_p50_s" in r
                    else ""
                ),
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "ads_scale",
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "max_rss_parent_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
