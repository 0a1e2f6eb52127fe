"""The internal model every SMI (and SMC) manifest version normalises to.

Role: immutable value objects for TrafficTarget, HTTPRouteGroup, TCPRoute, UDPRoute,
TrafficSplit and SMC's own MeshService, VirtualMachine and MeshConfig. Whatever API version a
manifest used, it becomes one of these; two manifests that mean the same thing compare equal.
Normal forms: header names and label maps are sorted tuples of pairs (hashable, canonical),
HTTP methods are upper case with ``("*",)`` meaning any method, port lists are sorted.
Concurrency: frozen dataclasses, no shared mutable state; safe everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

__all__ = [
    "Backend",
    "HTTPMatch",
    "HTTPRouteGroup",
    "IdentityRef",
    "MeshConfig",
    "MeshService",
    "Resource",
    "RouteRef",
    "RuleRef",
    "ServicePort",
    "TCPRoute",
    "TrafficSplit",
    "TrafficTarget",
    "UDPRoute",
    "VirtualMachine",
    "VirtualMachineGroup",
    "WorkloadPort",
    "vm_backs_service",
]

RuleKind = Literal["HTTPRouteGroup", "TCPRoute", "UDPRoute"]
Protocol = Literal["http", "tcp", "grpc", "udp"]
Backing = Literal["kubernetes", "vm"]


@dataclass(frozen=True, kw_only=True, slots=True)
class IdentityRef:
    """A workload identity: a Kubernetes service account (``kind`` is always ServiceAccount)."""

    kind: Literal["ServiceAccount"] = "ServiceAccount"
    name: str
    namespace: str

    @property
    def identity(self) -> str:
        """The identity string ``ns/sa`` used by the policy functions."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, kw_only=True, slots=True)
class RuleRef:
    """A TrafficTarget rule: a route resource (same namespace) and, optionally, named matches.

    An empty ``matches`` means every match of the referenced resource.
    """

    kind: RuleKind
    name: str
    matches: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class TrafficTarget:
    """Who (``sources``) may reach ``destination`` on which routes (``rules``).

    ``port`` is the destination port of access v1alpha1/v1alpha2 (``None``: every port); from
    v1alpha3 on, ports are expressed with TCPRoute/UDPRoute rules instead.
    """

    KIND: ClassVar[str] = "TrafficTarget"
    namespace: str
    name: str
    destination: IdentityRef
    port: int | None = None
    sources: tuple[IdentityRef, ...]
    rules: tuple[RuleRef, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class HTTPMatch:
    """One named HTTP route.

    ``path_regex`` is anchored at the start of the path (SMI semantics; ``None``: any path),
    ``methods`` are upper case (``("*",)``: any method), ``headers`` are (lower-case name,
    value regex) pairs sorted by name, all of which must match (full match of the value).
    """

    name: str
    path_regex: str | None = None
    methods: tuple[str, ...] = ("*",)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def header_map(self) -> dict[str, str]:
        """The header filters as a plain mapping name -> regex."""
        return dict(self.headers)

    @property
    def envoy_path_regex(self) -> str | None:
        """The path regex as a full-match RE2 pattern (what Envoy's ``safe_regex`` expects)."""
        if self.path_regex is None:
            return None
        return f"(?:{self.path_regex}).*"


@dataclass(frozen=True, kw_only=True, slots=True)
class HTTPRouteGroup:
    """A set of named HTTP matches (specs.smi-spec.io)."""

    KIND: ClassVar[str] = "HTTPRouteGroup"
    namespace: str
    name: str
    matches: tuple[HTTPMatch, ...]

    def match(self, name: str) -> HTTPMatch | None:
        """The match called ``name``, if any."""
        for m in self.matches:
            if m.name == name:
                return m
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class TCPRoute:
    """L4 TCP traffic on ``ports`` (sorted; empty: every port of the destination)."""

    KIND: ClassVar[str] = "TCPRoute"
    namespace: str
    name: str
    match_name: str | None = None
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class UDPRoute:
    """L4 UDP traffic on ``ports`` (sorted; empty: every port); specs v1alpha4 only."""

    KIND: ClassVar[str] = "UDPRoute"
    namespace: str
    name: str
    match_name: str | None = None
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Backend:
    """A TrafficSplit backend: a service in the split's namespace and its whole-number weight."""

    service: str
    weight: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RouteRef:
    """A TrafficSplit A/B match: an HTTPRouteGroup in the split's namespace."""

    kind: Literal["HTTPRouteGroup"] = "HTTPRouteGroup"
    name: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TrafficSplit:
    """Weighted traffic for the root ``service`` across ``backends``.

    With ``matches`` (split v1alpha3+), only requests matching one of the referenced route groups
    are split; the rest go to the root service.
    """

    KIND: ClassVar[str] = "TrafficSplit"
    namespace: str
    name: str
    service: str
    backends: tuple[Backend, ...]
    matches: tuple[RouteRef, ...] = ()

    @property
    def total_weight(self) -> int:
        """Sum of the backend weights."""
        return sum(b.weight for b in self.backends)


@dataclass(frozen=True, kw_only=True, slots=True)
class ServicePort:
    """A port of a MeshService: ``port`` clients use, ``target_port`` workloads listen on."""

    name: str
    port: int
    protocol: Protocol = "http"
    target_port: int


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshService:
    """A mesh service (smc.dev/v1alpha1), backed by Kubernetes workloads or by VMs.

    ``selector`` (sorted label pairs) picks the workloads; VMs may also name the service
    explicitly (see :func:`vm_backs_service`).
    """

    KIND: ClassVar[str] = "MeshService"
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    backing: Backing = "kubernetes"
    selector: tuple[tuple[str, str], ...] = ()

    @property
    def selector_map(self) -> dict[str, str]:
        """The selector as a plain mapping."""
        return dict(self.selector)


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadPort:
    """A port a workload (VM) listens on."""

    name: str
    port: int
    protocol: Protocol = "http"


@dataclass(frozen=True, kw_only=True, slots=True)
class VirtualMachine:
    """A VM workload (smc.dev/v1alpha1) joining the mesh.

    ``address`` is a normalised IPv4/IPv6 address, ``service_account`` its identity in
    ``namespace``, ``labels`` sorted pairs, ``services`` the MeshServices it backs explicitly.
    """

    KIND: ClassVar[str] = "VirtualMachine"
    namespace: str
    name: str
    address: str
    ports: tuple[WorkloadPort, ...] = ()
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()
    services: tuple[str, ...] = ()

    @property
    def identity(self) -> str:
        """The identity string ``ns/sa``."""
        return f"{self.namespace}/{self.service_account}"

    @property
    def label_map(self) -> dict[str, str]:
        """The labels as a plain mapping."""
        return dict(self.labels)


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshConfig:
    """Mesh-wide settings (smc.dev/v1alpha1)."""

    KIND: ClassVar[str] = "MeshConfig"
    namespace: str
    name: str
    permissive_traffic_mode: bool = False
    trust_domain: str = "cluster.local"
    certificate_lifetime_seconds: int = 86400
    #: Transparent sidecars pass traffic to destinations outside the mesh (OSM's
    #: ``enableEgress``); off: only what an Egress policy allows leaves the mesh.
    enable_egress: bool = True
    #: Canonical JSON of the normalised ``spec.observability`` (access log, tracing); ``""``:
    #: the defaults (JSON access log on stdout, no tracing). See docs/traffic-policy.md.
    observability: str = ""


from smc.smi._osm_model import (  # noqa: E402  (OSM's policy kinds join the Resource union)
    EgressPolicy,
    IngressBackendPolicy,
    RetryPolicy,
    UpstreamTrafficSetting,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class VirtualMachineGroup:
    """A group of identical VMs (smc.dev/v1alpha1): a template plus where its members come from.

    ``template_*`` is what every instance gets (service account, labels, ports, the services it
    backs). Membership comes from ``provider`` (a name in entry point group
    ``smc.vm_providers``): either the cloud group ``cloud_group`` (an AWS Auto Scaling group,
    an Azure VM scale set) or the instances whose provider labels (tags) match ``selector``.
    ``drain_seconds`` is how long a leaving instance keeps serving in-flight requests after
    every client dropped it; ``join_token_seconds`` the lifetime of its join tokens;
    ``readiness`` when a new instance gets traffic: once its proxy ACKed its config
    (``proxy``) or as soon as the provider says it runs (``running``).
    """

    KIND: ClassVar[str] = "VirtualMachineGroup"
    namespace: str
    name: str
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[WorkloadPort, ...] = ()
    services: tuple[str, ...] = ()
    provider: str
    cloud_group: str | None = None
    selector: tuple[tuple[str, str], ...] = ()
    region: str | None = None
    drain_seconds: int = 10
    join_token_seconds: int = 600
    readiness: Literal["proxy", "running"] = "proxy"

    @property
    def identity(self) -> str:
        """The identity string ``ns/sa`` every instance runs as."""
        return f"{self.namespace}/{self.service_account}"


Resource = (
    TrafficTarget
    | HTTPRouteGroup
    | TCPRoute
    | UDPRoute
    | TrafficSplit
    | MeshService
    | VirtualMachine
    | MeshConfig
    | EgressPolicy
    | IngressBackendPolicy
    | RetryPolicy
    | UpstreamTrafficSetting
    | VirtualMachineGroup
)


def vm_backs_service(*, vm: VirtualMachine, service: MeshService) -> bool:
    """Whether ``vm`` is a backend of ``service``.

    True when both are in the same namespace and either the VM lists the service by name, or the
    service is VM-backed with a non-empty selector that the VM's labels satisfy.
    """
    if vm.namespace != service.namespace:
        return False
    if service.name in vm.services:
        return True
    if service.backing != "vm" or not service.selector:
        return False
    labels = vm.label_map
    return all(labels.get(k) == v for k, v in service.selector)
