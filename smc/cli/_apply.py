"""``smc apply`` and ``smc delete``: the declarative mesh API (``get`` is in :mod:`smc.cli._get`,
``policy check`` in :mod:`smc.cli._policycheck`).

Role: kubectl-style commands. ``apply``/``delete`` read manifests from files, directories
(recursively: ``*.yaml``, ``*.yml``, ``*.json``) or stdin (``-``), rebuild the registry and policy
projections from the log, and append the changes through :class:`smc.api.MeshChanges` with the
actor recorded (``unix:USER``, ``unix:USER as NAME`` with ``--as``); with ``smc --server URL``
they go through the server's API instead (:mod:`smc.cli._client`). Each document is reported created /
configured / unchanged / deleted / error; valid documents apply even when others fail, and the
exit code is 1 if any failed. The manifest reader and projection helpers here serve those too.
Concurrency: one command per process; everything runs on the main thread.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path

import click

from smc.api import (
    ChangeReport,
    MeshChanges,
)
from smc.cli._app import cli, open_log_from
from smc.cli._client import change_via_api, client_from, operator_actor
from smc.cli._output import emit, output_option
from smc.events import EventLog, LogError, Position, SqliteLog
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.smi import ManifestError, Resource, load_documents

__all__ = ["apply_cmd", "delete_cmd", "read_manifests"]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def read_manifests(paths: tuple[str, ...]) -> tuple[list[Resource], list[ManifestError]]:
    """Resources and errors from files, directories (recursive) and ``-`` (stdin)."""
    resources: list[Resource] = []
    errors: list[ManifestError] = []
    for given in paths:
        if given == "-":
            sources: list[tuple[str, Path | None]] = [("-", None)]
        else:
            p = Path(given)
            if p.is_dir():
                found = sorted(
                    f for f in p.rglob("*") if f.is_file() and f.suffix in MANIFEST_SUFFIXES
                )
                if not found:
                    errors.append(
                        ManifestError(
                            document=given,
                            path="",
                            reason="directory holds no *.yaml, *.yml or *.json file",
                        )
                    )
                sources = [(str(f), f) for f in found]
            else:
                sources = [(given, p)]
        for label, path in sources:
            try:
                if path is None:
                    text = sys.stdin.buffer.read().decode("utf-8")
                else:
                    text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(
                    ManifestError(document=label, path="", reason=f"not UTF-8 (byte {exc.start})")
                )
                continue
            except OSError as exc:
                errors.append(
                    ManifestError(document=label, path="", reason=f"cannot read: {exc.strerror}")
                )
                continue
            res = load_documents(text, source=label)
            resources.extend(res.resources)
            errors.extend(res.errors)
    return resources, errors


def _projections(log: EventLog) -> tuple[RegistryProjection, PolicyProjection]:
    registry, policy = RegistryProjection(), PolicyProjection()
    ProjectionRunner(log=log, projections=[registry, policy]).catch_up()
    return registry, policy


def _projections_at(
    log: EventLog, at: str | None, trust: str | None
) -> tuple[RegistryProjection, PolicyProjection]:
    from smc.audit import load_trust, state_at
    from smc.cli._app import parse_position
    from smc.events import ChainVerifier
    from smc.projections import CheckpointDir

    verifier = ChainVerifier(trust=load_trust(trust)) if trust else None
    history = os.environ.get("SMC_CHECKPOINTS")
    runner = state_at(
        log,
        parse_position(log, at) if at else log.end_position(),
        verifier=verifier,
        checkpoints=CheckpointDir(history) if history else None,
    )
    registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    return registry, policy


def _print_report(report: ChangeReport, *, output: str, dry_run: bool) -> None:
    if output in ("json", "yaml"):
        emit(report.as_dict(), output, table=lambda: None)
        return
    if output == "name":  # as kubectl apply -o name: one kind/namespace/name per document
        for r in report.results:
            if r.errors:
                for e in r.errors:
                    click.echo(f"error: {e}", err=True)
            else:
                click.echo(r.document.lower())
        return
    suffix = " (dry run)" if dry_run else ""
    for r in report.results:
        if r.errors:
            for e in r.errors:
                click.echo(f"error: {e}", err=True)
        else:
            click.echo(f"{r.document} {r.status}{suffix}")
            for w in r.warnings:
                click.echo(f"warning: {r.document}: {w}", err=True)


def _change(
    ctx: click.Context,
    *,
    verb: str,
    files: tuple[str, ...],
    actor: str | None,
    request_id: str | None,
    dry_run: bool,
    output: str,
    ignore_not_found: bool = False,
) -> None:
    client = client_from(ctx)
    if client is not None:  # through the server's API, as the caller's credential
        ok = change_via_api(
            client,
            verb=verb,
            files=files,
            actor=actor,
            request_id=request_id,
            dry_run=dry_run,
            output=output,
            ignore_not_found=ignore_not_found,
        )
        if not ok:
            sys.exit(1)
        return
    resources, errors = read_manifests(files)
    log = _log_for_change(ctx, verb=verb, dry_run=dry_run)
    registry, policy = _projections(log)
    changes = MeshChanges(log=log, registry=registry, policy=policy)
    who = operator_actor(actor)
    rid = request_id or str(uuid.uuid4())
    if verb == "apply":
        plan = changes.plan_apply(
            resources, actor=who, source="cli", request_id=rid, load_errors=errors
        )
    else:
        plan = changes.plan_delete(
            resources,
            actor=who,
            source="cli",
            request_id=rid,
            load_errors=errors,
            ignore_not_found=ignore_not_found,
        )
    if dry_run:
        report = ChangeReport(plan=plan, appended=(), target=Position())
    else:
        report = changes.commit(plan)
    _print_report(report, output=output, dry_run=dry_run)
    if not plan.results:
        click.echo("error: no objects passed to " + verb, err=True)
        sys.exit(1)
    if not report.ok:
        sys.exit(1)


def _log_for_change(ctx: click.Context, *, verb: str, dry_run: bool) -> EventLog:
    """The log to plan against: ``apply`` creates a missing one; a dry run or a delete never
    does (with no log, a dry run plans against an empty mesh in memory)."""
    try:
        return open_log_from(ctx, create=verb == "apply" and not dry_run)
    except LogError:
        url = ctx.obj["log_url"]
        if not (dry_run and url.startswith("sqlite:///")):
            raise
    scratch = tempfile.TemporaryDirectory(prefix="smc-dry-run-")
    ctx.call_on_close(scratch.cleanup)
    empty = SqliteLog(Path(scratch.name) / "empty.db")
    ctx.call_on_close(empty.close)
    return empty


_FILE_OPT = click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    required=True,
    help="Manifest file, directory (recursive) or - for stdin; repeatable.",
)
_AS_OPT = click.option(
    "--as",
    "actor",
    default=None,
    help="Act as NAME (impersonation: recorded with your own principal, as 'you as NAME'; "
    "through --server it needs the impersonate grant).",
)
_RID_OPT = click.option(
    "--request-id", default=None, help="Idempotency key (a retry with it applies once)."
)
_DRY_OPT = click.option("--dry-run", is_flag=True, help="Show what would change; append nothing.")
_OUT_OPT = output_option()


@cli.command("apply")
@_FILE_OPT
@_AS_OPT
@_RID_OPT
@_DRY_OPT
@_OUT_OPT
@click.pass_context
def apply_cmd(
    ctx: click.Context,
    files: tuple[str, ...],
    actor: str | None,
    request_id: str | None,
    dry_run: bool,
    output: str,
) -> None:
    """Create or update mesh resources from manifests (like kubectl apply)."""
    _change(
        ctx,
        verb="apply",
        files=files,
        actor=actor,
        request_id=request_id,
        dry_run=dry_run,
        output=output,
    )


@cli.command("delete")
@_FILE_OPT
@_AS_OPT
@_RID_OPT
@_DRY_OPT
@_OUT_OPT
@click.option("--ignore-not-found", is_flag=True, help="Missing resources are not an error.")
@click.pass_context
def delete_cmd(
    ctx: click.Context,
    files: tuple[str, ...],
    actor: str | None,
    request_id: str | None,
    dry_run: bool,
    output: str,
    ignore_not_found: bool,
) -> None:
    """Delete the mesh resources named by manifests (like kubectl delete -f)."""
    _change(
        ctx,
        verb="delete",
        files=files,
        actor=actor,
        request_id=request_id,
        dry_run=dry_run,
        output=output,
        ignore_not_found=ignore_not_found,
    )
