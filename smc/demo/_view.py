"""What ``smc demo`` shows: the live table, the plain periodic line and the final summary.

Role: pure functions from a :class:`~smc.demo.DemoStatus` (or the summary dict) to a rich
renderable or text. Concurrency: none (called on the demo's asyncio loop).
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from smc.demo._mesh import DemoStatus

__all__ = ["live_view", "plain_line", "summary_lines"]


_SERVERS = ("bookstore-v1", "bookstore-v2", "bookwarehouse")


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def _position(pos: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(pos.items())) or "-"


def live_view(st: DemoStatus) -> Group:
    """The live screen: one row per source -> destination, then split and mesh state."""
    table = Table(
        title=f"smc demo: bookstore mesh, traffic for {st.uptime:.0f}s",
        title_justify="left",
        expand=False,
    )
    table.add_column("source -> destination")
    table.add_column("request")
    table.add_column("allowed (2xx)", justify="right", style="green")
    table.add_column("denied (403)", justify="right", style="red")
    table.add_column("errors", justify="right", style="yellow")
    table.add_column("req/s", justify="right")
    for f in st.flows:
        rate = f.total / st.uptime if st.uptime > 0 else 0.0
        table.add_row(
            f.key,
            f"{f.method} {f.path}",
            str(f.allowed),
            str(f.denied),
            str(f.errors),
            f"{rate:.1f}",
        )
    v1, v2 = st.split_counts
    t1, t2 = st.split_target
    split = Table(title="TrafficSplit bookstore", title_justify="left")
    split.add_column("backend")
    split.add_column("weight", justify="right")
    split.add_column("answers", justify="right")
    split.add_column("share", justify="right")
    split.add_row("bookstore-v1", str(t1), str(v1), _pct(v1, v1 + v2))
    split.add_row("bookstore-v2", str(t2), str(v2), _pct(v2, v1 + v2))
    served = "  ".join(f"{k}={v}" for k, v in st.served.items() if k in _SERVERS)
    footer = Text.assemble(
        ("served by the apps: ", "bold"),
        served,
        "\n",
        ("event log: ", "bold"),
        f"{st.log_events} events applied, position {_position(st.log_position)}",
        "\n",
        ("proxies: ", "bold"),
        f"{st.proxies}/{st.expected_proxies} connected over ADS, "
        f"{st.envoys_running} Envoys running, NACKs {st.nacks}",
        "\n",
        ("Ctrl-C stops everything", "dim"),
    )
    return Group(table, split, footer)


def plain_line(st: DemoStatus) -> str:
    """One line of counters (for ``--no-live`` and non-terminals)."""
    flows = " | ".join(
        f"{f.key}: allowed={f.allowed} denied={f.denied} errors={f.errors}" for f in st.flows
    )
    v1, v2 = st.split_counts
    return (
        f"[{st.uptime:5.1f}s] {flows} | split v1={v1} v2={v2} ({_pct(v2, v1 + v2)} v2, "
        f"target {st.split_target[0]}/{st.split_target[1]}) | "
        f"log events={st.log_events} | proxies={st.proxies}/{st.expected_proxies} "
        f"nacks={st.nacks}"
    )


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The final report as text lines."""
    out = [
        f"smc demo summary (stopped by {summary['stopped_by']}, "
        f"{summary['traffic_seconds']}s of traffic):"
    ]
    for key, f in summary["flows"].items():
        out.append(
            f"  {key:<30} {f['request']:<14} allowed={f['allowed']:<6} "
            f"denied={f['denied']:<6} errors={f['errors']}"
        )
    split = summary["split"]
    v1 = split["observed"]["bookstore-v1"]
    v2 = split["observed"]["bookstore-v2"]
    out.append(
        f"  split bookstore-v1/v2: {v1}/{v2} ({_pct(v1, v1 + v2)} / {_pct(v2, v1 + v2)}; "
        f"weights {split['target']['bookstore-v1']}/{split['target']['bookstore-v2']})"
    )
    served = summary["served"]
    out.append(
        "  served: " + ", ".join(f"{k}={served[k]['total']}" for k in _SERVERS if k in served)
    )
    log = summary["log"]
    out.append(f"  event log {log['url']}: {log['events']} events, position {log['position']}")
    out.append(
        f"  proxies connected at the end: {summary['proxies_connected']}; "
        f"NACKs: {len(summary['nacks'])}; Envoy rejected updates: "
        f"{summary['envoy_rejected'] or 'none'}"
    )
    return out
