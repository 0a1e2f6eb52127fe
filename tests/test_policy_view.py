"""PolicyView: policy queries over the registry and policy projections rebuilt from a real log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smc.api import MeshChanges
from smc.events import WorkloadJoined, WorkloadPort, make_event
from smc.events._sqlite import SqliteLog
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.projections._policyview import PolicyView
from smc.smi import load_documents

HYBRID = Path(__file__).parent / "data" / "smi" / "hybrid-mesh.yaml"

POLICY = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: warehouse-routes, namespace: bookwarehouse}
spec:
  matches:
  - name: restock
    pathRegex: /restock
    methods: [POST]
  - name: canary
    headers: {x-canary: "yes"}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: db, namespace: bookwarehouse}
spec:
  matches: {ports: [5432]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: bookstore-to-warehouse, namespace: bookwarehouse}
spec:
  destination: {kind: ServiceAccount, name: bookwarehouse, namespace: bookwarehouse}
  rules:
  - {kind: HTTPRouteGroup, name: warehouse-routes, matches: [restock]}
  sources:
  - {kind: ServiceAccount, name: bookstore, namespace: bookstore}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: admin-db, namespace: bookwarehouse}
spec:
  destination: {kind: ServiceAccount, name: bookwarehouse, namespace: bookwarehouse}
  rules:
  - {kind: TCPRoute, name: db}
  sources:
  - {kind: ServiceAccount, name: admin, namespace: ops}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: warehouse-split, namespace: bookwarehouse}
spec:
  service: bookwarehouse
  backends:
  - {service: bookwarehouse-v1, weight: 90}
  - {service: bookwarehouse-v2, weight: 10}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: warehouse-canary, namespace: bookwarehouse}
spec:
  service: bookwarehouse
  matches: [{kind: HTTPRouteGroup, name: warehouse-routes}]
  backends:
  - {service: bookwarehouse-v2, weight: 1}
"""

TRUST = """\
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: smc-system}
spec: {trustDomain: example.org, permissiveTrafficMode: %s}
"""


class World:
    def __init__(self, path: Path) -> None:
        self.log = SqliteLog(path)
        self.registry = RegistryProjection()
        self.policy = PolicyProjection()
        self.runner = ProjectionRunner(log=self.log, projections=[self.registry, self.policy])
        self.changes = MeshChanges(log=self.log, registry=self.registry, policy=self.policy)
        self.view = PolicyView(registry=self.registry, policy=self.policy)

    def apply(self, text: str) -> None:
        res = load_documents(text, source="t")
        assert res.ok, res.errors
        report = self.changes.apply(res.resources, actor="t", source="test", request_id=text)
        assert report.ok, report.plan.errors
        self.runner.catch_up()

    def pod(self, name: str, ns: str, sa: str, labels: dict[str, str]) -> None:
        ev = make_event(
            WorkloadJoined,
            source="k8s-informer",
            actor="test",
            kind="pod",
            namespace=ns,
            name=name,
            address="10.1.0.1",
            service_account=sa,
            labels=labels,
            ports=(WorkloadPort(name="http", port=8080, protocol="http"),),
        )
        self.log.append([ev])
        self.runner.catch_up()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "smc.db")
    w.apply(HYBRID.read_text())
    w.apply(POLICY)
    w.pod("bookstore-1", "bookstore", "bookstore", {"app": "bookstore"})
    # a pod labelled like the VM-backed service must not count as its backend
    w.pod("stray", "bookwarehouse", "stray", {"app": "bookwarehouse"})
    yield w
    w.log.close()


def test_service_identities_for_vm_and_kubernetes_services(world: World) -> None:
    v = world.view
    names = [w.name for w in v.workloads_of_service("bookwarehouse/bookwarehouse")]
    # vm-1 by selector, vm-2 because it names the service explicitly; not the pod
    assert names == ["warehouse-vm-1", "warehouse-vm-2"]
    assert v.service_identities("bookwarehouse/bookwarehouse") == ("bookwarehouse/bookwarehouse",)
    assert v.service_identities("bookstore/bookstore") == ("bookstore/bookstore",)
    assert v.service_identities("nowhere/none") == ()
    assert v.services_of_identity("bookstore/bookstore") == ("bookstore/bookstore",)


def test_spiffe_ids_follow_the_mesh_trust_domain(world: World) -> None:
    v = world.view
    assert v.spiffe_id("bookstore/bookstore") == "spiffe://cluster.local/ns/bookstore/sa/bookstore"
    world.apply(TRUST % "false")
    assert v.trust_domain == "example.org"
    sid = v.spiffe_id("ops/admin")
    assert sid == "spiffe://example.org/ns/ops/sa/admin"
    assert v.identity_of_spiffe(sid) == "ops/admin"
    assert v.identity_of_spiffe("spiffe://cluster.local/ns/ops/sa/admin") is None
    assert v.identity_of_spiffe("spiffe://example.org/ns/ops") is None
    with pytest.raises(ValueError, match="namespace/serviceaccount"):
        v.spiffe_id("no-slash")


def test_allowed_sources_and_outbound(world: World) -> None:
    v = world.view
    grants = v.allowed_sources("bookwarehouse/bookwarehouse")
    assert [(g.source, g.target) for g in grants] == [
        ("bookstore/bookstore", "TrafficTarget/bookwarehouse/bookstore-to-warehouse"),
        ("ops/admin", "TrafficTarget/bookwarehouse/admin-db"),
    ]
    assert [m.name for m in grants[0].http] == ["restock"]
    assert grants[1].tcp_ports == (5432,)
    assert v.outbound_identities("bookstore/bookstore") == ("bookwarehouse/bookwarehouse",)
    assert v.outbound_services("bookstore/bookstore") == ("bookwarehouse/bookwarehouse",)
    assert v.outbound_services("bookwarehouse/bookwarehouse") == ()


@pytest.mark.parametrize(
    ("source", "kw", "allowed"),
    [
        ("bookstore/bookstore", {"method": "POST", "path": "/restock/42"}, True),
        ("bookstore/bookstore", {"method": "GET", "path": "/restock"}, False),
        ("bookstore/bookstore", {"method": "POST", "path": "/other"}, False),
        ("bookstore/bookstore", {"port": 5432, "protocol": "tcp"}, False),
        ("ops/admin", {"port": 5432, "protocol": "tcp"}, True),
        ("ops/admin", {"port": 5433, "protocol": "tcp"}, False),
        ("ops/admin", {"method": "POST", "path": "/restock", "port": 14001}, False),
        ("stray/stray", {"method": "POST", "path": "/restock"}, False),
    ],
)
def test_allow_deny_table(world: World, source: str, kw: dict[str, object], allowed: bool) -> None:
    assert (
        world.view.is_allowed(source=source, destination="bookwarehouse/bookwarehouse", **kw)  # type: ignore[arg-type]
        is allowed
    )


def test_split_for_service(world: World) -> None:
    plan = world.view.split_for("bookwarehouse/bookwarehouse")
    assert plan is not None
    assert [(b.service, b.weight) for b in plan.backends] == [
        ("bookwarehouse-v1", 90),
        ("bookwarehouse-v2", 10),
    ]
    canary = plan.backends_for(method="GET", path="/", headers={"X-Canary": "yes"})
    assert [b.service for b in canary] == ["bookwarehouse-v2"]
    assert world.view.split_for("bookstore/bookstore") is None


def test_cache_follows_generation_and_permissive_mode(world: World) -> None:
    v = world.view
    first = v.evaluated
    assert v.evaluated is first  # cached while nothing changed
    world.apply(TRUST % "true")
    assert v.evaluated is not first
    assert v.permissive
    assert v.outbound_identities("stray/stray") is None
    assert v.outbound_services("stray/stray") == (
        "bookstore/bookstore",
        "bookwarehouse/bookwarehouse",
    )
    assert v.is_allowed(source="stray/stray", destination="bookstore/bookstore")
