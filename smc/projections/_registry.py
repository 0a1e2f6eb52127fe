"""Registry projection: services, their endpoints, workloads (pods and VMs), service accounts.

Role: folds ``smc.registry`` events into the catalog the SMI policy and the xDS builder query.
Every registry event carries the full state of its aggregate, so ``apply`` replaces (or removes)
one entry. Endpoints of a VM-backed service are derived at query time from the workloads that
match its selector, together with any explicit endpoint set.
Concurrency: single-threaded (see :mod:`smc.projections._base`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from smc.events import (
    REGISTRY,
    Endpoint,
    EndpointsChanged,
    Event,
    ServiceAccountRemoved,
    ServiceAccountUpserted,
    ServicePort,
    ServiceRemoved,
    ServiceUpserted,
    VmGroupStatusChanged,
    VmInstanceChanged,
    WorkloadJoined,
    WorkloadLeft,
    WorkloadPort,
)
from smc.projections._base import canonical_digest
from smc.projections._vmgroups import DRAINING_LABEL, WARMING_LABEL, VmGroups

__all__ = ["RegistryProjection", "Service", "Workload"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Service:
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    backing: str
    selector: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    kind: str
    namespace: str
    name: str
    address: str
    service_account: str
    labels: tuple[tuple[str, str], ...]
    ports: tuple[WorkloadPort, ...]

    @property
    def identity(self) -> str:
        """``namespace/service-account``: the workload's mesh identity."""
        return f"{self.namespace}/{self.service_account}"


class RegistryProjection:
    """The service registry, rebuilt from ``smc.registry``."""

    name = "registry"
    streams = frozenset({REGISTRY})
    #: Event types that set their aggregate\'s whole state here (earlier events of that
    #: aggregate stop mattering); lets a rebuild skip superseded records.
    replacing_types = frozenset(
        {
            ServiceUpserted.TYPE,
            ServiceRemoved.TYPE,
            EndpointsChanged.TYPE,
            WorkloadJoined.TYPE,
            WorkloadLeft.TYPE,
            ServiceAccountUpserted.TYPE,
            ServiceAccountRemoved.TYPE,
            VmInstanceChanged.TYPE,
            VmGroupStatusChanged.TYPE,
        }
    )

    def __init__(self) -> None:
        self.services: dict[tuple[str, str], Service] = {}
        self.endpoints: dict[tuple[str, str], tuple[Endpoint, ...]] = {}
        self.workloads: dict[tuple[str, str, str], Workload] = {}
        self.service_accounts: set[tuple[str, str]] = set()
        #: VirtualMachineGroup instances and provider status (see :mod:`._vmgroups`).
        self.vm_groups = VmGroups()
        #: Bumped by every applied event and restore (readers memoise derived views on it).
        self.generation = 0
        self._endpoints_memo: dict[tuple[str, str], tuple[Endpoint, ...]] = {}
        self._endpoints_generation = -1
        self._handlers: dict[type, Callable[[Any], None]] = {
            ServiceUpserted: self._service_upserted,
            ServiceRemoved: self._service_removed,
            EndpointsChanged: self._endpoints_changed,
            WorkloadJoined: self._workload_joined,
            WorkloadLeft: self._workload_left,
            ServiceAccountUpserted: self._sa_upserted,
            ServiceAccountRemoved: self._sa_removed,
            VmInstanceChanged: self.vm_groups.instance_changed,
            VmGroupStatusChanged: self.vm_groups.status_changed,
        }

    # -- fold -------------------------------------------------------------------------------
    def apply(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            self.generation += 1
            handler(event)

    def _service_upserted(self, e: ServiceUpserted) -> None:
        self.services[(e.namespace, e.name)] = Service(
            namespace=e.namespace,
            name=e.name,
            ports=tuple(e.ports),
            backing=e.backing,
            selector=tuple(sorted(e.selector.items())),
            labels=tuple(sorted(e.labels.items())),
        )

    def _service_removed(self, e: ServiceRemoved) -> None:
        self.services.pop((e.namespace, e.name), None)

    def _endpoints_changed(self, e: EndpointsChanged) -> None:
        if e.endpoints:
            self.endpoints[(e.namespace, e.service)] = tuple(e.endpoints)
        else:
            self.endpoints.pop((e.namespace, e.service), None)

    def _workload_joined(self, e: WorkloadJoined) -> None:
        self.workloads[(e.kind, e.namespace, e.name)] = Workload(
            kind=e.kind,
            namespace=e.namespace,
            name=e.name,
            address=e.address,
            service_account=e.service_account,
            labels=tuple(sorted(e.labels.items())),
            ports=tuple(e.ports),
        )

    def _workload_left(self, e: WorkloadLeft) -> None:
        self.workloads.pop((e.kind, e.namespace, e.name), None)

    def _sa_upserted(self, e: ServiceAccountUpserted) -> None:
        self.service_accounts.add((e.namespace, e.name))

    def _sa_removed(self, e: ServiceAccountRemoved) -> None:
        self.service_accounts.discard((e.namespace, e.name))

    # -- queries ----------------------------------------------------------------------------
    def workloads_of(self, service: Service) -> Iterator[Workload]:
        """Workloads in the service's namespace matching its selector, or naming the service.

        A VM names the services it backs with labels ``backs.smc.dev/<service>: "true"``.
        """
        sel = service.selector
        backs = f"backs.smc.dev/{service.name}"
        for w in self.workloads.values():
            if w.namespace != service.namespace:
                continue
            labels = dict(w.labels)
            if (sel and all(labels.get(k) == v for k, v in sel)) or labels.get(backs) == "true":
                yield w

    def endpoints_of(self, namespace: str, name: str) -> tuple[Endpoint, ...]:
        """Explicit endpoints (EndpointSlices, API) plus VM workloads matching the selector.
        A scan of the workloads, memoised until the next applied event (:attr:`generation`):
        proxies built together ask it for every service they reach."""
        if self._endpoints_generation != self.generation:
            self._endpoints_memo.clear()
            self._endpoints_generation = self.generation
        found = self._endpoints_memo.get((namespace, name))
        if found is None:
            found = self._endpoints_memo[(namespace, name)] = self._scan_endpoints(namespace, name)
        return found

    def _scan_endpoints(self, namespace: str, name: str) -> tuple[Endpoint, ...]:
        out = list(self.endpoints.get((namespace, name), ()))
        svc = self.services.get((namespace, name))
        if svc is not None:
            known = {(e.address, e.port) for e in out}
            for w in self.workloads_of(svc):
                if w.kind != "vm" or _out_of_rotation(w):
                    continue  # warming up or draining: its proxy has config, clients don't
                for sp in svc.ports:
                    if (w.address, sp.target_port) not in known:
                        out.append(
                            Endpoint(
                                address=w.address,
                                port=sp.target_port,
                                workload=f"{w.namespace}/{w.name}",
                                ready=True,
                            )
                        )
        return tuple(sorted(out, key=lambda e: (e.address, e.port)))

    def identities(self) -> set[str]:
        """Every mesh identity (``ns/sa``) known from service accounts and workloads."""
        ids = {f"{ns}/{sa}" for ns, sa in self.service_accounts}
        ids.update(w.identity for w in self.workloads.values())
        return ids

    # -- state as data ----------------------------------------------------------------------
    def _plain(self) -> dict[str, Any]:
        out = self._plain_core()
        if self.vm_groups.groups:  # absent when empty: digests of logs without groups unchanged
            out["vm_groups"] = self.vm_groups.plain()
        if self.vm_groups.removed:  # (likewise absent when none)
            out["vm_groups_removed"] = self.vm_groups.plain_removed()
        return out

    def _plain_core(self) -> dict[str, Any]:
        return {
            "services": {
                f"{ns}/{n}": {
                    "ports": [[p.name, p.port, p.protocol, p.target_port] for p in s.ports],
                    "backing": s.backing,
                    "selector": [list(x) for x in s.selector],
                    "labels": [list(x) for x in s.labels],
                }
                for (ns, n), s in self.services.items()
            },
            "endpoints": {
                f"{ns}/{n}": [[e.address, e.port, e.workload, e.ready] for e in eps]
                for (ns, n), eps in self.endpoints.items()
            },
            "workloads": {
                f"{k}/{ns}/{n}": {
                    "address": w.address,
                    "service_account": w.service_account,
                    "labels": [list(x) for x in w.labels],
                    "ports": [[p.name, p.port, p.protocol] for p in w.ports],
                }
                for (k, ns, n), w in self.workloads.items()
            },
            "service_accounts": sorted(f"{ns}/{n}" for ns, n in self.service_accounts),
        }

    def digest(self) -> str:
        return canonical_digest(self._plain())

    def checkpoint(self) -> dict[str, Any]:
        return self._plain()

    def restore(self, data: dict[str, Any]) -> None:
        services = {}
        for key, s in data["services"].items():
            ns, n = key.split("/", 1)
            services[(ns, n)] = Service(
                namespace=ns,
                name=n,
                ports=tuple(
                    ServicePort(name=a, port=b, protocol=c, target_port=d)
                    for a, b, c, d in s["ports"]
                ),
                backing=s["backing"],
                selector=tuple((k, v) for k, v in s["selector"]),
                labels=tuple((k, v) for k, v in s["labels"]),
            )
        endpoints = {}
        for key, eps in data["endpoints"].items():
            ns, n = key.split("/", 1)
            endpoints[(ns, n)] = tuple(
                Endpoint(address=a, port=p, workload=w, ready=r) for a, p, w, r in eps
            )
        workloads = {}
        for key, w in data["workloads"].items():
            k, ns, n = key.split("/", 2)
            workloads[(k, ns, n)] = Workload(
                kind=k,
                namespace=ns,
                name=n,
                address=w["address"],
                service_account=w["service_account"],
                labels=tuple((a, b) for a, b in w["labels"]),
                ports=tuple(WorkloadPort(name=a, port=b, protocol=c) for a, b, c in w["ports"]),
            )
        sas = set()
        for key in data["service_accounts"]:
            ns, n = key.split("/", 1)
            sas.add((ns, n))
        self.services, self.endpoints, self.workloads = services, endpoints, workloads
        self.service_accounts = sas
        self.generation += 1
        self.vm_groups.restore(data.get("vm_groups", {}))
        self.vm_groups.restore_removed(data.get("vm_groups_removed", {}))


def _out_of_rotation(w: Workload) -> bool:
    """A VM group instance whose proxy is not ready yet, or that is draining."""
    return (DRAINING_LABEL, "true") in w.labels or (WARMING_LABEL, "true") in w.labels
