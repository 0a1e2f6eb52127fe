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
from collections.abc import Awaitable, Callable

import click

from smc.cli._app import cli, open_log_from
from smc.errors import SMCError
from smc.projections import (
    CheckpointStore,
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
)

__all__ = ["serve"]

log = logging.getLogger("smc.serve")


def _parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--http")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _start_api(
    runner: ProjectionRunner,
    stop: asyncio.Event,
    http: tuple[str, int] | None,
    inventory: str | None,
    inventory_interval: float,
) -> tuple[list[Callable[[], Awaitable[None]]], list[asyncio.Task[None]]]:
    """Start the HTTP API and the inventory VM provider (when asked); returns what to close."""
    from smc.api import (
        ApiContext,
        ApiError,
        LiveMeshChanges,
        MeshChanges,
        create_app,
        start_http,
    )
    from smc.informers import InventoryDirectoryProvider, ProviderBridge

    registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    changes = MeshChanges(log=runner.log, registry=registry, policy=policy)
    live = LiveMeshChanges(changes=changes, runner=runner)
    closers: list[Callable[[], Awaitable[None]]] = []
    tasks: list[asyncio.Task[None]] = []
    if http is not None:
        ctx = ApiContext(live=live, runner=runner, registry=registry, policy=policy)
        try:
            app_runner = await start_http(create_app(ctx), host=http[0], port=http[1])
        except OSError as exc:
            raise ApiError(
                f"cannot serve the HTTP API on {http[0]}:{http[1]}: {exc.strerror or exc}; "
                "choose another with --http HOST:PORT or disable it with --http off"
            ) from exc
        closers.append(app_runner.cleanup)
        click.echo(f"HTTP API on http://{http[0]}:{http[1]} (OpenAPI: /openapi.json)", err=True)
    if inventory is not None:
        provider = InventoryDirectoryProvider(inventory, interval=inventory_interval)
        bridge = ProviderBridge(provider_name=provider.name, live=live)

        async def run_provider() -> None:
            await runner.caught_up.wait()
            await provider.run(sink=bridge, stop=stop)

        tasks.append(asyncio.create_task(run_provider()))
        click.echo(f"VM provider inventory watching {inventory}", err=True)
    return closers, tasks


async def _serve(
    runner: ProjectionRunner,
    store: CheckpointStore | None,
    every: float,
    http: tuple[str, int] | None = None,
    inventory: str | None = None,
    inventory_interval: float = 2.0,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # the API listens before the runner starts: /readyz answers 503 until it has caught up
    closers, side_tasks = await _start_api(runner, stop, http, inventory, inventory_interval)
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
        for t in side_tasks:
            t.cancel()
        for c in closers:
            await c()
        if store is not None and runner.caught_up.is_set() and not task.cancelled():
            exc = task.exception() if task.done() else None
            if exc is None:
                store.save(runner.checkpoint())
    task.result()


@cli.command("serve")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint file to use.")
@click.option("--checkpoint-every", default=30.0, show_default=True, help="Seconds between saves.")
@click.option(
    "--http",
    "http_addr",
    default="127.0.0.1:8470",
    show_default=True,
    help="HOST:PORT of the HTTP API; 'off' disables it.",
)
@click.option(
    "--inventory",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of VirtualMachine/MeshService manifests to watch (VM provider).",
)
@click.option("--inventory-interval", default=2.0, show_default=True, help="Seconds between scans.")
@click.pass_context
def serve(
    ctx: click.Context,
    checkpoint: str | None,
    checkpoint_every: float,
    http_addr: str,
    inventory: str | None,
    inventory_interval: float,
) -> None:
    """Run the control plane: follow the log and keep projections current."""
    http = None if http_addr == "off" else _parse_hostport(http_addr)
    log_ = open_log_from(ctx)
    runner = ProjectionRunner(log=log_, projections=all_projections())
    store = CheckpointStore(checkpoint) if checkpoint else None
    if store is not None:
        cp = store.load()
        if cp is not None:
            runner.restore(cp)
            click.echo(f"restored checkpoint at {cp.position.to_json()}", err=True)
    try:
        asyncio.run(_serve(runner, store, checkpoint_every, http, inventory, inventory_interval))
    except SMCError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
