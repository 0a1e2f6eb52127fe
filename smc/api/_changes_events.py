"""Mesh resources to events: the mapping documented in :mod:`smc.api._changes`.

Role: builds the upsert events of a resource (deterministic ids from the request and the
resource key), its delete event, and a MeshConfig's settings map.
Concurrency: pure functions.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

from smc.api._changes_model import _SMI_KINDS, MANAGED_BY_LABEL
from smc.events import (
    Event,
    MeshConfigChanged,
    ServiceAccountUpserted,
    ServiceRemoved,
    ServiceUpserted,
    SmiResourceApplied,
    SmiResourceDeleted,
    WorkloadJoined,
    WorkloadLeft,
    deterministic_id,
    make_event,
)
from smc.events import ServicePort as EvServicePort
from smc.events import WorkloadPort as EvWorkloadPort
from smc.projections import canonical_json
from smc.projections._policy import DEFAULT_CERT_LIFETIME, DEFAULT_TRUST_DOMAIN
from smc.projections._policyview import BACKS_LABEL_PREFIX
from smc.smi import (
    MeshConfig,
    MeshService,
    Resource,
    VirtualMachine,
    resource_key,
    to_manifest,
)


def _ids(cause: str, key: str) -> Callable[[str], str]:
    def make(suffix: str) -> str:
        parts = ("api", cause, key) if not suffix else ("api", cause, key, suffix)
        return deterministic_id(*parts)

    return make


def _upsert_events(
    r: Resource,
    *,
    actor: str,
    source: str,
    cause: str,
    owner: str | None,
    known_sas: Container[tuple[str, str]],
    added_sas: set[tuple[str, str]],
) -> list[Event]:
    """The events that record ``r``; a VM's service account is upserted unless the registry
    knows it (``known_sas``) or an earlier resource of the same plan added it (``added_sas``,
    updated here)."""
    key = resource_key(r)
    ids = _ids(cause, key)
    common: dict[str, Any] = {"actor": actor, "source": source, "correlation_id": cause}
    if isinstance(r, _SMI_KINDS):
        manifest = to_manifest(r)
        return [
            make_event(
                SmiResourceApplied,
                event_id=ids(""),
                kind=r.KIND,
                api_version=str(manifest["apiVersion"]),
                namespace=r.namespace,
                name=r.name,
                manifest_json=canonical_json(manifest),
                **common,
            )
        ]
    if isinstance(r, MeshService):
        return [
            make_event(
                ServiceUpserted,
                event_id=ids(""),
                namespace=r.namespace,
                name=r.name,
                ports=tuple(
                    EvServicePort(
                        name=p.name, port=p.port, protocol=p.protocol, target_port=p.target_port
                    )
                    for p in r.ports
                ),
                backing=r.backing,
                selector=dict(r.selector),
                labels={MANAGED_BY_LABEL: owner} if owner else {},
                **common,
            )
        ]
    if isinstance(r, VirtualMachine):
        labels = dict(r.labels)
        for s in r.services:
            labels[BACKS_LABEL_PREFIX + s] = "true"
        if owner:
            labels[MANAGED_BY_LABEL] = owner
        out: list[Event] = []
        sa = (r.namespace, r.service_account)
        if sa not in known_sas and sa not in added_sas:
            added_sas.add(sa)
            out.append(
                make_event(
                    ServiceAccountUpserted,
                    event_id=ids("ServiceAccountUpserted"),
                    namespace=r.namespace,
                    name=r.service_account,
                    **common,
                )
            )
        out.append(
            make_event(
                WorkloadJoined,
                event_id=ids(""),
                kind="vm",
                namespace=r.namespace,
                name=r.name,
                address=r.address,
                service_account=r.service_account,
                labels=labels,
                ports=tuple(
                    EvWorkloadPort(name=p.name, port=p.port, protocol=p.protocol) for p in r.ports
                ),
                **common,
            )
        )
        return out
    if isinstance(r, MeshConfig):
        return [
            make_event(
                MeshConfigChanged,
                event_id=ids(""),
                permissive=r.permissive_traffic_mode,
                trust_domain=r.trust_domain,
                cert_lifetime_seconds=r.certificate_lifetime_seconds,
                settings=mesh_settings(r),
                **common,
            )
        ]
    raise TypeError(f"not a mesh resource: {type(r).__name__}")  # pragma: no cover


def mesh_settings(r: MeshConfig) -> dict[str, str]:
    """The ``settings`` of the MeshConfigChanged event of ``r``: its ``ns/name`` and the
    settings that differ from the defaults (``enableEgress``, ``observability`` JSON)."""
    out = {"resource": f"{r.namespace}/{r.name}"}
    if not r.enable_egress:
        out["enableEgress"] = "false"
    if r.observability:
        out["observability"] = r.observability
    return out


def _delete_event(r: Resource, *, actor: str, source: str, cause: str) -> Event:
    ids = _ids(cause, resource_key(r))
    common: dict[str, Any] = {
        "actor": actor,
        "source": source,
        "correlation_id": cause,
        "event_id": ids("delete"),
    }
    if isinstance(r, _SMI_KINDS):
        return make_event(
            SmiResourceDeleted, kind=r.KIND, namespace=r.namespace, name=r.name, **common
        )
    if isinstance(r, MeshService):
        return make_event(ServiceRemoved, namespace=r.namespace, name=r.name, **common)
    if isinstance(r, VirtualMachine):
        return make_event(WorkloadLeft, kind="vm", namespace=r.namespace, name=r.name, **common)
    if isinstance(r, MeshConfig):
        return make_event(
            MeshConfigChanged,
            permissive=False,
            trust_domain=DEFAULT_TRUST_DOMAIN,
            cert_lifetime_seconds=DEFAULT_CERT_LIFETIME,
            settings={},
            **common,
        )
    raise TypeError(f"not a mesh resource: {type(r).__name__}")  # pragma: no cover
