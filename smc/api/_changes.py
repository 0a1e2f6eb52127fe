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

from collections.abc import Mapping, MutableMapping, Sequence

from smc.api._changes_checks import (
    _because,
    _fail,
    _group_errors,
    _left_pending,
    _load_failure,
    _pending_by_document,
    _reserved_label_problem,
    pending_reason,
)
from smc.api._changes_events import _delete_event, _upsert_events
from smc.api._changes_model import (
    MANAGED_BY_LABEL,
    ChangeReport,
    DocumentResult,
    IdSeed,
    Plan,
    Status,
)
from smc.api._changes_state import CurrentResources, current_resources
from smc.events import (
    Event,
    EventLog,
    Position,
)
from smc.projections import PolicyProjection, RegistryProjection
from smc.projections._policyview import BACKS_LABEL_PREFIX
from smc.smi import (
    SET_LEVEL_KINDS,
    ManifestError,
    Resource,
    check_references,
    references_of,
    resource_key,
)

__all__ = [
    "BACKS_LABEL_PREFIX",
    "MANAGED_BY_LABEL",
    "ChangeReport",
    "CurrentResources",
    "DocumentResult",
    "IdSeed",
    "MeshChanges",
    "Plan",
    "Status",
    "current_resources",
    "pending_reason",
]


# -- the service ----------------------------------------------------------------------------


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
        current: MutableMapping[str, tuple[Resource, str | None]] | None = None,
    ) -> Plan:
        """Plan creating/updating ``resources``.

        ``load_errors`` (from :func:`smc.smi.load_documents`) are reported as failed documents.
        ``owner`` marks VMs and services as managed by a provider. ``id_seed(resource_key)``
        replaces ``request_id`` as the cause of a resource's event ids (VM providers use a hash
        of the file the resource came from). ``current`` (default: what the projections hold)
        lets a group commit plan against the state earlier plans of its batch leave.
        """
        if current is None:
            current = CurrentResources(registry=self.registry, policy=self.policy)
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
        pending = _pending_after(current, {k: changes[k] for k in accepted})
        events: list[Event] = []
        added_sas: set[tuple[str, str]] = set()
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
                        known_sas=self.registry.service_accounts,
                        added_sas=added_sas,
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
        current: MutableMapping[str, tuple[Resource, str | None]] | None = None,
    ) -> Plan:
        """Plan deleting ``resources`` (identified by kind, namespace and name only).

        A deletion that leaves a stored resource with a reference to a missing resource
        succeeds with a warning naming that resource (it is pending from then on). ``current``:
        as for :meth:`plan_apply`.
        """
        if current is None:
            current = CurrentResources(registry=self.registry, policy=self.policy)
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

        Only resources of :data:`smc.smi.SET_LEVEL_KINDS` can carry set-level errors, and an
        unchanged one carries the same before and after, so the sets compared are the
        MeshConfigs plus the changed resources of those kinds (:func:`_set_level`): the cost
        follows the size of the change, not of the mesh.

        A change is an upsert (key in ``upserts``) or a delete (key in ``deletes``). An error on
        an upserted resource refuses that upsert; an error that newly appears on a resource
        that is not changed is pinned on the changes whose reversal makes it go away.
        """
        base = _set_level(current, changed=set(upserts) | deletes)
        baseline = set(check_references(base.values(), unresolved=False))
        pending = set(upserts) | set(deletes)
        refused: dict[str, list[ManifestError]] = {}

        def state(keys: set[str]) -> list[Resource]:
            s = dict(base)
            for k in keys:
                if k in deletes:
                    s.pop(k, None)
                elif isinstance(upserts[k], SET_LEVEL_KINDS):
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


def _set_level(
    current: Mapping[str, tuple[Resource, str | None]], *, changed: set[str]
) -> dict[str, Resource]:
    """What the set-level check needs of ``current``: every MeshConfig (their count is the
    check; in ``current``'s order, which decides the one the error lands on) and the current
    version of each changed resource of a set-level kind."""
    keys: list[str]
    if isinstance(current, CurrentResources):
        configs = set(current.keys_of_kind("MeshConfig"))
        keys = list(current.keys_of_kind("MeshConfig"))
        keys += [k for k in sorted(changed) if k in current and k not in configs]
    else:
        keys = [k for k in current if k.startswith("MeshConfig/") or k in changed]
    out: dict[str, Resource] = {}
    for k in keys:
        r = current[k][0]
        if isinstance(r, SET_LEVEL_KINDS):
            out[k] = r
    return out


def _pending_after(
    current: Mapping[str, tuple[Resource, str | None]], accepted: Mapping[str, Resource]
) -> dict[str, list[str]]:
    """The pending warnings of the ``accepted`` upserts in the state they leave: their
    unresolved references, looked up among the resources they name only
    (:func:`smc.smi.references_of`)."""
    subset: dict[str, Resource] = dict(accepted)
    for r in accepted.values():
        for ref in references_of(r):
            if ref not in subset:
                found = current.get(ref)
                if found is not None:
                    subset[ref] = found[0]
    return {
        doc: reasons
        for doc, reasons in _pending_by_document(subset.values()).items()
        if doc in accepted
    }
