"""What a mesh change reports: per-document results, plans and the change report.

Role: the value types of :mod:`smc.api._changes` (:class:`DocumentResult`, :class:`Plan`,
:class:`ChangeReport`, the ``Status`` of a document, the ``smc.dev/managed-by`` label).
Concurrency: immutable values, safe anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from smc.events import (
    Appended,
    Event,
    Position,
)
from smc.smi import (
    EgressPolicy,
    HTTPRouteGroup,
    IngressBackendPolicy,
    ManifestError,
    RetryPolicy,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    UpstreamTrafficSetting,
    VirtualMachineGroup,
)

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


IdSeed = Callable[[str], str]
