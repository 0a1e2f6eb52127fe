"""The current mesh state read back from the projections as model resources.

Role: :func:`current_resources` turns the registry and policy projections into
``Kind/ns/name -> (resource, owner)``, stripping the reserved labels the write path adds; the
base every plan of :mod:`smc.api._changes` compares against.
Concurrency: reads the projections: call it on the thread that applies events to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from smc.api._changes_model import MANAGED_BY_LABEL
from smc.projections import PolicyProjection, RegistryProjection
from smc.projections._policyview import BACKS_LABEL_PREFIX
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


def current_resources(
    *, registry: RegistryProjection, policy: PolicyProjection
) -> dict[str, tuple[Resource, str | None]]:
    """Everything the projections hold, as model resources keyed by ``Kind/ns/name``, each with
    its owner (``smc.dev/managed-by``) or ``None``.

    Services become MeshServices, VM workloads VirtualMachines, SMI manifests their model
    objects; the mesh config appears when it was set by a MeshConfig resource.
    """
    out: dict[str, tuple[Resource, str | None]] = {}
    for (kind, ns, name), stored in policy.resources.items():
        key = f"{kind}/{ns}/{name}"
        try:
            out[key] = (parse_manifest(stored.manifest(), document=key), None)
        except (ManifestErrors, ValueError):
            continue  # written by a newer/older SMC: not ours to validate
    settings = dict(policy.mesh.settings)
    ref = settings.get("resource")
    if ref and "/" in ref:
        ns, name = ref.split("/", 1)
        cfg = MeshConfig(
            namespace=ns,
            name=name,
            permissive_traffic_mode=policy.mesh.permissive,
            trust_domain=policy.mesh.trust_domain,
            certificate_lifetime_seconds=policy.mesh.cert_lifetime_seconds,
            enable_egress=settings.get("enableEgress", "true") == "true",
            observability=settings.get("observability", ""),
        )
        out[resource_key(cfg)] = (cfg, None)
    for svc in registry.services.values():
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
        out[resource_key(ms)] = (ms, dict(svc.labels).get(MANAGED_BY_LABEL))
    for w in registry.workloads.values():
        if w.kind != "vm":
            continue
        labels, services, owner = _split_labels(w.labels)
        vm = VirtualMachine(
            namespace=w.namespace,
            name=w.name,
            address=w.address,
            ports=tuple(
                WorkloadPort(name=p.name, port=p.port, protocol=cast(Any, p.protocol))
                for p in w.ports
            ),
            service_account=w.service_account,
            labels=labels,
            services=services,
        )
        out[resource_key(vm)] = (vm, owner)
    return out
