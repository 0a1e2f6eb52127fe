"""VirtualMachineGroup instances as real Envoys: an Auto Scaling group on moto's real server
whose instances get addresses on 127.0.0.x, each stood in for by a real Envoy and an app there,
a client behind its own Envoy sending requests the whole time, and the group controller
polling as in ``smc serve``. Scale-out: new instances get requests. Drained scale-in: 0 failed
requests, slow requests in flight finish, removed instances get none once they left, every
client ACKed the EDS without them before they left, and the log shows each join and leave with
its cause. Also 0 -> 100 instances in one step: all in the client's EDS within 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from vmgroup_helpers import group_controller, moto_server, smc_cli, until

from smc.events import Position, VmInstanceChanged, WorkloadLeft, default_codec
from smc.informers import VmGroupController, workload_name
from smc.testing.envoy import envoy_binary
from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml
from smc.testing.moto import MotoServer, auto_scaling_group

pytestmark = pytest.mark.envoy

NS = "shop"
MESH = f"""\
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh, namespace: {NS}}}
spec: {{permissiveTrafficMode: true}}
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {{name: web, namespace: {NS}}}
spec:
  backing: vm
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachineGroup
metadata: {{name: web, namespace: {NS}}}
spec:
  template:
    metadata: {{labels: {{app: web}}}}
    serviceAccount: web
    ports: [{{name: http, port: 8080}}]
    services: [web]
  provider: {{name: aws, group: web-asg}}
  drain: 2s
"""


@dataclass
class Fleet:
    cp: ControlPlane
    moto: MotoServer
    groups: VmGroupController
    client: Sidecar
    workdir: Path
    instances: dict[str, Sidecar] = field(default_factory=dict)  # instance id -> stand-in

    def asg_ids(self) -> list[str]:
        asg = self.moto.client("autoscaling")
        body = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["web-asg"])
        return sorted(i["InstanceId"] for i in body["AutoScalingGroups"][0]["Instances"])

    async def boot(self, ids: list[str]) -> None:
        """What a new instance does: its app and its Envoy start on its own address (the
        app's port is published as the instance tag ``smc.dev/app-port``)."""
        ec2 = self.moto.client("ec2")
        body = ec2.describe_instances(InstanceIds=ids)
        for r in body["Reservations"]:
            for raw in r["Instances"]:
                iid, address = raw["InstanceId"], raw["PrivateIpAddress"]
                sc = Sidecar(
                    namespace=NS,
                    name=workload_name("web", iid),
                    address=address,
                    workdir=self.workdir,
                )
                await sc.start_app()
                ec2.create_tags(
                    Resources=[iid], Tags=[{"Key": "smc.dev/app-port", "Value": str(sc.app_port)}]
                )
                self.instances[iid] = sc

    async def start_envoys(self) -> None:
        for sc in self.instances.values():
            if sc.envoy is None:
                await self.cp.start_proxy(sc, delta=False)

    def eds_hosts(self, sidecar: Sidecar) -> set[str]:
        """Addresses the Envoy of ``sidecar`` holds for service web (its /clusters)."""
        assert sidecar.envoy is not None
        with urllib.request.urlopen(sidecar.envoy.admin_url + "/clusters?format=json") as r:
            data = json.load(r)
        out: set[str] = set()
        for c in data.get("cluster_statuses", []):
            if c["name"].startswith(f"outbound|{NS}/web|"):
                for h in c.get("host_statuses", []):
                    out.add(h["address"]["socket_address"]["address"])
        return out

    def records(self) -> list[Any]:
        codec = default_codec()
        return [codec.decode(r.value, where=r.where) for r in self.cp.log.read(start=Position())]


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, *, readiness: str = "proxy") -> AsyncIterator[Fleet]:
    envoy_binary()
    stack = contextlib.ExitStack()
    moto = stack.enter_context(moto_server(tmp_path))
    cp = ControlPlane(workdir=tmp_path)
    await cp.start()
    groups = group_controller(cp, moto)
    client = Sidecar(namespace=NS, name="buyer", address="127.0.1.77", workdir=tmp_path)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    f = Fleet(cp, moto, groups, client, tmp_path)
    try:
        auto_scaling_group(moto, "web-asg", capacity=0)
        await client.start_app()
        mesh = MESH + f"  readiness: {readiness}\n"
        await cp.apply(mesh + "---\n" + vm_yaml(client, service_account="buyer"))
        await cp.start_proxy(client, delta=False)
        assert client.envoy is not None
        await client.envoy.wait_listener("outbound")
        task = asyncio.create_task(groups.run(stop=stop))
        yield f
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await groups.close()
        for sc in [client, *f.instances.values()]:
            await sc.stop()
        await cp.stop()
        cp.close()
        stack.close()


@dataclass
class Load:
    """Requests from the client's Envoy to web, all the time; what answered each."""

    answered: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    log: list[tuple[float, str]] = field(default_factory=list)  # (time, app) per answer


async def send(session: aiohttp.ClientSession, url: str, load: Load, path: str = "/") -> None:
    try:
        async with session.get(url + path, headers={"Host": "web.shop"}) as resp:
            body = await resp.json(content_type=None) if resp.status == 200 else None
            if resp.status != 200 or body is None:
                load.failed.append(f"{resp.status} {await resp.text()}")
                return
            load.answered[body["app"]] += 1
            load.log.append((time.monotonic(), body["app"]))
    except (aiohttp.ClientError, TimeoutError) as exc:
        load.failed.append(repr(exc))


async def generate(url: str, load: Load, stop: asyncio.Event, concurrency: int = 4) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def worker() -> None:
            while not stop.is_set():
                await send(session, url, load)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def test_scale_out_and_drained_scale_in_with_real_envoys(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        await until(lambda: f.groups.polls >= 2, "the controller to poll the empty group")
        asg = f.moto.client("autoscaling")
        asg.set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=3)
        first = f.asg_ids()
        await f.boot(first)
        await f.start_envoys()
        addresses = {sc.address for sc in f.instances.values()}
        await until(lambda: f.eds_hosts(f.client) == addresses, "3 instances in the client's EDS")
        load = Load()
        stop = asyncio.Event()
        gen = asyncio.create_task(generate(f.client.outbound, load, stop))
        await until(lambda: len(load.answered) == 3, "requests reaching all 3 instances")

        # scale-out 3 -> 5: the new instances get requests
        asg.set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=5)
        new = sorted(set(f.asg_ids()) - set(first))
        await f.boot(new)
        await f.start_envoys()
        names = {workload_name("web", i) for i in f.asg_ids()}
        await until(
            lambda: set(load.answered) == names,
            "requests reaching all 5 instances",
            diag=lambda: (
                dict(load.answered),
                {
                    i: s.phase
                    for i, s in f.groups.registry.vm_groups.groups[(NS, "web")].instances.items()
                },
                load.failed[:3],
            ),
        )

        # drained scale-in 5 -> 2 while slow requests are in flight to every instance
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            slow = Load()
            slow_tasks = [
                asyncio.create_task(send(s, f.client.outbound, slow, "/slow?delay=1.5"))
                for _ in range(10)
            ]
            await asyncio.sleep(0.2)
            asg.set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=2)
            kept = f.asg_ids()
            removed = [i for i in f.instances if i not in kept]
            assert len(removed) == 3
            await until(
                lambda: all(
                    (
                        ("vm", NS, workload_name("web", i))
                        not in f.cp.live.changes.registry.workloads
                    )
                    for i in removed
                ),
                "the removed instances to leave",
            )
            left_at = time.monotonic()
            # they are gone from the mesh: the cloud may now terminate them
            for i in removed:
                await f.instances[i].stop()
            await asyncio.sleep(1.5)
            stop.set()
            await gen
            await asyncio.gather(*slow_tasks)
        assert load.failed == [], load.failed[:5]
        assert slow.failed == [] and sum(slow.answered.values()) == 10
        gone = {workload_name("web", i) for i in removed}
        late = [(t, app) for t, app in load.log if app in gone and t > left_at]
        assert late == []
        assert f.eds_hosts(f.client) == {f.instances[i].address for i in kept}

        # the log: each join and leave with its cause; every drain ACKed by every proxy
        # before the instance left
        recs = f.records()
        changes = [e for e in recs if isinstance(e, VmInstanceChanged)]
        first: dict[str, str] = {}
        for e in changes:
            if e.phase == "joined":
                first.setdefault(e.instance_id, e.cause)
        assert first == dict.fromkeys(f.instances, "scale-out")
        # each served only once its own proxy had ACKed its config
        assert {e.instance_id for e in changes if e.phase == "serving"} == set(f.instances)
        assert {e.cause for e in changes if e.phase == "serving"} == {"proxy-ready"}
        assert {(e.instance_id, e.cause) for e in changes if e.phase == "left"} == {
            (i, "scale-in") for i in removed
        }
        # smc audit shows them, each with its cause
        log_db = f.workdir / "log.db"
        audit = smc_cli(log_db, "audit", "--json", "--actor", "vm-group-controller", timeout=120)
        assert audit.returncode == 0, audit.stderr
        rows = [
            r["payload"]
            for r in json.loads(audit.stdout)["events"]
            if r["type"] == "smc.registry.VmInstanceChanged"
        ]
        assert {(r["instance_id"], r["cause"]) for r in rows if r["phase"] == "left"} == {
            (i, "scale-in") for i in removed
        }
        table = smc_cli(
            log_db,
            "audit",
            "--actor",
            "vm-group-controller",
            timeout=120,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert table.stdout.count("left (scale-in)") == 3, table.stdout[-3000:]
        assert "joined (scale-out)" in table.stdout
        for e in changes:
            if e.phase != "draining":
                continue
            acked = f.cp.controller.acked_by_all(e.envelope.causation_id or "")
            assert acked is not None, "a drain was not ACKed by every proxy"
            (left,) = [
                x
                for x in recs
                if isinstance(x, WorkloadLeft) and x.name == workload_name("web", e.instance_id)
            ]
            assert acked <= left.envelope.occurred_at.timestamp() + 0.001


async def test_zero_to_one_hundred_instances_in_every_client_eds_within_10s(
    tmp_path: Path,
) -> None:
    # no Envoy per instance here (100 of them would not fit this machine): the group's
    # instances get traffic as soon as they run (readiness: running)
    async with fleet(tmp_path, readiness="running") as f:
        await until(lambda: f.groups.polls >= 2, "the controller to poll the empty group")
        start = time.monotonic()
        f.moto.client("autoscaling").set_desired_capacity(
            AutoScalingGroupName="web-asg", DesiredCapacity=100
        )
        ids = f.asg_ids()
        assert len(ids) == 100
        await until(lambda: len(f.eds_hosts(f.client)) == 100, "100 endpoints in EDS", 60)
        took = time.monotonic() - start
        print(f"0 -> 100 instances in the client's EDS: {took:.2f}s")
        assert took < 10.0
        assert len(f.groups.registry.vm_groups.groups[(NS, "web")].instances) == 100
