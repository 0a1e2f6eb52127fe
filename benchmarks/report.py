"""Performance report: runs every benchmark, then writes one JSON and one Markdown table.

Role: runs ``replay.py``, ``kafka_raw.py``, ``certs.py``, ``ads_streams.py``, ``ads_scale.py``,
``convergence.py``, ``sovereign_compare.py`` and ``console.py`` one after the other as ``nice -n 10``
subprocesses (each with the
sizes the issues ask for, or small ones with ``--quick``), records the load average before and
after each run, the command, exit code and wall time, reads each benchmark's JSON result, and
turns them into figures with their targets: ``report.json`` (every figure and run) and
``report.md`` (one table: benchmark, figure, value, unit, target, ratio to target where > 1 is
better than the target, pass/fail), and prints the table.

Results go to ``benchmarks/results/`` (full sizes) or ``benchmarks/results/quick/``
(``--quick``, so a quick check never overwrites full-size figures); ``--results-dir`` overrides.
``--only NAME,...`` runs only those benchmarks (the table still shows every result present);
``--from-results`` runs nothing and re-renders from the JSON files already there.
A result file older than a failed run is not used: the row says the run failed, and why.

Concurrency: one process, benchmarks strictly one at a time (the machine has two shared cores).

Usage: python benchmarks/report.py [--quick] [--only replay,certs] [--from-results]
       [--results-dir DIR] [--wait-load 2.0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# name -> (script, output flag, full-size arguments, quick arguments, timeout full/quick in s)
BENCHMARKS: dict[str, tuple[str, str, list[str], list[str], tuple[int, int]]] = {
    "replay": (
        "replay.py",
        "--out",
        ["--events", "1000000", "--backends", "sqlite,kafka"],
        ["--events", "200000", "--backends", "sqlite,kafka"],
        (3600, 600),
    ),
    "time_travel": (
        "time_travel.py",
        "--out",
        ["--events", "1000000", "--every", "100000", "--queries", "5"],
        ["--events", "100000", "--every", "10000", "--queries", "3"],
        (3600, 900),
    ),
    "kafka_raw": (
        "kafka_raw.py",
        "--output",
        ["--events", "1000000"],
        ["--events", "100000"],
        (1800, 600),
    ),
    "api_writes": (
        "api_writes.py",
        "--out",
        ["--applies", "2000", "--clients", "50", "--large", "20000"],
        ["--applies", "500", "--clients", "50", "--large", "5000"],
        (1800, 600),
    ),
    "certs": (
        "certs.py",
        "--out",
        ["--local-n", "5000", "--vault-n", "1000", "--threads", "1,4,8,16"],
        ["--local-n", "1000", "--vault-n", "200", "--threads", "1,4", "--local-threads", "1"],
        (1200, 300),
    ),
    "identity": (
        "identity.py",
        "--out",
        ["--local-n", "5000", "--vault-n", "1000", "--proxies", "500", "--agents", "5"],
        [
            "--local-n",
            "1000",
            "--vault-n",
            "200",
            "--vault-threads",
            "1,4",
            "--proxies",
            "100",
            "--renew-n",
            "100",
            "--agents",
            "3",
        ],
        (1200, 300),
    ),
    "ads_streams": (
        "ads_streams.py",
        "--out",
        ["--streams", "1000", "--services", "1000", "--endpoints", "10", "--changes", "5"],
        ["--streams", "500", "--services", "500", "--endpoints", "10", "--changes", "3"],
        (1800, 400),
    ),
    "ads_scale": (
        "ads_scale.py",
        "--out",
        ["--sizes", "1000,3000,10000", "--changes", "5", "--procs", "1,2", "--conns", "20"],
        ["--sizes", "1000,3000", "--changes", "3", "--procs", "1,2", "--conns", "20"],
        (3600, 900),
    ),
    "ads_replicas": (
        "ads_replicas.py",
        "--out",
        ["--proxies", "5000"],
        ["--proxies", "1000"],
        (3600, 1200),
    ),
    "convergence": (
        "convergence.py",
        "--out",
        ["--envoys", "10", "--rounds", "100", "--mode", "both"],
        ["--envoys", "10", "--rounds", "40", "--mode", "both"],
        (1800, 400),
    ),
    "sovereign_compare": (
        "sovereign_compare.py",
        "--out",
        ["--sizes", "1000,3000,10000", "--changes", "5", "--repeats", "2"],
        ["--sizes", "1000,3000", "--changes", "3", "--idle-s", "3"],
        (3600, 600),
    ),
    "console": (
        "console.py",
        "--out",
        ["--services", "1000", "--workloads", "10000", "--events", "100000", "--passes", "5"],
        ["--services", "300", "--workloads", "3000", "--events", "20000", "--passes", "3"],
        (1800, 600),
    ),
    "vm_groups": (
        "vm_groups.py",
        "--out",
        ["--instances", "1000", "--polls", "5", "--changes", "10"],
        ["--instances", "300", "--polls", "3", "--changes", "10"],
        (1200, 400),
    ),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Figure:
    """One row of the report."""

    benchmark: str
    figure: str
    value: float | None
    unit: str
    target: str = "—"
    ratio: float | None = None  # to target; > 1 is better than the target
    verdict: str = "info"  # pass | FAIL | info


def _target(
    benchmark: str,
    figure: str,
    value: float | None,
    unit: str,
    *,
    at_least: float | None = None,
    below: float | None = None,
    shown: str | None = None,
) -> Figure:
    """A figure with a target: ``at_least`` (higher is better) or ``below`` (lower is better)."""
    if value is None:
        return Figure(
            benchmark=benchmark,
            figure=figure,
            value=None,
            unit=unit,
            target=shown or "—",
            verdict="FAIL",
        )
    if at_least is not None:
        ratio = value / at_least if at_least else math.inf
        ok = value >= at_least
        text = shown or f">= {_num(at_least)}"
    elif below is not None:
        ratio = below / value if value > 0 else math.inf
        ok = value < below
        text = shown or f"< {_num(below)}"
    else:
        raise ValueError("a target needs at_least or below")
    return Figure(
        benchmark=benchmark,
        figure=figure,
        value=value,
        unit=unit,
        target=text,
        ratio=ratio,
        verdict="pass" if ok else "FAIL",
    )


def _info(benchmark: str, figure: str, value: Any, unit: str) -> Figure:
    v = float(value) if isinstance(value, int | float) else None
    return Figure(benchmark=benchmark, figure=figure, value=v, unit=unit)


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


# ---------------------------------------------------------------------- figures per benchmark


def _integrity_figures(b: str, name: str, n: Any, it: dict[str, Any] | None) -> list[Figure]:
    """Sealed appends and verified rebuilds (docs/log-integrity.md), when measured."""
    if not it:
        return []
    out = [
        _target(b, f"{name} sealed append / unsealed append",
                it.get("sealed_vs_unsealed_append"), "x", at_least=0.8,
                shown=">= 0.8 (within 20%)"),
        _info(b, f"{name} verified rebuild ({n:,} events, seals and chains checked)",
              it.get("verified_rebuild_events_per_second"), "events/s"),
        _info(b, f"{name} verified / unverified rebuild",
              it.get("verified_vs_unverified_rebuild"), "x"),
        _info(b, f"{name} verified rebuild per CPU second",
              it.get("verified_rebuild_events_per_cpu_second"), "events/CPU-s"),
        _info(b, f"{name} verified / unverified rebuild, per CPU second",
              it.get("verified_vs_unverified_rebuild_per_cpu_second"), "x"),
    ]  # fmt: skip
    if name == "SQLite":
        out.append(_target(b, "SQLite verified rebuild",
                           it.get("verified_rebuild_events_per_second"), "events/s",
                           at_least=100_000))  # fmt: skip
    if "verified_rebuild_vs_raw_consume" in it:
        out.append(_target(b, "Kafka verified rebuild / raw consume",
                           it.get("verified_rebuild_vs_raw_consume"), "x", at_least=0.5,
                           shown=">= 0.5 (within 2x)"))  # fmt: skip
        out.append(_info(b, "Kafka verified rebuild / raw consume, medians",
                         it.get("verified_rebuild_vs_raw_consume_medians"), "x"))  # fmt: skip
    return out


def figures_replay(r: dict[str, Any]) -> list[Figure]:
    b = "replay"
    n = r.get("events")
    out: list[Figure] = []
    sq = _get(r, "backends", "sqlite")
    if sq is not None:
        out.append(
            _target(
                b,
                f"SQLite rebuild ({n:,} events)",
                _get(sq, "rebuild", "events_per_second"),
                "events/s",
                at_least=100_000,
            )
        )
        out.append(
            _target(
                b,
                "SQLite rebuild per CPU second (one core)",
                _get(sq, "rebuild", "events_per_cpu_second"),
                "events/CPU-s",
                at_least=100_000,
            )
        )
        out.append(_info(b, "SQLite append", sq.get("append_events_per_second"), "events/s"))
        out.append(_info(b, "SQLite decode", sq.get("decode_events_per_second"), "events/s"))
        out.append(
            _info(
                b,
                "SQLite full fold (every record decoded)",
                _get(sq, "rebuild", "full_fold_events_per_second"),
                "events/s",
            )
        )
        out.append(_info(b, "SQLite rebuild peak RSS", _get(sq, "rebuild", "peak_rss_mb"), "MB"))
        out.extend(_integrity_figures(b, "SQLite", n, sq.get("integrity")))
    ka = _get(r, "backends", "kafka")
    if ka is not None:
        passes = len(ka.get("rebuild_passes_events_per_second") or [None])
        best = f", best of {passes}" if passes > 1 else ""
        out.append(
            _info(
                b,
                f"Kafka rebuild ({n:,} events{best})",
                ka.get("rebuild_best_events_per_second")
                or _get(ka, "rebuild", "events_per_second"),
                "events/s",
            )
        )
        out.append(
            _info(
                b,
                f"Kafka raw confluent-kafka consume (same records, values touched{best})",
                ka.get("raw_consume_events_per_second"),
                "events/s",
            )
        )
        out.append(
            _target(
                b,
                "Kafka rebuild / raw consume",
                ka.get("rebuild_vs_raw_consume"),
                "x",
                at_least=0.5,
                shown=">= 0.5 (within 2x)",
            )
        )
        out.extend(_integrity_figures(b, "Kafka", n, ka.get("integrity")))
        if "raw_count_only_events_per_second" in ka:
            out.append(
                _info(
                    b,
                    f"Kafka consume loop that only counts batches (same records{best})",
                    ka.get("raw_count_only_events_per_second"),
                    "events/s",
                )
            )
            out.append(
                _info(
                    b, "Kafka rebuild / count-only loop", ka.get("rebuild_vs_raw_count_only"), "x"
                )
            )
        if ka.get("rebuild_vs_raw_consume_medians") is not None:
            out.append(
                _info(
                    b,
                    "Kafka rebuild / raw consume, medians of the passes",
                    ka.get("rebuild_vs_raw_consume_medians"),
                    "x",
                )
            )
        out.append(_info(b, "Kafka append", ka.get("append_events_per_second"), "events/s"))
        out.append(_info(b, "Kafka rebuild peak RSS", _get(ka, "rebuild", "peak_rss_mb"), "MB"))
    return out


def figures_kafka_raw(r: dict[str, Any]) -> list[Figure]:
    b = "kafka_raw"
    out = [
        _info(
            b,
            f"raw consume baseline ({r.get('events', 0):,} msgs, best variant)",
            r.get("baseline_consume_msgs_per_s"),
            "msgs/s",
        )
    ]
    for v in r.get("variants", []):
        out.append(
            _info(
                b,
                f"raw produce, compression={v.get('compression')}",
                v.get("produce_msgs_per_s"),
                "msgs/s",
            )
        )
    return out


def figures_api_writes(r: dict[str, Any]) -> list[Figure]:
    b = "api_writes"
    out: list[Figure] = []
    for log, rate in (("sqlite", 500), ("kafka", 300)):
        run = r.get(log)
        if not run:
            continue
        n = f"{run['applies']} applies, {run['clients']} clients"
        out.append(
            _target(b, f"{log}: applies/s ({n})", run["applies_per_s"], "1/s", at_least=rate)
        )
        if log == "sqlite":
            out.append(_target(b, f"{log}: p99 latency ({n})", run["p99_ms"], "ms", below=250))
        else:
            out.append(_info(b, f"{log}: p99 latency ({n})", run["p99_ms"], "ms"))
        big = run.get("large")
        if big:
            out.append(
                _target(
                    b,
                    f"{log}: one apply of {big['documents']} documents (JSON)",
                    big["seconds"],
                    "s",
                    below=10,
                )
            )
        big = run.get("large_yaml")
        if big:
            out.append(
                _info(
                    b,
                    f"{log}: one apply of {big['documents']} documents (YAML)",
                    big["seconds"],
                    "s",
                )
            )
    return out


def figures_certs(r: dict[str, Any]) -> list[Figure]:
    b = "certs"
    best = r.get("best", {})
    local = r.get("local", [])
    vault = r.get("vault", [])
    ln = local[0]["n"] if local else 0
    vn = vault[0]["n"] if vault else 0
    return [
        _target(
            b,
            f"local issuer, best of threads ({ln} certs)",
            best.get("local"),
            "certs/s",
            at_least=2000,
        ),
        _target(
            b,
            f"Vault (OpenBao) issuer, best of threads ({vn} certs)",
            best.get("vault"),
            "certs/s",
            at_least=250,
        ),
    ]


def figures_identity(r: dict[str, Any]) -> list[Figure]:
    b = "identity"
    best = r.get("best", {})
    ren = r.get("renewals", {})
    first = r.get("first_certificate", {})
    rss = r.get("agent_rss_mb", {})
    return [
        _target(b, "CSR signing, local issuer", best.get("local"), "CSRs/s", at_least=2000),
        _target(b, "CSR signing, Vault pki/sign", best.get("vault"), "CSRs/s", at_least=250),
        _target(
            b,
            "renewals end to end (gRPC+TLS, proof, log, applied)",
            ren.get("renewals_per_s"),
            "/s",
            at_least=ren.get("needed_for_10000_proxies_per_s", 0.12),
            shown=">= 10,000 proxies at 24 h",
        ),
        _target(
            b,
            "first certificate, agent spawn -> serving (median)",
            first.get("median_spawn_to_serving_s"),
            "s",
            below=1.0,
        ),
        _target(b, "agent memory (VmRSS, max)", rss.get("max"), "MB", below=30.0),
    ]


def figures_convergence(r: dict[str, Any]) -> list[Figure]:
    b = "convergence"
    out = []
    for m in r.get("results", []):
        log = m.get("log", "sqlite")
        label = f"{m['mode']}, {log}, {m['envoys']} Envoys, {m['rounds']} changes"
        target = m.get("target_p99_s", 0.1)
        out.append(
            _target(b, f"append -> ACK by all, p99 ({label})", m.get("p99_s"), "s", below=target)
        )
        out.append(_info(b, f"append -> ACK by all, p50 ({m['mode']}, {log})", m.get("p50_s"), "s"))
        if "idle_cpu_s_per_s" in m:
            out.append(
                _info(
                    b,
                    f"control-plane CPU while idle ({m['mode']}, {log})",
                    m["idle_cpu_s_per_s"],
                    "s/s",
                )
            )
        nacks = _target(
            b, f"NACKs ({m['mode']}, {log})", m.get("nacks"), "count", below=1, shown="0"
        )
        out.append(replace(nacks, ratio=None))
    for mode, ratios in r.get("kafka_vs_sqlite", {}).items():
        out.append(
            _target(
                b,
                f"Kafka / SQLite append -> ACK by all p99 ({mode}, same run)",
                ratios.get("kafka_over_sqlite_p99"),
                "x",
                below=1.5,
                shown="<= 1.5",
            )
        )
    return out


def figures_ads_streams(r: dict[str, Any]) -> list[Figure]:
    b = "ads_streams"
    out = []
    for m in r.get("results", []):
        label = f"{m['mode']}, {m['streams']} streams, {m['services']} svc / {m['endpoints']} ep"
        out.append(
            _target(
                b,
                f"change -> all streams, p99 ({label})",
                m.get("change_convergence_p99_s"),
                "s",
                below=1.0,
            )
        )
        out.append(
            _target(
                b,
                f"memory per stream ({m['mode']})",
                m.get("memory_per_stream_mb"),
                "MB",
                below=0.2,
            )
        )
        out.append(
            _info(b, f"server CPU per change ({m['mode']})", m.get("change_server_cpu_s"), "CPU s")
        )
        out.append(
            _info(b, f"bytes sent per change ({m['mode']})", m.get("change_bytes_sent"), "B")
        )
    return out


def figures_ads_scale(r: dict[str, Any]) -> list[Figure]:
    b = "ads_scale"
    out = []
    for m in r.get("results", []):
        n = m["streams"]
        procs = m.get("server_processes", 1)
        label = (
            f"{m['mode']}, {n:,} streams, {m['services']} svc / {m['endpoints']} ep, "
            f"{procs} server process{'es' if procs > 1 else ''}"
        )
        n_p = f"{n:,}, {procs} proc"
        storm = m.get("storm_all_acked_s")
        out.append(
            _target(b, f"connect storm -> all ACKed ({label})", storm, "s", below=60.0)
            if n >= 10_000
            else _info(b, f"connect storm -> all ACKed ({label})", storm, "s")
        )
        lost = _target(
            b, f"streams lost ({n_p})", m.get("streams_lost_total"), "count", below=1, shown="0"
        )
        out.append(replace(lost, ratio=None))
        p99_target = 0.1 if n <= 1000 else 2.0 if n >= 10_000 else None
        if p99_target is not None:
            out.append(
                _target(
                    b, f"change -> all, p99 ({n_p})", m.get("change_p99_s"), "s", below=p99_target
                )
            )
        else:
            out.append(_info(b, f"change -> all, p99 ({n_p})", m.get("change_p99_s"), "s"))
        out.append(_info(b, f"change -> all, p50 ({n_p})", m.get("change_p50_s"), "s"))
        out.append(
            _target(
                b,
                f"server CPU per stream per change ({n_p})",
                m.get("server_cpu_ms_per_stream_per_change"),
                "ms",
                below=0.1,
                shown="<= 0.1",
            )
        )
        out.append(
            _target(b, f"memory per stream ({n_p})", m.get("memory_per_stream_mb"), "MB", below=0.1)
        )
    return out


def figures_console(r: dict[str, Any]) -> list[Figure]:
    b = "console"
    med = r.get("median", {})
    size = f"{r.get('services')} services / {r.get('workloads')} workloads"
    total = med.get("timeline_total")
    return [
        _target(
            b,
            f"page interactive, median ({size})",
            med.get("interactive_s"),
            "s",
            below=1.0,
        ),
        _info(b, "first timeline rows shown, median", med.get("timeline_s"), "s"),
        _info(b, f"timeline jump to the oldest of {total} events", med.get("jump_oldest_s"), "s"),
        _info(b, "timeline rows fetched while scrolling", med.get("rows_loaded"), "rows"),
    ]


def figures_vm_groups(r: dict[str, Any]) -> list[Figure]:
    b = "vm_groups"
    n = r.get("instances")
    u = r.get("unchanged_median", {})
    c = r.get("after_changes", {})
    return [
        _target(
            b,
            f"cloud API calls per unchanged poll ({n} instances)",
            u.get("calls"),
            "calls",
            below=3,
            shown="2 (constant)",
        ),
        _target(
            b,
            f"instances described per unchanged poll ({n})",
            u.get("described"),
            "",
            below=1,
            shown="0",
        ),
        _info(b, "events appended per unchanged poll", u.get("events"), "events"),
        _info(b, f"SMC CPU per unchanged poll ({n} instances)", u.get("smc_cpu_s"), "s"),
        _info(b, "SMC CPU full poll / unchanged poll", r.get("cpu_ratio_full_to_unchanged"), "x"),
        _info(b, f"calls after +{r.get('changes')} instances", c.get("calls"), "calls"),
        _info(b, f"described after +{r.get('changes')} instances", c.get("described"), ""),
    ]


def figures_ads_replicas(r: dict[str, Any]) -> list[Figure]:
    b = "ads_replicas"
    n = r.get("proxies_per_replica", 0)
    storm = r.get("storm", {})
    absorb = r.get("absorb", {})
    out = [
        _info(
            b,
            f"storm -> all served, replica 1 ({n:,} proxies)",
            storm.get("replica1_all_served_s"),
            "s",
        ),
        _info(
            b,
            f"storm -> all served, replica 2 ({n:,} proxies)",
            storm.get("replica2_all_served_s"),
            "s",
        ),
        _info(
            b,
            f"kill -9 of replica 1 -> its {n:,} proxies served by replica 2",
            absorb.get("kill_to_all_served_s"),
            "s",
        ),
    ]
    changed = _target(
        b,
        "config types changed on reconnect to the other replica",
        absorb.get("types_changed_on_reconnect"),
        "count",
        below=1,
        shown="0",
    )
    lost = _target(
        b,
        "replica 2's own streams lost while absorbing",
        absorb.get("replica2_streams_lost"),
        "count",
        below=1,
        shown="0",
    )
    out += [replace(changed, ratio=None), replace(lost, ratio=None)]
    if absorb.get("resumed") is not None:
        resumed = _target(
            b,
            "moved proxies not served again",
            n - absorb["resumed"],
            "count",
            below=1,
            shown="0",
        )
        out.append(replace(resumed, ratio=None))
    return out


def figures_sovereign(r: dict[str, Any]) -> list[Figure]:
    b = "sovereign_compare"
    out: list[Figure] = []
    if r.get("sovereign_error"):
        out.append(
            Figure(
                benchmark=b,
                figure=f"sovereign could not run: {r['sovereign_error'][:300]}",
                value=None,
                unit="",
                verdict="FAIL",
            )
        )
    rows = r.get("summary") or r.get("runs", [])
    for run in rows:
        if "error" in run:
            out.append(
                Figure(
                    benchmark=b,
                    figure=f"{run['plane']} N={run['clusters']} failed: {run['error'][:200]}",
                    value=None,
                    unit="",
                    verdict="FAIL",
                )
            )
            continue
        p, n = run["plane"], run["clusters"]
        reps = f", best of {run['repeats']}" if run.get("repeats", 1) > 1 else ""
        out.append(
            _info(
                b,
                f"{p} N={n}: Envoy start -> all clusters active{reps}",
                run.get("time_to_all_active_s"),
                "s",
            )
        )
        out.append(
            _info(
                b,
                f"{p} N={n}: Envoy CPU to all clusters active",
                run.get("envoy_cpu_to_all_active_s"),
                "CPU s",
            )
        )
        out.append(
            _info(
                b,
                f"{p} N={n}: one-cluster change applied, p50",
                run.get("change_latency_p50_s"),
                "s",
            )
        )
        out.append(
            _info(
                b, f"{p} N={n}: control-plane peak RSS", run.get("control_plane_peak_rss_mb"), "MB"
            )
        )
        out.append(
            _info(b, f"{p} N={n}: control-plane CPU, idle", run.get("idle_cpu_s_per_s"), "CPU s/s")
        )
        out.append(
            _info(b, f"{p} N={n}: bytes sent to Envoy", run.get("bytes_to_envoy_total"), "B")
        )
    refresh = r.get("envoy_rest_refresh_delay_s")
    for row in r.get("ratios", []):
        n = row["clusters"]
        for key, label, gate in (
            ("time_to_all_active_s", "time to all active (Envoy-bound)", False),
            ("envoy_cpu_to_all_active_s", "Envoy CPU to all active", False),
            ("change_latency_p50_s", f"change latency (sovereign REST refresh {refresh}s)", True),
            ("initial_serve_cpu_s", "CPU, initial serve", False),
            ("idle_cpu_s_per_s", "CPU while idle", False),
            ("control_plane_peak_rss_mb", "peak RSS", False),
            ("bytes_to_envoy_total", "bytes to Envoy", False),
        ):
            v = row.get(key, {}).get("sovereign_over_smc")
            if v is None and not gate:
                continue  # e.g. SMC used no CPU at all while idle: no ratio to show
            variant = row.get("smc_variant", "smc")
            fig = f"N={n}: sovereign / {variant}, {label} (> 1: SMC better)"
            if gate:
                out.append(_target(b, fig, v, "x", at_least=1.0, shown=">= 1 (SMC no worse)"))
            else:
                out.append(_info(b, fig, v, "x"))
    return out


def figures_time_travel(r: dict[str, Any]) -> list[Figure]:
    b = "time_travel"
    n = r.get("events") or 0
    return [
        _target(b, f"--at on a {n:,}-event log from checkpoints, slowest of "
                   f"{len(r.get('at_seconds') or [])}", r.get("at_max_seconds"), "s", below=5.0,
                shown="< 5 s"),
        _info(b, "the same --at replayed from zero", r.get("at_from_zero_seconds"), "s"),
    ]  # fmt: skip


EXTRACT: dict[str, Callable[[dict[str, Any]], list[Figure]]] = {
    "replay": figures_replay,
    "time_travel": figures_time_travel,
    "kafka_raw": figures_kafka_raw,
    "api_writes": figures_api_writes,
    "certs": figures_certs,
    "identity": figures_identity,
    "ads_streams": figures_ads_streams,
    "ads_scale": figures_ads_scale,
    "ads_replicas": figures_ads_replicas,
    "convergence": figures_convergence,
    "sovereign_compare": figures_sovereign,
    "console": figures_console,
    "vm_groups": figures_vm_groups,
}


# ---------------------------------------------------------------------- running


def _wait_for_load(limit: float | None, max_wait: float) -> None:
    if limit is None:
        return
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > limit and time.monotonic() < deadline:
        time.sleep(5)


def run_benchmark(
    name: str, *, quick: bool, results: Path, wait_load: float | None, max_wait: float
) -> dict[str, Any]:
    script, out_flag, full, small, (t_full, t_quick) = BENCHMARKS[name]
    out_path = results / f"{name}.json"
    log_path = results / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "nice",
        "-n",
        "10",
        sys.executable,
        str(BENCH / script),
        *(small if quick else full),
        out_flag,
        str(out_path),
    ]
    timeout = t_quick if quick else t_full
    _wait_for_load(wait_load, max_wait)
    load_before = os.getloadavg()
    print(f"[report] {name}: {' '.join(cmd[3:])} (load {load_before[0]:.2f}) ...", flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    started = time.time()
    t = time.perf_counter()
    error = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc = None
            error = f"timed out after {timeout} s"
    seconds = time.perf_counter() - t
    tail = log_path.read_text(errors="replace")[-1500:]
    if rc not in (0, None):
        error = f"exit code {rc}: {tail[-800:]}"
    fresh = out_path.exists() and out_path.stat().st_mtime >= started
    if error is None and not fresh:
        error = f"exit code 0 but {out_path.name} was not written"
    print(f"[report] {name}: {'ok' if error is None else 'FAILED'} in {seconds:.0f} s", flush=True)
    return {
        "command": cmd,
        "quick": quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(seconds, 1),
        "exit_code": rc,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "error": error,
        "result_fresh": fresh,
        "log": str(log_path),
    }


# ---------------------------------------------------------------------- rendering


def _num(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "inf"
    a = abs(v)
    if a >= 1 and float(v).is_integer():
        return f"{int(v):,}"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    return f"{v:.3g}"


def collect(results: Path, runs: dict[str, dict[str, Any]]) -> tuple[list[Figure], dict[str, Any]]:
    figures: list[Figure] = []
    raw: dict[str, Any] = {}
    for name in BENCHMARKS:
        path = results / f"{name}.json"
        run = runs.get(name) or {}
        error = run.get("error")
        if error is not None and not run.get("result_fresh"):
            figures.append(
                Figure(
                    benchmark=name,
                    figure=f"run failed: {error[:300]}",
                    value=None,
                    unit="",
                    verdict="FAIL",
                )
            )
            continue
        if not path.exists():
            figures.append(
                Figure(
                    benchmark=name,
                    figure=f"no result ({path.name} missing)",
                    value=None,
                    unit="",
                    verdict="FAIL",
                )
            )
            continue
        try:
            data = json.loads(path.read_text())
            raw[name] = data
            got = EXTRACT[name](data)
        except (ValueError, KeyError, TypeError) as exc:
            got = [
                Figure(
                    benchmark=name,
                    value=None,
                    unit="",
                    verdict="FAIL",
                    figure=f"unreadable {path.name}: {type(exc).__name__}: {exc}",
                )
            ]
        if error is not None:
            got.append(
                Figure(
                    benchmark=name,
                    figure=f"run failed after writing: {error[:300]}",
                    value=None,
                    unit="",
                    verdict="FAIL",
                )
            )
        figures.extend(got)
    return figures, raw


def _shown_command(cmd: list[str]) -> str:
    """``script.py args`` with paths inside the repository made relative."""
    parts = cmd[4:] if cmd[:1] == ["nice"] else cmd[1:]
    out = []
    for c in parts:
        if c.startswith(str(REPO) + os.sep):
            c = os.path.relpath(c, REPO)
        out.append(c)
    return " ".join(out)


def markdown(figures: list[Figure], runs: dict[str, dict[str, Any]], *, mode: str) -> str:
    lines = [
        f"# SMC performance report ({mode})",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (shared). Ratio to target: > 1 is better than the target.",
        "",
        "| benchmark | figure | value | unit | target | ratio to target | pass/fail |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for f in figures:
        fig = f.figure.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {f.benchmark} | {fig} | {_num(f.value)} | {f.unit} | {f.target} | "
            f"{_num(f.ratio)} | {f.verdict} |"
        )
    lines += ["", "Runs (load average 1/5/15 min before each benchmark):", ""]
    for name in BENCHMARKS:
        r = runs.get(name)
        if r is None:
            lines.append(
                f"- {name}: not run by this report (figures from the existing result file)"
            )
            continue
        la = " / ".join(f"{x:.2f}" for x in r["load_average_before"])
        status = "ok" if r.get("error") is None else f"FAILED ({r['error'][:120]})"
        lines.append(
            f"- {name}: {status}, {r['seconds']} s, load {la}; `{_shown_command(r['command'])}`"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (about 5 minutes in all)")
    ap.add_argument(
        "--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    ap.add_argument(
        "--from-results",
        action="store_true",
        help="run nothing; re-render from the JSON files already there",
    )
    ap.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="default benchmarks/results (benchmarks/results/quick with --quick)",
    )
    ap.add_argument(
        "--wait-load",
        type=float,
        default=None,
        help="before each benchmark wait (up to --max-wait s) for 1-min load <= this",
    )
    ap.add_argument("--max-wait", type=float, default=120.0)
    args = ap.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            ap.error(f"--only: unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    results = args.results_dir or (BENCH / "results" / "quick" if args.quick else BENCH / "results")
    results.mkdir(parents=True, exist_ok=True)
    report_json = results / "report.json"

    runs: dict[str, dict[str, Any]] = {}
    if report_json.exists():  # keep what earlier report runs recorded of benchmarks not re-run
        try:
            runs = dict(json.loads(report_json.read_text()).get("runs", {}))
        except (ValueError, AttributeError):
            runs = {}
    if not args.from_results:
        for name in names:
            runs[name] = run_benchmark(
                name,
                quick=args.quick,
                results=results,
                wait_load=args.wait_load,
                max_wait=args.max_wait,
            )
    figures, raw = collect(results, runs)
    mode = "quick sizes" if args.quick else "full sizes"
    md = markdown(figures, runs, mode=mode)
    report_json.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "mode": mode,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "figures": [
                    asdict(f)
                    | {"ratio": None if f.ratio is None or math.isinf(f.ratio) else f.ratio}
                    for f in figures
                ],
                "runs": runs,
                "results": raw,
            },
            indent=2,
        )
        + "\n"
    )
    (results / "report.md").write_text(md)
    print(md)
    print(f"wrote {report_json} and {results / 'report.md'}")
    failed_runs = [n for n in names if not args.from_results and runs[n].get("error")]
    if failed_runs:
        print(f"benchmarks that failed to run: {', '.join(failed_runs)}", file=sys.stderr)
    return 1 if failed_runs else 0


if __name__ == "__main__":
    raise SystemExit(main())
