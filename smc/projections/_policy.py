"""Policy projection: applied SMI (and SMC mesh) resources, and the mesh configuration.

Role: folds ``smc.policy`` events. Stores each resource's manifest exactly as applied
(canonical JSON), keyed by kind/namespace/name; turning manifests into policy decisions is the
pure SMI layer's job (:mod:`smc.smi`), done at query time, never during the fold, so a replay
never depends on anything but the log.
Concurrency: single-threaded (see :mod:`smc.projections._base`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from smc.events import POLICY, Event, MeshConfigChanged, SmiResourceApplied, SmiResourceDeleted
from smc.projections._base import canonical_digest

__all__ = ["MeshConfig", "PolicyProjection", "StoredResource"]

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CERT_LIFETIME = 24 * 3600


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredResource:
    kind: str
    api_version: str
    namespace: str
    name: str
    manifest_json: str

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.manifest_json)
        return data


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshConfig:
    permissive: bool = False
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_lifetime_seconds: int = DEFAULT_CERT_LIFETIME
    settings: tuple[tuple[str, str], ...] = field(default_factory=tuple)


class PolicyProjection:
    """SMI resources and mesh settings, rebuilt from ``smc.policy``."""

    name = "policy"
    streams = frozenset({POLICY})
    #: Event types that set their aggregate\'s whole state here (earlier events of that
    #: aggregate stop mattering); lets a rebuild skip superseded records.
    replacing_types = frozenset(
        {SmiResourceApplied.TYPE, SmiResourceDeleted.TYPE, MeshConfigChanged.TYPE}
    )

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str, str], StoredResource] = {}
        self.mesh = MeshConfig()
        #: Bumped on every applied change; lets callers cache derived policy cheaply.
        self.generation = 0

    def apply(self, event: Event) -> None:
        if isinstance(event, SmiResourceApplied):
            self.resources[(event.kind, event.namespace, event.name)] = StoredResource(
                kind=event.kind,
                api_version=event.api_version,
                namespace=event.namespace,
                name=event.name,
                manifest_json=event.manifest_json,
            )
        elif isinstance(event, SmiResourceDeleted):
            self.resources.pop((event.kind, event.namespace, event.name), None)
        elif isinstance(event, MeshConfigChanged):
            self.mesh = MeshConfig(
                permissive=event.permissive,
                trust_domain=event.trust_domain,
                cert_lifetime_seconds=event.cert_lifetime_seconds,
                settings=tuple(sorted(event.settings.items())),
            )
        else:
            return
        self.generation += 1

    def of_kind(self, kind: str) -> list[StoredResource]:
        return sorted(
            (r for (k, _, _), r in self.resources.items() if k == kind),
            key=lambda r: (r.namespace, r.name),
        )

    def _plain(self) -> dict[str, Any]:
        return {
            "resources": {
                f"{k}/{ns}/{n}": [r.api_version, r.manifest_json]
                for (k, ns, n), r in self.resources.items()
            },
            "mesh": {
                "permissive": self.mesh.permissive,
                "trust_domain": self.mesh.trust_domain,
                "cert_lifetime_seconds": self.mesh.cert_lifetime_seconds,
                "settings": [list(x) for x in self.mesh.settings],
            },
        }

    def digest(self) -> str:
        return canonical_digest(self._plain())

    def checkpoint(self) -> dict[str, Any]:
        return {**self._plain(), "generation": self.generation}

    def restore(self, data: dict[str, Any]) -> None:
        resources = {}
        for key, (api_version, manifest_json) in data["resources"].items():
            k, ns, n = key.split("/", 2)
            resources[(k, ns, n)] = StoredResource(
                kind=k, api_version=api_version, namespace=ns, name=n, manifest_json=manifest_json
            )
        m = data["mesh"]
        self.resources = resources
        self.mesh = MeshConfig(
            permissive=bool(m["permissive"]),
            trust_domain=str(m["trust_domain"]),
            cert_lifetime_seconds=int(m["cert_lifetime_seconds"]),
            settings=tuple((a, b) for a, b in m["settings"]),
        )
        self.generation = int(data.get("generation", 0))
