"""``smc serve``: the long-running control plane on the chosen log.

Role: starts the projection runner (from a checkpoint when one is given), reports when it has
caught up, saves checkpoints periodically, and hosts the servers that hang off the projections.
Concurrency: one asyncio loop; the log is read in worker threads; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

import click

from smc.cli._app import cli, open_log_from
from smc.errors import SMCError
from smc.projections import CheckpointStore, ProjectionRunner, all_projections

__all__ = ["serve"]

log = logging.getLogger("smc.serve")


async def _serve(runner: ProjectionRunner, store: CheckpointStore | None, every: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(runner.run(stop=stop))

    async def announce() -> None:
        await runner.caught_up.wait()
        click.echo(
            f"caught up: {runner.applied} events, position {runner.position.to_json()}", err=True
        )

    announcer = asyncio.create_task(announce())
    last = time.monotonic()
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if store is not None and time.monotonic() - last >= every and runner.caught_up.is_set():
                store.save(runner.checkpoint())
                last = time.monotonic()
    finally:
        stop.set()
        announcer.cancel()
        if store is not None and runner.caught_up.is_set() and not task.cancelled():
            exc = task.exception() if task.done() else None
            if exc is None:
                store.save(runner.checkpoint())
    task.result()


@cli.command("serve")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint file to use.")
@click.option("--checkpoint-every", default=30.0, show_default=True, help="Seconds between saves.")
@click.pass_context
def serve(ctx: click.Context, checkpoint: str | None, checkpoint_every: float) -> None:
    """Run the control plane: follow the log and keep projections current."""
    log_ = open_log_from(ctx)
    runner = ProjectionRunner(log=log_, projections=all_projections())
    store = CheckpointStore(checkpoint) if checkpoint else None
    if store is not None:
        cp = store.load()
        if cp is not None:
            runner.restore(cp)
            click.echo(f"restored checkpoint at {cp.position.to_json()}", err=True)
    try:
        asyncio.run(_serve(runner, store, checkpoint_every))
    except SMCError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
