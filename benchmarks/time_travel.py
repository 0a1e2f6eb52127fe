"""Benchmark: ``--at`` on a 1,000,000-event log, from checkpoints (target < 5 s).

Appends N events (default 1,000,000; replay.py's mix) to a SQLite log, sealed by an operator
writer, with a certificate for one proxy's identity early on; replays it once, keeping a
checkpoint every ``--every`` events (``CheckpointDir``, as ``smc serve --checkpoint-history``
keeps them); then asks for that proxy's config at several past positions
(``proxy_config_at``, verification on) from the checkpoints, and once from zero for
comparison, checking both give the same config. Prints seconds per query and writes
benchmarks/results/time_travel.json. Not a test. Usage: python benchmarks/time_travel.py
[--events N] [--every K] [--queries Q]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import make_events, writer_credentials

from smc.audit import proxy_config_at, state_at
from smc.events import (
    CertificateIssued,
    ChainVerifier,
    Position,
    SqliteLog,
    make_event,
)
from smc.projections import CheckpointDir, ProjectionRunner, all_projections

RESULTS = Path(__file__).resolve().parent / "results"
NODE = "ns6/pod-16-1"  # a workload of replay.make_events (service account sa16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "time_travel.json"))
    args = ap.parse_args()
    events = make_events(args.events)
    with tempfile.TemporaryDirectory() as tmp:
        signer, trust_pem = writer_credentials(tmp)
        from smc.audit import issue_writer, load_trust
        from smc.ca import LocalIssuer
        from smc.events import Signer

        ca_dir = f"{tmp}/ca-writer"
        issue_writer(
            LocalIssuer(directory=f"{tmp}/ca", trust_domain="bench.local"),
            trust_domain="bench.local",
            role="ca",
            name="bench",
            directory=ca_dir,
        )
        trust = load_trust(trust_pem)
        log = SqliteLog(f"{tmp}/log.db")
        now = datetime.now(UTC)
        cert = make_event(
            CertificateIssued, source="bench", actor="bench",
            identity="spiffe://cluster.local/ns/ns6/sa/sa16", serial="0a", not_before=now,
            not_after=now + timedelta(days=365), issuer="local", fingerprint="cd" * 32,
        )  # fmt: skip
        t = time.perf_counter()
        log.append([cert], signer=Signer.from_dir(ca_dir))
        for i in range(0, len(events), 5000):
            log.append(events[i : i + 5000], signer=signer)
        append_s = time.perf_counter() - t
        print(f"appended {len(events) + 1:,} sealed events in {append_s:.1f}s", flush=True)
        cps = CheckpointDir(f"{tmp}/checkpoints")
        runner = ProjectionRunner(
            log=log, projections=all_projections(), verifier=ChainVerifier(trust=trust)
        )
        end = log.end_position()
        t = time.perf_counter()
        marks = []
        step = args.every
        total = sum(o for _, o in end.items())
        for k in range(step, total + step, step):
            # positions every ``every`` records of the registry stream (most of the log)
            until = Position({tp: min(o, round(o * k / total)) for tp, o in end.items()})
            runner.catch_up(until=until)
            cps.save(runner.checkpoint())
            marks.append(until)
        build_s = time.perf_counter() - t
        print(f"replayed with {len(marks)} checkpoints in {build_s:.1f}s", flush=True)
        rng = random.Random(7)
        timings: list[float] = []
        cpu_timings: list[float] = []
        for _ in range(args.queries):
            frac = rng.uniform(0.05, 1.0)
            at = Position({tp: max(1, round(o * frac)) for tp, o in end.items()})
            t, cpu = time.perf_counter(), time.process_time()
            got = proxy_config_at(
                log, NODE, at, verifier=ChainVerifier(trust=trust), checkpoints=cps
            )
            secs, cpu = time.perf_counter() - t, time.process_time() - cpu
            timings.append(secs)
            cpu_timings.append(cpu)
            print(
                f"  --at {at.to_json()}: {secs:.2f}s wall, {cpu:.2f} CPU-s "
                f"({len(got['listeners'])} listeners, reason {got['reason']!r})",
                flush=True,
            )
        t = time.perf_counter()
        slow = proxy_config_at(log, NODE, at, verifier=ChainVerifier(trust=trust))
        zero_s = time.perf_counter() - t
        assert slow == got, "config from checkpoints differs from the config from zero"
        fast_runner = state_at(log, at, verifier=ChainVerifier(trust=trust), checkpoints=cps)
        # (verified: a position inside a sealed batch holds that batch back, from either start)
        assert (
            fast_runner.digests()
            == state_at(log, at, verifier=ChainVerifier(trust=trust)).digests()
        )
        print(f"  the same --at from zero: {zero_s:.2f}s; same config")
        result = {
            "benchmark": "time_travel",
            "events": len(events) + 1,
            "checkpoint_every": args.every,
            "append_seconds": append_s,
            "checkpointed_replay_seconds": build_s,
            "at_seconds": timings,
            "at_max_seconds": max(timings),
            "at_cpu_seconds": cpu_timings,
            "at_max_cpu_seconds": max(cpu_timings),
            "load_average": list(os.getloadavg()),
            "at_from_zero_seconds": zero_s,
            "target_seconds": 5.0,
        }
        print(
            f"--at with checkpoints: max {max(timings):.2f}s (target < 5 s); "
            f"from zero {zero_s:.2f}s"
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
