"""``PolicyView``: the policy questions the xDS builder, the API and the CLI ask, answered from
the policy and registry projections.

Role: a read-only query helper. The SMI resources in :class:`PolicyProjection` are evaluated with
:func:`smc.smi.evaluate` once per ``policy.generation`` (cached); registry lookups (which
workloads back a service, hence which identities serve it) are computed on demand and cost
O(workloads in the namespace). Identities are ``ns/sa`` strings, services ``ns/name`` strings;
:meth:`PolicyView.spiffe_id` maps an identity to ``spiffe://<trust_domain>/ns/<ns>/sa/<sa>`` with
the trust domain from the mesh config.

Which workloads back a service: for a VM-backed service, the VMs whose labels match its selector;
for a Kubernetes-backed one, the pods (any non-VM workload) matching it; in both cases also the
VMs that name the service explicitly (``spec.services`` of a VirtualMachine, carried as the
``backs.smc.dev/<service>`` label).
Concurrency: not thread-safe; use it on the thread that applies events to the projections (the
asyncio loop in ``smc serve``). Returned values are immutable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from smc.projections._policy import PolicyProjection
from smc.projections._registry import RegistryProjection, Service, Workload
from smc.smi import (
    Grant,
    HTTPRouteGroup,
    ManifestErrors,
    Policy,
    Resource,
    SplitPlan,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    evaluate,
    parse_manifest,
)

__all__ = ["BACKS_LABEL_PREFIX", "PolicyView"]

#: Label prefix marking the services a VM backs explicitly (written by :mod:`smc.api`).
BACKS_LABEL_PREFIX = "backs.smc.dev/"

TrafficProtocol = Literal["http", "grpc", "tcp", "udp"]


class PolicyView:
    """Policy answers over a registry and a policy projection (see the module docstring)."""

    def __init__(self, *, registry: RegistryProjection, policy: PolicyProjection) -> None:
        self.registry = registry
        self.policy = policy
        self._generation = -1
        self._policy_set: Policy | None = None
        # workloads_of_service answers, valid for one registry generation.
        self._svc_workloads: dict[str, tuple[Workload, ...]] = {}
        self._svc_generation = -1

    # -- the evaluated policy set -----------------------------------------------------------
    @property
    def evaluated(self) -> Policy:
        """The :class:`smc.smi.Policy` of the current SMI resources (re-evaluated only when
        ``policy.generation`` changed)."""
        if self._policy_set is None or self._generation != self.policy.generation:
            buckets: dict[str, list[Resource]] = {}
            for stored in self.policy.resources.values():
                try:
                    r = parse_manifest(
                        stored.manifest(),
                        document=f"{stored.kind}/{stored.namespace}/{stored.name}",
                    )
                except (ManifestErrors, ValueError):
                    continue
                buckets.setdefault(r.KIND, []).append(r)
            self._policy_set = evaluate(
                targets=[
                    r for r in buckets.get("TrafficTarget", []) if isinstance(r, TrafficTarget)
                ],
                route_groups=[
                    r for r in buckets.get("HTTPRouteGroup", []) if isinstance(r, HTTPRouteGroup)
                ],
                tcp_routes=[r for r in buckets.get("TCPRoute", []) if isinstance(r, TCPRoute)],
                udp_routes=[r for r in buckets.get("UDPRoute", []) if isinstance(r, UDPRoute)],
                splits=[r for r in buckets.get("TrafficSplit", []) if isinstance(r, TrafficSplit)],
                permissive=self.policy.mesh.permissive,
            )
            self._generation = self.policy.generation
        return self._policy_set

    @property
    def permissive(self) -> bool:
        """Permissive traffic mode: every source may reach every destination."""
        return self.policy.mesh.permissive

    @property
    def trust_domain(self) -> str:
        return self.policy.mesh.trust_domain

    # -- identities -------------------------------------------------------------------------
    def spiffe_id(self, identity: str) -> str:
        """``ns/sa`` -> ``spiffe://<trust_domain>/ns/<ns>/sa/<sa>``; raises ValueError."""
        ns, sep, sa = identity.partition("/")
        if not sep or not ns or not sa or "/" in sa:
            raise ValueError(f"identity {identity!r} is not of the form namespace/serviceaccount")
        return f"spiffe://{self.trust_domain}/ns/{ns}/sa/{sa}"

    def identity_of_spiffe(self, spiffe_id: str) -> str | None:
        """``spiffe://<trust_domain>/ns/<ns>/sa/<sa>`` -> ``ns/sa``; ``None`` if it is not one
        of this mesh's trust domain."""
        prefix = f"spiffe://{self.trust_domain}/ns/"
        if not spiffe_id.startswith(prefix):
            return None
        ns, sep, rest = spiffe_id[len(prefix) :].partition("/sa/")
        if not sep or not ns or not rest or "/" in ns or "/" in rest:
            return None
        return f"{ns}/{rest}"

    def workloads_of_service(self, service: str) -> tuple[Workload, ...]:
        """Workloads backing service ``ns/name`` (see the module docstring), sorted. A scan of
        the registry, memoised until the registry changes (``registry.generation``): many
        proxies connecting at once ask it for every service they reach."""
        if self._svc_generation != self.registry.generation:
            self._svc_workloads.clear()
            self._svc_generation = self.registry.generation
        found = self._svc_workloads.get(service)
        if found is None:
            found = self._svc_workloads[service] = self._scan_workloads_of(service)
        return found

    def _scan_workloads_of(self, service: str) -> tuple[Workload, ...]:
        svc = self._service(service)
        if svc is None:
            return ()
        explicit = BACKS_LABEL_PREFIX + svc.name
        sel = svc.selector
        out: list[Workload] = []
        for w in self.registry.workloads.values():
            if w.namespace != svc.namespace:
                continue
            labels = dict(w.labels)
            if w.kind == "vm" and labels.get(explicit) == "true":
                out.append(w)
                continue
            if not sel or not all(labels.get(k) == v for k, v in sel):
                continue
            if (svc.backing == "vm") == (w.kind == "vm"):
                out.append(w)
        return tuple(sorted(out, key=lambda w: (w.kind, w.namespace, w.name)))

    def service_identities(self, service: str) -> tuple[str, ...]:
        """Identities (``ns/sa``) that serve ``ns/name``: the service accounts of its workloads."""
        return tuple(sorted({w.identity for w in self.workloads_of_service(service)}))

    def services_of_identity(self, identity: str) -> tuple[str, ...]:
        """Services (``ns/name``) served by at least one workload running as ``identity``."""
        return tuple(
            sorted(key for key in self._service_keys() if identity in self.service_identities(key))
        )

    # -- access -----------------------------------------------------------------------------
    def allowed_sources(self, destination: str) -> tuple[Grant, ...]:
        """Grants towards identity ``destination``: each names a source identity and the HTTP
        matches / TCP / UDP ports it may use (see :class:`smc.smi.Grant`). In permissive mode
        these are still returned (what strict mode would allow); check :attr:`permissive`."""
        return self.evaluated.allowed_sources(destination)

    def outbound_identities(self, identity: str) -> tuple[str, ...] | None:
        """Destination identities ``identity`` may reach; ``None`` means any (permissive)."""
        return self.evaluated.outbound(identity)

    def outbound_services(self, identity: str) -> tuple[str, ...]:
        """Services (``ns/name``) ``identity`` may reach: those served by an identity it is
        granted access to (every known service in permissive mode), sorted."""
        reachable = self.outbound_identities(identity)
        keys = self._service_keys()
        if reachable is None:
            return keys
        allowed = set(reachable)
        return tuple(k for k in keys if allowed.intersection(self.service_identities(k)))

    def is_allowed(
        self,
        *,
        source: str,
        destination: str,
        method: str | None = None,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        port: int | None = None,
        protocol: TrafficProtocol | None = None,
    ) -> bool:
        """Whether identity ``source`` may send the described traffic to identity
        ``destination`` (deny by default; always true in permissive mode). ``protocol``
        defaults to http when a method or path is given, else tcp."""
        return self.evaluated.is_allowed(
            source=source,
            destination=destination,
            method=method,
            path=path,
            headers=headers,
            port=port,
            protocol=protocol,
        )

    def split_for(self, service: str) -> SplitPlan | None:
        """The traffic split plan of root service ``ns/name`` (weights and A/B matches)."""
        return self.evaluated.split_for(service)

    # -- internals --------------------------------------------------------------------------
    def _service(self, service: str) -> Service | None:
        ns, _, name = service.partition("/")
        return self.registry.services.get((ns, name))

    def _service_keys(self) -> tuple[str, ...]:
        return tuple(sorted(f"{ns}/{n}" for ns, n in self.registry.services))
