"""VM providers: entry-point discovery and the inventory directory provider, on real files, a
real SQLite log and the real projection runner."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from smc.api import LiveMeshChanges, MeshChanges
from smc.events import Position, ServiceRemoved, WorkloadJoined, WorkloadLeft, default_codec
from smc.events._sqlite import SqliteLog
from smc.informers import (
    InventoryDirectoryProvider,
    ProviderBridge,
    ProviderNotFound,
    VMProvider,
    available_vm_providers,
    load_vm_provider,
)
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.smi import load_documents


def vm(name: str, address: str, *, ns: str = "fleet", sa: str = "app", extra: str = "") -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: smc.dev/v1alpha1
        kind: VirtualMachine
        metadata:
          name: {name}
          namespace: {ns}
          labels: {{app: fleet}}
        spec:
          address: {address}
          serviceAccount: {sa}
          ports: [{{name: http, port: 8080}}]
        {extra}"""
    )


SERVICE = """\
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: fleet, namespace: fleet}
spec:
  backing: vm
  selector: {app: fleet}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so a change is visible even on coarse clocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= old:
        os.utime(path, ns=(st.st_atime_ns, old + 1_000_000))


@dataclass
class Replica:
    log: SqliteLog
    runner: ProjectionRunner
    registry: RegistryProjection
    live: LiveMeshChanges
    stop: asyncio.Event

    def vms(self) -> dict[str, str]:
        return {
            f"{ns}/{n}": w.address for (k, ns, n), w in self.registry.workloads.items() if k == "vm"
        }


@contextlib.asynccontextmanager
async def replica(db: Path) -> AsyncIterator[Replica]:
    log = SqliteLog(db)
    reg, pol = RegistryProjection(), PolicyProjection()
    runner = ProjectionRunner(log=log, projections=[reg, pol])
    live = LiveMeshChanges(changes=MeshChanges(log=log, registry=reg, policy=pol), runner=runner)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop=stop))
    try:
        await asyncio.wait_for(runner.caught_up.wait(), 10)
        yield Replica(log, runner, reg, live, stop)
    finally:
        stop.set()
        await task
        log.close()


@contextlib.asynccontextmanager
async def provider_running(
    rep: Replica, directory: Path
) -> AsyncIterator[tuple[InventoryDirectoryProvider, ProviderBridge]]:
    provider = InventoryDirectoryProvider(directory, interval=0.05)
    bridge = ProviderBridge(provider_name=provider.name, live=rep.live)
    stop = asyncio.Event()
    task = asyncio.create_task(provider.run(sink=bridge, stop=stop))
    try:
        yield provider, bridge
    finally:
        stop.set()
        await task


async def until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def records(db: Path) -> list[object]:
    log = SqliteLog(db)
    try:
        codec = default_codec()
        return [codec.decode(r.value, where=r.where) for r in log.read(start=Position())]
    finally:
        log.close()


def test_inventory_provider_is_discovered_through_entry_points(tmp_path: Path) -> None:
    found = available_vm_providers()
    assert found["inventory"] == "smc.informers.inventory:InventoryDirectoryProvider"
    p = load_vm_provider("inventory", directory=tmp_path, interval=1.0)
    assert isinstance(p, InventoryDirectoryProvider) and isinstance(p, VMProvider)
    assert p.name == "inventory" and p.directory == tmp_path
    with pytest.raises(ProviderNotFound, match="no VM provider named 'nope'"):
        load_vm_provider("nope")


def test_third_party_provider_plugin(tmp_path: Path) -> None:
    """A separately installed distribution registers a provider via its entry points."""
    (tmp_path / "acme_vms.py").write_text(
        textwrap.dedent(
            """\
            import asyncio

            class CloudProvider:
                def __init__(self, *, region):
                    self.name = "acme"
                    self.region = region

                async def run(self, *, sink, stop):
                    await stop.wait()
            """
        )
    )
    dist = tmp_path / "acme_vms-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-vms\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[smc.vm_providers]\nacme = acme_vms:CloudProvider\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert available_vm_providers()["acme"] == "acme_vms:CloudProvider"
        p = load_vm_provider("acme", region="eu-1")
        assert p.name == "acme" and isinstance(p, VMProvider)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("acme_vms", None)


async def test_vm_file_added_changed_removed(tmp_path: Path) -> None:
    inv, db = tmp_path / "inventory", tmp_path / "smc.db"
    inv.mkdir()
    write(inv / "svc.yaml", SERVICE)
    write(inv / "a" / "vm1.yaml", vm("vm1", "10.0.0.1"))
    async with replica(db) as rep, provider_running(rep, inv) as (_, bridge):
        await until(lambda: rep.vms() == {"fleet/vm1": "10.0.0.1"})
        assert ("fleet", "fleet") in rep.registry.services
        assert [e.address for e in rep.registry.endpoints_of("fleet", "fleet")] == ["10.0.0.1"]
        # a second VM file, then a change of address
        write(inv / "vm2.yml", vm("vm2", "10.0.0.2"))
        await until(lambda: len(rep.vms()) == 2)
        write(inv / "a" / "vm1.yaml", vm("vm1", "10.0.0.11"))
        await until(lambda: rep.vms().get("fleet/vm1") == "10.0.0.11")
        # the file disappears: the VM leaves; the other one stays
        (inv / "a" / "vm1.yaml").unlink()
        await until(lambda: rep.vms() == {"fleet/vm2": "10.0.0.2"})
        # the service file disappears
        (inv / "svc.yaml").unlink()
        await until(lambda: ("fleet", "fleet") not in rep.registry.services)
        await until(lambda: bridge.reports >= 5)  # counted after the change is applied
    evs = records(db)
    joined = [e for e in evs if isinstance(e, WorkloadJoined)]
    assert [(e.name, e.address) for e in joined] == [
        ("vm1", "10.0.0.1"),
        ("vm2", "10.0.0.2"),
        ("vm1", "10.0.0.11"),
    ]
    assert [e.name for e in evs if isinstance(e, WorkloadLeft)] == ["vm1"]
    assert [e.name for e in evs if isinstance(e, ServiceRemoved)] == ["fleet"]
    assert {e.envelope.actor for e in evs} == {"vm-provider:inventory"}  # type: ignore[attr-defined]
    assert all(dict(e.labels)["smc.dev/managed-by"] == "vm-provider.inventory" for e in joined)


async def test_broken_file_keeps_last_good_and_restart_is_quiet(tmp_path: Path) -> None:
    inv, db = tmp_path / "inventory", tmp_path / "smc.db"
    write(inv / "vm.yaml", vm("vm1", "10.0.0.1"))
    async with replica(db) as rep, provider_running(rep, inv) as (provider, bridge):
        await until(lambda: rep.vms() == {"fleet/vm1": "10.0.0.1"})
        write(inv / "vm.yaml", "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n  bad: [")
        scans = provider.scans
        await until(lambda: provider.scans > scans + 3)
        assert rep.vms() == {"fleet/vm1": "10.0.0.1"}  # not removed
        changed, report = provider.scan()
        assert not changed and report.errors and "invalid YAML" in report.errors[0].reason
        write(inv / "vm.yaml", vm("vm1", "10.0.0.5"))
        await until(lambda: rep.vms() == {"fleet/vm1": "10.0.0.5"})
    n = len(records(db))
    # a restarted replica finds everything unchanged and appends nothing
    async with replica(db) as rep, provider_running(rep, inv) as (_, bridge):
        await until(lambda: bridge.reports >= 1)
        applied, _ = bridge.last
        assert applied is not None and {r.status for r in applied.results} == {"unchanged"}
    assert len(records(db)) == n


async def test_provider_removes_only_what_it_owns(tmp_path: Path) -> None:
    inv, db = tmp_path / "inventory", tmp_path / "smc.db"
    inv.mkdir()
    async with replica(db) as rep:
        res = load_documents(vm("manual", "10.9.9.9"), source="cli")
        report = await rep.live.apply(res.resources, actor="alice", source="cli", request_id="r")
        assert report.ok
        async with provider_running(rep, inv):
            write(inv / "vm.yaml", vm("auto", "10.0.0.1"))
            await until(lambda: "fleet/auto" in rep.vms())
            (inv / "vm.yaml").unlink()
            await until(lambda: "fleet/auto" not in rep.vms())
        assert rep.vms() == {"fleet/manual": "10.9.9.9"}


async def test_two_replicas_on_one_inventory_append_once(tmp_path: Path) -> None:
    inv, db = tmp_path / "inventory", tmp_path / "smc.db"
    write(inv / "svc.yaml", SERVICE)
    write(inv / "vm.yaml", vm("vm1", "10.0.0.1"))
    # the same directory state gives the same causes (hence event ids) on every replica
    c1 = InventoryDirectoryProvider(inv).scan()[1].causes
    c2 = InventoryDirectoryProvider(inv).scan()[1].causes
    assert c1 == c2 and set(c1) == {"MeshService/fleet/fleet", "VirtualMachine/fleet/vm1"}
    async with (
        replica(db) as a,
        replica(db) as b,
        provider_running(a, inv),
        provider_running(b, inv),
    ):
        await until(lambda: "fleet/vm1" in a.vms() and "fleet/vm1" in b.vms())
        await asyncio.sleep(0.3)
    evs = records(db)
    assert sum(isinstance(e, WorkloadJoined) for e in evs) == 1
    ids = [e.envelope.event_id for e in evs]  # type: ignore[attr-defined]
    assert len(ids) == len(set(ids))
