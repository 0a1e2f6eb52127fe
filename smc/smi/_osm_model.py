"""The internal model of Open Service Mesh's policy kinds (``policy.openservicemesh.io/v1alpha1``).

Role: immutable value objects for Egress, IngressBackend, Retry and UpstreamTrafficSetting, the
traffic-management kinds OSM users bring with them. Each object keeps the typed fields the xDS
builder reads plus ``spec_json``, the canonical JSON of its normalised ``spec`` (sorted keys,
durations in Go syntax, CIDRs in compressed form), which is what :func:`smc.smi.to_manifest`
writes back; two manifests that mean the same thing therefore compare equal.
Durations are whole milliseconds; ``None`` means "not set" (Envoy's default applies).
Concurrency: frozen dataclasses, no shared mutable state; safe everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:  # _model imports this module for its Resource union
    from smc.smi._model import IdentityRef

__all__ = [
    "OSM_POLICY",
    "EgressPolicy",
    "EgressPort",
    "HTTPLocalRateLimit",
    "IngressBackendPolicy",
    "IngressBackendTarget",
    "IngressSource",
    "ObjectRef",
    "OsmResource",
    "OutlierDetection",
    "RetryPolicy",
    "RouteSetting",
    "TCPLocalRateLimit",
    "UpstreamTrafficSetting",
]

#: The API group/version of OSM's policy kinds.
OSM_POLICY = "policy.openservicemesh.io/v1alpha1"

RateUnit = Literal["second", "minute", "hour"]
UNIT_SECONDS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600}


@dataclass(frozen=True, kw_only=True, slots=True)
class _OsmBase:
    namespace: str
    name: str
    #: Canonical JSON of the normalised spec (what ``to_manifest`` writes back).
    spec_json: str

    def spec(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.spec_json)
        return data


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectRef:
    """A typed local object reference (``matches`` of Egress / IngressBackend)."""

    api_group: str
    kind: str
    name: str


@dataclass(frozen=True, kw_only=True, slots=True)
class EgressPort:
    number: int
    protocol: Literal["http", "https", "tcp"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EgressPolicy(_OsmBase):
    """Egress: ``sources`` may reach ``hosts`` (HTTP by Host, HTTPS by SNI) or ``ip_addresses``
    (CIDRs, any TCP) on ``ports``."""

    KIND: ClassVar[str] = "Egress"
    sources: tuple[IdentityRef, ...]
    hosts: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    ports: tuple[EgressPort, ...]
    matches: tuple[ObjectRef, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class IngressBackendTarget:
    """A backend service (in the policy's namespace) and the port ingress traffic arrives on;
    ``https``: TLS from the ingress, its certificate checked against the mesh CA unless
    ``skip_client_cert_validation``."""

    name: str
    port: int
    protocol: Literal["http", "https"]
    skip_client_cert_validation: bool = False
    sni_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class IngressSource:
    """``Service`` (its endpoints' addresses), ``AuthenticatedPrincipal`` (a certificate SAN)
    or ``IPRange`` (a CIDR, in ``name``)."""

    kind: Literal["Service", "AuthenticatedPrincipal", "IPRange"]
    name: str
    namespace: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class IngressBackendPolicy(_OsmBase):
    KIND: ClassVar[str] = "IngressBackend"
    backends: tuple[IngressBackendTarget, ...]
    sources: tuple[IngressSource, ...]
    matches: tuple[ObjectRef, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy(_OsmBase):
    """Retry: outbound requests of ``source`` to the ``destinations`` services (``ns/name``)."""

    KIND: ClassVar[str] = "Retry"
    source: IdentityRef
    destinations: tuple[str, ...]
    retry_on: str
    per_try_timeout_ms: int | None = None
    num_retries: int | None = None
    backoff_base_ms: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class TCPLocalRateLimit:
    connections: int
    unit: RateUnit
    burst: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class HTTPLocalRateLimit:
    requests: int
    unit: RateUnit
    burst: int = 0
    status: int = 429
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class OutlierDetection:
    """SMC extension of UpstreamTrafficSetting: eject an endpoint after ``consecutive_5xx``
    failures, for ``base_ejection_ms`` (times the number of ejections)."""

    consecutive_5xx: int = 5
    interval_ms: int = 10000
    base_ejection_ms: int = 30000
    max_ejection_percent: int = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class RouteSetting:
    """Settings of the upstream's HTTP routes whose path matches ``path`` (a regex anchored at
    the start, as SMI's ``pathRegex``); ``timeout_ms`` is an SMC extension."""

    path: str
    local: HTTPLocalRateLimit | None = None
    timeout_ms: int | None = None
    has_global: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class UpstreamTrafficSetting(_OsmBase):
    """Settings of traffic to the upstream ``service`` (``ns/name``, from ``spec.host``), or to
    an external host (``service`` empty: a host outside the mesh, such as ``api.github.com``,
    whose connection settings apply to the clusters of the Egress policies naming this setting
    in their ``matches``)."""

    KIND: ClassVar[str] = "UpstreamTrafficSetting"
    host: str
    service: str
    connect_timeout_ms: int | None = None
    max_connections: int | None = None
    max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_pending_requests: int | None = None
    max_retries: int | None = None
    local_tcp: TCPLocalRateLimit | None = None
    local_http: HTTPLocalRateLimit | None = None
    has_global: bool = False
    routes: tuple[RouteSetting, ...] = ()
    outlier: OutlierDetection | None = None


OsmResource = EgressPolicy | IngressBackendPolicy | RetryPolicy | UpstreamTrafficSetting
