"""``smc certs proxies``: the per-proxy certificates the log records (SMC agents' keys).

Role: rebuilds the certificate projection from ``--log`` and lists, per proxy (``pod/<ns>/<name>``
or ``vm/<ns>/<name>``), every certificate signed over its agent's CSR: serial, identity,
validity, how the proxy proved itself (service-account token, join token, its previous
certificate) and the status (active, superseded, revoked with the reason, expired). Never a key:
the log holds none.
Concurrency: one command per process.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from smc.cli._app import open_log_from
from smc.cli._certs import certs_group
from smc.cli._output import emit, output_option
from smc.projections import CertsProjection, ProjectionRunner, ProxyCertRecord

__all__ = ["proxies_cmd"]


def _row(rec: ProxyCertRecord, now: datetime) -> dict[str, Any]:
    status = "expired" if rec.status == "active" and rec.not_after <= now else rec.status
    return {
        "proxy": rec.proxy,
        "serial": rec.serial,
        "identity": rec.identity,
        "not_before": rec.not_before.isoformat(),
        "not_after": rec.not_after.isoformat(),
        "issuer": rec.issuer,
        "fingerprint": rec.fingerprint,
        "proof": rec.proof.partition(":")[0],
        "status": status,
        "reason": rec.reason,
    }


@certs_group.command("proxies")
@output_option()
@click.option("--current", "only_current", is_flag=True, help="Only each proxy's current one.")
@click.option("--proxy", default=None, help="Only this proxy (pod/NS/NAME or vm/NS/NAME).")
@click.pass_context
def proxies_cmd(ctx: click.Context, output: str, only_current: bool, proxy: str | None) -> None:
    """Every per-proxy certificate (made over an SMC agent's CSR) with its status."""
    certs = CertsProjection()
    ProjectionRunner(log=open_log_from(ctx), projections=[certs]).catch_up()
    now = datetime.now(UTC)
    rows = []
    for name in sorted(certs.proxy_certs):
        if proxy is not None and name != proxy:
            continue
        for rec in sorted(certs.proxy_certs[name].values(), key=lambda r: r.not_before):
            if only_current and certs.proxy_current.get(name) != rec.serial:
                continue
            rows.append(_row(rec, now))

    def show() -> None:
        table = Table(title=f"{len(rows)} proxy certificates ({len(certs.proxy_current)} current)")
        for col in ("proxy", "serial", "identity", "not after", "proof", "status"):
            table.add_column(col)
        for r in rows:
            status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
            table.add_row(
                r["proxy"], r["serial"], r["identity"], r["not_after"], r["proof"], status
            )
        Console(width=220).print(table)

    emit(
        rows,
        output,
        table=show,
        names=lambda: [f"certificate/{r['serial']}" for r in rows],
    )
