"""Policy semantics (smc.smi.evaluate) and cross-reference checks (smc.smi.check_references)."""

from __future__ import annotations

import pytest

from smc.smi import (
    Backend,
    HTTPMatch,
    HTTPRouteGroup,
    Policy,
    Resource,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    check_references,
    evaluate,
    load_documents,
    resource_key,
)

POLICY_SET = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: bookstore-routes, namespace: bookstore}
spec:
  matches:
  - name: buy-a-book
    pathRegex: /buy
    methods: [GET]
  - name: books-bought
    pathRegex: /books-bought$
    methods: [GET]
    headers:
      user-agent: ".*bookbuyer.*"
  - name: admin
    pathRegex: /admin/.*
    methods: [POST, DELETE]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: bookstore-access, namespace: bookstore}
spec:
  destination: {kind: ServiceAccount, name: bookstore}
  rules:
  - kind: HTTPRouteGroup
    name: bookstore-routes
    matches: [buy-a-book, books-bought]
  sources:
  - {kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer}
---
apiVersion: access.smi-spec.io/v1alpha2
kind: TrafficTarget
metadata: {name: bookstore-admin, namespace: bookstore}
spec:
  destination: {kind: ServiceAccount, name: bookstore, port: 8080}
  rules:
  - kind: HTTPRouteGroup
    name: bookstore-routes
    matches: [admin]
  sources:
  - {kind: ServiceAccount, name: admin, namespace: ops}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: http-port, namespace: bookwarehouse}
spec:
  matches: {ports: [14001]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: warehouse-routes, namespace: bookwarehouse}
spec:
  matches:
  - name: restock
    pathRegex: /restock
    methods: [POST]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: warehouse-access, namespace: bookwarehouse}
spec:
  destination: {kind: ServiceAccount, name: bookwarehouse}
  rules:
  - {kind: TCPRoute, name: http-port}
  - {kind: HTTPRouteGroup, name: warehouse-routes}
  sources:
  - {kind: ServiceAccount, name: bookstore, namespace: bookstore}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: mysql, namespace: bookwarehouse}
spec:
  matches: {ports: [3306]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: db-access, namespace: bookwarehouse}
spec:
  destination: {kind: ServiceAccount, name: mysql}
  rules:
  - {kind: TCPRoute, name: mysql}
  sources:
  - {kind: ServiceAccount, name: bookwarehouse}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: UDPRoute
metadata: {name: dns, namespace: kube-system}
spec:
  matches: {ports: [53]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: dns-access, namespace: kube-system}
spec:
  destination: {kind: ServiceAccount, name: coredns}
  rules:
  - {kind: UDPRoute, name: dns}
  sources:
  - {kind: ServiceAccount, name: bookstore, namespace: bookstore}
  - {kind: ServiceAccount, name: bookbuyer, namespace: bookbuyer}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: bookstore-split, namespace: bookstore}
spec:
  service: bookstore.bookstore.svc.cluster.local
  backends:
  - {service: bookstore-v1, weight: 90}
  - {service: bookstore-v2, weight: 10}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: beta-users, namespace: bookstore}
spec:
  matches:
  - name: beta
    headers: {x-beta: "yes"}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: bookstore-ab, namespace: bookstore}
spec:
  service: bookstore
  matches: [{kind: HTTPRouteGroup, name: beta-users}]
  backends:
  - {service: bookstore-v1, weight: 0}
  - {service: bookstore-v2, weight: 100}
"""


def _resources() -> tuple[Resource, ...]:
    result = load_documents(POLICY_SET, source="policy.yaml")
    assert result.errors == (), [str(e) for e in result.errors]
    return result.resources


def _policy(resources: tuple[Resource, ...], *, permissive: bool = False) -> Policy:
    return evaluate(
        targets=[r for r in resources if isinstance(r, TrafficTarget)],
        route_groups=[r for r in resources if isinstance(r, HTTPRouteGroup)],
        tcp_routes=[r for r in resources if isinstance(r, TCPRoute)],
        udp_routes=[r for r in resources if isinstance(r, UDPRoute)],
        splits=[r for r in resources if isinstance(r, TrafficSplit)],
        permissive=permissive,
    )


BUYER = "bookbuyer/bookbuyer"
THIEF = "bookthief/bookthief"
ADMIN = "ops/admin"
STORE = "bookstore/bookstore"
WAREHOUSE = "bookwarehouse/bookwarehouse"
MYSQL = "bookwarehouse/mysql"
DNS = "kube-system/coredns"
UA = {"User-Agent": "bookbuyer/1.0"}

# source, destination, protocol, port, method, path, headers, expected
TABLE: list[tuple[str, str, str, int | None, str | None, str | None, dict[str, str], bool]] = [
    (BUYER, STORE, "http", 14001, "GET", "/buy", {}, True),
    (BUYER, STORE, "http", 14001, "GET", "/buy/a-book?id=3", {}, True),  # anchored at start only
    (BUYER, STORE, "http", 14001, "get", "/buy", {}, True),  # method case-insensitive
    (BUYER, STORE, "http", 14001, "POST", "/buy", {}, False),  # method not allowed
    (BUYER, STORE, "http", 14001, "GET", "/xbuy", {}, False),  # regex anchored at start
    (BUYER, STORE, "http", 14001, "GET", "/books-bought", UA, True),
    (BUYER, STORE, "http", 14001, "GET", "/books-bought", {}, False),  # header missing
    (BUYER, STORE, "http", 14001, "GET", "/books-bought", {"user-agent": "curl"}, False),
    (BUYER, STORE, "http", 14001, "GET", "/books-bought/x", UA, False),  # '$' in regex
    (BUYER, STORE, "http", 14001, "POST", "/admin/reset", {}, False),  # not its match
    (BUYER, STORE, "tcp", 14001, None, None, {}, False),  # HTTP rules only: no raw TCP
    (THIEF, STORE, "http", 14001, "GET", "/buy", {}, False),  # not a source
    (ADMIN, STORE, "http", 8080, "POST", "/admin/reset", {}, True),
    (ADMIN, STORE, "http", 8080, "DELETE", "/admin/x", {}, True),
    (ADMIN, STORE, "http", 14001, "POST", "/admin/reset", {}, False),  # destination.port 8080
    (ADMIN, STORE, "http", 8080, "GET", "/buy", {}, False),
    (STORE, WAREHOUSE, "http", 14001, "POST", "/restock", {}, True),
    (STORE, WAREHOUSE, "http", 14002, "POST", "/restock", {}, False),  # TCPRoute port limits HTTP
    (STORE, WAREHOUSE, "http", 14001, "GET", "/restock", {}, False),
    (STORE, WAREHOUSE, "tcp", 14001, None, None, {}, True),  # HTTP port open as TCP too
    (BUYER, WAREHOUSE, "http", 14001, "POST", "/restock", {}, False),
    (WAREHOUSE, MYSQL, "tcp", 3306, None, None, {}, True),
    (WAREHOUSE, MYSQL, "tcp", 3307, None, None, {}, False),
    (WAREHOUSE, MYSQL, "http", 3306, "GET", "/", {}, True),  # HTTP bytes on an allowed TCP port
    (WAREHOUSE, MYSQL, "udp", 3306, None, None, {}, False),
    (STORE, MYSQL, "tcp", 3306, None, None, {}, False),
    (STORE, DNS, "udp", 53, None, None, {}, True),
    (BUYER, DNS, "udp", 53, None, None, {}, True),
    (STORE, DNS, "tcp", 53, None, None, {}, False),
    (THIEF, DNS, "udp", 53, None, None, {}, False),
    (MYSQL, WAREHOUSE, "tcp", 14001, None, None, {}, False),  # grants are not symmetric
]


@pytest.mark.parametrize(
    ("source", "destination", "protocol", "port", "method", "path", "headers", "expected"), TABLE
)
def test_allow_deny_table(
    source: str,
    destination: str,
    protocol: str,
    port: int | None,
    method: str | None,
    path: str | None,
    headers: dict[str, str],
    expected: bool,
) -> None:
    policy = _policy(_resources())
    got = policy.is_allowed(
        source=source,
        destination=destination,
        method=method,
        path=path,
        headers=headers,
        port=port,
        protocol=protocol,  # type: ignore[arg-type]
    )
    assert got is expected
    # permissive mode allows everything
    assert _policy(_resources(), permissive=True).is_allowed(
        source=source, destination=destination, method=method, path=path, port=port
    )


def test_full_matrix_deny_by_default() -> None:
    policy = _policy(_resources())
    identities = [BUYER, THIEF, ADMIN, STORE, WAREHOUSE, MYSQL, DNS]
    allowed = {
        (s, d)
        for s in identities
        for d in identities
        for proto in ("http", "tcp", "udp")
        if policy.is_allowed(
            source=s,
            destination=d,
            protocol=proto,
            method="GET" if proto == "http" else None,
            path="/buy" if proto == "http" else None,
            headers=UA,
        )
    }
    assert allowed == {
        (BUYER, STORE),
        (STORE, WAREHOUSE),
        (WAREHOUSE, MYSQL),
        (STORE, DNS),
        (BUYER, DNS),
    }


def test_allowed_sources_and_outbound() -> None:
    policy = _policy(_resources())
    grants = policy.allowed_sources(STORE)
    assert [(g.source, g.target) for g in grants] == [
        (BUYER, "TrafficTarget/bookstore/bookstore-access"),
        (ADMIN, "TrafficTarget/bookstore/bookstore-admin"),
    ]
    buyer_grant = grants[0]
    assert [m.name for m in buyer_grant.http] == ["buy-a-book", "books-bought"]
    assert buyer_grant.tcp_ports is None and buyer_grant.udp_ports is None
    assert buyer_grant.port is None
    assert grants[1].port == 8080
    (wh,) = policy.allowed_sources(WAREHOUSE)
    assert wh.tcp_ports == (14001,) and [m.name for m in wh.http] == ["restock"]
    (db,) = policy.allowed_sources(MYSQL)
    assert db.tcp_ports == (3306,) and db.http == ()
    assert policy.allowed_sources(THIEF) == ()
    assert policy.outbound(BUYER) == (STORE, DNS)
    assert policy.outbound(STORE) == tuple(sorted((WAREHOUSE, DNS)))
    assert policy.outbound(THIEF) == ()
    assert _policy(_resources(), permissive=True).outbound(THIEF) is None


def test_split_plan() -> None:
    policy = _policy(_resources())
    plan = policy.split_for("bookstore/bookstore")
    assert plan is not None
    assert plan.default_split == "TrafficSplit/bookstore/bookstore-split"
    assert plan.backends == (
        Backend(service="bookstore-v1", weight=90),
        Backend(service="bookstore-v2", weight=10),
    )
    (ab,) = plan.ab_routes
    assert ab.split == "TrafficSplit/bookstore/bookstore-ab"
    assert ab.matches == (HTTPMatch(name="beta", headers=(("x-beta", "yes"),)),)
    assert plan.backends_for(method="GET", path="/", headers={"X-Beta": "yes"}) == ab.backends
    assert plan.backends_for(method="GET", path="/", headers={}) == plan.backends
    assert policy.split_for("bookstore/other") is None
    assert policy.split_services() == ("bookstore/bookstore",)


def test_conflicting_weighted_splits_pick_lowest_key() -> None:
    resources = _resources()
    extra = TrafficSplit(
        namespace="bookstore",
        name="a-first",
        service="bookstore",
        backends=(Backend(service="bookstore-v3", weight=1),),
    )
    plan = _policy((*resources, extra)).split_for("bookstore/bookstore")
    assert plan is not None
    assert plan.default_split == "TrafficSplit/bookstore/a-first"
    assert plan.conflicts == ("TrafficSplit/bookstore/bookstore-split",)


def test_unresolved_rules_grant_nothing() -> None:
    resources = tuple(r for r in _resources() if not isinstance(r, HTTPRouteGroup))
    policy = _policy(resources)
    assert policy.allowed_sources(STORE) == ()
    assert not policy.is_allowed(source=BUYER, destination=STORE, method="GET", path="/buy")


# ---- check_references ----------------------------------------------------------------------


def test_references_of_the_policy_set_resolve() -> None:
    assert check_references(_resources()) == []


def test_unknown_references_are_reported() -> None:
    text = """\
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: t, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api}
  rules:
  - {kind: HTTPRouteGroup, name: missing-group}
  - {kind: HTTPRouteGroup, name: routes, matches: [read, nope]}
  - {kind: TCPRoute, name: missing-tcp}
  - {kind: TCPRoute, name: tcp, matches: [unnamed]}
  sources: [{kind: ServiceAccount, name: web}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: routes, namespace: shop}
spec:
  matches: [{name: read, methods: [GET]}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: tcp, namespace: shop}
spec: {matches: {ports: [80]}}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: s, namespace: shop}
spec:
  service: api
  matches: [{kind: HTTPRouteGroup, name: no-such-group}]
  backends: [{service: api-v1, weight: 1}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: vm, namespace: shop}
spec: {address: 10.1.1.1, serviceAccount: api, services: [ghost]}
---
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {name: a}
---
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {name: b}
"""
    result = load_documents(text, source="refs.yaml")
    assert result.errors == ()
    errors = check_references(result.resources)
    found = {(e.document, e.path) for e in errors}
    assert found == {
        ("TrafficTarget/shop/t", "spec.rules[0].name"),
        ("TrafficTarget/shop/t", "spec.rules[1].matches[1]"),
        ("TrafficTarget/shop/t", "spec.rules[2].name"),
        ("TrafficTarget/shop/t", "spec.rules[3].matches[0]"),
        ("TrafficSplit/shop/s", "spec.matches[0].name"),
        ("VirtualMachine/shop/vm", "spec.services[0]"),
        ("MeshConfig/default/b", ""),
    }
    by_path = {e.path: str(e) for e in errors if e.document == "TrafficTarget/shop/t"}
    assert "HTTPRouteGroup shop/missing-group does not exist" in by_path["spec.rules[0].name"]
    assert "no match named 'nope' (it has: read)" in by_path["spec.rules[1].matches[1]"]


def test_zero_weights_and_duplicates_in_a_set() -> None:
    zero = TrafficSplit(
        namespace="a", name="z", service="s", backends=(Backend(service="x", weight=0),)
    )
    dup = TrafficSplit(
        namespace="a", name="z", service="s", backends=(Backend(service="y", weight=3),)
    )
    errors = check_references([zero, dup])
    reasons = sorted(e.reason for e in errors)
    assert any("sum to zero" in r for r in reasons)
    assert any("defined more than once" in r for r in reasons)
    assert all(e.document == resource_key(zero) for e in errors)
