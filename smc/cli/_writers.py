"""Loading the per-role writer credentials ``smc serve --writers DIR`` seals appends with.

Role: reads ``DIR/<role>/writer.key`` and ``writer.crt`` for each role present (ca, api,
informer, provider), checks each certificate names that role, and records the signers on
the log (:func:`smc.events.with_role_signers`); the API's signer also seals any other
append of the process. Concurrency: called once at start-up.
"""

from __future__ import annotations

from pathlib import Path

import click

from smc.events import EventLog, Signer, parse_writer_identity, with_role_signers

__all__ = ["use_role_writers"]

_ROLES = ("ca", "api", "informer", "provider")


def use_role_writers(log: EventLog, directory: str) -> dict[str, Signer]:
    """Load the signers found under ``directory`` onto ``log``; raises click errors."""
    signers: dict[str, Signer] = {}
    for role in _ROLES:
        d = Path(directory) / role
        if not (d / "writer.key").exists():
            continue
        signer = Signer.from_dir(d)
        who = parse_writer_identity(signer.identity)
        if who is None or who[1] != role:
            raise click.BadParameter(
                f"{d}/writer.crt names {signer.identity!r}, not a {role} writer",
                param_hint="--writers",
            )
        signers[role] = signer
    if not signers:
        raise click.BadParameter(
            f"no writer credentials under {directory} (expected {', '.join(_ROLES)} "
            "subdirectories from `smc writer issue --out`)",
            param_hint="--writers",
        )
    with_role_signers(log, signers)
    log.signer = signers.get("api") or log.signer
    click.echo("sealing appends as " + ", ".join(s.identity for s in signers.values()), err=True)
    return signers
