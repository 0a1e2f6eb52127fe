"""The root click group, shared options and error handling of the ``smc`` CLI.

Role: defines :data:`cli` and :func:`main`; parses times and positions given on the command
line. Concurrency: one command per process.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from smc.errors import SMCError
from smc.events import EventLog, Position, Signer, open_log

__all__ = ["DEFAULT_LOG", "cli", "main", "open_log_from", "parse_position", "parse_time"]

DEFAULT_LOG = "sqlite:///smc.db"


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SMCError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option(
    "--log",
    "log_url",
    envvar="SMC_LOG",
    default=DEFAULT_LOG,
    show_default=True,
    help="Event log URL: sqlite:///PATH or kafka://HOST:PORT (env SMC_LOG).",
)
@click.option(
    "--writer",
    "writer_dir",
    envvar="SMC_WRITER",
    default=None,
    type=click.Path(file_okay=False),
    help="Writer credentials (writer.key, writer.crt from `smc writer issue`) that seal "
    "what this command appends (env SMC_WRITER).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="smc", prog_name="smc", message="%(prog)s %(version)s")
@click.option(
    "--server",
    envvar="SMC_SERVER",
    default=None,
    help="https://HOST:PORT of a running `smc serve`: apply, delete and get go through its "
    "API with your credential instead of writing to the log (env SMC_SERVER).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Bearer token for --server (or $SMC_TOKEN; default: the local admin credential).",
)
@click.option(
    "--cacert", type=click.Path(dir_okay=False), default=None, help="CA of --server's certificate."
)
@click.option("--cert", type=click.Path(dir_okay=False), default=None, help="Client certificate.")
@click.option("--key", type=click.Path(dir_okay=False), default=None, help="Key of --cert.")
@click.pass_context
def cli(
    ctx: click.Context,
    log_url: str,
    writer_dir: str | None,
    verbose: int,
    server: str | None,
    token_file: str | None,
    cacert: str | None,
    cert: str | None,
    key: str | None,
) -> None:
    """SMC: an event-sourced service mesh control plane for Envoy."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["log_url"] = log_url
    ctx.obj["writer_dir"] = writer_dir
    ctx.obj.update(server=server, token_file=token_file, cacert=cacert, cert=cert, key=key)


def open_log_from(ctx: click.Context, *, create: bool = False) -> EventLog:
    """The log ``--log`` names; appends are sealed with ``--writer`` credentials if given.
    Read commands never create one (``create=False``: a missing SQLite file is an error
    naming it); commands that write pass ``create=True``."""
    log = open_log(ctx.obj["log_url"], create=create)
    ctx.call_on_close(log.close)
    writer_dir = (ctx.find_root().obj or {}).get("writer_dir")
    if writer_dir:
        log.signer = Signer.from_dir(writer_dir)
    return log


def parse_time(text: str) -> datetime:
    """ISO 8601 (``2026-11-26T14:00:00Z``), ``now``, or relative like ``-15m``, ``-2h``, ``-1d``."""
    t = text.strip()
    if t == "now":
        return datetime.now(UTC)
    if t.startswith("-") and t[-1:] in "smhd" and t[1:-1].isdigit():
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[t[-1]]
        return datetime.now(UTC) - timedelta(**{unit: int(t[1:-1])})
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(
            f"{text!r} is not a time (ISO 8601, 'now' or -15m/-2h/-1d)"
        ) from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def parse_position(log: EventLog, text: str) -> Position:
    """An offset (applies to every partition), ``stream:partition=offset,...``, or a time."""
    t = text.strip()
    if t.isdigit():
        end = log.end_position()
        return Position({tp: int(t) for tp, _ in end.items()})
    if "=" in t:
        out = {}
        for part in t.split(","):
            k, _, v = part.partition("=")
            stream, _, p = k.rpartition(":")
            if not stream or not p.isdigit() or not v.strip().isdigit():
                raise click.BadParameter(f"{part!r}: expected stream:partition=offset")
            out[(stream, int(p))] = int(v)
        return Position(out)
    return log.position_at(parse_time(t))


def main() -> None:
    cli(prog_name="smc")
