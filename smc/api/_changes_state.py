"""The current mesh state read back from the projections as model resources.

Role: :func:`current_resources` turns the registry and policy projections into
``Kind/ns/name -> (resource, owner)``, stripping the reserved labels the write path adds; the
base every plan of :mod:`smc.api._changes` compares against. :class:`CurrentResources` is the
same as a lazy mapping (one key read when asked for) with a write overlay: what plans use, so
that planning a small change does not cost a pass over the whole mesh.
Concurrency: reads the projections: call it on the thread that applies events to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any, cast

from smc.api._changes_model import MANAGED_BY_LABEL
from smc.projections import PolicyProjection, RegistryProjection
from smc.projections._policyview import BACKS_LABEL_PREFIX
from smc.projections._registry import Service, Workload
from smc.smi import (
    ManifestErrors,
    MeshConfig,
    MeshService,
    Resource,
    ServicePort,
    VirtualMachine,
    WorkloadPort,
    parse_manifest,
    resource_key,
)

# -- reading the current state back as resources -------------------------------------------


def _split_labels(
    labels: Iterable[tuple[str, str]],
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...], str | None]:
    plain: list[tuple[str, str]] = []
    services: list[str] = []
    owner: str | None = None
    for k, v in labels:
        if k == MANAGED_BY_LABEL:
            owner = v
        elif k.startswith(BACKS_LABEL_PREFIX):
            services.append(k[len(BACKS_LABEL_PREFIX) :])
        else:
            plain.append((k, v))
    return tuple(sorted(plain)), tuple(sorted(services)), owner


def _policy_entry(key: str, stored: Any) -> tuple[Resource, str | None] | None:
    try:
        return (parse_manifest(stored.manifest(), document=key), None)
    except (ManifestErrors, ValueError):
        return None  # written by a newer/older SMC: not ours to validate


def _mesh_config(policy: PolicyProjection) -> MeshConfig | None:
    """The mesh config as a MeshConfig resource, when one set it (else ``None``)."""
    settings = dict(policy.mesh.settings)
    ref = settings.get("resource")
    if not ref or "/" not in ref:
        return None
    ns, name = ref.split("/", 1)
    return MeshConfig(
        namespace=ns,
        name=name,
        permissive_traffic_mode=policy.mesh.permissive,
        trust_domain=policy.mesh.trust_domain,
        certificate_lifetime_seconds=policy.mesh.cert_lifetime_seconds,
        enable_egress=settings.get("enableEgress", "true") == "true",
        observability=settings.get("observability", ""),
    )


def _service_entry(svc: Service) -> tuple[Resource, str | None]:
    ms = MeshService(
        namespace=svc.namespace,
        name=svc.name,
        ports=tuple(
            ServicePort(
                name=p.name,
                port=p.port,
                protocol=cast(Any, p.protocol),
                target_port=p.target_port,
            )
            for p in svc.ports
        ),
        backing=cast(Any, svc.backing),
        selector=svc.selector,
    )
    return (ms, dict(svc.labels).get(MANAGED_BY_LABEL))


def _vm_entry(w: Workload) -> tuple[Resource, str | None]:
    labels, services, owner = _split_labels(w.labels)
    vm = VirtualMachine(
        namespace=w.namespace,
        name=w.name,
        address=w.address,
        ports=tuple(
            WorkloadPort(name=p.name, port=p.port, protocol=cast(Any, p.protocol)) for p in w.ports
        ),
        service_account=w.service_account,
        labels=labels,
        services=services,
    )
    return (vm, owner)


def current_resources(
    *, registry: RegistryProjection, policy: PolicyProjection
) -> dict[str, tuple[Resource, str | None]]:
    """Everything the projections hold, as model resources keyed by ``Kind/ns/name``, each with
    its owner (``smc.dev/managed-by``) or ``None``.

    Services become MeshServices, VM workloads VirtualMachines, SMI manifests their model
    objects; the mesh config appears when it was set by a MeshConfig resource.
    """
    return dict(CurrentResources(registry=registry, policy=policy).items())


Entry = tuple[Resource, str | None]


class CurrentResources(MutableMapping[str, Entry]):
    """:func:`current_resources` as a lazy mapping with a write overlay.

    A key is read from the projections only when asked for (``O(1)`` per lookup, memoised), so a
    plan of a few documents costs the same with 20 or 20,000 resources in the mesh. Writes
    (``m[key] = entry``, ``del m[key]``) go to an overlay and never touch the projections:
    that is how a group commit lets each plan of a round start from what the earlier ones
    leave. Iteration order is that of :func:`current_resources` (SMI/OSM resources, the
    MeshConfig, services, VMs), keys written that were not there (or were deleted) last, as for
    a dict; iterating materialises everything (only deletions need that).
    """

    def __init__(self, *, registry: RegistryProjection, policy: PolicyProjection) -> None:
        self._registry = registry
        self._policy = policy
        self._memo: dict[str, Entry | None] = {}
        self._over: dict[str, Entry | None] = {}  # None: deleted
        self._tail: dict[str, None] = {}  # keys iterated after the projections' ones

    def _stored(self, key: str) -> Entry | None:
        if key in self._memo:
            return self._memo[key]
        kind, _, rest = key.partition("/")
        ns, sep, name = rest.partition("/")
        value: Entry | None = None
        if sep:
            if kind == "MeshService":
                svc = self._registry.services.get((ns, name))
                value = _service_entry(svc) if svc is not None else None
            elif kind == "VirtualMachine":
                w = self._registry.workloads.get(("vm", ns, name))
                value = _vm_entry(w) if w is not None else None
            elif kind == "MeshConfig":
                cfg = _mesh_config(self._policy)
                value = (cfg, None) if cfg is not None and resource_key(cfg) == key else None
            else:
                stored = self._policy.resources.get((kind, ns, name))
                value = _policy_entry(key, stored) if stored is not None else None
        self._memo[key] = value
        return value

    def _base_keys(self, kind: str | None) -> Iterator[str]:
        special = ("MeshConfig", "MeshService", "VirtualMachine")
        if kind is None or kind not in special:
            for k, ns, name in self._policy.resources:
                if kind is None or k == kind:
                    yield f"{k}/{ns}/{name}"
        if kind in (None, "MeshConfig"):
            cfg = _mesh_config(self._policy)
            if cfg is not None:
                yield resource_key(cfg)
        if kind in (None, "MeshService"):
            for ns, name in self._registry.services:
                yield f"MeshService/{ns}/{name}"
        if kind in (None, "VirtualMachine"):
            for wkind, ns, name in self._registry.workloads:
                if wkind == "vm":
                    yield f"VirtualMachine/{ns}/{name}"

    def keys_of_kind(self, kind: str | None = None) -> Iterator[str]:
        """The keys (of ``kind``, or all), in iteration order, without building the others."""
        for key in self._base_keys(kind):
            if key not in self._tail and key in self:
                yield key
        prefix = f"{kind}/" if kind is not None else ""
        yield from (k for k in self._tail if k.startswith(prefix))

    def __getitem__(self, key: str) -> Entry:
        value = self._over[key] if key in self._over else self._stored(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Entry) -> None:
        if key not in self:  # new (or deleted before): iterated last, as in a dict
            self._tail[key] = None
        self._over[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._over[key] = None
        self._tail.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return self.keys_of_kind(None)

    def __len__(self) -> int:
        return sum(1 for _ in self)
