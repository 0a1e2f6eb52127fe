"""``smc agent``: run the SMC agent beside an Envoy (the same as ``python -m smc.agent``).

Role: replaces this process with ``python -m smc.agent`` and its arguments (see
:mod:`smc.agent`), so that only the small resident agent stays up, not the CLI.
Concurrency: one agent per process.
"""

from __future__ import annotations

import os
import sys

import click

from smc.cli._app import cli

__all__ = ["agent"]


@cli.command(
    "agent",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def agent(args: tuple[str, ...]) -> None:
    """Run beside an Envoy: make its key, get it certified, write it where Envoy reads it
    (``smc agent --help`` lists the options)."""
    # Become ``python -m smc.agent``: the agent stays up for the proxy's life, and this CLI
    # process (click and every command's imports) would otherwise be what stays resident.
    os.execv(sys.executable, [sys.executable, "-m", "smc.agent", *args])
