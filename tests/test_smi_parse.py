"""Parsing, normalisation and round-trip of SMI/SMC manifests (smc.smi)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from smc.errors import SMCError
from smc.smi import (
    Backend,
    HTTPMatch,
    HTTPRouteGroup,
    IdentityRef,
    ManifestError,
    ManifestErrors,
    MeshConfig,
    MeshService,
    Resource,
    RouteRef,
    RuleRef,
    ServicePort,
    SmiError,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    VirtualMachine,
    WorkloadPort,
    load_documents,
    parse_manifest,
    resource_key,
    to_manifest,
    vm_backs_service,
)

DATA = Path(__file__).parent / "data" / "smi"


def load_file(name: str) -> tuple[Resource, ...]:
    result = load_documents((DATA / name).read_text(), source=name)
    assert result.errors == (), [str(e) for e in result.errors]
    assert result.ok
    return result.resources


def by_key(resources: tuple[Resource, ...]) -> dict[str, Resource]:
    return {resource_key(r): r for r in resources}


def sa(name: str, ns: str = "default") -> IdentityRef:
    return IdentityRef(name=name, namespace=ns)


# ---- spec examples of each version -----------------------------------------------------------

API_ROUTES = HTTPRouteGroup(
    namespace="default",
    name="api-service-routes",
    matches=(
        HTTPMatch(name="api", path_regex="/api", methods=("*",)),
        HTTPMatch(name="metrics", path_regex="/metrics", methods=("GET",)),
    ),
)


def test_access_v1alpha1_and_v1alpha2_examples_normalise_to_the_same_model() -> None:
    v1 = load_file("access-v1alpha1.yaml")
    v2 = load_file("access-v1alpha2.yaml")
    assert v1 == v2
    keys = by_key(v1)
    assert keys["HTTPRouteGroup/default/api-service-routes"] == API_ROUTES
    assert keys["TrafficTarget/default/api-service-api"] == TrafficTarget(
        namespace="default",
        name="api-service-api",
        destination=sa("api-service"),
        port=8080,
        sources=(sa("website-service"), sa("payments-service")),
        rules=(RuleRef(kind="HTTPRouteGroup", name="api-service-routes", matches=("api",)),),
    )
    assert keys["TrafficTarget/default/api-service-metrics"] == TrafficTarget(
        namespace="default",
        name="api-service-metrics",
        destination=sa("api-service"),
        port=None,
        sources=(sa("prometheus"),),
        rules=(RuleRef(kind="HTTPRouteGroup", name="api-service-routes", matches=("metrics",)),),
    )


def test_access_v1alpha3_example_uses_tcp_and_udp_routes_for_ports() -> None:
    keys = by_key(load_file("access-v1alpha3.yaml"))
    assert keys["HTTPRouteGroup/default/api-service-routes"] == API_ROUTES
    assert keys["TCPRoute/default/api-service-port"] == TCPRoute(
        namespace="default", name="api-service-port", ports=(8080,)
    )
    assert keys["TCPRoute/default/tcp-ports"] == TCPRoute(
        namespace="default", name="tcp-ports", ports=(8300, 8301, 8302)
    )
    assert keys["UDPRoute/default/udp-ports"] == UDPRoute(
        namespace="default", name="udp-ports", ports=(8301, 8302)
    )
    target = keys["TrafficTarget/default/api-service-api"]
    assert isinstance(target, TrafficTarget)
    assert target.port is None
    assert target.rules == (
        RuleRef(kind="TCPRoute", name="api-service-port"),
        RuleRef(kind="HTTPRouteGroup", name="api-service-routes", matches=("api",)),
    )
    l4 = keys["TrafficTarget/default/protocol-specific"]
    assert isinstance(l4, TrafficTarget)
    assert [r.kind for r in l4.rules] == ["TCPRoute", "UDPRoute"]


THE_ROUTES = HTTPRouteGroup(
    namespace="default",
    name="the-routes",
    matches=(
        HTTPMatch(name="metrics", path_regex="/metrics", methods=("GET",)),
        HTTPMatch(name="health", path_regex="/ping", methods=("*",)),
    ),
)

HEADER_ROUTES = HTTPRouteGroup(
    namespace="default",
    name="header-routes",
    matches=(
        HTTPMatch(
            name="android-insiders",
            headers=(("cookie", "^(.*?;)?(type=insider)(;.*)?$"), ("user-agent", ".*Android.*")),
        ),
        HTTPMatch(name="firefox-users", headers=(("user-agent", ".*Firefox.*"),)),
        HTTPMatch(
            name="iphone-users",
            path_regex="/api/.*",
            methods=("GET", "HEAD"),
            headers=(("user-agent", ".*iPhone.*"),),
        ),
    ),
)


@pytest.mark.parametrize("version", ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"])
def test_specs_examples_of_every_version_normalise_to_the_same_model(version: str) -> None:
    keys = by_key(load_file(f"specs-{version}.yaml"))
    assert keys["HTTPRouteGroup/default/the-routes"] == THE_ROUTES
    assert keys["TCPRoute/default/tcp-route"] == TCPRoute(namespace="default", name="tcp-route")
    if version != "v1alpha1":
        assert keys["HTTPRouteGroup/default/header-routes"] == HEADER_ROUTES
    if version == "v1alpha4":
        assert keys["TCPRoute/default/mysql-routes"] == TCPRoute(
            namespace="default", name="mysql-routes", ports=(3306, 6446)
        )
        assert keys["UDPRoute/default/udp-routes"] == UDPRoute(
            namespace="default", name="udp-routes", ports=(989, 990)
        )


CANARY = TrafficSplit(
    namespace="default",
    name="canary",
    service="website",
    backends=(Backend(service="website-v1", weight=90), Backend(service="website-v2", weight=10)),
)


@pytest.mark.parametrize("version", ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"])
def test_split_examples_of_every_version_normalise_to_the_same_model(version: str) -> None:
    keys = by_key(load_file(f"split-{version}.yaml"))
    assert keys["TrafficSplit/default/canary"] == CANARY
    if version in ("v1alpha3", "v1alpha4"):
        assert keys["TrafficSplit/default/ab-test"] == TrafficSplit(
            namespace="default",
            name="ab-test",
            service="website",
            backends=(
                Backend(service="website-v1", weight=0),
                Backend(service="website-v2", weight=100),
            ),
            matches=(RouteRef(name="ab-test"),),
        )


def test_split_v1alpha1_quantities_become_whole_numbers_with_the_same_ratio() -> None:
    keys = by_key(load_file("split-v1alpha1.yaml"))
    split = keys["TrafficSplit/default/milli-weights"]
    assert isinstance(split, TrafficSplit)
    assert split.backends == (
        Backend(service="web-next", weight=1),
        Backend(service="web-current", weight=9),
    )
    doc = {
        "apiVersion": "split.smi-spec.io/v1alpha1",
        "kind": "TrafficSplit",
        "metadata": {"name": "q"},
        "spec": {
            "service": "s",
            "backends": [
                {"service": "a", "weight": "1k"},
                {"service": "b", "weight": "250"},
                {"service": "c", "weight": "1.5"},
            ],
        },
    }
    parsed = parse_manifest(doc, document="q")
    assert isinstance(parsed, TrafficSplit)
    assert [b.weight for b in parsed.backends] == [2000, 500, 3]


def test_hybrid_mesh_file() -> None:
    keys = by_key(load_file("hybrid-mesh.yaml"))
    assert keys["MeshConfig/smc-system/mesh"] == MeshConfig(
        namespace="smc-system",
        name="mesh",
        permissive_traffic_mode=False,
        trust_domain="cluster.local",
        certificate_lifetime_seconds=86400,
    )
    store = keys["MeshService/bookstore/bookstore"]
    assert store == MeshService(
        namespace="bookstore",
        name="bookstore",
        ports=(ServicePort(name="http", port=14001, protocol="http", target_port=8080),),
        backing="kubernetes",
        selector=(("app", "bookstore"),),
    )
    warehouse = keys["MeshService/bookwarehouse/bookwarehouse"]
    assert isinstance(warehouse, MeshService)
    assert warehouse.ports[1] == ServicePort(name="db", port=5432, protocol="tcp", target_port=5432)
    vm1 = keys["VirtualMachine/bookwarehouse/warehouse-vm-1"]
    vm2 = keys["VirtualMachine/bookwarehouse/warehouse-vm-2"]
    assert isinstance(vm1, VirtualMachine) and isinstance(vm2, VirtualMachine)
    assert vm1.identity == "bookwarehouse/bookwarehouse"
    assert vm1.labels == (("app", "bookwarehouse"), ("zone", "eu-1"))
    assert vm1.ports == (
        WorkloadPort(name="http", port=14001, protocol="http"),
        WorkloadPort(name="db", port=5432, protocol="tcp"),
    )
    assert vm2.address == "2001:db8::17"  # normalised
    assert vm_backs_service(vm=vm1, service=warehouse)  # by labels
    assert vm_backs_service(vm=vm2, service=warehouse)  # by explicit list
    assert not vm_backs_service(vm=vm1, service=store)  # other namespace


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.yaml")))
def test_every_example_round_trips_through_the_canonical_manifest(name: str) -> None:
    resources = load_file(name)
    for r in resources:
        manifest = to_manifest(r)
        assert parse_manifest(manifest, document="rt") == r
    # And as one multi-document YAML file / as JSON.
    text = yaml.safe_dump_all([to_manifest(r) for r in resources])
    assert load_file_text(text) == resources
    as_json = json.dumps({"kind": "List", "items": [to_manifest(r) for r in resources]})
    assert load_file_text(as_json) == resources


def load_file_text(text: str) -> tuple[Resource, ...]:
    result = load_documents(text, source="text")
    assert result.errors == (), [str(e) for e in result.errors]
    return result.resources


def test_canonical_manifest_uses_latest_version_that_can_express_the_resource() -> None:
    v1 = by_key(load_file("access-v1alpha1.yaml"))
    with_port = to_manifest(v1["TrafficTarget/default/api-service-api"])
    without_port = to_manifest(v1["TrafficTarget/default/api-service-metrics"])
    assert with_port["apiVersion"] == "access.smi-spec.io/v1alpha2"
    assert without_port["apiVersion"] == "access.smi-spec.io/v1alpha3"
    assert to_manifest(CANARY)["apiVersion"] == "split.smi-spec.io/v1alpha4"
    assert to_manifest(THE_ROUTES)["apiVersion"] == "specs.smi-spec.io/v1alpha4"


def test_resource_key() -> None:
    assert resource_key(CANARY) == "TrafficSplit/default/canary"
    assert resource_key(THE_ROUTES) == "HTTPRouteGroup/default/the-routes"


def test_defaults_namespace_and_source_namespaces() -> None:
    doc = {
        "apiVersion": "access.smi-spec.io/v1alpha3",
        "kind": "TrafficTarget",
        "metadata": {"name": "t", "namespace": "shop"},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": "api"},
            "rules": [{"kind": "TCPRoute", "name": "all"}],
            "sources": [{"kind": "ServiceAccount", "name": "web"}],
        },
    }
    t = parse_manifest(doc, document="d")
    assert isinstance(t, TrafficTarget)
    assert t.destination == sa("api", "shop")
    assert t.sources == (sa("web", "shop"),)


def test_methods_are_normalised() -> None:
    doc = {
        "apiVersion": "specs.smi-spec.io/v1alpha4",
        "kind": "HTTPRouteGroup",
        "metadata": {"name": "g"},
        "spec": {
            "matches": [
                {"name": "a", "pathRegex": "/a", "methods": ["post", "GET", "GET"]},
                {"name": "b", "pathRegex": "/b", "methods": ["GET", "*"]},
                {"name": "c", "headers": {"X-Env": "prod"}},
            ]
        },
    }
    g = parse_manifest(doc, document="d")
    assert isinstance(g, HTTPRouteGroup)
    assert [m.methods for m in g.matches] == [("GET", "POST"), ("*",), ("*",)]
    assert g.matches[2].headers == (("x-env", "prod"),)
    assert g.matches[2].path_regex is None
    assert g.matches[0].envoy_path_regex == "(?:/a).*"


# ---- malformed input ------------------------------------------------------------------------

GOOD_SPLIT = """\
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: good
  namespace: shop
spec:
  service: web
  backends:
  - service: web-v1
    weight: 1
"""


def errors_of(text: str) -> tuple[tuple[Resource, ...], tuple[ManifestError, ...]]:
    result = load_documents(text, source="bad.yaml")
    return result.resources, result.errors


def only_error(text: str) -> ManifestError:
    resources, errors = errors_of(f"{GOOD_SPLIT}---\n{text}---\n{GOOD_SPLIT}")
    # the good documents around the bad one still come through
    assert [resource_key(r) for r in resources] == ["TrafficSplit/shop/good"] * 2
    assert len(errors) == 1, [str(e) for e in errors]
    err = errors[0]
    assert err.document == "bad.yaml#2"
    return err


def test_non_integer_weight_is_rejected_with_path() -> None:
    err = only_error(
        """\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: canary, namespace: shop}
spec:
  service: web
  backends:
  - service: web-v1
    weight: 90
  - service: web-v2
    weight: 10.5
"""
    )
    assert err.path == "spec.backends[1].weight"
    assert "whole number" in err.reason
    assert err.kind == "TrafficSplit" and err.name == "shop/canary"
    assert "bad.yaml#2 (TrafficSplit/shop/canary): field spec.backends[1].weight:" in str(err)


@pytest.mark.parametrize("weight", ['"10"', "true", "-1", "[1]", "10m"])
def test_weights_that_are_not_whole_numbers_for_integer_versions(weight: str) -> None:
    err = only_error(
        f"""\
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {{name: s}}
spec:
  service: web
  backends:
  - service: web-v1
    weight: {weight}
"""
    )
    assert err.path == "spec.backends[0].weight"


def test_quantity_weight_that_is_not_a_quantity() -> None:
    err = only_error(
        """\
apiVersion: split.smi-spec.io/v1alpha1
kind: TrafficSplit
metadata: {name: s}
spec:
  service: web
  backends:
  - service: web-v1
    weight: lots
"""
    )
    assert err.path == "spec.backends[0].weight"
    assert "quantity" in err.reason


def test_zero_weight_sum_is_rejected() -> None:
    err = only_error(
        """\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: s}
spec:
  service: web
  backends:
  - service: web-v1
    weight: 0
"""
    )
    assert err.path == "spec.backends"
    assert "sum to zero" in err.reason


def test_traffic_target_needs_destination_rule_and_source() -> None:
    text = """\
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: t}
spec:
  rules: []
  sources:
  - kind: ServiceAccount
"""
    resources, errors = errors_of(text)
    assert resources == ()
    paths = {e.path: e.reason for e in errors}
    assert paths["spec.destination"] == "required field is missing"
    assert paths["spec.rules"] == "must have at least one entry"
    assert paths["spec.sources[0].name"] == "required field is missing"
    assert all(e.document == "bad.yaml#1" for e in errors)


def test_wrong_kinds_in_fields() -> None:
    text = """\
apiVersion: access.smi-spec.io/v1alpha2
kind: TrafficTarget
metadata: {name: t}
spec:
  destination: {kind: Group, name: admins}
  rules:
  - kind: UDPRoute
    name: x
  sources:
  - {kind: ServiceAccount, name: web}
"""
    _, errors = errors_of(text)
    paths = {e.path: e.reason for e in errors}
    assert "must be ServiceAccount" in paths["spec.destination.kind"]
    assert "must be one of HTTPRouteGroup, TCPRoute" in paths["spec.rules[0].kind"]


def test_unknown_kind_and_api_version() -> None:
    err = only_error("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    assert err.path == "kind" and "unknown kind 'Pod'" in err.reason
    err = only_error(
        "apiVersion: split.smi-spec.io/v1beta9\nkind: TrafficSplit\nmetadata: {name: p}\n"
    )
    assert err.path == "apiVersion"
    assert "TrafficSplit is not served by split.smi-spec.io/v1beta9" in err.reason
    err = only_error(
        "apiVersion: specs.smi-spec.io/v1alpha3\nkind: UDPRoute\nmetadata: {name: p}\n"
    )
    assert err.path == "apiVersion" and "specs.smi-spec.io/v1alpha4" in err.reason
    err = only_error(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficTarget\nmetadata: {name: p}\n"
    )
    assert "split.smi-spec.io/v1alpha4 serves TrafficSplit" in err.reason


def test_fields_that_do_not_exist_in_the_version() -> None:
    # matches on a v1alpha2 split (added in v1alpha3)
    err = only_error(
        """\
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: s}
spec:
  service: web
  matches: [{kind: HTTPRouteGroup, name: g}]
  backends: [{service: a, weight: 1}]
"""
    )
    assert err.path == "spec.matches" and "unknown field" in err.reason
    # destination.port on access v1alpha3
    err = only_error(
        """\
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: t}
spec:
  destination: {kind: ServiceAccount, name: api, port: 80}
  rules: [{kind: TCPRoute, name: r}]
  sources: [{kind: ServiceAccount, name: web}]
"""
    )
    assert err.path == "spec.destination.port"
    # headers on specs v1alpha1
    err = only_error(
        """\
apiVersion: specs.smi-spec.io/v1alpha1
kind: HTTPRouteGroup
metadata: {name: g}
matches:
- {name: a, pathRegex: /, methods: ["*"], headers: {a: b}}
"""
    )
    assert err.path == "matches[0].headers"


def test_bad_values() -> None:
    text = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: Bad_Name}
spec:
  matches:
  - {name: a, pathRegex: "(unclosed"}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: g}
spec:
  matches:
  - {name: a, pathRegex: "(?=look)ahead"}
  - {name: a, pathRegex: "/dup"}
  - {name: b, methods: ["GE T"]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: t}
spec:
  matches: {ports: [80, 80, 70000]}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: vm, labels: {"bad key!": x}}
spec: {address: 10.0.0.300, serviceAccount: sa, ports: [{name: http, port: 0}]}
---
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {permissiveTrafficMode: "yes please", trustDomain: "Not Valid", certificateLifetime: 3 days}
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: svc}
spec: {backing: cloud, ports: [{name: http, port: 80, protocol: sctp}]}
"""
    resources, errors = errors_of(text)
    assert resources == ()
    found = {(e.document, e.path) for e in errors}
    expected = {
        ("bad.yaml#1", "metadata.name"),
        ("bad.yaml#2", "spec.matches[0].pathRegex"),
        ("bad.yaml#2", "spec.matches[1].name"),
        ("bad.yaml#2", "spec.matches[2].methods[0]"),
        ("bad.yaml#3", "spec.matches.ports[1]"),
        ("bad.yaml#3", "spec.matches.ports[2]"),
        ("bad.yaml#4", "metadata.labels.bad key!"),
        ("bad.yaml#4", "spec.address"),
        ("bad.yaml#4", "spec.ports[0].port"),
        ("bad.yaml#5", "spec.permissiveTrafficMode"),
        ("bad.yaml#5", "spec.trustDomain"),
        ("bad.yaml#5", "spec.certificateLifetime"),
        ("bad.yaml#6", "spec.backing"),
        ("bad.yaml#6", "spec.ports[0].protocol"),
    }
    assert expected <= found, sorted(found)
    lookahead = next(
        e for e in errors if e.path == "spec.matches[0].pathRegex" and e.document == "bad.yaml#2"
    )
    assert "RE2" in lookahead.reason
    for e in errors:
        assert e.reason and isinstance(e, SmiError) and isinstance(e, SMCError)


def test_parse_manifest_raises_all_problems_at_once() -> None:
    with pytest.raises(ManifestErrors) as info:
        parse_manifest(
            {
                "apiVersion": "split.smi-spec.io/v1alpha4",
                "kind": "TrafficSplit",
                "metadata": {"name": "s"},
                "spec": {
                    "service": "web",
                    "backends": [
                        {"service": "a", "weight": 1.5},
                        {"service": "a", "weight": 1},
                        {"service": "b"},
                    ],
                },
            },
            document="api-request",
        )
    paths = [e.path for e in info.value.errors]
    assert paths == [
        "spec.backends[0].weight",
        "spec.backends[1].service",
        "spec.backends[2].weight",
    ]
    assert "api-request" in str(info.value)


def test_not_a_mapping_and_invalid_yaml() -> None:
    resources, errors = errors_of(
        f"- just\n- a list of strings\n---\n{GOOD_SPLIT}---\nkey: [unclosed\n"
    )
    assert [resource_key(r) for r in resources] == ["TrafficSplit/shop/good"]
    assert errors[0].document == "bad.yaml#1[0]" and "must be a mapping" in errors[0].reason
    assert errors[-1].document == "bad.yaml#3" and "invalid YAML" in errors[-1].reason
    assert "line" in errors[-1].reason


def test_empty_documents_are_skipped() -> None:
    resources, errors = errors_of(f"---\n# nothing\n---\n{GOOD_SPLIT}...\n")
    assert errors == () and len(resources) == 1


def test_duplicate_keys_are_rejected() -> None:
    err = only_error(
        """\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: s}
spec:
  service: web
  backends: [{service: a, weight: 1}]
  backends: [{service: b, weight: 1}]
"""
    )
    assert "duplicate key 'backends'" in err.reason


# ---- hostile input --------------------------------------------------------------------------

BILLION_LAUGHS = """\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: lol}
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_billion_laughs_is_rejected_quickly() -> None:
    import time

    start = time.perf_counter()
    err = only_error(BILLION_LAUGHS)
    assert time.perf_counter() - start < 2.0
    assert "more than 100000 nodes" in err.reason and "alias" in err.reason


def test_recursive_alias_is_rejected() -> None:
    err = only_error("apiVersion: v1\nkind: X\nmetadata: &m {name: x, self: *m}\n")
    assert err.reason == "recursive alias: a node contains itself"


def test_crlf_and_bom_input() -> None:
    text = "\ufeff" + f"---\n{GOOD_SPLIT}---\n{GOOD_SPLIT}".replace("\n", "\r\n")
    resources, errors = errors_of(text)
    assert errors == () and len(resources) == 2


def test_huge_document_is_rejected_but_neighbours_apply() -> None:
    big = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: big}\ndata:\n" + "".join(
        f"  k{i}: {'x' * 100}\n" for i in range(12_000)
    )
    err = only_error(big)
    assert "larger than the limit of 1048576" in err.reason


def test_too_many_nodes_without_aliases() -> None:
    many = (
        "apiVersion: v1\nkind: X\nmetadata: {name: x}\nitems: ["
        + ",".join("1" for _ in range(100_500))
        + "]\n"
    )
    err = only_error(many)
    assert "more than 100000 nodes" in err.reason


def test_deep_nesting_does_not_crash() -> None:
    deep = "a: " + "[" * 200_000 + "]" * 200_000 + "\n"
    assert len(deep) < (1 << 20)
    err = only_error(deep)
    # Our own limit, or (PyYAML >= 6.0.4) libyaml's, whichever trips first: a clear error.
    assert "nested deeper than 100" in err.reason or "maximum nesting depth" in err.reason
    # JSON path too
    result = load_documents("[" * 50_000 + "]" * 50_000, source="deep.json")
    assert result.resources == ()
    assert "nested deeper" in result.errors[0].reason


def test_json_document() -> None:
    text = json.dumps(to_manifest(CANARY))
    result = load_documents(text, source="canary.json")
    assert result.resources == (CANARY,)
    result = load_documents(json.dumps([to_manifest(CANARY), {"kind": "Nope"}]), source="l.json")
    assert result.resources == (CANARY,)
    assert result.errors[0].document == "l.json#1[1]"


@pytest.mark.parametrize("version", ["v1alpha2", "v1alpha3", "v1alpha4"])
def test_list_form_headers_as_osm_writes_them(version: str) -> None:
    """OSM's CRD form: a list of mappings of header name to regex (one or more per item)."""
    matches = """\
matches:
- name: books-bought
  headers:
  - "User-Agent": ".*-http-client/*.*"
  - {client-app: bookbuyer, x-tier: gold}
"""
    if version != "v1alpha2":  # v1alpha3+ nest the matches under spec
        matches = "spec:\n" + "".join("  " + line for line in matches.splitlines(True))
    text = (
        f"apiVersion: specs.smi-spec.io/{version}\nkind: HTTPRouteGroup\n"
        "metadata: {name: g, namespace: bookstore}\n" + matches
    )
    result = load_documents(text, source="osm.yaml")
    assert result.errors == ()
    [group] = result.resources
    assert isinstance(group, HTTPRouteGroup)
    assert group.matches[0].headers == (
        ("client-app", "bookbuyer"),
        ("user-agent", ".*-http-client/*.*"),
        ("x-tier", "gold"),
    )


def test_list_form_headers_errors_name_the_item() -> None:
    base = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: g}
spec:
  matches:
  - name: m
    headers:
"""
    err = only_error(base + "    - {a: x}\n    - {A: y}\n")
    assert err.path == "spec.matches[0].headers[1].A" and "more than once" in err.reason
    err = only_error(base + "    - {a: x}\n    - just-a-string\n")
    assert err.path == "spec.matches[0].headers[1]" and "mapping of header name" in err.reason
    err = only_error(base + "    - {}\n")
    assert err.path == "spec.matches[0].headers[0]"
