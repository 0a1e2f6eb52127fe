"""Unit tests of the snapshot builder and the controller's affected-proxy computation.

The mesh is written as manifests and turned into events by the real planner (MeshChanges), folded
into real projections; certificates come from a real LocalIssuer. The controller tests run the
whole control plane in-process (no Envoy) and check, after every kind of change, that the cache
equals a from-scratch build of every proxy (soundness) while rebuilding fewer proxies than all
for local changes (incrementality).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from google.protobuf import json_format

from smc.api import MeshChanges
from smc.ca import LocalIssuer
from smc.projections import PolicyProjection, PolicyView, RegistryProjection
from smc.smi import load_documents
from smc.testing.mesh import ControlPlane
from smc.xds import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    BuildPass,
    InvalidNodeId,
    IssuingCertSource,
    parse_node_id,
)

BASE = """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: server, namespace: demo}
spec:
  backing: vm
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: server-v2, namespace: demo}
spec:
  backing: vm
  selector: {app: server-v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: db, namespace: store}
spec:
  backing: vm
  selector: {app: db}
  ports: [{name: pg, port: 5432, protocol: tcp, targetPort: 5432}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: server-1, namespace: demo, labels: {app: server, smc.dev/app-port: "9001"}}
spec: {address: 127.0.50.3, serviceAccount: server}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: server-2, namespace: demo, labels: {app: server-v2}}
spec: {address: 127.0.50.4, serviceAccount: server}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: client-1, namespace: demo}
spec: {address: 127.0.50.1, serviceAccount: client}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: client-2, namespace: demo}
spec: {address: 127.0.50.2, serviceAccount: client}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: thief-1, namespace: demo}
spec: {address: 127.0.50.9, serviceAccount: thief}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: db-1, namespace: store, labels: {app: db}}
spec: {address: 127.0.50.20, serviceAccount: db}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: routes, namespace: demo}
spec:
  matches:
  - {name: get-api, pathRegex: "/api", methods: [GET, HEAD]}
  - {name: admin, pathRegex: "/admin", methods: [POST], headers: {x-admin: "t.*"}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: canary, namespace: demo}
spec:
  matches:
  - {name: canary, headers: {x-canary: "yes"}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-server, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: server, namespace: demo}
  rules: [{kind: HTTPRouteGroup, name: routes}]
  sources: [{kind: ServiceAccount, name: client, namespace: demo}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: pg, namespace: store}
spec:
  matches: {ports: [5432]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: server-to-db, namespace: store}
spec:
  destination: {kind: ServiceAccount, name: db, namespace: store}
  rules: [{kind: TCPRoute, name: pg}]
  sources: [{kind: ServiceAccount, name: server, namespace: demo}]
"""

SPLIT = """
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: split, namespace: demo}
spec:
  service: server
  backends: [{service: server, weight: 90}, {service: server-v2, weight: 10}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: ab, namespace: demo}
spec:
  service: server
  matches: [{kind: HTTPRouteGroup, name: canary}]
  backends: [{service: server-v2, weight: 100}]
"""

PERMISSIVE = """
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: smc-system}
spec: {permissiveTrafficMode: true}
"""


class World:
    def __init__(self, issuer_dir: Path) -> None:
        self.registry = RegistryProjection()
        self.policy = PolicyProjection()
        self.changes = MeshChanges(log=None, registry=self.registry, policy=self.policy)  # type: ignore[arg-type]
        self.view = PolicyView(registry=self.registry, policy=self.policy)
        self.issuer = LocalIssuer(directory=issuer_dir, trust_domain="cluster.local")
        self.certs = IssuingCertSource(issuer=self.issuer, trust_domain="cluster.local")

    def apply(self, text: str) -> None:
        loaded = load_documents(text, source="test")
        assert not loaded.errors, loaded.errors
        for r in loaded.resources:
            for e in self.changes.plan([r], actor="t", source="t", request_id="r"):
                (self.registry if e.STREAM == "smc.registry" else self.policy).apply(e)

    def build(self, node: str) -> Any:
        return BuildPass(view=self.view, certs=self.certs).build(node)


@pytest.fixture
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory() as d:
        w = World(Path(d))
        w.apply(BASE)
        yield w


def as_dict(snapshot: Any, type_url: str, name: str) -> dict[str, Any]:
    msg = snapshot.resource(type_url, name)
    assert msg is not None, f"{name} missing"
    return json_format.MessageToDict(msg)


def inbound_rbac(snapshot: Any, port: int) -> dict[str, Any] | None:
    rc = as_dict(snapshot, ROUTE, f"inbound|{port}")
    per_route = rc["virtualHosts"][0]["typedPerFilterConfig"]["envoy.filters.http.rbac"]
    rbac: dict[str, Any] | None = per_route.get("rbac")
    return rbac


# ---------------------------------------------------------------------- node ids


def test_node_ids() -> None:
    assert parse_node_id("demo/server-1").key == "demo/server-1"
    assert parse_node_id("vm/demo/server-1").kind == "vm"
    for bad in ("", "demo", "a/b/c/d", "pod//x", "Demo/x", "job/demo/x", "demo/x_y"):
        with pytest.raises(InvalidNodeId):
            parse_node_id(bad)


def test_unknown_node_and_missing_cert_get_no_snapshot(world: World) -> None:
    b = world.build("demo/nope")
    assert b.snapshot is None and "no workload" in b.reason and "wl:demo/nope" in b.deps
    b = world.build("not a node id")
    assert b.snapshot is None and "not" in b.reason

    class NoCerts:
        def get(self, identity: str) -> None:
            return None

        def trust_bundle(self) -> list[str]:
            return []

    b = BuildPass(view=world.view, certs=NoCerts()).build("demo/client-1")
    assert b.snapshot is None and "no certificate" in b.reason
    assert "id:demo/client" in b.deps


# ---------------------------------------------------------------------- inbound / RBAC


def test_inbound_rbac_allows_exactly_the_smi_sources(world: World) -> None:
    snap = world.build("demo/server-1").snapshot
    snap.check_consistency()
    listener = as_dict(snap, LISTENER, "inbound|8080")
    assert listener["address"]["socketAddress"] == {"address": "127.0.50.3", "portValue": 8080}
    tls = listener["filterChains"][0]["transportSocket"]["typedConfig"]
    assert tls["requireClientCertificate"] is True
    hcm = listener["filterChains"][0]["filters"][0]["typedConfig"]
    # Deny by default at the listener; the allowed sources are per route (RDS).
    assert hcm["httpFilters"][0]["typedConfig"]["rules"] == {}
    assert hcm["rds"]["routeConfigName"] == "inbound|8080"
    rbac = inbound_rbac(snap, 8080)
    assert rbac is not None
    policies = rbac["rules"]["policies"]
    assert list(policies) == ["TrafficTarget/demo/client-to-server|demo/client"]
    pol = policies["TrafficTarget/demo/client-to-server|demo/client"]
    assert pol["principals"] == [
        {"authenticated": {"principalName": {"exact": "spiffe://cluster.local/ns/demo/sa/client"}}}
    ]
    get_api, admin = pol["permissions"]
    assert get_api == {
        "andRules": {
            "rules": [
                {"urlPath": {"path": {"safeRegex": {"regex": "(?:/api).*"}}}},
                {
                    "header": {
                        "name": ":method",
                        "stringMatch": {"safeRegex": {"regex": "GET|HEAD"}},
                    }
                },
            ]
        }
    }
    assert admin["andRules"]["rules"][2] == {
        "header": {"name": "x-admin", "stringMatch": {"safeRegex": {"regex": "t.*"}}}
    }
    # The local application: label smc.dev/app-port, else the target port itself.
    local = as_dict(snap, CLUSTER, "inbound|8080")
    ep = local["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
    assert ep["socketAddress"] == {"address": "127.0.0.1", "portValue": 9001}
    local2 = as_dict(world.build("demo/server-2").snapshot, CLUSTER, "inbound|8080")
    ep2 = local2["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
    assert ep2["socketAddress"]["portValue"] == 8080


def test_deny_by_default_and_permissive(world: World) -> None:
    world.apply(
        """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: lonely-1, namespace: demo, labels: {app: lonely}}
spec: {address: 127.0.50.30, serviceAccount: lonely}
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: lonely, namespace: demo}
spec:
  backing: vm
  selector: {app: lonely}
  ports: [{name: http, port: 80, targetPort: 7000}]
"""
    )
    snap = world.build("demo/lonely-1").snapshot
    rbac = inbound_rbac(snap, 7000)
    assert rbac is not None and rbac["rules"].get("policies", {}) == {}  # nobody may call it
    # client's outbound does not even know the service
    client = world.build("demo/client-1").snapshot
    hosts = {vh["name"] for vh in as_dict(client, ROUTE, "outbound").get("virtualHosts", [])}
    assert hosts == {"demo/server|80", "demo/server-v2|80"}  # both served by identity server
    world.apply(PERMISSIVE)
    assert inbound_rbac(world.build("demo/lonely-1").snapshot, 7000) is None  # RBAC off
    client = world.build("demo/client-1").snapshot
    hosts = {vh["name"] for vh in as_dict(client, ROUTE, "outbound").get("virtualHosts", [])}
    assert hosts == {"demo/server|80", "demo/server-v2|80", "demo/lonely|80"}
    assert client.consistent()


def test_tcp_port_gets_network_rbac(world: World) -> None:
    snap = world.build("store/db-1").snapshot
    snap.check_consistency()
    listener = as_dict(snap, LISTENER, "inbound|5432")
    filters = listener["filterChains"][0]["filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.network.rbac",
        "envoy.filters.network.tcp_proxy",
    ]
    policies = filters[0]["typedConfig"]["rules"]["policies"]
    assert list(policies) == ["TrafficTarget/store/server-to-db|demo/server"]
    principal = policies["TrafficTarget/store/server-to-db|demo/server"]["principals"][0]
    assert principal["authenticated"]["principalName"]["exact"].endswith("/ns/demo/sa/server")
    assert ROUTE not in snap.types or "inbound|5432" not in snap.names(ROUTE)


# ---------------------------------------------------------------------- outbound


def test_outbound_routes_clusters_and_endpoints(world: World) -> None:
    snap = world.build("demo/client-1").snapshot
    snap.check_consistency()
    rc = as_dict(snap, ROUTE, "outbound")
    assert [v["name"] for v in rc["virtualHosts"]] == ["demo/server|80", "demo/server-v2|80"]
    vh = rc["virtualHosts"][0]
    assert vh["domains"] == [
        "server",
        "server.demo",
        "server.demo.svc",
        "server.demo.svc.cluster.local",
        "server:80",
        "server.demo:80",
        "server.demo.svc:80",
        "server.demo.svc.cluster.local:80",
    ]
    assert vh["routes"][-1]["route"]["cluster"] == "outbound|demo/server|80"
    cluster = as_dict(snap, CLUSTER, "outbound|demo/server|80")
    assert cluster["type"] == "EDS"
    ctx = cluster["transportSocket"]["typedConfig"]["commonTlsContext"]
    sans = ctx["combinedValidationContext"]["defaultValidationContext"]["matchTypedSubjectAltNames"]
    assert sans == [
        {"sanType": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/demo/sa/server"}}
    ]
    cla = as_dict(snap, ENDPOINT, "outbound|demo/server|80")
    addrs = [e["endpoint"]["address"]["socketAddress"] for e in cla["endpoints"][0]["lbEndpoints"]]
    assert addrs == [{"address": "127.0.50.3", "portValue": 8080}]
    listener = as_dict(snap, LISTENER, "outbound")
    assert listener["address"]["socketAddress"] == {"address": "127.0.50.1", "portValue": 15001}
    # thief may call nothing: empty route config, no clusters at all.
    thief = world.build("demo/thief-1").snapshot
    assert as_dict(thief, ROUTE, "outbound").get("virtualHosts", []) == []
    assert thief.names(CLUSTER) == frozenset()
    # Cross-namespace: server reaches store/db without the bare short name.
    server = world.build("demo/server-1").snapshot
    assert "outbound|store/db|5432" in server.names(CLUSTER)


TRANSPARENT = """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: server-1, namespace: demo, labels: {app: server, smc.dev/interception: iptables}}
spec: {address: 127.0.50.3, serviceAccount: server}
"""


def _chains(listener: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in listener["filterChains"]}


def test_transparent_workloads_get_original_dst_listeners(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.apply(TRANSPARENT)
    snap = world.build("demo/server-1").snapshot
    snap.check_consistency()
    assert {n for n in snap.names(LISTENER)} == {"inbound", "outbound"}
    original_dst = [
        {
            "name": "envoy.filters.listener.original_dst",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
            },
        }
    ]
    # Inbound: every port on 15006, matched on the original destination port, mTLS + RBAC;
    # anything else passes through to where it was going.
    inbound = as_dict(snap, LISTENER, "inbound")
    assert inbound["address"]["socketAddress"] == {"address": "0.0.0.0", "portValue": 15006}
    assert inbound["listenerFilters"] == original_dst
    chain = _chains(inbound)["inbound|8080"]
    assert chain["filterChainMatch"] == {"destinationPort": 8080}
    assert chain["transportSocket"]["typedConfig"]["requireClientCertificate"] is True
    assert chain["filters"][0]["typedConfig"]["rds"]["routeConfigName"] == "inbound|8080"
    assert inbound_rbac(snap, 8080) is not None  # the policy is in the route, as before
    passthrough = inbound["defaultFilterChain"]["filters"][0]["typedConfig"]
    assert passthrough["cluster"] == "passthrough"
    assert as_dict(snap, CLUSTER, "passthrough")["type"] == "ORIGINAL_DST"
    app = as_dict(snap, CLUSTER, "inbound|8080")["loadAssignment"]["endpoints"][0]
    assert app["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]["address"] == "127.0.0.1"
    # Outbound: on 15001, one chain per destination port of what the identity may reach
    # (HTTP by Host through RDS "outbound", TCP straight to its cluster), else pass through.
    outbound = as_dict(snap, LISTENER, "outbound")
    assert outbound["address"]["socketAddress"] == {"address": "0.0.0.0", "portValue": 15001}
    assert outbound["listenerFilters"] == original_dst
    chains = _chains(outbound)
    assert set(chains) == {"outbound-tcp|5432"}  # server may reach store/db only
    tcp = chains["outbound-tcp|5432"]
    assert tcp["filterChainMatch"] == {"destinationPort": 5432}
    assert tcp["filters"][0]["typedConfig"]["cluster"] == "outbound|store/db|5432"
    assert outbound["defaultFilterChain"]["filters"][0]["typedConfig"]["cluster"] == "passthrough"
    # The client (explicit) keeps its address-bound listeners; as a transparent workload its
    # HTTP destinations get chains on their service ports.
    client = world.build("demo/client-1").snapshot
    assert as_dict(client, LISTENER, "outbound")["address"]["socketAddress"]["portValue"] == 15001
    assert "inbound" not in client.names(LISTENER)
    world.apply(
        """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: client-1, namespace: demo, labels: {smc.dev/interception: iptables}}
spec: {address: 127.0.50.1, serviceAccount: client}
"""
    )
    client = world.build("demo/client-1").snapshot
    client.check_consistency()
    http = _chains(as_dict(client, LISTENER, "outbound"))["outbound|80"]
    assert http["filterChainMatch"] == {"destinationPort": 80}
    assert http["filters"][0]["typedConfig"]["rds"]["routeConfigName"] == "outbound"
    # A label value that is neither mode: explicit listeners, and a warning naming it.
    world.apply(TRANSPARENT.replace("iptables", "ebpf"))
    with caplog.at_level("WARNING", logger="smc.xds.builder"):
        snap = world.build("demo/server-1").snapshot
    assert "inbound|8080" in snap.names(LISTENER) and "inbound" not in snap.names(LISTENER)
    assert "'ebpf'" in caplog.text


def test_traffic_split_weighted_clusters_and_ab_routes(world: World) -> None:
    world.apply(SPLIT)
    snap = world.build("demo/client-1").snapshot
    snap.check_consistency()
    (vh,) = [
        v for v in as_dict(snap, ROUTE, "outbound")["virtualHosts"] if v["name"] == "demo/server|80"
    ]
    ab, default = vh["routes"]
    assert ab["match"]["headers"] == [
        {"name": "x-canary", "stringMatch": {"safeRegex": {"regex": "yes"}}}
    ]
    assert ab["route"]["cluster"] == "outbound|demo/server-v2|80"
    assert default["match"] == {"prefix": "/"}
    assert default["route"]["weightedClusters"]["clusters"] == [
        {"name": "outbound|demo/server|80", "weight": 90},
        {"name": "outbound|demo/server-v2|80", "weight": 10},
    ]
    assert {"outbound|demo/server|80", "outbound|demo/server-v2|80"} <= snap.names(CLUSTER)
    assert {"outbound|demo/server|80", "outbound|demo/server-v2|80"} <= snap.names(ENDPOINT)


# ---------------------------------------------------------------------- secrets, versions


def _leaf_uri(pem_chain: str) -> str:
    cert = x509.load_pem_x509_certificate(pem_chain.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def test_each_proxy_gets_only_its_own_secret_and_every_root(world: World) -> None:
    client = world.build("demo/client-1").snapshot
    server = world.build("demo/server-1").snapshot
    assert client.names(SECRET) == {"default", "ROOTCA"} == server.names(SECRET)
    c = as_dict(client, SECRET, "default")["tlsCertificate"]
    s = as_dict(server, SECRET, "default")["tlsCertificate"]
    assert (
        _leaf_uri(c["certificateChain"]["inlineString"])
        == "spiffe://cluster.local/ns/demo/sa/client"
    )
    assert (
        _leaf_uri(s["certificateChain"]["inlineString"])
        == "spiffe://cluster.local/ns/demo/sa/server"
    )
    # The client's snapshot holds no other identity's private key.
    server_key = s["privateKey"]["inlineString"]
    assert all(server_key.encode() not in e.value for e in client.entries(SECRET).values())
    # Root rotation: the bundle carries the old and the new root.
    world.issuer.rotate_root()
    roots = as_dict(world.build("demo/client-1").snapshot, SECRET, "ROOTCA")
    assert roots["validationContext"]["trustedCa"]["inlineString"].count("BEGIN CERTIFICATE") == 2


def test_versions_are_content_derived_and_entries_shared(world: World) -> None:
    a = world.build("demo/client-1").snapshot
    b = world.build("demo/client-1").snapshot  # a fresh pass: same content, same versions
    assert a.versions() == b.versions()
    # Two proxies of one identity share every identity-level entry (interned).
    c2 = world.build("demo/client-2").snapshot
    assert a.entries(ROUTE)["outbound"] is c2.entries(ROUTE)["outbound"]
    assert a.entries(SECRET)["default"] is c2.entries(SECRET)["default"]
    for name in a.names(CLUSTER):
        assert a.entries(CLUSTER)[name] is c2.entries(CLUSTER)[name]
    # ... but not their listeners (own addresses).
    assert a.version(LISTENER) != c2.version(LISTENER)
    # An unrelated change keeps every version of the client.
    world.apply(
        """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: db-2, namespace: store, labels: {app: db}}
spec: {address: 127.0.50.21, serviceAccount: db}
"""
    )
    assert world.build("demo/client-1").snapshot.versions() == a.versions()


# ---------------------------------------------------------------------- the controller


async def _settle(cp: ControlPlane) -> None:
    for _ in range(200):
        await asyncio.sleep(cp.debounce)
        if cp.controller.idle():
            return
    raise AssertionError("controller did not settle")


def _fresh(cp: ControlPlane) -> dict[str, dict[str, str] | None]:
    bp = BuildPass(view=cp.controller.view, certs=cp.certs)
    out: dict[str, dict[str, str] | None] = {}
    for node in cp.controller.node_ids():
        snap = bp.build(node).snapshot
        out[node] = (
            None
            if snap is None
            else {t: snap.version(t) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET)}
        )
    return out


def _cached(cp: ControlPlane) -> dict[str, dict[str, str] | None]:
    out: dict[str, dict[str, str] | None] = {}
    for node in cp.controller.node_ids():
        snap = cp.controller.cache.get(node)
        out[node] = (
            None
            if snap is None
            else {t: snap.version(t) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET)}
        )
    return out


def _builds(cp: ControlPlane) -> float:
    v = cp.metrics.get_sample_value("smc_xds_proxy_builds_total")
    return 0.0 if v is None else v


CHANGES: list[tuple[str, str, bool, int | None]] = [
    # (what, manifests, delete?, at most this many proxies rebuilt; None: any)
    (
        "a VM joins service server",
        """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: server-3, namespace: demo, labels: {app: server}}
spec: {address: 127.0.50.5, serviceAccount: server}
""",
        False,
        5,  # server-3 itself, the two clients, server-1 and server-2 (same namespace)
    ),
    (
        "a VM of another namespace joins",
        """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: db-2, namespace: store, labels: {app: db}}
spec: {address: 127.0.50.21, serviceAccount: db}
""",
        False,
        5,  # db-2, db-1 (same service), the three servers calling store/db; not the clients
    ),
    ("a split appears", SPLIT, False, None),
    (
        "a VM changes identity",
        """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: server-2, namespace: demo, labels: {app: server-v2}}
spec: {address: 127.0.50.4, serviceAccount: other}
""",
        False,
        None,
    ),
    (
        "a service changes its selector",
        """
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: server-v2, namespace: demo}
spec:
  backing: vm
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
""",
        False,
        None,
    ),
    (
        "a VM leaves",
        """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: server-1, namespace: demo, labels: {app: server}}
spec: {address: 127.0.50.3, serviceAccount: server}
""",
        True,
        None,
    ),
    ("permissive mode", PERMISSIVE, False, None),
]


@pytest.mark.asyncio(loop_scope="session")
async def test_controller_rebuilds_exactly_what_changed(tmp_path: Path) -> None:
    cp = ControlPlane(workdir=tmp_path, debounce=0.005, ca=False)
    await cp.start()
    try:
        await cp.apply(BASE)
        await _settle(cp)
        nodes = [
            "demo/server-1",
            "demo/server-2",
            "demo/server-3",
            "demo/client-1",
            "demo/client-2",
            "demo/thief-1",
            "store/db-1",
            "store/db-2",
        ]
        for n in nodes:
            cp.controller.track(n)
        assert _cached(cp) == _fresh(cp)
        for what, text, delete, limit in CHANGES:
            before = _builds(cp)
            ids = await cp.apply(text, delete=delete)
            await _settle(cp)
            assert _cached(cp) == _fresh(cp), what
            rebuilt = _builds(cp) - before
            if limit is not None:
                assert rebuilt <= limit, (what, rebuilt)
            trace = cp.controller.trace(ids[-1])
            assert trace is not None and trace["events_in_batch"] >= 1, what
        # Nothing changes: nothing is rebuilt, versions stay.
        before, snap = _builds(cp), _cached(cp)
        await cp.apply(PERMISSIVE)  # unchanged manifest: no event at all
        await _settle(cp)
        assert _builds(cp) == before and _cached(cp) == snap
    finally:
        await cp.stop()
        cp.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_certificate_change_rebuilds_only_that_identity(tmp_path: Path) -> None:
    cp = ControlPlane(workdir=tmp_path, debounce=0.005, ca=False)
    await cp.start()
    try:
        await cp.apply(BASE)
        await _settle(cp)
        for n in ("demo/client-1", "demo/client-2", "demo/server-1", "demo/thief-1"):
            cp.controller.track(n)
        before = _cached(cp)
        builds = _builds(cp)
        cp.issuing.forget("demo/client")  # the next get() issues a new certificate
        await asyncio.to_thread(
            cp.controller.on_certs_changed, {"spiffe://cluster.local/ns/demo/sa/client"}, False
        )
        await _settle(cp)
        after = _cached(cp)
        assert _builds(cp) - builds == 2  # the two client proxies only
        for n in ("demo/client-1", "demo/client-2"):
            b, a = before[n], after[n]
            assert b is not None and a is not None
            assert a[SECRET] != b[SECRET]
            assert {t: v for t, v in a.items() if t != SECRET} == {
                t: v for t, v in b.items() if t != SECRET
            }
        assert after["demo/server-1"] == before["demo/server-1"]
        assert after == _fresh(cp)
    finally:
        await cp.stop()
        cp.close()


_STRUCT_IN_ANY = r"""
from google.protobuf import json_format
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from smc.xds import make_entry

fmt = {f"field_{i}": f"%REQ(X-{i})%" for i in range(40)}
hcm = {
    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager",
    "stat_prefix": "x",
    "route_config": {"name": "r"},
    "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": "/dev/stdout",
        "log_format": {"json_format": fmt},
    }}],
}
listener = json_format.ParseDict(
    {"name": "l", "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}]},
    listener_pb2.Listener(),
)
print(make_entry(listener).version)
"""


def test_resource_versions_agree_across_processes() -> None:
    """A map inside an ``Any`` (a JSON access-log format is a Struct) is serialised in an
    order that differs per process unless re-packed deterministically: two replicas would give
    the same listener different versions, and a proxy switching replica a config change."""
    import subprocess
    import sys

    versions = {
        subprocess.run(
            [sys.executable, "-c", _STRUCT_IN_ANY], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(4)
    }
    assert len(versions) == 1, versions
