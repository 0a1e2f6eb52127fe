"""``smc agent``: run the SMC agent beside an Envoy (the same as ``python -m smc.agent``).

Role: hands its arguments to :func:`smc.agent.__main__.main` (see :mod:`smc.agent`).
Concurrency: one agent per process.
"""

from __future__ import annotations

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
    from smc.agent.__main__ import main

    sys.exit(main(list(args)))
