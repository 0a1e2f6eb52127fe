"""Benchmark: applies per second through ``smc serve``'s HTTP API, on SQLite and on Kafka.

Role: starts a real ``smc serve`` (SQLite log in a temporary folder; and on a real single-node
Kafka broker started here, unless ``--skip-kafka``), then 50 concurrent clients (aiohttp, one
keep-alive connection each) POST ``/v1/apply`` with one MeshService each, every request a real
change (a new port number), until ``--applies`` requests were answered. Every answer must be
200 with the document ``created`` or ``configured``. Then one request with ``--large``
MeshServices (default 20,000) is timed, as compact JSON (the target; what a client that
converts manifests sends, as kubectl does) and as a YAML stream (reported). Then the 50
clients run again with those 40,000 services in the mesh (a plan must cost what the change
costs, not what the mesh holds). Prints applies/s, p50/p99 latency and the large apply's
seconds against the targets (SQLite >= 500 applies/s with p99 < 250 ms, Kafka >= 300/s,
20,000 documents < 10 s), serve's CPU time per apply (from /proc: the figure that does not
depend on what else runs on the machine; 1000 / ms per apply is what one core sustains) and
the load average around each phase, and writes ``benchmarks/results/api_writes.json``.
Concurrency: one process (the clients share one event loop); serve is a child process.

Usage: python benchmarks/api_writes.py [--applies 2000] [--clients 50] [--large 20000]
       [--skip-kafka] [--sealed] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from smc.auth import ClientCredentials
from smc.testing.serve import ServeProcess

TARGETS = {"sqlite_rate": 500.0, "sqlite_p99_ms": 250.0, "kafka_rate": 300.0, "large_s": 10.0}


def _doc(i: int, port: int) -> str:
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
        f"metadata: {{name: s{i}, namespace: bench}}\n"
        f"spec: {{ports: [{{name: http, port: {port}, protocol: http}}], selector: {{app: s{i}}}}}\n"
    )


def _session(creds: ClientCredentials, **kwargs: Any) -> aiohttp.ClientSession:
    """A session that verifies serve's certificate and carries its admin token."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=creds.ssl_context()), headers=creds.headers(), **kwargs
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measured(pid: int, run: Any) -> dict[str, Any]:
    """``run()``'s result with serve's CPU seconds and the load average around it."""
    load, cpu = os.getloadavg()[0], _cpu_seconds(pid)
    out: dict[str, Any] = asyncio.run(run())
    out["serve_cpu_s"] = round(_cpu_seconds(pid) - cpu, 2)
    out["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    if "applies" in out:
        out["serve_cpu_ms_per_apply"] = round(out["serve_cpu_s"] * 1000 / out["applies"], 3)
    return out


async def _clients(creds: ClientCredentials, *, applies: int, clients: int) -> dict[str, Any]:
    base = creds.server
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(applies))

    async def client(c: int) -> None:
        async with _session(creds) as session:
            for n in counter:
                body = _doc(c, 1000 + n).encode()
                t0 = time.perf_counter()
                async with session.post(base + "/v1/apply", data=body) as resp:
                    answer = await resp.json()
                latencies.append(time.perf_counter() - t0)
                if resp.status != 200 or answer["results"][0]["status"] not in (
                    "created",
                    "configured",
                ):
                    errors.append(f"{resp.status}: {json.dumps(answer)[:300]}")

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "applies": applies,
        "clients": clients,
        "seconds": round(elapsed, 3),
        "applies_per_s": round(applies / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def _json_doc(i: int, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "smc.dev/v1alpha1",
        "kind": "MeshService",
        "metadata": {"name": f"s{i}", "namespace": "bench"},
        "spec": {
            "ports": [{"name": "http", "port": port, "protocol": "http"}],
            "selector": {"app": f"s{i}"},
        },
    }


async def _large(creds: ClientCredentials, n: int, *, form: str, first: int) -> dict[str, Any]:
    base = creds.server
    """One apply of ``n`` new MeshServices, as compact JSON (``{"documents": [...]}``, what a
    client converting manifests sends, as kubectl does) or as a YAML stream."""
    if form == "json":
        docs = [_json_doc(first + i, 80) for i in range(n)]
        body = json.dumps({"documents": docs}, separators=(",", ":")).encode()
    else:
        body = "---\n".join(_doc(first + i, 80) for i in range(n)).encode()
    timeout = aiohttp.ClientTimeout(total=600)
    async with _session(creds, timeout=timeout) as session:
        t0 = time.perf_counter()
        async with session.post(base + "/v1/apply", data=body) as resp:
            answer = await resp.json()
        took = time.perf_counter() - t0
        async with session.get(base + "/v1/services") as resp:
            listed = len((await resp.json())["items"])
    created = sum(1 for r in answer.get("results", []) if r["status"] == "created")
    return {
        "documents": n,
        "form": form,
        "body_bytes": len(body),
        "status": resp.status,
        "seconds": round(took, 3),
        "created": created,
        "services_listed": listed,
    }


def _writers(tmp: Path) -> list[str]:
    """``--writers DIR`` with an api writer issued by a local CA: every append sealed (one
    signature per group-commit round and partition)."""
    from smc.audit import issue_writer
    from smc.ca import LocalIssuer

    ca = LocalIssuer(directory=tmp / "writer-ca", trust_domain="cluster.local")
    issue_writer(
        ca, trust_domain="cluster.local", role="api", name="bench", directory=tmp / "w" / "api"
    )
    return ["--writers", str(tmp / "w")]


def _run(tmp: Path, log_url: str, args: argparse.Namespace) -> dict[str, Any]:
    extra = _writers(tmp) if args.sealed else []
    serve = ServeProcess(tmp, args=extra, xds_host=None, log_url=log_url)
    try:
        serve.wait_ready(timeout=120)
        creds, pid = serve.credentials, serve.proc.pid
        asyncio.run(_clients(creds, applies=min(200, args.applies), clients=args.clients))

        def clients() -> Any:
            return _clients(creds, applies=args.applies, clients=args.clients)

        out = _measured(pid, clients)
        if args.large:
            out["large"] = _measured(
                pid, lambda: _large(creds, args.large, form="json", first=100_000)
            )
            out["large_yaml"] = _measured(
                pid, lambda: _large(creds, args.large, form="yaml", first=200_000)
            )
            out["big_mesh"] = _measured(pid, clients)
            out["big_mesh"]["services_in_mesh"] = out["large_yaml"]["services_listed"]
        return out
    finally:
        serve.stop()


def _show_rate(name: str, r: dict[str, Any], rate_target: float, note: str = "") -> None:
    print(
        f"{name:7s} {r['applies']} applies by {r['clients']} clients{note}: "
        f"{r['applies_per_s']:.0f}/s (target {rate_target:.0f}, ratio "
        f"{r['applies_per_s'] / rate_target:.2f}), p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
        f"errors {r['errors']}; serve CPU {r['serve_cpu_ms_per_apply']} ms/apply; "
        f"load {r['load_average'][0]}-{r['load_average'][1]}"
    )


def _show(name: str, r: dict[str, Any], rate_target: float) -> None:
    _show_rate(name, r, rate_target)
    for big in (r.get("large"), r.get("large_yaml")):
        if not big:
            continue
        print(
            f"{name:7s} one apply of {big['documents']} documents ({big['form']}, "
            f"{big['body_bytes'] / 1e6:.1f} MB): {big['seconds']:.2f} s "
            f"(target {TARGETS['large_s']:.0f} s, ratio {TARGETS['large_s'] / big['seconds']:.2f}), "
            f"HTTP {big['status']}, {big['created']} created, {big['services_listed']} listed; "
            f"serve CPU {big['serve_cpu_s']} s; load {big['load_average'][0]}-"
            f"{big['load_average'][1]}"
        )
    if r.get("big_mesh"):
        note = f" with {r['big_mesh']['services_in_mesh']} services in the mesh"
        _show_rate(name, r["big_mesh"], rate_target, note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--applies", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--large", type=int, default=20_000)
    ap.add_argument("--skip-kafka", action="store_true")
    ap.add_argument(
        "--sealed", action="store_true", help="Serve seals every append (--writers, an api writer)."
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "api_writes.json"
    )
    args = ap.parse_args()
    results: dict[str, Any] = {
        "benchmark": "api_writes",
        "machine": {
            "python": platform.python_version(),
            "arch": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "targets": TARGETS,
        "sealed": args.sealed,
    }
    with tempfile.TemporaryDirectory(prefix="smc-bench-api-") as d:
        tmp = Path(d)
        (tmp / "sqlite").mkdir()
        results["sqlite"] = _run(tmp / "sqlite", f"sqlite:///{tmp / 'sqlite' / 'log.db'}", args)
        _show("sqlite", results["sqlite"], TARGETS["sqlite_rate"])
        if not args.skip_kafka:
            from smc.testing.kafka import KafkaBroker

            (tmp / "kafka").mkdir()
            with KafkaBroker() as broker:
                broker.create_topics()
                results["kafka"] = _run(tmp / "kafka", f"kafka://{broker.bootstrap}", args)
            _show("kafka", results["kafka"], TARGETS["kafka_rate"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
