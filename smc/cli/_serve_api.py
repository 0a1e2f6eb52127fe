"""The HTTP side of ``smc serve``: API, console, metrics, debug routes, inventory provider.

Role: :func:`_start_api` mounts the authenticated HTTP API (with ``/debug/state``, the xDS
debug endpoints, ``/metrics`` and the console) and starts the VM group controller and the
inventory VM provider; it returns what serve closes at exit. Split out of
:mod:`smc.cli._serve`, which calls it.
Concurrency: one asyncio loop (serve's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import click

from smc.cli._metrics import ServeMetrics, zero_ads_series
from smc.cli._serve_xds import _Xds
from smc.events import ChainVerifier, for_role
from smc.projections import (
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
)

if TYPE_CHECKING:
    from aiohttp import web

    from smc.cli._serve_auth import ApiAuthOptions
    from smc.informers import KubeEndpoint


def _verifier(trust: str) -> ChainVerifier:
    from smc.audit import load_trust

    return ChainVerifier(trust=load_trust(trust))


def _state_handler(runner: ProjectionRunner) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /debug/state``: position, events applied, duplicates dropped and the digest of
    every projection (as ``smc log replay --json`` prints them), to compare replicas."""

    from aiohttp import web

    async def state(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "caught_up": runner.caught_up.is_set(),
                "position": runner.position.to_json(),
                "applied": runner.applied,
                "duplicates": runner.duplicates,
                "digests": runner.digests(),
                "skipped": runner.skipped,
            }
        )

    return state


async def _start_api(
    runner: ProjectionRunner,
    stop: asyncio.Event,
    http: tuple[str, int] | None,
    inventory: str | None,
    inventory_interval: float,
    xds: _Xds | None = None,
    clouds: dict[str, dict[str, str]] | None = None,
    group_interval: float = 5.0,
    auth: ApiAuthOptions | None = None,
    kube: KubeEndpoint | None = None,
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
    changes = MeshChanges(log=for_role(runner.log, "api"), registry=registry, policy=policy)
    live = LiveMeshChanges(changes=changes, runner=runner)
    closers: list[Callable[[], Awaitable[None]]] = []
    tasks: list[asyncio.Task[None]] = []
    from smc.cli._vmgroups import start_vm_groups

    vm_groups, vm_groups_task = start_vm_groups(
        live=live, stop=stop, clouds=clouds or {}, interval=group_interval, xds=xds
    )
    tasks.append(vm_groups_task)
    if http is not None:
        from smc.cli._serve_auth import ApiAuthOptions, start_api_auth, vouch_principals
        from smc.projections import CertsProjection
        from smc.xds._debug import mount_debug

        certs = next(p for p in runner.projections if isinstance(p, CertsProjection))
        door = start_api_auth(auth or ApiAuthOptions(), http=http, runner=runner, kube=kube)
        vouch_principals(door.guard, changes.log, basis="kubernetes" if kube else "grants")
        ctx = ApiContext(
            live=live,
            runner=runner,
            registry=registry,
            policy=policy,
            certs=certs,
            serving=xds.listening if xds is not None else None,
        )
        app = create_app(ctx, guard=door.guard)
        app.router.add_get("/debug/state", _state_handler(runner))
        serve_metrics = ServeMetrics(runner)
        app.middlewares.insert(0, serve_metrics.middleware())
        if xds is not None:
            zero_ads_series(xds.server.metrics)
        mount_debug(
            app,
            controller=xds.controller if xds is not None else None,
            server=xds.server if xds is not None else None,
            registries=[
                door.guard.registry,
                *([xds.metrics] if xds is not None else []),
                vm_groups.metrics,
                serve_metrics.registry,
            ],
        )
        from smc.console import mount_console
        from smc.console._serve import console_hub

        mount_console(
            app,
            console_hub(
                runner=runner,
                server=xds.server if xds is not None else None,
                controller=xds.controller if xds is not None else None,
                traffic=xds.traffic if xds is not None else None,
            ),
        )
        try:
            app_runner = await start_http(
                app, host=http[0], port=http[1], ssl_context=door.ssl_context
            )
        except OSError as exc:
            raise ApiError(
                f"cannot serve the HTTP API on {http[0]}:{http[1]}: {exc.strerror or exc}; "
                "choose another with --http HOST:PORT or disable it with --http off"
            ) from exc
        closers.append(app_runner.cleanup)
        closers.extend(door.closers)
        tasks.append(asyncio.create_task(door.follow_mesh_roots(runner, stop)))
        click.echo(
            f"HTTP API on https://{http[0]}:{http[1]} (OpenAPI: /openapi.json, console: "
            f"/console/); credentials for the CLI in {door.credentials_path}",
            err=True,
        )
    if inventory is not None:
        provider = InventoryDirectoryProvider(inventory, interval=inventory_interval)
        bridge = ProviderBridge(provider_name=provider.name, live=live)

        async def run_provider() -> None:
            await runner.caught_up.wait()
            await provider.run(sink=bridge, stop=stop)

        tasks.append(asyncio.create_task(run_provider()))
        click.echo(f"VM provider inventory watching {inventory}", err=True)
    return closers, tasks
