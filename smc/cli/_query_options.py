"""Option blocks shared by the commands that query policy and the log's history.

Role: :func:`access_options` (``--from``/``--to`` identities, checked as
``namespace/serviceaccount``, and ``--path``/``--method``/``--port``) for ``policy check`` and
``audit why``; :func:`trust_option` (``--trust`` PEM roots, required or optional) for the
commands that verify seals; :data:`CHECKPOINTS` for the time-travel commands.
Concurrency: click decorators, used at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

__all__ = ["CHECKPOINTS", "access_options", "check_identity", "trust_option"]


def check_identity(value: str, name: str) -> str:
    """``value`` when it is ``namespace/serviceaccount``; raises click.BadParameter naming
    the option."""
    ns, sep, sa = value.partition("/")
    if not sep or not ns or not sa or "/" in sa:
        raise click.BadParameter(f"{value!r} is not namespace/serviceaccount", param_hint=name)
    return value


def _identity(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return check_identity(value, "--" + (param.opts[0].lstrip("-")))


def access_options(*, http_help: str = "") -> Callable[[Any], Any]:
    """``--from SRC --to DST [--path P] [--method M] [--port N]`` (identities checked)."""
    options = [
        click.option(
            "--from",
            "source",
            required=True,
            callback=_identity,
            help="Source identity ns/serviceaccount.",
        ),
        click.option(
            "--to",
            "destination",
            required=True,
            callback=_identity,
            help="Destination identity ns/serviceaccount.",
        ),
        click.option("--path", default=None, help=f"HTTP path{http_help}."),
        click.option("--method", default=None, help=f"HTTP method{http_help}."),
        click.option(
            "--port", type=click.IntRange(1, 65535), default=None, help="Destination port."
        ),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def trust_option(*, required: bool) -> Callable[[Any], Any]:
    """``--trust ROOTS.pem`` (env SMC_TRUST): required to verify the log, optional where it
    only filters which records count."""
    return click.option(
        "--trust",
        envvar="SMC_TRUST",
        required=required,
        default=None,
        type=click.Path(dir_okay=False, exists=True),
        help=(
            "PEM trust roots of the mesh CA that certifies writers (env SMC_TRUST)."
            if required
            else "Only records whose seals verify against these PEM roots count (env SMC_TRUST)."
        ),
    )


CHECKPOINTS = click.option(
    "--checkpoints",
    envvar="SMC_CHECKPOINTS",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory of checkpoints (`smc serve --checkpoint-dir`): start from the newest "
    "one before the point asked for (env SMC_CHECKPOINTS).",
)
