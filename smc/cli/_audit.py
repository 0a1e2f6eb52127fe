"""``smc writer issue``, ``smc audit verify|why`` and ``smc proxy config``: writer credentials,
log verification and time travel.

Role: CLI over :mod:`smc.audit`. ``writer issue`` asks the mesh CA (``--ca``) for a writer
certificate of a role and writes the credentials other commands use with ``--writer DIR``;
``audit verify`` checks every seal and chain of the log against trust roots and prints each
finding with its position (exit status 1 when there is any); ``audit why`` lists what changed
an access; ``proxy config --at`` rebuilds a proxy's past config. Every one prints
``-o table|json|yaml|name`` (:mod:`smc.cli._output`).
Concurrency: one command per process.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from smc.audit import (
    CheckpointDir,
    access_history,
    issue_writer,
    load_trust,
    proxy_config_at,
    verify_log,
)
from smc.cli._app import cli, open_log_from, parse_position
from smc.cli._certs import ca_options, factory_from_ca_options
from smc.cli._log import audit
from smc.cli._output import emit, facts_table, output_option
from smc.cli._proxy import proxy
from smc.cli._query_options import CHECKPOINTS, access_options, trust_option
from smc.events import ROLES, ChainVerifier

__all__ = ["proxy_config_cmd", "verify_cmd", "why_cmd", "writer_group"]

_REVOKED = click.option(
    "--revoked",
    envvar="SMC_REVOKED_WRITERS",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="JSON {serial: revoked-at time} of revoked writer certificates.",
)
_FROM_TO = (
    click.option("--from", "from_", default=None, help="From here (TIME or position)."),
    click.option("--to", default=None, help="Up to here (TIME or position)."),
)


def verifier_from(trust: str | None, revoked: str | None = None) -> ChainVerifier | None:
    """A verifier over ``--trust`` roots, or None without them."""
    return ChainVerifier(trust=load_trust(trust, revoked=revoked)) if trust else None


@cli.group("writer")
def writer_group() -> None:
    """Log writer credentials (keys certified by the mesh CA)."""


@writer_group.command("issue")
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the writer may append.")
@click.option("--name", required=True, help="Writer name (an informer's: its cluster).")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--days", default=30.0, show_default=True, help="Certificate lifetime in days.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@output_option(default="json")
@ca_options
def writer_issue(
    role: str,
    name: str,
    trust_domain: str,
    days: float,
    out_dir: str,
    output: str,
    **ca: Any,
) -> None:
    """Issue a writer key and certificate into --out (writer.key 0600, writer.crt, trust.pem)."""
    factory = factory_from_ca_options(**ca)
    if factory is None:
        raise click.UsageError("--ca is required (local:DIR or vault:URL)")
    facts = issue_writer(
        factory(trust_domain),
        trust_domain=trust_domain,
        role=role,
        name=name,
        directory=out_dir,
        lifetime=timedelta(days=days),
    )
    emit(facts, output, table=facts_table(facts), names=lambda: [f"writer/{facts['identity']}"])


@audit.command("verify")
@_FROM_TO[0]
@_FROM_TO[1]
@trust_option(required=True)
@_REVOKED
@click.option(
    "--previous",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A former `audit verify -o json` report: a partition that now ends before the last "
    "seal seen then is reported as truncated.",
)
@output_option(json_alias=True)
@click.pass_context
def verify_cmd(
    ctx: click.Context,
    from_: str | None,
    to: str | None,
    trust: str,
    revoked: str | None,
    previous: str | None,
    output: str,
) -> None:
    """Check every record's seal, chain, writer and entitlement; exit 1 on any finding
    (-o name: one bad position per line)."""
    log = open_log_from(ctx)
    start = parse_position(log, from_) if from_ else None
    end = parse_position(log, to) if to else None
    seals = None
    if previous:
        try:
            seals = dict(json.loads(Path(previous).read_text())["seals"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise click.BadParameter(
                f"{previous}: not an `audit verify -o json` report with seals ({exc})",
                param_hint="--previous",
            ) from exc
    report = verify_log(
        log, load_trust(trust, revoked=revoked), start=start, end=end, previous=seals
    )

    def table() -> None:
        click.echo(
            f"verified {report.verified} of {report.records} records in {report.seconds:.2f}s; "
            f"{len(report.writers)} writers"
        )
        for w in report.writers.values():
            click.echo(f"  writer {w['identity']} serial {w['serial']}: {w['records']} records")
        if report.findings:
            click.echo(f"first bad position: {report.findings[0].where}")
        for f in report.findings:
            click.echo(f"  {f.where} {f.kind}: {f.detail}")

    emit(report.to_json(), output, table=table, names=lambda: [f.where for f in report.findings])
    if report.findings:
        sys.exit(1)


@proxy.command("config")
@click.argument("node")
@click.option("--at", "at", required=True, help="TIME, OFFSET or stream:partition=offset,...")
@trust_option(required=False)
@CHECKPOINTS
@output_option(default="json")
@click.pass_context
def proxy_config_cmd(
    ctx: click.Context,
    node: str,
    at: str,
    trust: str | None,
    checkpoints: str | None,
    output: str,
) -> None:
    """The config NODE (ns/workload) was served at a past point of the log, rebuilt by replay:
    listeners, routes, clusters, endpoints (with RBAC) and secret names (-o table: one
    line per resource with the type's version; -o name: type/name per line)."""
    log = open_log_from(ctx)
    position = parse_position(log, at)
    data = proxy_config_at(
        log,
        node,
        position,
        verifier=verifier_from(trust),
        checkpoints=CheckpointDir(checkpoints) if checkpoints else None,
    )
    rows = _config_rows(data)

    def table() -> None:
        click.echo(f"node {data.get('node', node)} identity {data.get('identity', '')}")
        width = max((len(n) for _, n, _ in rows), default=4)
        click.echo(f"{'TYPE':9} {'NAME':{width}} VERSION")
        for kind, name, version in rows:
            click.echo(f"{kind:9} {name:{width}} {version}")

    emit(data, output, table=table, names=lambda: [f"{k}/{n}" for k, n, _ in rows])
    if data["reason"]:
        click.echo(f"error: no config for {node} then: {data['reason']}", err=True)
        sys.exit(1)


def _config_rows(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, name, version) of every resource of a :func:`proxy_config_at` answer."""
    rows: list[tuple[str, str, str]] = []
    versions = data.get("versions") or {}
    for key, kind in (
        ("listeners", "listener"),
        ("routes", "route"),
        ("clusters", "cluster"),
        ("endpoints", "endpoints"),
    ):
        for item in data.get(key) or []:
            name = item.get("name") or item.get("cluster_name") or "?"
            rows.append((kind, str(name), str(versions.get(key, ""))))
    rows.extend(("secret", str(s), "") for s in data.get("secrets") or [])
    return rows


@audit.command("why")
@access_options()
@click.option("--until", default=None, help="Stop at this TIME or position.")
@trust_option(required=False)
@output_option(json_alias=True)
@click.pass_context
def why_cmd(
    ctx: click.Context,
    source: str,
    destination: str,
    path: str | None,
    method: str | None,
    port: int | None,
    until: str | None,
    trust: str | None,
    output: str,
) -> None:
    """The events that granted, widened, narrowed or revoked SOURCE's access to DESTINATION,
    in log order, with the actor on each and the writer whose seal proves it (-o name:
    one log position per line)."""
    log = open_log_from(ctx)
    rows = access_history(
        log,
        source=source,
        destination=destination,
        path=path,
        method=method,
        port=port,
        verifier=verifier_from(trust),
        end=parse_position(log, until) if until else None,
    )

    def table() -> None:
        if not rows:
            click.echo(f"no event ever changed whether {source} may reach {destination}")
        for r in rows:
            who = r["writer"] if r["verified"] else "unverified"
            click.echo(
                f"{r['position']} {r['occurred_at']} {r['effect']:8} {r['type']} "
                f"{r['aggregate']} by {r['actor']} (sealed by {who}): {r['decision']}, "
                f"{r['reason']}"
            )

    emit(rows, output, table=table, names=lambda: [str(r["position"]) for r in rows])
