"""VM group state inside the registry projection: instances per group and provider status.

Role: folds ``VmInstanceChanged`` (an instance joined, is draining, or left, and why) and
``VmGroupStatusChanged`` (provider ok / stale / group removed) into a small table the registry
projection carries (``RegistryProjection.vm_groups``), for ``smc get vmgroups``, the metrics
and the group controller (which resumes drains after a restart from it). Left instances and
removed groups are dropped, so the table holds what is in the mesh now.
The two event types are different aggregates, so they may sit in different partitions and be
read in either order: the fold gives the same table in both. A group's removal is remembered
(``removed``: its reason and time) until the group reports another status, so an instance
event read after the removal finds the group removed, as it would read before it.
Concurrency: single-threaded, like every projection (see :mod:`smc.projections._base`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from smc.events import VmGroupStatusChanged, VmInstanceChanged

__all__ = [
    "DRAINING_LABEL",
    "GROUP_LABEL",
    "INSTANCE_LABEL",
    "WARMING_LABEL",
    "GroupState",
    "InstanceState",
    "VmGroups",
]

#: Workload labels the group controller sets on every instance.
GROUP_LABEL = "smc.dev/vm-group"
INSTANCE_LABEL = "smc.dev/instance-id"
#: Set on an instance while it drains: its endpoint leaves every EDS, its proxy keeps serving.
DRAINING_LABEL = "smc.dev/draining"
#: Set on a new instance until its proxy has ACKed its config: no client sends it traffic yet.
WARMING_LABEL = "smc.dev/warming"


@dataclass(frozen=True, kw_only=True, slots=True)
class InstanceState:
    instance_id: str
    workload: str
    phase: str
    cause: str
    address: str
    state: str
    since: str  # ISO time of the last change


@dataclass(kw_only=True, slots=True)
class GroupState:
    status: str = "ok"
    reason: str = ""
    since: str = ""
    instances: dict[str, InstanceState] = field(default_factory=dict)


class VmGroups:
    """``(namespace, group) -> GroupState``."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], GroupState] = {}
        #: Groups whose latest status is "removed": ``(namespace, group) -> (reason, since)``.
        self.removed: dict[tuple[str, str], tuple[str, str]] = {}

    def instance_changed(self, e: VmInstanceChanged) -> None:
        key = (e.namespace, e.group)
        g = self.groups.get(key)
        if e.phase == "left":
            if g is not None:
                g.instances.pop(e.instance_id, None)
                if not g.instances and (g.status == "removed" or not g.since):
                    del self.groups[key]
            return
        if g is None:
            g = self.groups[key] = GroupState()
            gone = self.removed.get(key)
            if gone is not None:  # the removal was read first (another partition)
                g.status = "removed"
                g.reason, g.since = gone
        g.instances[e.instance_id] = InstanceState(
            instance_id=e.instance_id,
            workload=e.workload,
            phase=e.phase,
            cause=e.cause,
            address=e.address,
            state=e.state,
            since=_iso(e.envelope.occurred_at),
        )

    def status_changed(self, e: VmGroupStatusChanged) -> None:
        key = (e.namespace, e.group)
        if e.status == "removed":
            self.removed[key] = (e.reason, _iso(e.envelope.occurred_at))
            g = self.groups.get(key)
            if g is not None and not g.instances:
                del self.groups[key]
            elif g is not None:
                g.status, g.reason, g.since = "removed", e.reason, _iso(e.envelope.occurred_at)
            return
        self.removed.pop(key, None)
        g = self.groups.setdefault(key, GroupState())
        g.status, g.reason, g.since = e.status, e.reason, _iso(e.envelope.occurred_at)

    # -- state as data ----------------------------------------------------------------------
    def plain(self) -> dict[str, Any]:
        return {
            f"{ns}/{name}": {
                "status": g.status,
                "reason": g.reason,
                "since": g.since,
                "instances": {
                    i: [s.workload, s.phase, s.cause, s.address, s.state, s.since]
                    for i, s in sorted(g.instances.items())
                },
            }
            for (ns, name), g in sorted(self.groups.items())
        }

    def plain_removed(self) -> dict[str, list[str]]:
        return {f"{ns}/{name}": list(v) for (ns, name), v in sorted(self.removed.items())}

    def restore_removed(self, data: dict[str, list[str]]) -> None:
        removed: dict[tuple[str, str], tuple[str, str]] = {}
        for key, (reason, since) in data.items():
            ns, name = key.split("/", 1)
            removed[(ns, name)] = (reason, since)
        self.removed = removed

    def restore(self, data: dict[str, Any]) -> None:
        groups: dict[tuple[str, str], GroupState] = {}
        for key, g in data.items():
            ns, name = key.split("/", 1)
            groups[(ns, name)] = GroupState(
                status=g["status"],
                reason=g["reason"],
                since=g["since"],
                instances={
                    i: InstanceState(
                        instance_id=i,
                        workload=w,
                        phase=ph,
                        cause=c,
                        address=a,
                        state=st,
                        since=t,
                    )
                    for i, (w, ph, c, a, st, t) in g["instances"].items()
                },
            )
        self.groups = groups


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")
