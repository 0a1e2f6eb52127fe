"""``smc policy check``: may a source identity reach a destination (now, or at a past time).

Role: answers from the policy projection (or the server's API, or the log as of ``--at``);
exit code 1 on deny, as ``kubectl auth can-i``.
Concurrency: one command per process; everything runs on the main thread.
"""

from __future__ import annotations

import sys

import click

from smc.api import (
    policy_check,
)
from smc.cli._app import cli, open_log_from
from smc.cli._apply import _projections, _projections_at
from smc.cli._output import emit, output_option
from smc.cli._query_options import access_options, trust_option
from smc.projections._policyview import PolicyView


@cli.group("policy")
def policy_group() -> None:
    """Query the policy in force."""


@policy_group.command("check")
@access_options(http_help=" (implies HTTP)")
@output_option()
@click.option("--at", "at", default=None, help="Answer as of this TIME or log position.")
@trust_option(required=False)
@click.pass_context
def policy_check_cmd(
    ctx: click.Context,
    source: str,
    destination: str,
    path: str | None,
    method: str | None,
    port: int | None,
    output: str,
    at: str | None,
    trust: str | None,
) -> None:
    """Print allow or deny for traffic from one identity to another (now, or --at a past point)."""
    if at is not None or trust is not None:
        registry, policy = _projections_at(open_log_from(ctx), at, trust)
    else:
        registry, policy = _projections(open_log_from(ctx))
    result = policy_check(
        PolicyView(registry=registry, policy=policy),
        source=source,
        destination=destination,
        path=path,
        method=method,
        port=port,
    )
    emit(
        result,
        output,
        table=lambda: click.echo(f"{result['decision']}: {result['reason']}"),
        names=lambda: [str(result["decision"])],
    )
    if result["decision"] != "allow":
        sys.exit(1)  # as `kubectl auth can-i`: scripts can test the answer
