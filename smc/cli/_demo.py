"""``smc demo``: the bookstore mesh on 127.0.0.1 with live counters (see :mod:`smc.demo`).

Role: parses the options, makes the work directory (a fresh temporary one unless ``--keep``
keeps it), runs :class:`smc.demo.BookstoreDemo` and shows its counters: a rich Live table
refreshed four times a second on a terminal, or one plain line every two seconds with
``--no-live`` (and whenever stdout is not a terminal). It stops on SIGINT (Ctrl-C), SIGTERM or
after ``--duration`` seconds, stops every Envoy, application and server it started, prints a
final summary and exits 0 (also on Ctrl-C/SIGTERM: that is how the demo is meant to end); a
failure to set the demo up exits 1 with one line on stderr.
Concurrency: one asyncio loop; the signal handlers only set an event on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from smc.cli._app import cli
from smc.errors import SMCError

__all__ = ["demo"]

_PLAIN_EVERY = 2.0
_LIVE_EVERY = 0.25


async def _show(demo: Any, stop: asyncio.Event, *, duration: float | None, live: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    from smc.demo import live_view, plain_line

    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration

    def left(every: float) -> float:
        return every if deadline is None else max(0.0, min(every, deadline - loop.time()))

    def over() -> bool:
        return stop.is_set() or (deadline is not None and loop.time() >= deadline)

    async def tick(every: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=left(every))

    if live:
        console = Console()
        with Live(
            live_view(demo.status()), console=console, auto_refresh=False, transient=False
        ) as screen:
            while not over():
                await tick(_LIVE_EVERY)
                screen.update(live_view(demo.status()), refresh=True)
    else:
        while not over():
            await tick(_PLAIN_EVERY)
            click.echo(plain_line(demo.status()))
            sys.stdout.flush()


async def _run(
    options: Any, *, duration: float | None, live: bool, json_summary: str | None
) -> None:
    from smc.demo import BookstoreDemo, summary_lines

    stop = asyncio.Event()
    stopped_by = ["duration" if duration is not None else "end"]
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if not stop.is_set():
            stopped_by[0] = name
            click.echo(f"\n{name}: stopping the demo...", err=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)

    def say(message: str) -> None:
        click.echo(message, err=True)

    demo = BookstoreDemo(options, say=say)
    try:
        try:
            started = await demo.start(stop)
        except SMCError:
            if not stop.is_set():
                raise
            started = False  # interrupted while starting (Ctrl-C also hits the Envoys)
        if started:
            await _show(demo, stop, duration=duration, live=live)
        await demo.stop_traffic()
        await demo.collect_rejections()
        summary = demo.summary(stopped_by=stopped_by[0])
    finally:
        await demo.close()
    say("stopped: Envoys, applications, ADS server and projection runner are down")
    for line in summary_lines(summary):
        click.echo(line)
    if json_summary is not None:
        Path(json_summary).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


@cli.command("demo")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Run the traffic this many seconds, print the summary and exit 0 (default: until Ctrl-C).",
)
@click.option(
    "--split",
    "split_text",
    default="90/10",
    show_default=True,
    help="TrafficSplit weights bookstore-v1/bookstore-v2, e.g. 50/50.",
)
@click.option(
    "--no-live",
    is_flag=True,
    help="Print a plain line of counters every 2 s instead of the live table (automatic when "
    "stdout is not a terminal).",
)
@click.option(
    "--json-summary",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the final summary as JSON to this file.",
)
@click.option(
    "--log",
    "demo_log",
    default=None,
    help="Event log URL for the demo, sqlite:///PATH (also taken from `smc --log`; SMC_LOG is "
    "ignored); default: a fresh SQLite file in the work directory.",
)
@click.option("--keep", is_flag=True, help="Keep the work directory (log, CA, Envoy logs).")
@click.option(
    "--net",
    default="127.0.1",
    show_default=True,
    help="Loopback /24 for the sidecars: workload N listens on NET.N.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.5, max=500),
    default=20.0,
    show_default=True,
    help="bookbuyer's requests per second (bookthief sends half as many).",
)
@click.option("--delta", is_flag=True, help="Envoys use delta (incremental) ADS.")
@click.option(
    "--console",
    "console_addr",
    default="127.0.0.1:0",
    show_default=True,
    help="Serve the web console (and the API) on HOST:PORT (port 0: a free one), or 'off'.",
)
@click.option(
    "--manifests",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Demo manifests template (default: the packaged bookstore.yaml).",
)
@click.pass_context
def demo(
    ctx: click.Context,
    duration: float | None,
    split_text: str,
    no_live: bool,
    json_summary: str | None,
    demo_log: str | None,
    keep: bool,
    net: str,
    rate: float,
    delta: bool,
    manifests: str | None,
    console_addr: str,
) -> None:
    """Run a bookstore mesh on 127.0.0.1: the control plane on an embedded log, a local CA, five
    applications behind real Envoy sidecars (one a VM), SMI policy and a traffic split, with
    live counters. Ctrl-C stops everything cleanly (exit 0)."""
    from smc.demo import DEFAULT_MANIFESTS, DemoOptions, parse_split

    split = parse_split(split_text)
    parts = net.split(".")
    if len(parts) != 3 or parts[0] != "127" or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise click.BadParameter(
            f"{net!r} is not a loopback /24 such as 127.0.1", param_hint="--net"
        )
    log_url = demo_log
    root = ctx.find_root()
    if log_url is None and root.get_parameter_source("log_url") == ParameterSource.COMMANDLINE:
        log_url = root.params["log_url"]
    workdir = Path(tempfile.mkdtemp(prefix="smc-demo-"))
    if keep:
        click.echo(f"work directory (kept): {workdir}", err=True)
    console: tuple[str, int] | None = None
    if console_addr != "off":
        host, _, port_text = console_addr.rpartition(":")
        if not host or not port_text.isdigit() or int(port_text) > 65535:
            raise click.BadParameter(
                f"{console_addr!r} is not HOST:PORT or 'off'", param_hint="--console"
            )
        console = (host, int(port_text))
    options = DemoOptions(
        workdir=workdir,
        log_url=log_url,
        net=net,
        split=split,
        buyer_rate=rate,
        thief_rate=rate / 2,
        delta=delta,
        manifests=Path(manifests) if manifests else DEFAULT_MANIFESTS,
        console=console,
    )
    live = not no_live and sys.stdout.isatty()
    try:
        asyncio.run(_run(options, duration=duration, live=live, json_summary=json_summary))
    except SMCError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        if keep:
            click.echo(f"work directory kept: {workdir}", err=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
