"""``smc serve --cloud NAME:key=value,...``: the VirtualMachineGroup controller inside serve.

Role: parses the ``--cloud`` options (which cloud providers this server may call, and their
options: ``endpoint_url``, ``region``, ``profile``, ``page_size``, ``resync_seconds``,
``timeout``; credentials come from the provider's own chain, never from a flag), builds the
:class:`smc.informers.VmGroupController` (drains wait for the xDS server's ACKs, new
instances serve once their proxy ACKed its listeners, and, when this server signs agents'
CSRs with ``--ca-listen``, groups get join tokens in their user data) and runs it.
Kept out of ``_serve.py`` so that module only carries the hook.
Concurrency: called on the serve loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click

from smc.errors import SMCError

if TYPE_CHECKING:
    from smc.api import LiveMeshChanges
    from smc.informers import CloudProvider, VmGroupController

__all__ = ["parse_clouds", "proxy_ready_check", "start_vm_groups"]

_SECRET_KEYS = ("secret", "password", "token", "access_key", "key_id")


def parse_clouds(specs: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["aws:endpoint_url=http://...,region=eu-west-1", "azure"]`` -> name -> options."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, _, rest = spec.partition(":")
        name = name.strip()
        if not name:
            raise click.BadParameter(f"{spec!r}: a provider name is missing", param_hint="--cloud")
        opts: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise click.BadParameter(
                    f"{spec!r}: {item!r} is not key=value", param_hint="--cloud"
                )
            if any(s in key.lower() for s in _SECRET_KEYS):
                raise click.BadParameter(
                    f"{spec!r}: {key} looks like a credential; give credentials through the "
                    "provider's own chain (environment, profile, instance role), not a flag",
                    param_hint="--cloud",
                )
            opts[key] = value
        out[name] = opts
    return out


def proxy_ready_check(server: Any) -> Callable[[str], bool]:
    """``ready(node_id)``: a proxy with that node id has a stream open to ``server`` (an
    :class:`smc.xds.AdsServer`) and ACKed its listeners."""
    from smc.xds._types import LISTENER

    def ready(node_id: str) -> bool:
        for p in server.proxies():
            if p.node_id == node_id:
                ts = p.types.get(LISTENER)
                if ts is not None and ts.acked_version:
                    return True
        return False

    return ready


def _join_tokens(xds: Any) -> Any:
    """Join tokens for VM groups when this server signs agents' CSRs (``--ca-listen``): the
    instances are told the certificate service's and ADS's listen addresses (a wildcard
    listen address cannot be told: no tokens then, and a warning)."""
    identity = getattr(xds, "identity", None)
    if identity is None:
        return None
    from smc.identity import GroupJoinTokens

    ca_host, ca_port = identity.options.listen
    ads_host, ads_port = xds.addr
    if "0.0.0.0" in (ca_host, ads_host) or "::" in (ca_host, ads_host):
        click.echo(
            "VM groups: no join tokens (--ca-listen and --xds must name an address instances "
            "can reach, not a wildcard)",
            err=True,
        )
        return None

    def bundle() -> str:
        issuer = xds.issuers.current() if xds.issuers is not None else None
        return "".join(issuer.trust_bundle()) if issuer is not None else ""

    return GroupJoinTokens(
        ca=f"{ca_host}:{ca_port}", ads=f"{ads_host}:{ads_port}", ca_bundle=bundle
    )


def start_vm_groups(
    *,
    live: LiveMeshChanges,
    stop: asyncio.Event,
    clouds: Mapping[str, Mapping[str, str]],
    interval: float,
    xds: Any = None,
) -> tuple[VmGroupController, asyncio.Task[None]]:
    """Load the providers, build the controller and start it (returns it and its task)."""
    from smc.events import for_role
    from smc.informers import VmGroupController, load_cloud_provider

    providers: dict[str, CloudProvider] = {}
    for name, options in clouds.items():
        try:
            providers[name] = load_cloud_provider(name, **dict(options))
        except SMCError:
            raise
        except (TypeError, ValueError, ImportError) as exc:
            raise click.BadParameter(f"{name}: {exc}", param_hint="--cloud") from exc
    waiter = None
    ready = None
    join = None
    if xds is not None:
        controller = xds.controller
        ready = proxy_ready_check(xds.server)
        join = _join_tokens(xds)

        async def waiter(event_id: str, timeout: float) -> None:
            await controller.wait_acked(event_id, timeout=timeout)

    groups = VmGroupController(
        live=live,
        providers=providers,
        interval=interval,
        drain_waiter=waiter,
        ready_check=ready,
        join_tokens=join,
        # followers (--ca follow) never append: the issuing replica polls and drains
        read_only=bool(getattr(xds, "follow", False)),
        certs_log=for_role(live.runner.log, "ca"),  # join tokens: only the CA writes smc.certs
    )

    async def run() -> None:
        try:
            await groups.run(stop=stop)
        finally:
            await groups.close()

    if providers:
        click.echo(f"VM groups: cloud providers {', '.join(sorted(providers))}", err=True)
    return groups, asyncio.create_task(run())
