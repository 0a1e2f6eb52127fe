"""VM providers: the plugin interface for sources that report virtual machines, and the bridge
that turns their reports into events.

Role: a :class:`VMProvider` (found through the entry point group ``smc.vm_providers``) watches
some inventory (a directory, a cloud API, a CMDB) and reports :class:`VMReport` values to a
:class:`VMSink`: either the full desired set of its VMs (and MeshServices), or changes. The
:class:`ProviderBridge` sink applies them through :class:`smc.api.LiveMeshChanges` with actor and
source ``vm-provider:<name>``, marks what it created as managed by the provider (label
``smc.dev/managed-by: vm-provider.<name>``), and on a full report removes what the provider
owned but no longer lists. Event ids come from the causes the provider gives (for the inventory
directory: the file's content hash and mtime), so replicas watching the same inventory append
each change once.
Concurrency: providers and the bridge run as tasks on the asyncio loop of ``smc serve``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from smc.api import ChangeReport, LiveMeshChanges, current_resources
from smc.informers._errors import ProviderNotFound
from smc.smi import ManifestError, MeshService, Resource, VirtualMachine, resource_key

__all__ = [
    "ENTRY_POINT_GROUP",
    "ProviderBridge",
    "VMProvider",
    "VMReport",
    "VMSink",
    "available_vm_providers",
    "load_vm_provider",
]

log = logging.getLogger("smc.informers.vm")

ENTRY_POINT_GROUP = "smc.vm_providers"
_BUILTIN = {"inventory": "smc.informers.inventory:InventoryDirectoryProvider"}


@dataclass(frozen=True, kw_only=True, slots=True)
class VMReport:
    """What a provider saw.

    ``full=True``: ``resources`` is the provider's complete desired set (VirtualMachines and
    MeshServices); anything it owned before and does not list now is removed.
    ``full=False``: ``resources`` are upserted and ``removed`` (``Kind/ns/name`` keys) deleted.
    ``causes`` maps a resource key to the cause its event ids derive from (e.g. a file's path
    and content hash); ``cause`` is used for keys without one and for removals.
    ``errors`` are problems in the inventory, reported but not fatal.
    """

    full: bool
    resources: tuple[Resource, ...]
    cause: str
    causes: Mapping[str, str] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    errors: tuple[ManifestError, ...] = ()


@runtime_checkable
class VMSink(Protocol):
    """Receives reports from a provider."""

    async def report(self, report: VMReport) -> None: ...


@runtime_checkable
class VMProvider(Protocol):
    """A source of VMs. ``run`` reports to ``sink`` until ``stop`` is set, then returns."""

    name: str

    async def run(self, *, sink: VMSink, stop: asyncio.Event) -> None: ...


def available_vm_providers() -> dict[str, str]:
    """Provider name -> ``module:Class``, from entry points (built-ins when not installed)."""
    out = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out[ep.name] = ep.value
    return out


def load_vm_provider(name: str, **options: Any) -> VMProvider:
    """Instantiate provider ``name`` with ``options`` (e.g. ``directory=...``)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            factory = ep.load()
            break
    else:
        if name not in _BUILTIN:
            known = ", ".join(sorted(available_vm_providers()))
            raise ProviderNotFound(f"no VM provider named {name!r} (available: {known})")
        import importlib

        module, _, attr = _BUILTIN[name].partition(":")
        factory = getattr(importlib.import_module(module), attr)
    provider = factory(**options)
    if not isinstance(provider, VMProvider):
        raise ProviderNotFound(f"VM provider {name!r} does not implement VMProvider")
    return provider


class ProviderBridge:
    """A :class:`VMSink` that applies reports through :class:`LiveMeshChanges`."""

    KINDS = (VirtualMachine, MeshService)

    def __init__(self, *, provider_name: str, live: LiveMeshChanges) -> None:
        self.provider_name = provider_name
        self.live = live
        self.actor = f"vm-provider:{provider_name}"
        self.owner = f"vm-provider.{provider_name}"
        #: The outcome of the latest report (apply, delete), for debugging and tests.
        self.last: tuple[ChangeReport | None, ChangeReport | None] = (None, None)
        self.reports = 0

    async def report(self, report: VMReport) -> None:
        for e in report.errors:
            log.warning("%s: %s", self.actor, e)
        resources = [r for r in report.resources if isinstance(r, self.KINDS)]
        for r in report.resources:
            if not isinstance(r, self.KINDS):
                log.warning("%s: ignoring %s (only VirtualMachine, MeshService)", self.actor, r)
        causes = dict(report.causes)

        def seed(key: str) -> str:
            return f"{self.actor}\x1f{causes.get(key, report.cause)}"

        applied = await self.live.apply(
            resources,
            actor=self.actor,
            source=self.actor,
            request_id=report.cause,
            owner=self.owner,
            id_seed=seed,
        )
        for res in applied.results:
            for e in res.errors:
                log.warning("%s: refused %s", self.actor, e)
        await self.live.runner.caught_up.wait()
        current = current_resources(
            registry=self.live.changes.registry, policy=self.live.changes.policy
        )
        owned = {k: r for k, (r, owner) in current.items() if owner == self.owner}
        if report.full:
            wanted = {resource_key(r) for r in resources}
            gone = [r for k, r in sorted(owned.items()) if k not in wanted]
        else:
            gone = [owned[k] for k in report.removed if k in owned]
        deleted = None
        if gone:
            # VMs first so that a service is not refused for still being named by one of them
            gone.sort(key=lambda r: 0 if isinstance(r, VirtualMachine) else 1)

            def removal_seed(key: str) -> str:
                return f"{self.actor}\x1fremoved\x1f{report.cause}"

            deleted = await self.live.delete(
                gone,
                actor=self.actor,
                source=self.actor,
                request_id=report.cause,
                ignore_not_found=True,
                id_seed=removal_seed,
            )
            for res in deleted.results:
                for e in res.errors:
                    log.warning("%s: cannot remove: %s", self.actor, e)
        self.last = (applied, deleted)
        self.reports += 1
