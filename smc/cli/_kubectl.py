"""``smc diff -f`` and ``smc completion``: the kubectl habits that are not reads or writes.

Role: ``smc diff -f FILE|DIR|-`` plans an apply against the log (nothing is appended, no log is
created) and prints, per document that would change, a unified diff of the canonical YAML
(``---`` what is stored, ``+++`` what the apply would store); exit status as ``kubectl diff``:
0 no differences, 1 differences, 2 an error (invalid documents, an unreadable log).
``smc completion bash|zsh|fish`` prints the shell completion script (click's for bash and zsh,
:mod:`smc.cli._completion`'s for fish), for the ``smc`` program name: ``source <(smc completion
bash)``.
Concurrency: one command per process.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

import click
import yaml
from click.shell_completion import get_completion_class

from smc.api import MeshChanges, current_resources
from smc.cli._app import cli
from smc.cli._apply import _FILE_OPT, _log_for_change, _projections, read_manifests
from smc.errors import SMCError
from smc.smi import resource_key, to_manifest

__all__ = ["completion_cmd", "diff_cmd"]


def _yaml(manifest: Any) -> list[str]:
    if manifest is None:
        return []
    return yaml.safe_dump(manifest, sort_keys=True, default_flow_style=False).splitlines(True)


@cli.command("diff")
@_FILE_OPT
@click.pass_context
def diff_cmd(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Show what `smc apply -f` would change (exit 0: nothing, 1: differences, 2: error)."""
    try:
        resources, errors = read_manifests(files)
        log = _log_for_change(ctx, verb="apply", dry_run=True)
        registry, policy = _projections(log)
        changes = MeshChanges(log=log, registry=registry, policy=policy)
        current = current_resources(registry=registry, policy=policy)
        plan = changes.plan_apply(
            resources,
            actor="diff",
            source="cli",
            request_id="diff",
            load_errors=errors,
            current=dict(current),
        )
    except SMCError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    given = {resource_key(r): r for r in resources}
    differ = False
    failed = False
    for r in plan.results:
        if r.errors:
            failed = True
            for e in r.errors:
                click.echo(f"error: {e}", err=True)
            continue
        if r.status not in ("created", "configured") or r.document not in given:
            continue
        old = current.get(r.document)
        before = _yaml(to_manifest(old[0]) if old is not None else None)
        after = _yaml(to_manifest(given[r.document]))
        lines = difflib.unified_diff(
            before,
            after,
            fromfile=f"stored/{r.document}" if old is not None else "/dev/null",
            tofile=f"applied/{r.document}",
        )
        text = "".join(lines)
        if text:
            differ = True
            click.echo(text, nl=not text.endswith("\n"))
    if failed:
        sys.exit(2)
    sys.exit(1 if differ else 0)


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_cmd(shell: str) -> None:
    """Print the shell completion script: `source <(smc completion bash)`."""
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click ships all three
        raise click.UsageError(f"no completion for {shell}")
    root = click.get_current_context().find_root().command
    click.echo(cls(root, {}, "smc", "_SMC_COMPLETE").source())
