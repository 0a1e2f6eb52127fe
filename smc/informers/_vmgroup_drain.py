"""Draining a VirtualMachineGroup's instance out of the mesh, then letting it leave.

Role: an instance that left its group, stopped or was terminated is first labelled
``smc.dev/draining`` (out of every service's EDS, its own proxy keeps config and certificate);
once every connected proxy ACKed that (the drain waiter), plus the group's ``drain`` time,
``WorkloadLeft`` is appended. Drains in progress resume after a restart; a deleted group's
instances are all drained.
Concurrency: one asyncio task per drain on the serve loop; appends in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from smc.events import (
    Event,
    VmGroupStatusChanged,
    VmInstanceChanged,
    WorkloadJoined,
    WorkloadLeft,
    deterministic_id,
    make_event,
)
from smc.informers._cloud import (
    CloudInstance,
)
from smc.informers._vmgroup_base import _IN_MESH, _VmGroupBase
from smc.projections._vmgroups import (
    DRAINING_LABEL,
    WARMING_LABEL,
    GroupState,
)
from smc.smi import VirtualMachineGroup

log = logging.getLogger("smc.informers.vmgroup")


class _VmGroupDrains(_VmGroupBase):
    """The drains of the VM group controller."""

    # -- draining ----------------------------------------------------------------------------
    def _start_drain(
        self,
        group: VirtualMachineGroup | None,
        iid: str,
        workload: str,
        cause: str,
        inst: CloudInstance | None,
        *,
        namespace: str | None = None,
        group_name: str | None = None,
    ) -> None:
        ns = group.namespace if group is not None else namespace
        gname = group.name if group is not None else group_name
        assert ns is not None and gname is not None
        key = (ns, gname, iid)
        if key in self._drains and not self._drains[key].done():
            return
        self._drains[key] = asyncio.create_task(
            self._drain(ns, gname, group, iid, workload, cause, inst)
        )

    def _resume_drains(self) -> None:
        groups = {(g.namespace, g.name): g for g in self.groups()}
        for (ns, gname), state in self.registry.vm_groups.groups.items():
            for iid, s in state.instances.items():
                if s.phase == "draining":
                    self._start_drain(
                        groups.get((ns, gname)),
                        iid,
                        s.workload,
                        s.cause,
                        None,
                        namespace=ns,
                        group_name=gname,
                    )

    async def _drain(
        self,
        ns: str,
        gname: str,
        group: VirtualMachineGroup | None,
        iid: str,
        workload: str,
        cause: str,
        inst: CloudInstance | None,
    ) -> None:
        common: dict[str, Any] = {
            "actor": self.actor,
            "source": f"vm-provider:{group.provider if group else 'unknown'}",
            "correlation_id": f"{ns}/{gname}",
        }
        provider = group.provider if group is not None else ""
        drain_seconds = group.drain_seconds if group is not None else 10

        def record(
            seed: tuple[str, ...], caused_by: str, phase: str, why: str, address: str, state: str
        ) -> Event:
            """The group's record of this instance, caused by the workload event ``caused_by``."""
            return make_event(
                VmInstanceChanged,
                event_id=deterministic_id(*seed, "record"),
                causation_id=caused_by,
                namespace=ns,
                group=gname,
                instance_id=iid,
                workload=workload,
                phase=phase,
                cause=why,
                provider=provider,
                address=address,
                state=state,
                **common,
            )

        try:
            state = self.registry.vm_groups.groups.get((ns, gname))
            rec = state.instances.get(iid) if state is not None else None
            w = self.registry.workloads.get(("vm", ns, workload))
            if rec is None or w is None:
                return
            if rec.phase in _IN_MESH:
                labels = dict(w.labels)
                labels.pop(WARMING_LABEL, None)
                labels[DRAINING_LABEL] = "true"
                seed = ("vm-group", ns, gname, iid, rec.since, "draining")
                drained_id = deterministic_id(*seed)
                await self._append(
                    [
                        make_event(
                            WorkloadJoined,
                            event_id=drained_id,
                            kind="vm",
                            namespace=ns,
                            name=workload,
                            address=w.address,
                            service_account=w.service_account,
                            labels=labels,
                            ports=w.ports,
                            **common,
                        ),
                        record(
                            seed,
                            drained_id,
                            "draining",
                            cause,
                            w.address,
                            inst.state if inst is not None else "missing",
                        ),
                    ]
                )
                self._changes.labels(ns, gname, "draining", cause).inc()
                if self.drain_waiter is not None:
                    try:
                        await self.drain_waiter(drained_id, self.drain_ack_timeout)
                    except TimeoutError:
                        log.warning(
                            "VM group %s/%s: not every proxy ACKed the drain of %s in %.0fs",
                            ns,
                            gname,
                            workload,
                            self.drain_ack_timeout,
                        )
            await asyncio.sleep(drain_seconds)
            state = self.registry.vm_groups.groups.get((ns, gname))
            rec = state.instances.get(iid) if state is not None else None
            if rec is None or rec.phase != "draining":
                return
            seed = ("vm-group", ns, gname, iid, rec.since, "left")
            left_id = deterministic_id(*seed)
            await self._append(
                [
                    make_event(
                        WorkloadLeft,
                        event_id=left_id,
                        kind="vm",
                        namespace=ns,
                        name=workload,
                        **common,
                    ),
                    record(seed, left_id, "left", rec.cause, rec.address, rec.state),
                ]
            )
            self._changes.labels(ns, gname, "left", rec.cause).inc()
            self._update_gauges()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("VM group %s/%s: drain of %s failed", ns, gname, workload)
        finally:
            self._drains.pop((ns, gname, iid), None)

    async def wait_drained(self, timeout: float = 60.0) -> None:
        """Wait until no drain is in progress (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._drains:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._drains)} drains still running after {timeout}s")
            await asyncio.wait(list(self._drains.values()), timeout=deadline - time.monotonic())

    async def _remove_group(self, key: tuple[str, str], state: GroupState) -> None:
        ns, gname = key
        live = {iid: s for iid, s in state.instances.items()}
        for iid, s in sorted(live.items()):
            if s.phase in _IN_MESH:
                self._start_drain(
                    None, iid, s.workload, "group-deleted", None, namespace=ns, group_name=gname
                )
        if not live and state.status != "removed":
            await self._append(
                [
                    make_event(
                        VmGroupStatusChanged,
                        event_id=deterministic_id("vm-group", ns, gname, "removed", state.since),
                        actor=self.actor,
                        source="vm-group-controller",
                        namespace=ns,
                        group=gname,
                        status="removed",
                        reason="the VirtualMachineGroup was deleted",
                        instances=0,
                    )
                ]
            )
        self._known.pop(key, None)
