"""VirtualMachineGroups: the manifest, and instances joining and leaving through the ``aws``
provider against moto's real server (AWS API over HTTP on 127.0.0.1), on a real SQLite log
and the real projection runner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from vmgroup_helpers import moto_server, smc_cli

from smc.api import LiveMeshChanges, MeshChanges, vmgroups_view
from smc.events import (
    Position,
    VmGroupStatusChanged,
    VmInstanceChanged,
    WorkloadJoined,
    WorkloadLeft,
    default_codec,
)
from smc.events._sqlite import SqliteLog
from smc.informers import (
    CloudProvider,
    VmGroupController,
    load_cloud_provider,
    tags_to_labels,
    workload_name,
)
from smc.informers.aws import AwsProvider
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.smi import (
    ManifestErrors,
    VirtualMachineGroup,
    load_documents,
    parse_manifest,
    to_manifest,
)
from smc.testing.moto import MotoServer, auto_scaling_group

SERVICE = """\
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: web, namespace: shop}
spec:
  backing: vm
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def group_yaml(name: str = "web", *, membership: str = "group: web-asg", drain: str = "0s") -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: smc.dev/v1alpha1
        kind: VirtualMachineGroup
        metadata: {{name: {name}, namespace: shop}}
        spec:
          template:
            metadata: {{labels: {{app: web}}}}
            serviceAccount: web
            ports: [{{name: http, port: 8080}}]
            services: [web]
          provider: {{name: aws, {membership}}}
          drain: {drain}
        """
    )


# -- the manifest ----------------------------------------------------------------------------


def test_group_manifest_round_trips_and_normalises() -> None:
    res = load_documents(group_yaml(), source="g.yaml")
    assert res.ok, res.errors
    (g,) = res.resources
    assert isinstance(g, VirtualMachineGroup)
    assert g.identity == "shop/web" and g.cloud_group == "web-asg" and g.services == ("web",)
    assert g.labels == (("app", "web"),) and g.drain_seconds == 0 and g.join_token_seconds == 600
    assert parse_manifest(to_manifest(g), document="again") == g


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        (
            "template: {}\n  provider: {name: aws, group: g}",
            "spec.template.serviceAccount",
            "required",
        ),
        ("template: {serviceAccount: a}\n  provider: {name: aws}", "spec.provider", "membership"),
        (
            "template: {serviceAccount: a}\n  provider: {name: aws, group: g, selector: {a: b}}",
            "spec.provider",
            "not both",
        ),
        (
            "template: {serviceAccount: a, metadata: {labels: {smc.dev/vm-group: x}}}\n"
            "  provider: {name: aws, group: g}",
            "spec.template.metadata.labels.smc.dev/vm-group",
            "reserved",
        ),
        (
            "template: {serviceAccount: a}\n  provider: {name: aws, group: g}\n  drain: soon",
            "spec.drain",
            "duration",
        ),
        (
            "template: {serviceAccount: a}\n  provider: {name: aws, group: g}\n  readiness: maybe",
            "spec.readiness",
            "proxy or running",
        ),
        (
            "template: {serviceAccount: a}\n  provider: {name: aws, group: g}\n  joinTokenTTL: 5s",
            "spec.joinTokenTTL",
            "between 1m and 24h",
        ),
        (
            "template: {serviceAccount: a, ports: [{name: h, port: 1}, {name: h, port: 1}]}\n"
            "  provider: {name: aws, group: g}",
            "spec.template.ports[1]",
            "duplicate",
        ),
        (
            "template: {serviceAccount: a}\n  provider: {name: Bad_Name, group: g}",
            "spec.provider.name",
            "DNS",
        ),
    ],
)
def test_group_manifest_errors_name_the_field(spec: str, field: str, reason: str) -> None:
    doc = f"apiVersion: smc.dev/v1alpha1\nkind: VirtualMachineGroup\nmetadata: {{name: g}}\nspec:\n  {spec}\n"
    res = load_documents(doc, source="bad.yaml")
    assert not res.resources
    assert any(e.path == field and reason in e.reason for e in res.errors), res.errors


def test_group_naming_a_missing_service_is_pending_with_a_field_warning(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db")
    try:
        reg, pol = RegistryProjection(), PolicyProjection()
        changes = MeshChanges(log=log, registry=reg, policy=pol)
        (g,) = load_documents(group_yaml(), source="g").resources
        plan = changes.plan_apply([g], actor="t", source="t", request_id="r")
        (res,) = plan.results
        assert res.status == "created" and not res.errors  # apply order never matters
        (warning,) = res.warnings
        assert "spec.template.services[0]" in warning
        assert "MeshService shop/web does not exist" in warning
    finally:
        log.close()


def test_tags_become_labels_without_provider_or_reserved_keys() -> None:
    got = tags_to_labels(
        {
            "Name": "web-1",
            "team": "shop",
            "aws:autoscaling:groupName": "web-asg",
            "smc.dev/vm-group": "evil",
            "bad key": "x",
            "ok": "spaces are not a label value",
        }
    )
    assert got == (("Name", "web-1"), ("team", "shop"))
    assert workload_name("web", "i-0ABC") == "web-i-0abc"


# -- the controller against moto's server ------------------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@dataclass
class Mesh:
    log: SqliteLog
    runner: ProjectionRunner
    registry: RegistryProjection
    policy: PolicyProjection
    live: LiveMeshChanges
    groups: VmGroupController
    provider: CloudProvider

    async def apply(self, text: str) -> None:
        res = load_documents(text, source="test")
        assert res.ok, res.errors
        report = await self.live.apply(
            list(res.resources), actor="tester", source="test", request_id=f"r{time.time_ns()}"
        )
        assert report.ok, report.as_dict()

    def vms(self, group: str = "web") -> dict[str, str]:
        return {
            n: w.address
            for (k, ns, n), w in self.registry.workloads.items()
            if k == "vm" and dict(w.labels).get("smc.dev/vm-group") == group
        }

    def endpoints(self) -> set[str]:
        return {e.address for e in self.registry.endpoints_of("shop", "web")}

    def records(self) -> list[Any]:
        codec = default_codec()
        return [codec.decode(r.value, where=r.where) for r in self.log.read(start=Position())]


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, provider: CloudProvider) -> AsyncIterator[Mesh]:
    log = SqliteLog(tmp_path / "log.db")
    reg, pol = RegistryProjection(), PolicyProjection()
    runner = ProjectionRunner(log=log, projections=[reg, pol])
    live = LiveMeshChanges(changes=MeshChanges(log=log, registry=reg, policy=pol), runner=runner)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop=stop))
    groups = VmGroupController(live=live, providers={"aws": provider}, interval=3600)
    try:
        await asyncio.wait_for(runner.caught_up.wait(), 10)
        yield Mesh(log, runner, reg, pol, live, groups, provider)
    finally:
        await groups.close()
        stop.set()
        await task
        log.close()


def asg_ids(moto: MotoServer, name: str) -> list[str]:
    body = moto.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[name])
    return [i["InstanceId"] for i in body["AutoScalingGroups"][0]["Instances"]]


def changes_of(m: Mesh, phase: str) -> dict[str, str]:
    return {
        e.instance_id: e.cause
        for e in m.records()
        if isinstance(e, VmInstanceChanged) and e.phase == phase
    }


async def test_auto_scaling_group_scales_0_5_2_and_stops_and_terminates(
    tmp_path: Path, moto: MotoServer
) -> None:
    auto_scaling_group(moto, "web-asg", tags={"team": "shop"})
    asg = moto.client("autoscaling")
    ec2 = moto.client("ec2")
    provider = load_cloud_provider("aws", **moto.provider_options())
    async with mesh(tmp_path, provider) as m:
        await m.apply(SERVICE + "---\n" + group_yaml())
        (r,) = await m.groups.poll_once()
        assert r.joined == 0 and not m.vms()

        asg.set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=5)
        ids = asg_ids(moto, "web-asg")
        (r,) = await m.groups.poll_once()
        assert r.joined == 5
        vms = m.vms()
        assert set(vms) == {workload_name("web", i) for i in ids}
        assert all(a.startswith("127.0.0.") for a in vms.values())
        assert m.endpoints() == set(vms.values())
        w = m.registry.workloads[("vm", "shop", workload_name("web", ids[0]))]
        labels = dict(w.labels)
        assert labels["app"] == "web" and labels["team"] == "shop" and w.identity == "shop/web"
        assert labels["smc.dev/instance-id"] == ids[0] and "backs.smc.dev/web" in labels
        assert set(changes_of(m, "joined").values()) == {"scale-out"}
        # nothing changed: nothing appended
        before = len(m.records())
        (r,) = await m.groups.poll_once()
        assert r.events == 0 and len(m.records()) == before

        asg.set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=2)
        kept = asg_ids(moto, "web-asg")
        removed = set(ids) - set(kept)
        await m.groups.poll_once()
        await m.groups.wait_drained(60)
        assert set(m.vms()) == {workload_name("web", i) for i in kept}
        left = changes_of(m, "left")
        assert {i: left[i] for i in removed} == dict.fromkeys(removed, "scale-in")
        draining = changes_of(m, "draining")
        assert set(draining) == removed

        # a stopped instance drains and leaves, its endpoint first
        ec2.stop_instances(InstanceIds=[kept[0]])
        await m.groups.poll_once()
        await m.groups.wait_drained(60)
        assert workload_name("web", kept[0]) not in m.vms()
        assert changes_of(m, "left")[kept[0]] == "stopped"
        # terminated outside the group's own scaling: moto's group replaces it
        ec2.terminate_instances(InstanceIds=[kept[1]])
        await m.groups.poll_once()
        await m.groups.wait_drained(60)
        assert changes_of(m, "left")[kept[1]] == "terminated"
        now = asg_ids(moto, "web-asg")
        assert set(m.vms()) == {
            workload_name("web", i)
            for i in now
            if i != kept[0]  # stopped: still in the group, not in the mesh
        }
        # every join and leave is on the log with the actor, each WorkloadJoined/Left paired
        recs = m.records()
        joined_ids = {e.event_id for e in recs if isinstance(e, WorkloadJoined)}
        left_ids = {e.event_id for e in recs if isinstance(e, WorkloadLeft)}
        for e in recs:
            if isinstance(e, VmInstanceChanged):
                assert e.envelope.actor == "vm-group-controller"
                assert e.envelope.source == "vm-provider:aws"
                target = left_ids if e.phase == "left" else joined_ids
                assert e.envelope.causation_id in target


async def test_deleting_a_group_drains_its_instances_and_removes_it(
    tmp_path: Path, moto: MotoServer
) -> None:
    auto_scaling_group(moto, "gone-asg", cidr="10.50.0.0/24", capacity=2)
    provider = load_cloud_provider("aws", **moto.provider_options())
    async with mesh(tmp_path, provider) as m:
        text = SERVICE + "---\n" + group_yaml("gone", membership="group: gone-asg")
        await m.apply(text)
        await m.groups.poll_once()
        assert len(m.vms("gone")) == 2
        (g,) = load_documents(
            group_yaml("gone", membership="group: gone-asg"), source="t"
        ).resources
        report = await m.live.delete([g], actor="tester", source="test", request_id="del")
        assert report.ok, report.as_dict()
        await m.groups.poll_once()
        await m.groups.wait_drained(60)
        assert m.vms("gone") == {}
        assert set(changes_of(m, "left").values()) == {"group-deleted"}
        await m.groups.poll_once()
        assert [v for v in vmgroups_view(m.registry, m.policy) if v["name"] == "gone"] == []
        assert ("shop", "gone") not in m.registry.vm_groups.groups


async def test_two_replicas_polling_one_cloud_append_each_change_once(
    tmp_path: Path, moto: MotoServer
) -> None:
    auto_scaling_group(moto, "twin-asg", cidr="10.60.0.0/24", capacity=3)
    a = load_cloud_provider("aws", **moto.provider_options())
    b = load_cloud_provider("aws", **moto.provider_options())
    async with mesh(tmp_path, a) as one, mesh(tmp_path, b) as two:
        await one.apply(SERVICE + "---\n" + group_yaml("twin", membership="group: twin-asg"))
        await two.runner.caught_up.wait()
        await asyncio.gather(one.groups.poll_once(), two.groups.poll_once())
        await asyncio.gather(one.groups.poll_once(), two.groups.poll_once())
        moto.client("autoscaling").set_desired_capacity(
            AutoScalingGroupName="twin-asg", DesiredCapacity=1
        )
        await asyncio.gather(one.groups.poll_once(), two.groups.poll_once())
        await asyncio.gather(one.groups.wait_drained(60), two.groups.wait_drained(60))
        recs = one.records()
        by_phase: dict[str, list[str]] = {}
        for e in recs:
            if isinstance(e, VmInstanceChanged):
                by_phase.setdefault(e.phase, []).append(e.instance_id)
        # each change once, although both replicas saw and wrote it
        assert (
            sorted(by_phase["joined"]) == sorted(set(by_phase["joined"]))
            and len(by_phase["joined"]) == 3
        )
        assert len(by_phase["left"]) == 2 == len(set(by_phase["left"]))
        assert len({e.event_id for e in recs}) == len(recs)
        assert one.vms("twin") == two.vms("twin") and len(one.vms("twin")) == 1
        assert one.registry.digest() == two.registry.digest()


async def test_provider_outage_keeps_instances_marked_stale(tmp_path: Path) -> None:
    server = MotoServer(workdir=tmp_path)
    server.start()
    try:
        auto_scaling_group(server, "web-asg", capacity=3)
        provider = load_cloud_provider("aws", **server.provider_options(timeout=1))
        async with mesh(tmp_path, provider) as m:
            await m.apply(SERVICE + "---\n" + group_yaml())
            await m.groups.poll_once()
            assert len(m.vms()) == 3
            server.stop()
            (r,) = await m.groups.poll_once()
            assert r.stale
            assert len(m.vms()) == 3 and len(m.endpoints()) == 3  # kept, not emptied
            (view,) = vmgroups_view(m.registry, m.policy)
            assert view["status"] == "stale" and view["joined"] == 3
            assert "DescribeAutoScalingGroups" in view["reason"] or "describe" in view["reason"]
            metrics = generate_latest(m.groups.metrics).decode()
            assert 'smc_vmgroup_stale{group="web",namespace="shop"} 1.0' in metrics
            assert (
                'smc_vmgroup_instances{group="web",namespace="shop",phase="joined"} 3.0' in metrics
            )
            # a second failed poll appends nothing more
            n = len(m.records())
            await m.groups.poll_once()
            assert len(m.records()) == n
            # back (with a fresh state: a new group of 2): ok again, the mesh follows it
            server.start()
            auto_scaling_group(server, "web-asg", capacity=2)
            await m.groups.poll_once()
            await m.groups.wait_drained(60)
            (view,) = vmgroups_view(m.registry, m.policy)
            assert view["status"] == "ok" and view["joined"] == 2 and len(m.vms()) == 2
            statuses = [e.status for e in m.records() if isinstance(e, VmGroupStatusChanged)]
            assert statuses == ["stale", "ok"]
            metrics = generate_latest(m.groups.metrics).decode()
            assert 'smc_vmgroup_stale{group="web",namespace="shop"} 0.0' in metrics
    finally:
        server.stop()


async def test_selector_group_pages_through_1000_instances(
    tmp_path: Path, moto: MotoServer
) -> None:
    ec2 = moto.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.0.0/16")["Subnet"]["SubnetId"]
    for _ in range(100):  # 100 reservations of 10 (moto pages by reservation, AWS by instance)
        ec2.run_instances(
            ImageId="ami-12c6146b",
            MinCount=10,
            MaxCount=10,
            SubnetId=subnet,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "role", "Value": "batch"}]}
            ],
        )
    provider = AwsProvider(**moto.provider_options(page_size=10, timeout=120))
    async with mesh(tmp_path, provider) as m:
        await m.apply(SERVICE + "---\n" + group_yaml("batch", membership="selector: {role: batch}"))
        (r,) = await m.groups.poll_once()
        assert r.joined == 1000 and len(m.vms("batch")) == 1000
        assert provider.stats.calls_by_operation == {"DescribeInstances": 10}
        (view,) = [g for g in vmgroups_view(m.registry, m.policy) if g["name"] == "batch"]
        assert view["joined"] == 1000


async def test_polling_an_unchanged_group_costs_two_calls_whatever_its_size(
    tmp_path: Path, moto: MotoServer
) -> None:
    # (benchmarks/vm_groups.py measures the same at 1,000 instances)
    auto_scaling_group(moto, "big-asg", cidr="10.30.0.0/16", capacity=200)
    provider = AwsProvider(**moto.provider_options(resync_seconds=3600, timeout=120))
    async with mesh(tmp_path, provider) as m:
        await m.apply(SERVICE + "---\n" + group_yaml("big", membership="group: big-asg"))
        (r,) = await m.groups.poll_once()
        assert r.joined == 200
        full = provider.stats.described
        assert full == 200
        calls = provider.stats.calls
        (r,) = await m.groups.poll_once()
        assert r.events == 0
        assert provider.stats.calls - calls == 2  # the group's member list + not-running ones
        assert provider.stats.described == full  # no instance described again
        # 3 more instances: described alone
        moto.client("autoscaling").set_desired_capacity(
            AutoScalingGroupName="big-asg", DesiredCapacity=203
        )
        calls = provider.stats.calls
        (r,) = await m.groups.poll_once()
        assert r.joined == 3
        assert provider.stats.calls - calls == 3 and provider.stats.described == full + 3


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_bad_group_manifest_is_a_field_error_not_a_crash() -> None:
    with pytest.raises(ManifestErrors) as info:
        parse_manifest(
            {
                "apiVersion": "smc.dev/v1alpha1",
                "kind": "VirtualMachineGroup",
                "metadata": {"name": "g"},
                "spec": {"template": "nope", "provider": {"name": "aws", "group": "x"}},
            },
            document="d",
        )
    assert info.value.errors[0].path == "spec.template"


# -- inside smc serve ------------------------------------------------------------------------


def test_smc_serve_runs_the_groups_and_shows_them_stale_in_get_and_metrics(
    tmp_path: Path,
) -> None:
    from smc.testing.serve import ServeProcess, eventually

    serve = None
    with moto_server(tmp_path) as server:
        try:
            auto_scaling_group(server, "web-asg", capacity=3)
            cloud = f"aws:endpoint_url={server.endpoint_url},region=us-east-1,timeout=2"
            serve = ServeProcess(tmp_path, args=["--cloud", cloud, "--vm-group-interval", "0.2"])
            serve.wait_ready()
            status, body = serve.request(
                "/v1/apply",
                method="POST",
                body=(SERVICE + "---\n" + group_yaml(drain="0s")).encode(),
                headers={"Content-Type": "application/yaml"},
            )
            assert status == 200, body

            def groups() -> Any:
                return serve.request("/v1/vmgroups")[1]["items"]

            eventually(
                lambda: groups()[0]["joined"] == 3, what="3 instances", diag=serve.tail, wait=60
            )
            server.stop()  # the provider goes away: the instances stay, marked stale
            eventually(
                lambda: groups()[0]["status"] == "stale", what="stale", diag=serve.tail, wait=60
            )
            (g,) = groups()
            assert g["joined"] == 3 and g["reason"]
            metrics = serve.request("/metrics")[1]
            assert 'smc_vmgroup_stale{group="web",namespace="shop"} 1.0' in metrics
            assert (
                'smc_vmgroup_instances{group="web",namespace="shop",phase="joined"} 3.0' in metrics
            )
            assert "testing" not in metrics  # no credential in metrics
            out = smc_cli(tmp_path / "log.db", "get", "vmgroups", "-o", "json")
            assert out.returncode == 0, out.stderr
            (cli,) = json.loads(out.stdout)
            assert cli["status"] == "stale" and cli["joined"] == 3
            assert {i["nodeId"] for i in cli["instances"]} == {
                f"shop/{i['workload']}" for i in cli["instances"]
            }
            table = smc_cli(tmp_path / "log.db", "get", "vmgroups")
            assert "stale" in table.stdout and "web-asg" in table.stdout
        finally:
            if serve is not None:
                serve.stop()


def test_cloud_options_parse_and_credentials_are_refused_on_the_command_line() -> None:
    import click

    from smc.cli._vmgroups import parse_clouds

    assert parse_clouds(["aws:endpoint_url=http://127.0.0.1:5000, region=eu-west-1", "azure"]) == {
        "aws": {"endpoint_url": "http://127.0.0.1:5000", "region": "eu-west-1"},
        "azure": {},
    }
    for bad, why in (
        ("aws:aws_secret_access_key=abc", "credential"),
        ("aws:session_token=abc", "credential"),
        ("aws:region", "not key=value"),
        (":region=x", "name is missing"),
    ):
        with pytest.raises(click.BadParameter, match=why):
            parse_clouds([bad])
    with pytest.raises(Exception, match="no cloud VM provider named 'nope'"):
        load_cloud_provider("nope")
