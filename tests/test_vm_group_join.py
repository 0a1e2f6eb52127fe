"""Instances of a VirtualMachineGroup bootstrap themselves: the group controller puts a join
token in the Auto Scaling group's user data (moto's real server), a new instance reads it
from its own user data, its SMC agent makes the key there and trades the token plus a CSR over
TLS for its certificate (the certificate service of a real control plane), its real Envoy
serves with it; replayed, expired, other-group and non-member tokens are refused and counted;
on scale-in the instance's certificate is revoked only after its drain."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest
from vmgroup_helpers import group_controller, moto_server, until

from smc.agent import Agent, AgentConfig
from smc.agent._protocol import SignRequest
from smc.events import (
    JoinTokenIssued,
    Position,
    ProxyCertificateIssued,
    ProxyCertificateRevoked,
    VmInstanceChanged,
    WorkloadLeft,
    default_codec,
)
from smc.identity import GroupJoinTokens, ProofRefused, group_join_token_event, parse_user_data
from smc.informers import VmGroupController, workload_name
from smc.testing.envoy import envoy_binary
from smc.testing.mesh import ControlPlane, Sidecar
from smc.testing.moto import MotoServer, auto_scaling_group

pytestmark = pytest.mark.envoy

NS = "shop"
SMC = [sys.executable, "-m", "smc.cli"]


def group(name: str, asg: str, sa: str) -> str:
    return f"""\
apiVersion: smc.dev/v1alpha1
kind: VirtualMachineGroup
metadata: {{name: {name}, namespace: {NS}}}
spec:
  template:
    serviceAccount: {sa}
    ports: [{{name: http, port: 8080}}]
  provider: {{name: aws, group: {asg}}}
  drain: 1s
  joinTokenTTL: 10m
"""


@dataclass
class World:
    cp: ControlPlane
    moto: MotoServer
    groups: VmGroupController
    workdir: Path
    stand_ins: list[Sidecar] = field(default_factory=list)

    def ids(self, asg: str) -> list[str]:
        body = self.moto.client("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[asg]
        )
        return sorted(i["InstanceId"] for i in body["AutoScalingGroups"][0]["Instances"])

    def user_data(self, iid: str) -> dict[str, str]:
        """What the instance reads from its metadata service: its user data."""
        raw = self.moto.client("ec2").describe_instance_attribute(
            InstanceId=iid, Attribute="userData"
        )
        return parse_user_data(base64.b64decode(raw["UserData"]["Value"]).decode())

    def address(self, iid: str) -> str:
        body = self.moto.client("ec2").describe_instances(InstanceIds=[iid])
        return str(body["Reservations"][0]["Instances"][0]["PrivateIpAddress"])

    def records(self) -> list[Any]:
        codec = default_codec()
        return [codec.decode(r.value, where=r.where) for r in self.cp.log.read(start=Position())]

    async def boot(self, iid: str, group: str) -> Sidecar:
        """An instance booting: ``smc vm join`` turns its user data into the agent's files,
        its agent makes its key and trades the token for its certificate, then its Envoy
        starts with the agent's SDS."""
        raw = self.moto.client("ec2").describe_instance_attribute(
            InstanceId=iid, Attribute="userData"
        )
        ud = self.workdir / f"user-data-{iid}"
        ud.write_bytes(base64.b64decode(raw["UserData"]["Value"]))
        out = self.workdir / f"join-{iid}"
        done = await asyncio.to_thread(
            subprocess.run,
            [*SMC, "vm", "join", "--user-data", str(ud), "--instance-id", iid, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"node id {NS}/{workload_name(group, iid)}" in done.stdout
        assert (out / "join-token").stat().st_mode & 0o077 == 0
        assert f"{NS}/{workload_name(group, iid)}" in (out / "bootstrap.yaml").read_text()
        data = self.user_data(iid)
        sc = Sidecar(
            namespace=NS,
            name=workload_name(group, iid),
            address=self.address(iid),
            workdir=self.workdir,
        )
        await sc.start_app()
        folder = sc.proxy_dir
        folder.mkdir(parents=True, exist_ok=True)
        token_file = out / "join-token"  # what smc vm join wrote
        bundle = (out / "ca.pem").read_text()
        assert bundle.strip() == base64.b64decode(data["SMC_CA_BUNDLE"]).decode().strip()
        sc._ca_pem = bundle  # its Envoy speaks mTLS to ADS with the agent's certificate
        sc.agent = Agent(
            AgentConfig(
                proxy=sc.node_id,
                ca_address=data["SMC_CA_ADDRESS"],
                ca_bundle_pem=bundle,
                proxy_dir=sc.proxy_dir,
                join_token_file=token_file,
                retry_initial=0.1,
            )
        )
        sc._agent_stop = asyncio.Event()
        sc._agent_task = asyncio.create_task(sc.agent.run(stop=sc._agent_stop))
        await asyncio.wait_for(sc.agent.ready.wait(), timeout=90)
        host, _, port = data["SMC_ADS_ADDRESS"].rpartition(":")
        assert host == "127.0.0.1"
        sc.start_envoy(ads_port=int(port), delta=False)
        self.stand_ins.append(sc)
        return sc


@contextlib.asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    envoy_binary()
    stack = contextlib.ExitStack()
    moto = stack.enter_context(moto_server(tmp_path))
    cp = ControlPlane(workdir=tmp_path, agents=True, revoke_grace=300)
    await cp.start()
    groups = group_controller(
        cp,
        moto,
        join_tokens=GroupJoinTokens(
            ca=f"127.0.0.1:{cp.ca_port}", ads=f"127.0.0.1:{cp.port}", ca_bundle=cp.ca_bundle
        ),
    )
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    w = World(cp, moto, groups, tmp_path)
    try:
        auto_scaling_group(moto, "web-asg", capacity=0)
        auto_scaling_group(moto, "api-asg", cidr="127.0.2.0/24", capacity=0)
        await cp.apply(group("web", "web-asg", "web") + "---\n" + group("api", "api-asg", "api"))
        task = asyncio.create_task(groups.run(stop=stop))
        yield w
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await groups.close()
        for sc in w.stand_ins:
            await sc.stop()
        await cp.stop()
        cp.close()
        stack.close()


def csr_for(node: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def refused(w: World, node: str, token: str) -> str:
    assert w.cp.identity is not None
    with pytest.raises(ProofRefused) as info:
        await w.cp.identity.sign(SignRequest(proxy=node, csr_pem=csr_for(node), join_token=token))
    return info.value.kind


async def test_instances_join_with_the_group_token_and_attackers_are_refused(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        await until(lambda: w.groups.tokens_issued >= 2, "a join token in each group's user data")
        asg = w.moto.client("autoscaling")
        asg.set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=2)
        asg.set_desired_capacity(AutoScalingGroupName="api-asg", DesiredCapacity=1)
        web = w.ids("web-asg")
        (api,) = w.ids("api-asg")
        await until(
            lambda: all(
                ("vm", NS, workload_name("web", i)) in w.cp.live.changes.registry.workloads
                for i in web
            ),
            "the instances in the registry",
        )
        data = w.user_data(web[0])
        token = data["SMC_JOIN_TOKEN"]
        assert data["SMC_GROUP"] == "shop/web" and len(token) > 40
        # only the digest is on the log: the token itself is nowhere in it
        raw = b"".join(r.value for r in w.cp.log.read(start=Position()))
        assert token.encode() not in raw
        issued = [e for e in w.records() if isinstance(e, JoinTokenIssued)]
        assert {e.proxy for e in issued} == {"vmgroup/shop/web", "vmgroup/shop/api"}

        # each instance bootstraps itself from its user data; the key stays in its agent
        for iid in web:
            sc = await w.boot(iid, "web")
            assert sc.envoy is not None
            await sc.envoy.wait_live()
        await until(
            lambda: (
                {
                    e.instance_id
                    for e in w.records()
                    if isinstance(e, VmInstanceChanged) and e.phase == "serving"
                }
                == set(web)
            ),
            "both instances serving (their proxies ACKed their config)",
        )
        certs = [e for e in w.records() if isinstance(e, ProxyCertificateIssued)]
        assert {(e.proxy, e.proof.partition(":")[0]) for e in certs} == {
            (f"vm/shop/{workload_name('web', i)}", "group-join-token") for i in web
        }
        assert b"PRIVATE KEY" not in b"".join(r.value for r in w.cp.log.read(start=Position()))

        # the attacker's side
        node = f"{NS}/{workload_name('web', web[0])}"
        assert await refused(w, node, token) == "join-token-replayed"  # the same instance again
        api_node = f"{NS}/{workload_name('api', api)}"
        await until(
            lambda: ("vm", NS, workload_name("api", api)) in w.cp.live.changes.registry.workloads,
            "the api instance",
        )
        assert await refused(w, api_node, token) == "join-token-other-group"
        assert await refused(w, f"{NS}/web-i-00000000000000000", token) == "workload-gone"
        assert await refused(w, node, "made-up-token") == "join-token-unknown"
        old, event = group_join_token_event(
            namespace=NS,
            group="web",
            identity="spiffe://cluster.local/ns/shop/sa/web",
            ttl=timedelta(minutes=1),
            now=datetime.now(UTC) - timedelta(hours=1),
        )
        appended = await asyncio.to_thread(w.cp.log.append, [event])
        await w.cp.live.wait_for(
            Position({(a.stream, a.partition): a.offset + 1 for a in appended})
        )
        assert await refused(w, node, old) == "join-token-expired"
        assert w.cp.identity is not None
        counted = w.cp.identity.refused
        for kind in (
            "join-token-replayed",
            "join-token-other-group",
            "workload-gone",
            "join-token-unknown",
            "join-token-expired",
        ):
            assert counted.get(kind, 0) >= 1, kind
        metrics = generate_latest(w.cp.metrics).decode()
        assert 'smc_identity_refusals_total{kind="join-token-other-group"} 1.0' in metrics
        assert token not in metrics

        # scale-in: the instance drains, leaves, and only then loses its certificate
        asg.set_desired_capacity(AutoScalingGroupName="web-asg", DesiredCapacity=1)
        (gone,) = set(web) - set(w.ids("web-asg"))
        proxy = f"vm/shop/{workload_name('web', gone)}"
        await until(
            lambda: any(
                isinstance(e, ProxyCertificateRevoked) and e.proxy == proxy for e in w.records()
            ),
            "the removed instance's certificate revoked",
        )
        recs = w.records()
        (draining,) = [
            e
            for e in recs
            if isinstance(e, VmInstanceChanged) and e.phase == "draining" and e.instance_id == gone
        ]
        acked = w.cp.controller.acked_by_all(draining.envelope.causation_id or "")
        assert acked is not None
        (left,) = [
            e for e in recs if isinstance(e, WorkloadLeft) and e.name == workload_name("web", gone)
        ]
        (revoked,) = [
            e for e in recs if isinstance(e, ProxyCertificateRevoked) and e.proxy == proxy
        ]
        assert acked <= left.envelope.occurred_at.timestamp() + 0.001
        assert left.envelope.occurred_at <= revoked.envelope.occurred_at
