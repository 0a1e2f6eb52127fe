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

from smc.audit import issue_writer, load_trust, verify_log
from smc.cli._app import cli, open_log_from, parse_position
from smc.cli._certs import ca_options, factory_from_ca_options
from smc.cli._log import audit
from smc.events import ROLES

__all__ = ["verify_cmd", "writer_group"]

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
