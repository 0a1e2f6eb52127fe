"""``smc get --watch``: follow the log and print each listed object that changed or went away.

Role: after ``get`` printed its list, :func:`watch` tails the log with the same runner and
prints one line (table, name) or one event object (json, yaml: ``{"type": "MODIFIED"|
"DELETED", "object": ...}``, as ``kubectl get -w -o json``) per changed object, until Ctrl-C
(exit 0), also when the shell started it with SIGINT ignored (a background job: as kubectl, the
watch installs its own handler). Concurrency: one command per process; blocking reads on the
main thread.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from typing import Any

import click
import yaml

from smc.projections import ProjectionRunner

__all__ = ["watch"]


def watch(what: str, runner: ProjectionRunner, current: Callable[[], Any], output: str) -> None:
    """Follow the log; print each item that changed (or went away), until Ctrl-C."""

    def keyed(data: Any) -> dict[str, Any]:
        if isinstance(data, dict):
            return {"meshconfig": data}
        return {f"{i['namespace']}/{i['name']}": i for i in data}

    seen = keyed(current())
    # A shell without job control starts background commands with SIGINT ignored, and Python
    # then never raises KeyboardInterrupt: Ctrl-C (or kill -INT) must still end a watch.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            recs = runner.log.read(start=runner.position, timeout=1.0)
            if not recs:
                continue
            runner.step_records(recs)
            now = keyed(current())
            changed = [k for k in now if seen.get(k) != now[k]]
            gone = [k for k in seen if k not in now]
            for k in changed:
                _watch_line(what, k, now[k], output, deleted=False)
            for k in gone:
                _watch_line(what, k, seen[k], output, deleted=True)
            seen = now
    except KeyboardInterrupt:
        return


def _watch_line(what: str, key: str, item: Any, output: str, *, deleted: bool) -> None:
    if output in ("json", "yaml"):
        event = {"type": "DELETED" if deleted else "MODIFIED", "object": item}
        if output == "json":
            click.echo(json.dumps(event, sort_keys=True))
        else:
            click.echo("---\n" + yaml.safe_dump(event, sort_keys=True).rstrip("\n"))
    elif output == "name":
        click.echo(f"{what}/{key}")
    else:
        click.echo(f"{'DELETED' if deleted else 'MODIFIED':9s} {what}/{key}", nl=True)
    sys.stdout.flush()
