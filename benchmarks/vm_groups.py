"""Benchmark: what polling a VirtualMachineGroup costs, at ``--instances`` (1,000) instances.

Role: starts moto's server (AWS API on 127.0.0.1), an Auto Scaling group of ``--instances``
instances, a real SQLite log and projection runner, and the ``aws`` provider with the group
controller. Measures the first (full) poll, then ``--polls`` polls with nothing changed, then
polls after ``--changes`` instances were added: per poll, the cloud API calls made, the
instances described, the events appended, and the controller's own CPU time (the process's,
minus nothing: moto runs in another process). The target is that polling cost grows with the
changes, not with the fleet: an unchanged poll makes 2 calls and describes 0 instances at
any size, and SMC's work per unchanged poll stays small next to the full poll.
Prints the figures and ratios, writes ``benchmarks/results/vm_groups.json``.
Concurrency: one asyncio loop; moto is a child process.

Usage: python benchmarks/vm_groups.py [--instances 1000] [--polls 5] [--changes 10] [--out F]
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

from smc.api import LiveMeshChanges, MeshChanges
from smc.events import Position, SqliteLog
from smc.informers import VmGroupController
from smc.informers.aws import AwsProvider
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.smi import load_documents
from smc.testing.moto import MotoServer, auto_scaling_group

GROUP = """\
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: web, namespace: shop}
spec:
  backing: vm
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachineGroup
metadata: {name: web, namespace: shop}
spec:
  template:
    serviceAccount: web
    ports: [{name: http, port: 8080}]
    services: [web]
  provider: {name: aws, group: web-asg}
  readiness: running
"""


async def _poll(groups: VmGroupController, provider: AwsProvider, log: SqliteLog) -> dict[str, Any]:
    calls, described = provider.stats.calls, provider.stats.described
    events = sum(1 for _ in log.read(start=Position()))
    cpu, wall = time.process_time(), time.perf_counter()
    (r,) = await groups.poll_once()
    return {
        "wall_s": time.perf_counter() - wall,
        "smc_cpu_s": time.process_time() - cpu,
        "calls": provider.stats.calls - calls,
        "described": provider.stats.described - described,
        "events": sum(1 for _ in log.read(start=Position())) - events,
        "joined": r.joined,
    }


async def run(instances: int, polls: int, changes: int, workdir: Path) -> dict[str, Any]:
    os.environ.update(MotoServer.env())
    moto = MotoServer(workdir=workdir)
    moto.start()
    try:
        t = time.perf_counter()
        auto_scaling_group(moto, "web-asg", cidr="10.40.0.0/16", capacity=instances)
        setup_s = time.perf_counter() - t
        log = SqliteLog(workdir / "log.db")
        reg, pol = RegistryProjection(), PolicyProjection()
        runner = ProjectionRunner(log=log, projections=[reg, pol])
        live = LiveMeshChanges(
            changes=MeshChanges(log=log, registry=reg, policy=pol), runner=runner
        )
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop=stop))
        await runner.caught_up.wait()
        provider = AwsProvider(**moto.provider_options(timeout=300, resync_seconds=86400))
        groups = VmGroupController(live=live, providers={"aws": provider}, interval=3600)
        res = load_documents(GROUP, source="bench")
        await live.apply(list(res.resources), actor="bench", source="bench", request_id="b")
        first = await _poll(groups, provider, log)
        unchanged = [await _poll(groups, provider, log) for _ in range(polls)]
        moto.client("autoscaling").set_desired_capacity(
            AutoScalingGroupName="web-asg", DesiredCapacity=instances + changes
        )
        changed = await _poll(groups, provider, log)
        await groups.close()
        stop.set()
        await task
        log.close()
    finally:
        moto.stop()
    med = {
        k: statistics.median(p[k] for p in unchanged)
        for k in ("wall_s", "smc_cpu_s", "calls", "described", "events")
    }
    return {
        "instances": instances,
        "changes": changes,
        "setup_s": setup_s,
        "first_poll": first,
        "unchanged_polls": unchanged,
        "unchanged_median": med,
        "after_changes": changed,
        "cpu_ratio_full_to_unchanged": first["smc_cpu_s"] / med["smc_cpu_s"]
        if med["smc_cpu_s"]
        else None,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--polls", type=int, default=5)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "vm_groups.json")
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="smc-vmgroups-") as tmp:
        r = asyncio.run(run(a.instances, a.polls, a.changes, Path(tmp)))
    f, u, c = r["first_poll"], r["unchanged_median"], r["after_changes"]
    print(f"VM group polling at {r['instances']} instances (moto setup {r['setup_s']:.1f}s)")
    print(
        f"  first poll:     {f['calls']} calls, {f['described']} described, "
        f"{f['events']} events, SMC CPU {f['smc_cpu_s']:.3f}s, wall {f['wall_s']:.2f}s"
    )
    print(
        f"  unchanged poll: {u['calls']:.0f} calls, {u['described']:.0f} described, "
        f"{u['events']:.0f} events, SMC CPU {u['smc_cpu_s']:.4f}s, wall {u['wall_s']:.2f}s "
        "(median)"
    )
    print(
        f"  +{r['changes']} instances: {c['calls']} calls, {c['described']} described, "
        f"{c['events']} events, SMC CPU {c['smc_cpu_s']:.4f}s"
    )
    ratio = r["cpu_ratio_full_to_unchanged"]
    if ratio:
        print(f"  SMC CPU full poll / unchanged poll: {ratio:.0f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
