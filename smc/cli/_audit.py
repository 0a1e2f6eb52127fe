"""``smc writer issue`` and ``smc audit verify``: writer credentials and log verification.

Role: CLI over :mod:`smc.audit`. ``writer issue`` asks the mesh CA (``--ca``) for a writer
certificate of a role and writes the credentials other commands use with ``--writer DIR``;
``audit verify`` checks every seal and chain of the log against trust roots and prints each
finding with its position (exit status 1 when there is any).
Concurrency: one command per process.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

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
from smc.cli._proxy import proxy
from smc.events import ROLES, ChainVerifier

__all__ = ["proxy_config_cmd", "verify_cmd", "why_cmd", "writer_group"]

_TRUST = click.option(
    "--trust",
    envvar="SMC_TRUST",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="PEM trust roots of the mesh CA that certifies writers (env SMC_TRUST).",
)
_REVOKED = click.option(
    "--revoked",
    envvar="SMC_REVOKED_WRITERS",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="JSON {serial: revoked-at time} of revoked writer certificates.",
)


_TRUST_OPTIONAL = click.option(
    "--trust",
    envvar="SMC_TRUST",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="Only records whose seals verify against these PEM roots count (env SMC_TRUST).",
)
_CHECKPOINTS = click.option(
    "--checkpoints",
    envvar="SMC_CHECKPOINTS",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory of checkpoints (`smc serve --checkpoint-dir`): start from the newest "
    "one before the point asked for (env SMC_CHECKPOINTS).",
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
@ca_options
def writer_issue(
    role: str,
    name: str,
    trust_domain: str,
    days: float,
    out_dir: str,
    ca: str | None,
    vault_role: str,
    vault_mount: str,
    vault_token_file: str | None,
    vault_ca_cert: str | None,
) -> None:
    """Issue a writer key and certificate into --out (writer.key 0600, writer.crt, trust.pem)."""
    factory = factory_from_ca_options(
        ca=ca,
        vault_role=vault_role,
        vault_mount=vault_mount,
        vault_token_file=vault_token_file,
        vault_ca_cert=vault_ca_cert,
    )
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
    click.echo(json.dumps(facts, indent=2, sort_keys=True))


@audit.command("verify")
@click.option("--from", "from_", default=None, help="Report from here (TIME or position).")
@click.option("--to", default=None, help="Report up to here (TIME or position).")
@_TRUST
@_REVOKED
@click.option("--json", "as_json", is_flag=True, help="JSON report.")
@click.pass_context
def verify_cmd(
    ctx: click.Context,
    from_: str | None,
    to: str | None,
    trust: str,
    revoked: str | None,
    as_json: bool,
) -> None:
    """Check every record's seal, chain, writer and entitlement; exit 1 on any finding."""
    log = open_log_from(ctx)
    start = parse_position(log, from_) if from_ else None
    end = parse_position(log, to) if to else None
    report = verify_log(log, load_trust(trust, revoked=revoked), start=start, end=end)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
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
    if report.findings:
        sys.exit(1)


@proxy.command("config")
@click.argument("node")
@click.option("--at", "at", required=True, help="TIME, OFFSET or stream:partition=offset,...")
@_TRUST_OPTIONAL
@_CHECKPOINTS
@click.pass_context
def proxy_config_cmd(
    ctx: click.Context, node: str, at: str, trust: str | None, checkpoints: str | None
) -> None:
    """The config NODE (ns/workload) was served at a past point of the log, rebuilt by replay:
    listeners, routes, clusters, endpoints (with RBAC) and secret names, as JSON."""
    log = open_log_from(ctx)
    position = parse_position(log, at)
    data = proxy_config_at(
        log,
        node,
        position,
        verifier=verifier_from(trust),
        checkpoints=CheckpointDir(checkpoints) if checkpoints else None,
    )
    click.echo(json.dumps(data, indent=2, sort_keys=True))
    if data["reason"]:
        click.echo(f"error: no config for {node} then: {data['reason']}", err=True)
        sys.exit(1)


@audit.command("why")
@click.option("--from", "source", required=True, help="Source identity ns/serviceaccount.")
@click.option("--to", "destination", required=True, help="Destination identity ns/sa.")
@click.option("--path", default=None, help="HTTP path.")
@click.option("--method", default=None, help="HTTP method.")
@click.option("--port", type=click.IntRange(1, 65535), default=None)
@click.option("--until", default=None, help="Stop at this TIME or position.")
@_TRUST_OPTIONAL
@click.option("--json", "as_json", is_flag=True, help="JSON instead of lines.")
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
    as_json: bool,
) -> None:
    """The events that granted, widened, narrowed or revoked SOURCE's access to DESTINATION,
    in log order, with the actor on each and the writer whose seal proves it."""
    for value, name in ((source, "--from"), (destination, "--to")):
        ns, sep, sa = value.partition("/")
        if not sep or not ns or not sa or "/" in sa:
            raise click.BadParameter(f"{value!r} is not namespace/serviceaccount", param_hint=name)
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
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        click.echo(f"no event ever changed whether {source} may reach {destination}")
    for r in rows:
        who = r["writer"] if r["verified"] else "unverified"
        click.echo(
            f"{r['position']} {r['occurred_at']} {r['effect']:8} {r['type']} {r['aggregate']} "
            f"by {r['actor']} (sealed by {who}): {r['decision']}, {r['reason']}"
        )
