"""Wiring of the console into ``smc serve``: the hub over the runner, the ADS server and the
controller of one serve process.

Role: :func:`console_hub` builds a :class:`~smc.console.ConsoleHub` whose proxies come from the
ADS server (a proxy is ACKed when every type it was sent is ACKed at the sent version, NACKed
when its last answer to any type was a NACK) and whose current configs come from the controller
(keys redacted, as ``/debug/config_dump``).
Concurrency: build and use it on the serve loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from smc.api import LiveMeshChanges
from smc.console._graph import ProxyState
from smc.console._routes import ConsoleHub, mount_console
from smc.events import ChainVerifier, open_log
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.projections._policyview import PolicyView
from smc.xds._controller import XdsController
from smc.xds._debug import config_dump
from smc.xds._metrics_sink import MetricsSink
from smc.xds._server import AdsServer

__all__ = ["console_hub", "start_console_app"]


def console_hub(
    *,
    runner: ProjectionRunner,
    server: AdsServer | None = None,
    controller: XdsController | None = None,
    traffic: MetricsSink | None = None,
) -> ConsoleHub:
    registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    url = runner.log.url

    def proxies() -> Iterator[ProxyState]:
        if server is None:
            return
        for p in server.proxies():
            sent = [t for t in p.types.values() if t.sent_version]
            yield ProxyState(
                node_id=p.node_id,
                acked=bool(sent) and all(t.acked_version == t.sent_version for t in sent),
                nacked=any(
                    t.last_nack is not None and t.acked_version != t.sent_version
                    for t in p.types.values()
                ),
            )

    def dump(node: str) -> dict[str, Any] | None:
        return config_dump(controller, node) if controller is not None else None

    def verifier() -> ChainVerifier | None:  # past states are verified as the live one is
        live = runner.verifier
        return ChainVerifier(trust=live.trust) if live is not None else None

    return ConsoleHub(
        runner=runner,
        verifier=verifier,
        view=PolicyView(registry=registry, policy=policy),
        open_log=lambda: open_log(url),
        proxies=proxies,
        traffic=traffic.edges if traffic is not None else lambda: (),
        config_dump=dump,
    )


async def start_console_app(
    *,
    runner: ProjectionRunner,
    live: LiveMeshChanges,
    host: str,
    port: int,
    server: AdsServer | None = None,
    controller: XdsController | None = None,
    traffic: MetricsSink | None = None,
) -> tuple[web.AppRunner, str, Path]:
    """Serve the API with the console on ``host:port`` for an in-process control plane
    (``smc demo``), over HTTPS behind the same door as ``smc serve`` (the local admin
    credential, AccessGrants); returns the app runner (``cleanup()`` it), the page URL and
    the admin token's file (paste the token in the page, or add ``#token=...`` to the URL:
    the fragment is never sent to the server)."""
    from smc.api import ApiContext, create_app, start_http
    from smc.auth import open_door
    from smc.projections import CertsProjection

    registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    certs = next((p for p in runner.projections if isinstance(p, CertsProjection)), None)
    from smc.auth import config_root

    # one folder for every demo run (its port changes): the same CA and admin token each time
    door = open_door(
        host=host, port=port, policy=policy, certs=certs, folder=config_root() / "demo"
    )
    app = create_app(
        ApiContext(live=live, runner=runner, registry=registry, policy=policy, certs=certs),
        guard=door.guard,
    )
    mount_console(
        app,
        console_hub(runner=runner, server=server, controller=controller, traffic=traffic),
    )
    app_runner = await start_http(app, host=host, port=port, ssl_context=door.ssl_context)
    return app_runner, f"{door.url}/console/", door.token_path
