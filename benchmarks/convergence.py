"""Benchmark: time from the append of an event to its ACK by every connected Envoy (10 real ones).

Role: runs the whole control plane in-process (SqliteLog, ProjectionRunner, LiveMeshChanges,
XdsController with its default 20 ms debounce, ADS server, local CA) and N real Envoy sidecars
(state of the world or delta), all of one identity calling one service. Each round applies one
change through the mesh API (plan, append to the log, projections apply it) and measures, from
just before the append to the moment the last Envoy ACKed the config version carrying that event
(the controller's causal chain, fed by the server's ACKs): alternately an endpoint change (a VM
joins or leaves the backing service: EDS for every proxy) and a traffic-split weight change (RDS
for every proxy). Prints p50/p99/max per mode and writes JSON. Not part of the test run.

Usage: python benchmarks/convergence.py [--envoys 10] [--rounds 60] [--mode sotw|delta|both]
       [--out benchmarks/results/convergence.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml

BASE = """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: backend, namespace: bench}
spec:
  backing: vm
  selector: {app: backend}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: backend-v2, namespace: bench}
spec:
  backing: vm
  selector: {app: backend-v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: backend-1, namespace: bench, labels: {app: backend}}
spec: {address: 127.0.90.1, serviceAccount: backend}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: backend-v2-1, namespace: bench, labels: {app: backend-v2}}
spec: {address: 127.0.90.2, serviceAccount: backend}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: all, namespace: bench}
spec:
  matches: [{name: everything, pathRegex: "/"}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: clients-to-backend, namespace: bench}
spec:
  destination: {kind: ServiceAccount, name: backend, namespace: bench}
  rules: [{kind: HTTPRouteGroup, name: all}]
  sources: [{kind: ServiceAccount, name: client, namespace: bench}]
"""

EXTRA_VM = """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: backend-x{n}, namespace: bench, labels: {{app: backend}}}}
spec: {{address: 127.0.91.{n}, serviceAccount: backend}}
"""

SPLIT = """
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{name: backend-split, namespace: bench}}
spec:
  service: backend
  backends: [{{service: backend, weight: {a}}}, {{service: backend-v2, weight: {b}}}]
"""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


async def run_mode(*, delta: bool, envoys: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="smc-bench-conv-") as tmp:
        workdir = Path(tmp)
        cp = ControlPlane(workdir=workdir, debounce=0.02)
        await cp.start()
        sidecars = [
            Sidecar(
                namespace="bench", name=f"client-{i}", address=f"127.0.92.{i + 1}", workdir=workdir
            )
            for i in range(envoys)
        ]
        try:
            docs = [BASE, SPLIT.format(a=50, b=50)]
            docs += [vm_yaml(s, service_account="client") for s in sidecars]
            await cp.apply("\n---\n".join(docs))
            for s in sidecars:
                s.start_envoy(ads_port=cp.port, delta=delta)
            for s in sidecars:
                assert s.envoy is not None
                await s.envoy.wait_live(timeout=60)
            nodes = [s.node_id for s in sidecars]
            # Let every proxy settle before measuring.
            warm = await cp.apply(SPLIT.format(a=49, b=51))
            await cp.controller.wait_acked(warm[-1], node_ids=nodes, timeout=30)
            samples: dict[str, list[float]] = {"endpoints": [], "split": []}
            present = False
            for r in range(rounds):
                if r % 2 == 0:
                    kind = "endpoints"
                    text = EXTRA_VM.format(n=1)
                    delete = present
                    present = not present
                else:
                    kind = "split"
                    a = 10 + (r * 7) % 80
                    text, delete = SPLIT.format(a=a, b=100 - a), False
                t0 = time.time()
                ids = await cp.apply(text, delete=delete)
                acked = await cp.controller.wait_acked(ids[-1], node_ids=nodes, timeout=30)
                trace = cp.controller.trace(ids[-1])
                assert trace is not None and set(trace["proxies"]) >= set(nodes), trace
                samples[kind].append(acked - t0)
                await asyncio.sleep(0.05)
            rejected = {s.node_id: s.rejected() for s in sidecars}
            nacks = len(cp.server.nacks())
        finally:
            for s in sidecars:
                await s.stop()
            await cp.stop()
            cp.close()
    every = samples["endpoints"] + samples["split"]
    out: dict[str, Any] = {
        "mode": "delta" if delta else "sotw",
        "envoys": envoys,
        "rounds": rounds,
        "debounce_s": 0.02,
        "p50_s": statistics.median(every),
        "p99_s": _pct(every, 0.99),
        "max_s": max(every),
        "by_change": {
            k: {"p50_s": statistics.median(v), "p99_s": _pct(v, 0.99), "max_s": max(v)}
            for k, v in samples.items()
            if v
        },
        "nacks": nacks,
        "envoy_update_rejected": {k: v for k, v in rejected.items() if v},
        "target_p99_s": 0.1,
    }
    out["meets_target"] = out["p99_s"] < 0.1
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    modes = {"sotw": [False], "delta": [True], "both": [False, True]}[args.mode]
    results = []
    for delta in modes:
        res = await run_mode(delta=delta, envoys=args.envoys, rounds=args.rounds)
        results.append(res)
        print(
            f"{res['mode']:5s} {res['envoys']} Envoys, {res['rounds']} changes: append -> ACK by all "
            f"p50 {res['p50_s'] * 1000:.1f} ms, p99 {res['p99_s'] * 1000:.1f} ms, "
            f"max {res['max_s'] * 1000:.1f} ms (target p99 < 100 ms: "
            f"{'met' if res['meets_target'] else 'MISSED'}); NACKs {res['nacks']}"
        )
        for kind, figs in res["by_change"].items():
            print(
                f"      {kind:9s} p50 {figs['p50_s'] * 1000:.1f} ms  p99 {figs['p99_s'] * 1000:.1f} ms"
            )
    return {
        "benchmark": "convergence",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envoys", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--mode", choices=["sotw", "delta", "both"], default="both")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "convergence.json")
    )
    args = parser.parse_args()
    if args.envoys < 1 or args.rounds < 2:
        parser.error("--envoys must be >= 1 and --rounds >= 2")
    data = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
