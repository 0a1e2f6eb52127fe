"""``smc log tail``, ``smc log replay`` and ``smc audit``: reading the event log.

Role: CLI over the log and the projection runner; no state of its own.
Concurrency: one command per process; reads the log on the main thread.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import click
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from smc.audit import load_trust
from smc.auth import actor_matches
from smc.cli._app import cli, open_log_from, parse_position, parse_time
from smc.cli._output import emit, output_option
from smc.events import ChainVerifier, Event, EventLog, Position, Record, default_codec
from smc.projections import ProjectionRunner, all_projections

__all__ = ["audit", "diff_states", "event_row", "log_group"]


def event_row(rec: Record, ev: Event) -> dict[str, Any]:
    """One event as a flat, JSON-able row (what audit and tail print)."""
    env = ev.envelope
    payload = {}
    for f in fields(ev):
        if f.name == "envelope":
            continue
        payload[f.name] = _plain(getattr(ev, f.name))
    return {
        "position": rec.where,
        "appended_at": datetime.fromtimestamp(rec.timestamp_ms / 1000, UTC).isoformat(),
        "occurred_at": env.occurred_at.isoformat(),
        "type": type(ev).TYPE,
        "aggregate": env.aggregate,
        "actor": env.actor,
        "source": env.source,
        "event_id": env.event_id,
        "causation_id": env.causation_id,
        "correlation_id": env.correlation_id,
        "payload": payload,
    }


def _why(row: dict[str, Any]) -> str:
    """What a VM group instance did and why (`` joined (scale-out)``), for the audit table."""
    if row["type"] != "smc.registry.VmInstanceChanged":
        return ""
    p = row["payload"]
    return f" {p.get('phase')} ({p.get('cause')})"


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, datetime):
        return v.isoformat()
    if hasattr(v, "__dataclass_fields__"):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    return v


#: How long ``log tail`` waits for a record it knows exists before failing.
_TAIL_READ_TIMEOUT = 30.0


def _short_type(t: str) -> str:
    return t.rsplit(".", 1)[-1]


@cli.group("log")
def log_group() -> None:
    """Read the event log."""


@log_group.command("tail")
@click.option("--since", help="Start at this time (ISO 8601, now, -15m); default: the end.")
@click.option("--from-start", is_flag=True, help="Start at the beginning of the log.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("-n", "--lines", default=20, show_default=True, help="Last N events (no --since).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (= -o json).")
@output_option()
@click.pass_context
def tail(
    ctx: click.Context,
    since: str | None,
    from_start: bool,
    follow: bool,
    lines: int,
    as_json: bool,
    output: str,
) -> None:
    """Print events from the log, optionally following it (-o json: one object per line,
    yaml: one document per event, name: event/ID)."""
    if as_json:
        output = "json"
    log = open_log_from(ctx)
    codec = default_codec()
    if from_start:
        pos = Position()
    elif since:
        pos = log.position_at(parse_time(since))
    else:
        end = log.end_position()
        pos = Position({tp: max(0, off - lines) for tp, off in end.items()})
    console = Console()

    def show(recs: list[Record]) -> None:
        for rec in recs:
            row = event_row(rec, codec.decode(rec.value, where=rec.where))
            if output == "json":
                click.echo(json.dumps(row, sort_keys=True))
            elif output == "yaml":
                click.echo("---\n" + yaml.safe_dump(row, sort_keys=True).rstrip("\n"))
            elif output == "name":
                click.echo(f"event/{row['event_id']}")
            else:
                console.print(
                    f"[dim]{row['position']}[/] {row['occurred_at']} "
                    f"[bold]{_short_type(row['type'])}[/] {row['aggregate']} "
                    f"[cyan]{row['actor']}[/]@{row['source']}",
                    highlight=False,
                )
        sys.stdout.flush()

    # Without --follow, read up to the end position taken now. A read may return nothing
    # before the end (a Kafka consumer fetches asynchronously: an empty first poll is normal),
    # so the loop ends on reaching the end, never on an empty read.
    end = log.end_position()
    deadline = time.monotonic() + _TAIL_READ_TIMEOUT
    last: list[Record] = []
    while not pos.covers(end):
        recs = log.read(start=pos, max_records=1000, timeout=0.5)
        if recs:
            deadline = time.monotonic() + _TAIL_READ_TIMEOUT
        elif time.monotonic() > deadline:
            raise click.ClickException(
                f"{log.url}: no record arrived within {_TAIL_READ_TIMEOUT:.0f}s while reading "
                f"from {pos.to_json()} up to {end.to_json()}"
            )
        pos = pos.advanced(recs)
        if from_start or since:
            show(recs)
        else:
            last.extend(recs)  # at most ``lines`` per partition
    if not from_start and not since and lines > 0:
        show(sorted(last, key=lambda r: r.timestamp_ms)[-lines:])  # stable: ties keep log order
    while follow:
        recs = log.read(start=pos, max_records=1000, timeout=0.5)
        show(recs)
        pos = pos.advanced(recs)


@log_group.command("replay")
@click.option("--until", help="Stop before OFFSET, stream:partition=offset,..., or a TIME.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (= -o json).")
@output_option()
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--full", is_flag=True, help="Decode and apply every record (also superseded ones).")
@click.option(
    "--trust",
    envvar="SMC_TRUST",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="Verify seals against these PEM roots: unverified records are skipped and reported.",
)
@click.pass_context
def replay(
    ctx: click.Context,
    until: str | None,
    as_json: bool,
    no_progress: bool,
    full: bool,
    trust: str | None,
    output: str,
) -> None:
    """Rebuild every projection from the log and print their digests and sizes."""
    if output == "name":
        raise click.UsageError("-o name: replay prints a summary, not named objects")
    as_json = as_json or output in ("json", "yaml")
    log = open_log_from(ctx)
    target = parse_position(log, until) if until else log.end_position()
    total = sum(off for _, off in target.items()) if log.dedupes_on_append else None
    verifier = ChainVerifier(trust=load_trust(trust)) if trust else None
    runner = ProjectionRunner(log=log, projections=all_projections(), verifier=verifier)
    t0 = time.perf_counter()
    if no_progress or as_json:
        runner.catch_up(until=target, compact=not full)
    else:
        with Progress(
            TextColumn("replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        ) as bar:
            task = bar.add_task("replay", total=total)
            runner.catch_up(
                until=target,
                compact=not full,
                progress=lambda n: bar.update(task, completed=n),
            )
    if verifier is not None and until is None:
        verifier.finish()  # records no seal covers by the end of the log: unsigned
    secs = time.perf_counter() - t0
    result = _summary(runner, secs)
    if as_json:
        emit(result, "yaml" if output == "yaml" else "json", table=lambda: None)
        return
    click.echo(
        f"replayed {result['events']} events in {secs:.2f}s "
        f"({result['events_per_second']:.0f} events/s) to {result['position']}"
    )
    if verifier is not None:
        click.echo(f"verified {verifier.verified} records; skipped {verifier.rejected}")
        for f in result["findings"]:
            click.echo(f"  skipped {f['position']} {f['kind']}: {f['detail']}")
    for name, d in result["digests"].items():
        click.echo(f"  {name:9} {d}  {result['sizes'][name]}")


def _summary(runner: ProjectionRunner, secs: float) -> dict[str, Any]:
    from smc.projections import CertsProjection, PolicyProjection, RegistryProjection

    sizes: dict[str, str] = {}
    for p in runner.projections:
        if isinstance(p, RegistryProjection):
            sizes[p.name] = (
                f"{len(p.services)} services, {len(p.workloads)} workloads, "
                f"{len(p.endpoints)} endpoint sets, {len(p.service_accounts)} service accounts"
            )
        elif isinstance(p, PolicyProjection):
            sizes[p.name] = f"{len(p.resources)} resources, permissive={p.mesh.permissive}"
        elif isinstance(p, CertsProjection):
            sizes[p.name] = f"{len(p.current)} current certificates, {len(p.revoked())} revoked"
    out: dict[str, Any] = {}
    if runner.verifier is not None:
        out["verified"] = runner.verifier.verified
        out["skipped"] = runner.verifier.rejected
        out["findings"] = [f.to_json() for f in runner.verifier.findings]
    return out | {
        "events": runner.applied,
        "duplicates_dropped": runner.duplicates,
        "seconds": round(secs, 3),
        "events_per_second": runner.applied / secs if secs > 0 else 0.0,
        "position": runner.position.to_json(),
        "digests": runner.digests(),
        "sizes": sizes,
    }


def diff_states(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per projection and section: keys added, removed and changed between two checkpoints."""
    out: dict[str, Any] = {}
    for proj in sorted(set(before) | set(after)):
        b, a = before.get(proj, {}), after.get(proj, {})
        sections: dict[str, Any] = {}
        for sec in sorted(set(b) | set(a)):
            bv, av = b.get(sec), a.get(sec)
            if isinstance(bv, dict) or isinstance(av, dict):
                bd, ad = bv or {}, av or {}
                added = sorted(set(ad) - set(bd))
                removed = sorted(set(bd) - set(ad))
                changed = sorted(k for k in set(ad) & set(bd) if ad[k] != bd[k])
            elif isinstance(bv, list) or isinstance(av, list):
                bs = {json.dumps(x, sort_keys=True) for x in bv or []}
                as_ = {json.dumps(x, sort_keys=True) for x in av or []}
                added = sorted(json.loads(x) for x in as_ - bs)
                removed = sorted(json.loads(x) for x in bs - as_)
                changed = []
            else:
                added, removed = [], []
                changed = [sec] if bv != av else []
            if added or removed or changed:
                sections[sec] = {"added": added, "removed": removed, "changed": changed}
        if sections:
            out[proj] = sections
    return out


def _audit_data(log: EventLog, start: Position, end: Position) -> dict[str, Any]:
    codec = default_codec()
    runner = ProjectionRunner(log=log, projections=all_projections())
    runner.catch_up(until=start)
    before = {p.name: p.checkpoint() for p in runner.projections}
    events: list[dict[str, Any]] = []
    pos = start
    while not pos.covers(end):
        recs = [
            r
            for r in log.read(start=pos, max_records=5000)
            if r.offset < end.get((r.stream, r.partition))
        ]
        if not recs:
            break
        for rec in recs:
            events.append(event_row(rec, codec.decode(rec.value, where=rec.where)))
        pos = pos.advanced(recs)
    runner.catch_up(until=end)
    after = {p.name: p.checkpoint() for p in runner.projections}
    events.sort(key=lambda r: r["appended_at"])  # stable: ties keep the log's read order
    return {"events": events, "diff": diff_states(before, after)}


@cli.group("audit", invoke_without_command=True)
@click.option("--from", "from_", default=None, help="Start (TIME or position); default: beginning.")
@click.option("--to", default=None, help="End (TIME or position); default: now.")
@click.option("--actor", default=None, help="Only events by this actor.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table (= -o json).")
@output_option()
@click.pass_context
def audit(
    ctx: click.Context,
    from_: str | None,
    to: str | None,
    actor: str | None,
    as_json: bool,
    output: str,
) -> None:
    """What changed, when and by whom between two points in time, and the state difference.

    Subcommands: `verify` (signatures and chains), `why` (what granted or revoked access)."""
    if ctx.invoked_subcommand is not None:
        return
    log = open_log_from(ctx)
    start = parse_position(log, from_) if from_ else Position()
    end = parse_position(log, to) if to else log.end_position()
    data = _audit_data(log, start, end)
    if actor:
        data["events"] = [e for e in data["events"] if actor_matches(e["actor"], actor)]
    if as_json or output != "table":
        emit(
            data,
            "json" if as_json else output,
            table=lambda: None,
            names=lambda: [f"event/{e['event_id']}" for e in data["events"]],
        )
        return
    console = Console()
    table = Table(title=f"{len(data['events'])} changes")
    for col in ("occurred at", "type", "aggregate", "actor", "source", "position"):
        table.add_column(col)
    for e in data["events"]:
        table.add_row(
            e["occurred_at"],
            _short_type(e["type"]) + _why(e),
            e["aggregate"],
            e["actor"],
            e["source"],
            e["position"],
        )
    console.print(table)
    if not data["diff"]:
        console.print("state difference: none")
    for proj, secs in data["diff"].items():
        for sec, d in secs.items():
            console.print(
                f"[bold]{proj}.{sec}[/]: +{len(d['added'])} -{len(d['removed'])} "
                f"~{len(d['changed'])}",
                highlight=False,
            )
            for verb, items in (("+", d["added"]), ("-", d["removed"]), ("~", d["changed"])):
                for k in items[:50]:
                    console.print(f"    {verb} {k}", highlight=False)
