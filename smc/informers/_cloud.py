"""Cloud VM providers: the interface a VirtualMachineGroup's membership comes from.

Role: a cloud provider lists the instances of a group, either a cloud group (an AWS Auto
Scaling group, an Azure VM scale set) or the instances whose labels (tags) match a selector.
Providers are plugins of the entry point group ``smc.vm_providers`` (the group the inventory
provider lives in); a provider class implements :class:`CloudProvider`, and
:func:`load_cloud_provider` instantiates one by name with options from ``smc serve
--cloud NAME:key=value,...`` (endpoint, credentials profile; never in a manifest).

The contract that keeps polling cheap: ``list_instances`` receives the instances it returned
last time (``known``) and may reuse them for instances whose membership record did not change,
describing only new or changed ones; it raises :class:`ProviderUnavailable` when the cloud
cannot be read (the controller then keeps the last known instances and marks the group stale).
An Azure scale set provider is a second module implementing the same protocol
(``list_instances`` over the scale set's VM list, instance ids ``0``, ``1``..., tags as labels).
Concurrency: ``list_instances`` is a coroutine on the serve loop; blocking SDK calls run in
worker threads inside the provider.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol, runtime_checkable

from smc.informers._errors import InformersError, ProviderNotFound

__all__ = [
    "CloudInstance",
    "CloudProvider",
    "GroupQuery",
    "ProviderStats",
    "ProviderUnavailable",
    "UserDataDelivery",
    "load_cloud_provider",
    "tags_to_labels",
]

InstanceState = Literal["pending", "running", "stopping", "stopped", "terminating", "terminated"]

_BUILTIN = {"aws": "smc.informers.aws:AwsProvider"}


class ProviderUnavailable(InformersError):
    """The provider's API could not be read (network, throttling, credentials, 5xx)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupQuery:
    """Which instances make up a group: a cloud group, or a tag selector, in ``region``."""

    cloud_group: str | None
    selector: tuple[tuple[str, str], ...] = ()
    region: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class CloudInstance:
    """One instance as the provider sees it.

    ``incarnation`` identifies this life of the instance (e.g. its launch time): a replaced
    instance reusing an id is a new incarnation, so its events get new ids. ``labels`` are the
    instance's tags that are valid label names and values (see :func:`tags_to_labels`).
    A provider may return instances that just left the group (state ``terminated`` or
    ``terminating``) so that the controller learns why they left.
    """

    instance_id: str
    state: InstanceState
    address: str | None
    labels: tuple[tuple[str, str], ...] = ()
    incarnation: str = ""
    zone: str = ""
    #: Why a leaving instance leaves, when the provider knows (``scale-in``, ``terminated``).
    cause: str = ""

    @property
    def serving(self) -> bool:
        """Running with an address: it can be in the mesh."""
        return self.state == "running" and bool(self.address)


@dataclass(kw_only=True, slots=True)
class ProviderStats:
    """What polling cost: API calls made and instances described (for metrics/benchmarks)."""

    calls: int = 0
    described: int = 0
    calls_by_operation: dict[str, int] = field(default_factory=dict)

    def count(self, operation: str, described: int = 0) -> None:
        self.calls += 1
        self.described += described
        self.calls_by_operation[operation] = self.calls_by_operation.get(operation, 0) + 1


@runtime_checkable
class UserDataDelivery(Protocol):
    """Optional: a provider that can set the user data new instances of a group boot with
    (where a VirtualMachineGroup's join token travels)."""

    async def deliver_user_data(self, query: GroupQuery, user_data: str) -> bool:
        """True once new instances get ``user_data``; False when the group has no place for it
        (e.g. a tag selector). Raises ProviderUnavailable."""
        ...


@runtime_checkable
class CloudProvider(Protocol):
    """A source of VM group members (see the module docstring)."""

    name: str
    stats: ProviderStats

    async def list_instances(
        self, query: GroupQuery, *, known: Mapping[str, CloudInstance]
    ) -> tuple[CloudInstance, ...]:
        """Every current member of the group (any state); raises ProviderUnavailable."""
        ...

    async def close(self) -> None: ...


def load_cloud_provider(name: str, **options: Any) -> CloudProvider:
    """Instantiate cloud provider ``name`` (entry point group ``smc.vm_providers``)."""
    factory: Any = None
    for ep in entry_points(group="smc.vm_providers"):
        if ep.name == name:
            factory = ep.load()
            break
    if factory is None:
        target = _BUILTIN.get(name)
        if target is None:
            raise ProviderNotFound(
                f"no cloud VM provider named {name!r} (available: {', '.join(sorted(_BUILTIN))})"
            )
        module, _, attr = target.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    provider = factory(**options)
    if not isinstance(provider, CloudProvider):
        raise ProviderNotFound(f"VM provider {name!r} is not a cloud provider (list_instances)")
    return provider


_PASSED = frozenset({"smc.dev/app-port"})
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def tags_to_labels(tags: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Cloud tags as workload labels: tags that are valid label names and values are kept,
    the provider's own (``aws:``, ``azure:``) and SMC's reserved prefixes are dropped, except
    ``smc.dev/app-port`` (where the instance's application listens, read by the xDS builder)."""
    out = []
    for k, v in tags.items():
        if k in _PASSED:
            pass
        elif k.startswith(("aws:", "azure:", "smc.dev/", "backs.smc.dev/")):
            continue
        prefix, _, name = k.rpartition("/")
        if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
            continue
        if not (0 < len(name) <= 63 and _LABEL_NAME.match(name)):
            continue
        if len(v) > 63 or not _LABEL_VALUE.match(v):
            continue
        out.append((k, v))
    return tuple(sorted(out))
