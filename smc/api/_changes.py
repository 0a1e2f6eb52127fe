"""``MeshChanges``: validated mesh resources in, events out (the one write path of the API).

Role: turns parsed resources (:mod:`smc.smi`) into events and appends them, kubectl style:
each resource is reported ``created``, ``configured``, ``unchanged``, ``deleted`` or ``error``,
and only created/configured/deleted ones produce events. Before anything is appended, the set the
projections would hold afterwards is checked with :func:`smc.smi.check_references`; a change that
would introduce a set-level error (a second MeshConfig, weights summing to zero) is refused and
named, while the other changes of the same request still go through. Apply order never matters:
a reference to a resource that does not exist (yet) is accepted, and the referring resource is
*pending* (it grants or routes nothing through the missing part until it exists); the result
carries a warning saying so, and deleting a resource others still name succeeds with a warning
naming the resources it leaves pending. Within one request the last document of a
``Kind/ns/name`` wins (as with ``kubectl apply``).

Mapping to events:

- TrafficTarget, HTTPRouteGroup, TCPRoute, UDPRoute, TrafficSplit, OSM's Egress,
  IngressBackend, Retry, UpstreamTrafficSetting and VirtualMachineGroup -> ``SmiResourceApplied``
  (``manifest_json`` is the canonical JSON of :func:`smc.smi.to_manifest`) / ``SmiResourceDeleted``.
- MeshService -> ``ServiceUpserted`` / ``ServiceRemoved``.
- VirtualMachine -> ``WorkloadJoined(kind="vm")`` plus ``ServiceAccountUpserted`` for its identity
  when the registry does not know it yet / ``WorkloadLeft``. The services a VM names explicitly
  travel as reserved labels ``backs.smc.dev/<service>: "true"``; the owner of a resource (a VM
  provider) as ``smc.dev/managed-by``. Both are stripped again when the state is read back.
- MeshConfig -> ``MeshConfigChanged`` (its ``ns/name`` kept in ``settings["resource"]``); deleting
  it resets the mesh to the defaults.

Event ids are deterministic: ``deterministic_id("api", request_id, resource_key)`` for an upsert
(``..., "ServiceAccountUpserted")`` for a VM's identity, ``..., "delete")`` for a deletion), so a
retried request is applied once.
Concurrency: planning reads the projections and must run on the thread that applies events to
them (the asyncio loop in ``smc serve``, the main thread in the CLI); :meth:`MeshChanges.commit`
appends (blocking I/O) and may run in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from smc.events import (
    Appended,
    Event,
    EventLog,
    MeshConfigChanged,
    Position,
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
from smc.projections import PolicyProjection, RegistryProjection, canonical_json
from smc.projections._policy import DEFAULT_CERT_LIFETIME, DEFAULT_TRUST_DOMAIN
from smc.projections._policyview import BACKS_LABEL_PREFIX
from smc.smi import (
    EgressPolicy,
    HTTPRouteGroup,
    IngressBackendPolicy,
    ManifestError,
    ManifestErrors,
    MeshConfig,
    MeshService,
    Resource,
    RetryPolicy,
    ServicePort,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    UpstreamTrafficSetting,
    VirtualMachine,
    VirtualMachineGroup,
    WorkloadPort,
    check_references,
    parse_manifest,
    resource_key,
    to_manifest,
    unresolved_references,
)

__all__ = [
    "BACKS_LABEL_PREFIX",
    "MANAGED_BY_LABEL",
    "ChangeReport",
    "DocumentResult",
    "IdSeed",
    "MeshChanges",
    "Plan",
    "Status",
    "current_resources",
    "pending_reason",
]

Status = Literal["created", "configured", "unchanged", "deleted", "not found", "error"]

#: Label carrying the owner (e.g. ``vm-provider.inventory``) of a VM or service.
MANAGED_BY_LABEL = "smc.dev/managed-by"

_SMI_KINDS = (
    TrafficTarget,
    HTTPRouteGroup,
    TCPRoute,
    UDPRoute,
    TrafficSplit,
    EgressPolicy,
    IngressBackendPolicy,
    RetryPolicy,
    UpstreamTrafficSetting,
    VirtualMachineGroup,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class DocumentResult:
    """The outcome for one document: ``document`` is ``Kind/ns/name`` for a resource that could
    be read, else the source label (``file.yaml#3``); ``errors`` is non-empty iff ``status`` is
    ``error`` or ``not found``."""

    document: str
    kind: str | None
    name: str | None
    status: Status
    errors: tuple[ManifestError, ...] = ()
    #: Accepted, but something is pending: a reference to a missing resource (this one's, or
    #: one a deletion left in another resource), each a sentence naming field and resource.
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "document": self.document,
            "kind": self.kind,
            "name": self.name,
            "status": self.status,
            "errors": [error_dict(e) for e in self.errors],
            "warnings": list(self.warnings),
        }


def error_dict(e: ManifestError) -> dict[str, Any]:
    """A ManifestError as the API's error object (``document``, ``field``, ``reason``, ...)."""
    return {
        "document": e.document,
        "kind": e.kind,
        "name": e.name,
        "field": e.path,
        "reason": e.reason,
        "message": str(e),
    }


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What a request would do: per-document results and the events to append (in order)."""

    results: tuple[DocumentResult, ...]
    events: tuple[Event, ...]

    @property
    def ok(self) -> bool:
        return all(r.status not in ("error", "not found") for r in self.results)

    @property
    def errors(self) -> tuple[ManifestError, ...]:
        return tuple(e for r in self.results for e in r.errors)


@dataclass(frozen=True, kw_only=True, slots=True)
class ChangeReport:
    """A committed plan: the plan plus where each event landed (``appended``) and the position
    the projections must reach for every event of it to be visible (``target``)."""

    plan: Plan
    appended: tuple[Appended, ...]
    target: Position

    @property
    def ok(self) -> bool:
        return self.plan.ok

    @property
    def results(self) -> tuple[DocumentResult, ...]:
        return self.plan.results

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "results": [r.as_dict() for r in self.plan.results],
            "errors": [error_dict(e) for e in self.plan.errors],
            "warnings": [
                {"document": r.document, "warning": w}
                for r in self.plan.results
                for w in r.warnings
            ],
            "events": len(self.appended),
            "duplicates": sum(1 for a in self.appended if a.duplicate),
        }


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


# -- the service ----------------------------------------------------------------------------

IdSeed = Callable[[str], str]


class MeshChanges:
    """Plans and appends mesh changes against the given projections and log."""

    def __init__(
        self, *, log: EventLog, registry: RegistryProjection, policy: PolicyProjection
    ) -> None:
        self.log = log
        self.registry = registry
        self.policy = policy

    # -- planning ---------------------------------------------------------------------------
    def plan(
        self,
        resources: Sequence[Resource],
        *,
        actor: str,
        source: str,
        request_id: str,
    ) -> list[Event]:
        """The events :meth:`apply` would append for ``resources`` (nothing is appended)."""
        return list(
            self.plan_apply(resources, actor=actor, source=source, request_id=request_id).events
        )

    def plan_apply(
        self,
        resources: Sequence[Resource],
        *,
        actor: str,
        source: str,
        request_id: str,
        load_errors: Sequence[ManifestError] = (),
        owner: str | None = None,
        id_seed: IdSeed | None = None,
        current: dict[str, tuple[Resource, str | None]] | None = None,
    ) -> Plan:
        """Plan creating/updating ``resources``.

        ``load_errors`` (from :func:`smc.smi.load_documents`) are reported as failed documents.
        ``owner`` marks VMs and services as managed by a provider. ``id_seed(resource_key)``
        replaces ``request_id`` as the cause of a resource's event ids (VM providers use a hash
        of the file the resource came from). ``current`` (default: what the projections hold)
        lets a group commit plan against the state earlier plans of its batch leave.
        """
        if current is None:
            current = current_resources(registry=self.registry, policy=self.policy)
        results: dict[str, DocumentResult] = {}
        order: list[str] = []
        failed: list[DocumentResult] = [_load_failure(e) for e in _group_errors(load_errors)]
        changes: dict[str, Resource] = {}
        for r in resources:
            key = resource_key(r)
            problem = _reserved_label_problem(r)
            if problem is not None:
                failed.append(_fail(r, *problem))
                continue
            if key not in changes:
                order.append(key)
            changes[key] = r  # a later document of the same resource wins (kubectl's rule)
        accepted, refused = self._resolve(current, upserts=changes, deletes=set())
        for key, errs in refused.items():
            r = changes[key]
            results[key] = DocumentResult(
                document=key,
                kind=r.KIND,
                name=f"{r.namespace}/{r.name}",
                status="error",
                errors=tuple(errs),
            )
        final = {k: r for k, (r, _) in current.items()}
        final.update((k, changes[k]) for k in accepted)
        pending = _pending_by_document(final.values())
        events: list[Event] = []
        known_sas = set(self.registry.service_accounts)
        for key in order:
            if key not in accepted:
                continue
            r = changes[key]
            prior = current.get(key)
            if prior is not None and prior[0] == r and prior[1] == owner:
                status: Status = "unchanged"
            else:
                status = "created" if prior is None else "configured"
                cause = id_seed(key) if id_seed is not None else request_id
                events.extend(
                    _upsert_events(
                        r,
                        actor=actor,
                        source=source,
                        cause=cause,
                        owner=owner,
                        known_sas=known_sas,
                    )
                )
            results[key] = DocumentResult(
                document=key,
                kind=r.KIND,
                name=f"{r.namespace}/{r.name}",
                status=status,
                warnings=tuple(pending.get(key, ())),
            )
        ordered = [results[k] for k in order if k in results]
        return Plan(results=(*ordered, *failed), events=tuple(events))

    def plan_delete(
        self,
        resources: Sequence[Resource],
        *,
        actor: str,
        source: str,
        request_id: str,
        load_errors: Sequence[ManifestError] = (),
        ignore_not_found: bool = False,
        id_seed: IdSeed | None = None,
        current: dict[str, tuple[Resource, str | None]] | None = None,
    ) -> Plan:
        """Plan deleting ``resources`` (identified by kind, namespace and name only).

        A deletion that leaves a stored resource with a reference to a missing resource
        succeeds with a warning naming that resource (it is pending from then on). ``current``:
        as for :meth:`plan_apply`.
        """
        if current is None:
            current = current_resources(registry=self.registry, policy=self.policy)
        failed: list[DocumentResult] = [_load_failure(e) for e in _group_errors(load_errors)]
        order: list[str] = []
        by_key: dict[str, Resource] = {}
        results: dict[str, DocumentResult] = {}
        for r in resources:
            key = resource_key(r)
            if key in by_key:
                continue
            by_key[key] = r
            order.append(key)
            if key not in current:
                if ignore_not_found:
                    results[key] = DocumentResult(
                        document=key,
                        kind=r.KIND,
                        name=f"{r.namespace}/{r.name}",
                        status="unchanged",
                    )
                else:
                    results[key] = _fail(r, "", f"{key} not found", status="not found")
        deletes = {k for k in order if k in current}
        accepted, refused = self._resolve(current, upserts={}, deletes=deletes)
        left = _left_pending({k: r for k, (r, _) in current.items()}, accepted)
        events: list[Event] = []
        for key in order:
            if key in results:
                continue
            r = current[key][0]
            if key in refused:
                results[key] = DocumentResult(
                    document=key,
                    kind=r.KIND,
                    name=f"{r.namespace}/{r.name}",
                    status="error",
                    errors=tuple(refused[key]),
                )
                continue
            cause = id_seed(key) if id_seed is not None else request_id
            events.append(_delete_event(r, actor=actor, source=source, cause=cause))
            results[key] = DocumentResult(
                document=key,
                kind=r.KIND,
                name=f"{r.namespace}/{r.name}",
                status="deleted",
                warnings=tuple(left.get(key, ())),
            )
        return Plan(results=(*(results[k] for k in order), *failed), events=tuple(events))

    # -- reference checks -------------------------------------------------------------------
    def _resolve(
        self,
        current: Mapping[str, tuple[Resource, str | None]],
        *,
        upserts: Mapping[str, Resource],
        deletes: set[str],
    ) -> tuple[set[str], dict[str, list[ManifestError]]]:
        """Split changes into accepted and refused so that no new set-level error appears
        (references to missing resources are pending state, not errors).

        A change is an upsert (key in ``upserts``) or a delete (key in ``deletes``). An error on
        an upserted resource refuses that upsert; an error that newly appears on a resource
        that is not changed is pinned on the changes whose reversal makes it go away.
        """
        base = {k: r for k, (r, _) in current.items()}
        baseline = set(check_references(base.values(), unresolved=False))
        pending = set(upserts) | set(deletes)
        refused: dict[str, list[ManifestError]] = {}

        def state(keys: set[str]) -> list[Resource]:
            s = dict(base)
            for k in keys:
                if k in deletes:
                    s.pop(k, None)
                else:
                    s[k] = upserts[k]
            # current resources first, so set-level errors ("only one MeshConfig") land on
            # the incoming resource
            return [r for k, r in s.items() if k in base] + [
                r for k, r in s.items() if k not in base
            ]

        while pending:
            new = [
                e for e in check_references(state(pending), unresolved=False) if e not in baseline
            ]
            if not new:
                break
            blamed: dict[str, list[ManifestError]] = {}
            for e in new:
                if e.document in pending and e.document in upserts:
                    blamed.setdefault(e.document, []).append(e)
            if not blamed:
                # which change, when left out, makes the error go away (one check per change)
                without = {
                    k: set(check_references(state(pending - {k}), unresolved=False))
                    for k in pending
                }
                for e in new:
                    culprits = [k for k in sorted(pending) if e not in without[k]]
                    for k in culprits or sorted(pending):
                        blamed.setdefault(k, []).append(_because(k, e))
            for k, errs in blamed.items():
                refused.setdefault(k, []).extend(errs)
                pending.discard(k)
        return pending, refused

    # -- appending --------------------------------------------------------------------------
    def commit(self, plan: Plan) -> ChangeReport:
        """Append the plan's events (blocking; may run in a worker thread)."""
        appended = self.log.append(list(plan.events)) if plan.events else []
        offsets: dict[tuple[str, int], int] = {}
        for a in appended:
            tp = (a.stream, a.partition)
            offsets[tp] = max(offsets.get(tp, 0), a.offset + 1)
        target = Position(offsets)
        return ChangeReport(plan=plan, appended=tuple(appended), target=target)

    def apply(
        self,
        resources: Sequence[Resource],
        *,
        actor: str,
        source: str,
        request_id: str,
        load_errors: Sequence[ManifestError] = (),
        owner: str | None = None,
        id_seed: IdSeed | None = None,
    ) -> ChangeReport:
        """Plan and append creating/updating ``resources`` (see :meth:`plan_apply`)."""
        return self.commit(
            self.plan_apply(
                resources,
                actor=actor,
                source=source,
                request_id=request_id,
                load_errors=load_errors,
                owner=owner,
                id_seed=id_seed,
            )
        )

    def delete(
        self,
        resources: Sequence[Resource],
        *,
        actor: str,
        source: str,
        request_id: str,
        load_errors: Sequence[ManifestError] = (),
        ignore_not_found: bool = False,
        id_seed: IdSeed | None = None,
    ) -> ChangeReport:
        """Plan and append deleting ``resources`` (see :meth:`plan_delete`)."""
        return self.commit(
            self.plan_delete(
                resources,
                actor=actor,
                source=source,
                request_id=request_id,
                load_errors=load_errors,
                ignore_not_found=ignore_not_found,
                id_seed=id_seed,
            )
        )


# -- helpers ----------------------------------------------------------------------------------


def pending_reason(e: ManifestError) -> str:
    """One unresolved reference as the sentence shown to users."""
    field = f"field {e.path}: " if e.path else ""
    return f"pending: {field}{e.reason} (nothing is granted or routed through it until it does)"


def _pending_by_document(resources: Iterable[Resource]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in unresolved_references(resources):
        out.setdefault(e.document, []).append(pending_reason(e))
    return out


def _left_pending(base: Mapping[str, Resource], deletes: set[str]) -> dict[str, list[str]]:
    """Per deleted key: the references that deleting it leaves unresolved in kept resources."""
    if not deletes:
        return {}
    before = set(unresolved_references(base.values()))

    def after(gone: set[str]) -> set[ManifestError]:
        return set(unresolved_references(r for k, r in base.items() if k not in gone))

    new = after(deletes) - before
    out: dict[str, list[str]] = {}
    for key in sorted(deletes):
        # the references that keeping this one would resolve
        caused = new if len(deletes) == 1 else new - after(deletes - {key})
        for e in sorted(caused, key=lambda e: (e.document, e.path)):
            out.setdefault(key, []).append(
                f"{e.document} is now pending: field {e.path}: {e.reason}"
            )
    return out


def _fail(r: Resource, path: str, reason: str, *, status: Status = "error") -> DocumentResult:
    key = resource_key(r)
    name = f"{r.namespace}/{r.name}"
    err = ManifestError(document=key, path=path, reason=reason, kind=r.KIND, name=name)
    return DocumentResult(document=key, kind=r.KIND, name=name, status=status, errors=(err,))


def _because(key: str, e: ManifestError) -> ManifestError:
    kind, _, name = key.partition("/")
    return ManifestError(
        document=key,
        path="",
        reason=f"refused: it would break {e.document}: field {e.path or '(document)'}: {e.reason}",
        kind=kind,
        name=name,
    )


def _group_errors(errors: Sequence[ManifestError]) -> list[list[ManifestError]]:
    groups: dict[str, list[ManifestError]] = {}
    for e in errors:
        groups.setdefault(e.document, []).append(e)
    return list(groups.values())


def _load_failure(errs: list[ManifestError]) -> DocumentResult:
    first = errs[0]
    return DocumentResult(
        document=first.document,
        kind=first.kind,
        name=first.name,
        status="error",
        errors=tuple(errs),
    )


def _reserved_label_problem(r: Resource) -> tuple[str, str] | None:
    if not isinstance(r, VirtualMachine):
        return None
    for k, _ in r.labels:
        if k == MANAGED_BY_LABEL or k.startswith(BACKS_LABEL_PREFIX):
            return "metadata.labels", f"label {k!r} is reserved for SMC"
    for i, s in enumerate(r.services):
        if len(s) > 63:
            return f"spec.services[{i}]", f"service name {s!r} is longer than 63 characters"
    return None


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
    known_sas: set[tuple[str, str]],
) -> list[Event]:
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
        if sa not in known_sas:
            known_sas.add(sa)
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
