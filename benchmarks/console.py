"""Benchmark: the web console on a large mesh with a long history, in a real browser.

Role: writes a SQLite log holding a mesh of ``--services`` services and ``--workloads`` VM
workloads (each service granted to the next one by a TrafficTarget) padded with endpoint
updates to ``--events`` records, starts ``smc serve`` on it, opens ``/console/`` in headless
Chromium (Debian's chromium via Selenium) and measures, over ``--passes`` fresh page loads:
time from navigation start to an interactive map (every node drawn, handlers attached), to the
first timeline rows, and to rows shown after jumping to the middle and to the oldest end of the
timeline; plus how many timeline rows the page fetched (it must not load them all). Targets:
interactive < 1 s at 1,000 services / 10,000 workloads; the timeline scrolls 100,000 events.
Prints the figures and ratios, writes ``benchmarks/results/console.json``.
Concurrency: one process; the browser and the server are child processes.

Usage: python benchmarks/console.py [--services 1000] [--workloads 10000] [--events 100000]
       [--passes 3] [--out FILE]
"""

from __future__ import annotations

import argparse
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

from smc.events import (
    Endpoint,
    EndpointsChanged,
    Event,
    ServicePort,
    ServiceUpserted,
    SmiResourceApplied,
    SqliteLog,
    WorkloadJoined,
    WorkloadPort,
    make_event,
)
from smc.testing.browser import headless_chromium
from smc.testing.serve import ServeProcess

TARGET_INTERACTIVE_S = 1.0


def _mesh_events(services: int, workloads: int, total: int) -> list[Event]:
    def ev(cls: type[Event], **payload: Any) -> Event:
        return make_event(cls, source="bench", actor="bench", **payload)

    out: list[Event] = []
    port = (ServicePort(name="http", port=80, protocol="http", target_port=8080),)
    for s in range(services):
        out.append(
            ev(
                ServiceUpserted,
                namespace=f"ns{s % 20}",
                name=f"svc{s}",
                ports=port,
                backing="vm",
                selector={"app": f"svc{s}"},
            )
        )
    for w in range(workloads):
        s = w % services
        out.append(
            ev(
                WorkloadJoined,
                kind="vm",
                namespace=f"ns{s % 20}",
                name=f"vm{w}",
                address=f"10.{w // 65536}.{(w // 256) % 256}.{w % 256}",
                service_account=f"sa{s}",
                labels={"app": f"svc{s}"},
                ports=(WorkloadPort(name="http", port=8080, protocol="http"),),
            )
        )
    for n in range(20):
        group = {
            "apiVersion": "specs.smi-spec.io/v1alpha4",
            "kind": "HTTPRouteGroup",
            "metadata": {"name": "all", "namespace": f"ns{n}"},
            "spec": {"matches": [{"name": "all", "pathRegex": ".*"}]},
        }
        out.append(
            ev(
                SmiResourceApplied,
                kind="HTTPRouteGroup",
                api_version="specs.smi-spec.io/v1alpha4",
                namespace=f"ns{n}",
                name="all",
                manifest_json=json.dumps(group),
            )
        )
    for s in range(services):
        src, dst = s, (s + 1) % services
        manifest = {
            "apiVersion": "access.smi-spec.io/v1alpha3",
            "kind": "TrafficTarget",
            "metadata": {"name": f"tt{s}", "namespace": f"ns{dst % 20}"},
            "spec": {
                "destination": {"kind": "ServiceAccount", "name": f"sa{dst}"},
                "sources": [
                    {"kind": "ServiceAccount", "name": f"sa{src}", "namespace": f"ns{src % 20}"}
                ],
                "rules": [{"kind": "HTTPRouteGroup", "name": "all"}],
            },
        }
        out.append(
            ev(
                SmiResourceApplied,
                kind="TrafficTarget",
                api_version="access.smi-spec.io/v1alpha3",
                namespace=f"ns{dst % 20}",
                name=f"tt{s}",
                manifest_json=json.dumps(manifest),
            )
        )
    i = 0
    while len(out) < total:  # the history: endpoints of services going up and down
        s = i % services
        ready = (i // services) % 2 == 0
        out.append(
            ev(
                EndpointsChanged,
                namespace=f"ns{s % 20}",
                service=f"svc{s}",
                endpoints=(Endpoint(address="10.9.0.1", port=8080, ready=ready),),
            )
        )
        i += 1
    return out


def _page_pass(driver: Any, url: str) -> dict[str, float | int]:
    driver.get("about:blank")
    driver.get(url)
    deadline = time.monotonic() + 60
    while not driver.execute_script("return window.smcConsole && window.smcConsole.timelineAt"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the console did not load: {driver.get_log('browser')}")
        time.sleep(0.01)
    m = driver.execute_script(
        "const s = window.smcConsole; return {interactive: s.readyAt, timeline: s.timelineAt,"
        " nodes: s.cy.nodes().length, edges: s.cy.edges().length, total: s.total}"
    )

    def jump(display: int) -> float:
        t0 = time.perf_counter()
        driver.execute_script(
            f"const b = document.getElementById('timeline'); b.scrollTop = {display} * 24;"
        )
        while not driver.execute_script(
            f"return !!document.querySelector('.tl-row[data-display=\"{display}\"][data-seq]')"
        ):
            if time.perf_counter() - t0 > 30:
                raise RuntimeError(f"timeline row {display} never showed")
            time.sleep(0.005)
        return time.perf_counter() - t0

    total = int(m["total"])
    middle = jump(total // 2)
    oldest = jump(total - 30)
    loaded = driver.execute_script(
        "let n = 0; for (const p of window.smcConsole.pages.values()) n += p.length; return n"
    )
    return {
        "interactive_s": m["interactive"] / 1000,
        "timeline_s": m["timeline"] / 1000,
        "nodes": m["nodes"],
        "edges": m["edges"],
        "timeline_total": total,
        "jump_middle_s": middle,
        "jump_oldest_s": oldest,
        "rows_loaded": int(loaded),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--workloads", type=int, default=10000)
    ap.add_argument("--events", type=int, default=100000)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "console.json")
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="smc-bench-console-"))
    log = SqliteLog(tmp / "log.db")
    t0 = time.perf_counter()
    events = _mesh_events(args.services, args.workloads, args.events)
    for i in range(0, len(events), 5000):
        log.append(events[i : i + 5000])
    log.close()
    print(f"wrote {len(events)} events in {time.perf_counter() - t0:.1f}s")
    serve = ServeProcess(tmp, xds_host=None)
    driver = None
    try:
        serve.wait_ready(timeout=300)
        driver = headless_chromium(accept_insecure_certs=True)  # serve's own API CA
        url = f"{serve.base}/console/#token={serve.credentials.token}"
        passes = [_page_pass(driver, url) for _ in range(args.passes)]
    finally:
        if driver is not None:
            driver.quit()
        serve.stop()
    for p in passes:
        print(
            f"  interactive {p['interactive_s']:.3f}s, first rows {p['timeline_s']:.3f}s, "
            f"{p['nodes']} nodes / {p['edges']} edges, jump to middle {p['jump_middle_s']:.3f}s, "
            f"to oldest {p['jump_oldest_s']:.3f}s, {p['rows_loaded']} of "
            f"{p['timeline_total']} rows fetched"
        )
    med = {k: statistics.median(float(p[k]) for p in passes) for k in passes[0]}
    ratio = TARGET_INTERACTIVE_S / med["interactive_s"] if med["interactive_s"] else 0.0
    print(
        f"median interactive {med['interactive_s']:.3f}s (target < {TARGET_INTERACTIVE_S}s, "
        f"ratio {ratio:.2f}); timeline of {int(med['timeline_total'])} events scrolled with "
        f"{int(med['rows_loaded'])} rows fetched ({med['rows_loaded'] / med['timeline_total']:.2%})"
    )
    result = {
        "services": args.services,
        "workloads": args.workloads,
        "events": len(events),
        "passes": passes,
        "median": med,
        "target_interactive_s": TARGET_INTERACTIVE_S,
        "ratio_interactive": ratio,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "loadavg": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
