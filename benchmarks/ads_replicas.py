"""Benchmark: two ``smc serve`` replicas on one Kafka log, N proxies each; one killed with -9.

Role: starts a real Kafka broker (fresh topics), applies a mesh of S services (each backed by
a VM) and 2 x N client VMs allowed to call them (one identity), starts replica 1 (issues
certificates, ``--ca local``) and replica 2 (``--ca follow``, same key directory), then two Go
load generators (``benchmarks/adsload``, see ``ads_scale.py``), each with N streams of real
node ids (``bench/client-K``) that learn their EDS/RDS names from CDS/LDS like Envoy: one
connects to replica 1 first, the other to replica 2, both falling back to the other replica.
All 2 x N streams connect at once. Then replica 1 is killed with SIGKILL: its N proxies
reconnect to replica 2 (a storm), which absorbs them. Measures: storm time per replica to
all served, time from the kill to every moved proxy served again, how many types changed
version on reconnect (identical snapshots on both replicas: 0 expected), streams of replica
2 lost, replica CPU. Prints figures and writes JSON; not part of the test run.

Usage: python benchmarks/ads_replicas.py [--proxies 5000] [--services 20]
       [--out benchmarks/results/ads_replicas.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from ads_scale import LoadGen, build_loadgen  # noqa: E402

from smc.events import DEFAULT_TOPICS, ensure_topics  # noqa: E402
from smc.testing.kafka import KafkaBroker  # noqa: E402
from smc.testing.ports import free_port  # noqa: E402
from smc.testing.serve import ServeProcess  # noqa: E402


def mesh_yaml(services: int, clients: int) -> str:
    docs = [
        """apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: all, namespace: bench}
spec:
  matches: [{name: everything, pathRegex: "/"}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: clients-to-backends, namespace: bench}
spec:
  destination: {kind: ServiceAccount, name: backend, namespace: bench}
  rules: [{kind: HTTPRouteGroup, name: all}]
  sources: [{kind: ServiceAccount, name: client, namespace: bench}]"""
    ]
    for i in range(services):
        docs.append(
            f"""apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  backing: vm
  selector: {{app: svc-{i}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: backend-{i}, namespace: bench, labels: {{app: svc-{i}}}}}
spec: {{address: 10.1.{i // 250}.{i % 250 + 1}, serviceAccount: backend}}"""
        )
    for k in range(clients):
        docs.append(
            f"""apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: client-{k}, namespace: bench, labels: {{app: client}}}}
spec: {{address: 10.2.{k // 250}.{k % 250 + 1}, serviceAccount: client}}"""
        )
    return "\n---\n".join(docs) + "\n"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_event(gen: LoadGen, name: str) -> dict[str, Any]:
    while True:
        ev = gen.event()
        if ev["event"] == name:
            return ev


def stats(gen: LoadGen) -> dict[str, Any]:
    gen.send("stats")
    return wait_event(gen, "stats")


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = build_loadgen()
    n = args.proxies
    broker = KafkaBroker(heap="1g").start()
    replicas: list[ServeProcess] = []
    gens: list[LoadGen] = []
    try:
        prefix = f"rep{uuid.uuid4().hex[:8]}."
        defs = {
            "topics": [
                {**t, "name": prefix + t["name"]}
                for t in DEFAULT_TOPICS["topics"]
                if t["name"] != "smc.checkpoints"
            ]
        }
        ensure_topics(bootstrap=broker.bootstrap, definitions=defs)
        url = f"kafka://{broker.bootstrap}?prefix={prefix}"
        with tempfile.TemporaryDirectory(prefix="smc-bench-rep-") as tmp_name:
            tmp = Path(tmp_name)
            mesh = tmp / "mesh.yaml"
            mesh.write_text(mesh_yaml(args.services, 2 * n))
            t = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "smc.cli", "--log", url, "apply", "-f", str(mesh)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            apply_s = time.monotonic() - t
            r1 = ServeProcess(tmp, log_url=url)
            replicas.append(r1)
            r1.wait_ready(timeout=300)
            port2 = free_port()
            r2 = ServeProcess(
                tmp,
                xds_host=None,
                log_url=url,
                args=["--xds", f"127.0.0.1:{port2}", "--ca", "follow", "--keys", str(tmp / "keys")],
            )
            replicas.append(r2)
            r2.wait_ready(timeout=300)
            a1, a2 = f"127.0.0.1:{r1.xds_port}", f"127.0.0.1:{port2}"
            common = [
                f"-streams={n}",
                "-conns=10",
                "-learn",
                "-reconnect",
                "-node-format=bench/client-%d",
                f"-ready-timeout={args.storm_timeout}s",
            ]
            g1 = LoadGen(binary, [f"-addr={a1},{a2}", "-node-offset=0", *common])
            gens.append(g1)
            g2 = LoadGen(binary, [f"-addr={a2},{a1}", f"-node-offset={n}", *common])
            gens.append(g2)
            cpu1, cpu2 = cpu_s(r1.proc.pid), cpu_s(r2.proc.pid)
            g1.send("start")
            g2.send("start")
            ready1, ready2 = wait_event(g1, "ready"), wait_event(g2, "ready")
            storm = {
                "replica1_all_served_s": ready1["seconds"] if ready1["ready"] == n else None,
                "replica2_all_served_s": ready2["seconds"] if ready2["ready"] == n else None,
                "ready": [ready1["ready"], ready2["ready"]],
                "replica1_cpu_s": cpu_s(r1.proc.pid) - cpu1,
                "replica2_cpu_s": cpu_s(r2.proc.pid) - cpu2,
            }
            print(f"storm: {storm}", flush=True)
            before = [stats(g1), stats(g2)]
            time.sleep(2.0)
            cpu2 = cpu_s(r2.proc.pid)
            killed_ns = time.time_ns()
            r1.proc.send_signal(signal.SIGKILL)
            r1.proc.wait(10)
            deadline = time.monotonic() + args.absorb_timeout
            s1 = stats(g1)
            while s1["resumed"] < n and time.monotonic() < deadline:
                time.sleep(0.5)
                s1 = stats(g1)
            s2 = stats(g2)
            absorb = {
                "moved_proxies": n,
                "resumed": s1["resumed"],
                "kill_to_all_served_s": (s1["last_back_ns"] - killed_ns) / 1e9
                if s1["resumed"] >= n
                else None,
                "types_changed_on_reconnect": s1["changed_on_reconnect"],
                "types_unchanged_on_reconnect": s1["unchanged_on_reconnect"],
                "replica2_streams_lost": s2["lost"] - before[1]["lost"],
                "replica2_cpu_s": cpu_s(r2.proc.pid) - cpu2,
                "loss_codes_moved": s1["codes"],
            }
            print(f"absorb: {absorb}", flush=True)
            return {
                "proxies_per_replica": n,
                "services": args.services,
                "apply_s": apply_s,
                "storm": storm,
                "absorb": absorb,
                "before_kill": before,
            }
    finally:
        for g in gens:
            g.close()
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
                try:
                    r.proc.wait(15)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxies", type=int, default=5000, help="proxies per replica")
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--storm-timeout", type=float, default=600.0)
    parser.add_argument("--absorb-timeout", type=float, default=600.0)
    parser.add_argument("--out", default=str(BENCH / "results" / "ads_replicas.json"))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    result = run(args)
    result.update(
        {
            "benchmark": "ads_replicas",
            "python": platform.python_version(),
            "load_average_before": load,
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
