"""Checks and per-document failures of the mesh write path.

Role: pending references as the sentences users see (:func:`pending_reason`), what a deletion
leaves pending, failed :class:`~smc.api._changes_model.DocumentResult` values, grouping of
load errors and the reserved-label check, for :mod:`smc.api._changes`.
Concurrency: pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from smc.api._changes_model import MANAGED_BY_LABEL, DocumentResult, Status
from smc.projections._policyview import BACKS_LABEL_PREFIX
from smc.smi import (
    ManifestError,
    Resource,
    VirtualMachine,
    resource_key,
    unresolved_references,
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
