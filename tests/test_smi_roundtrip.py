"""Property: every valid model object survives ``parse_manifest(to_manifest(r)) == r``."""

from __future__ import annotations

import ipaddress
import json
from typing import Literal

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from smc.smi import (
    Backend,
    HTTPMatch,
    HTTPRouteGroup,
    IdentityRef,
    MeshConfig,
    MeshService,
    Resource,
    RouteRef,
    RuleRef,
    ServicePort,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    VirtualMachine,
    WorkloadPort,
    load_documents,
    parse_manifest,
    to_manifest,
)

label = st.from_regex(r"[a-z]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
subdomain = st.lists(label, min_size=1, max_size=3).map(".".join)
ports = st.integers(min_value=1, max_value=65535)
regexes = st.sampled_from(["/", "/api", "/api/.*", ".*", "/v[0-9]+/books", "^/x$", "/a|/b"])
methods = st.one_of(
    st.just(("*",)),
    st.sets(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]), min_size=1).map(
        lambda s: tuple(sorted(s))
    ),
)
header_names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
headers = st.dictionaries(header_names, regexes, max_size=3).map(lambda d: tuple(sorted(d.items())))
match_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,15}", fullmatch=True)
labels = st.dictionaries(
    st.from_regex(r"([a-z]{1,5}\.io/)?[a-z][a-z0-9_.-]{0,8}[a-z0-9]", fullmatch=True),
    st.from_regex(r"([A-Za-z0-9][-A-Za-z0-9_.]{0,8}[A-Za-z0-9])?", fullmatch=True),
    max_size=3,
).map(lambda d: tuple(sorted(d.items())))
Proto = Literal["http", "tcp", "grpc", "udp"]
PROTOCOLS: list[Proto] = ["http", "tcp", "grpc", "udp"]
protocols = st.sampled_from(PROTOCOLS)
identity = st.builds(IdentityRef, name=subdomain, namespace=label)


@st.composite
def http_route_groups(draw: st.DrawFn) -> HTTPRouteGroup:
    names = draw(st.lists(match_names, min_size=1, max_size=4, unique=True))
    matches = tuple(
        HTTPMatch(
            name=n,
            path_regex=draw(st.one_of(st.none(), regexes)),
            methods=draw(methods),
            headers=draw(headers),
        )
        for n in names
    )
    return HTTPRouteGroup(namespace=draw(label), name=draw(subdomain), matches=matches)


@st.composite
def l4_routes(draw: st.DrawFn) -> TCPRoute | UDPRoute:
    udp = draw(st.booleans())
    namespace, name = draw(label), draw(subdomain)
    match_name = draw(st.one_of(st.none(), match_names))
    chosen = tuple(sorted(draw(st.sets(ports, max_size=4))))
    if udp:
        return UDPRoute(namespace=namespace, name=name, match_name=match_name, ports=chosen)
    return TCPRoute(namespace=namespace, name=name, match_name=match_name, ports=chosen)


@st.composite
def traffic_targets(draw: st.DrawFn) -> TrafficTarget:
    rules = tuple(
        RuleRef(
            kind=draw(st.sampled_from(["HTTPRouteGroup", "TCPRoute", "UDPRoute"])),
            name=draw(subdomain),
            matches=tuple(draw(st.lists(match_names, max_size=3, unique=True))),
        )
        for _ in range(draw(st.integers(1, 3)))
    )
    port = draw(st.one_of(st.none(), ports))
    if port is not None:  # the versions with destination.port (v1alpha2) have no UDPRoute
        rules = tuple(r for r in rules if r.kind != "UDPRoute") or (
            RuleRef(kind="TCPRoute", name="fallback"),
        )
    return TrafficTarget(
        namespace=draw(label),
        name=draw(subdomain),
        destination=draw(identity),
        port=port,
        sources=tuple(draw(st.lists(identity, min_size=1, max_size=3, unique=True))),
        rules=rules,
    )


@st.composite
def traffic_splits(draw: st.DrawFn) -> TrafficSplit:
    services = draw(st.lists(subdomain, min_size=1, max_size=4, unique=True))
    weights = draw(
        st.lists(st.integers(0, 2**31 - 1), min_size=len(services), max_size=len(services)).filter(
            lambda ws: sum(ws) > 0
        )
    )
    return TrafficSplit(
        namespace=draw(label),
        name=draw(subdomain),
        service=draw(subdomain),
        backends=tuple(
            Backend(service=s, weight=w) for s, w in zip(services, weights, strict=True)
        ),
        matches=tuple(RouteRef(name=n) for n in draw(st.lists(subdomain, max_size=2, unique=True))),
    )


@st.composite
def mesh_services(draw: st.DrawFn) -> MeshService:
    names = draw(st.lists(label, min_size=1, max_size=3, unique=True))
    numbers = draw(st.lists(ports, min_size=len(names), max_size=len(names), unique=True))
    return MeshService(
        namespace=draw(label),
        name=draw(subdomain),
        ports=tuple(
            ServicePort(name=n, port=p, protocol=draw(protocols), target_port=draw(ports))
            for n, p in zip(names, numbers, strict=True)
        ),
        backing=draw(st.sampled_from(["kubernetes", "vm"])),
        selector=draw(labels),
    )


@st.composite
def virtual_machines(draw: st.DrawFn) -> VirtualMachine:
    address = draw(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
    names = draw(st.lists(label, max_size=3, unique=True))
    numbers = draw(st.lists(ports, min_size=len(names), max_size=len(names), unique=True))
    return VirtualMachine(
        namespace=draw(label),
        name=draw(subdomain),
        address=ipaddress.ip_address(address).compressed,
        ports=tuple(
            WorkloadPort(name=n, port=p, protocol=draw(protocols))
            for n, p in zip(names, numbers, strict=True)
        ),
        service_account=draw(subdomain),
        labels=draw(labels),
        services=tuple(sorted(draw(st.sets(subdomain, max_size=3)))),
    )


mesh_configs = st.builds(
    MeshConfig,
    namespace=label,
    name=subdomain,
    permissive_traffic_mode=st.booleans(),
    trust_domain=st.from_regex(r"[a-z0-9._-]{1,20}", fullmatch=True),
    certificate_lifetime_seconds=st.integers(60, 366 * 86400),
)

resources = st.one_of(
    http_route_groups(),
    l4_routes(),
    traffic_targets(),
    traffic_splits(),
    mesh_services(),
    virtual_machines(),
    mesh_configs,
)


@settings(max_examples=300, deadline=None)
@given(resources)
def test_parse_of_canonical_manifest_is_identity(r: Resource) -> None:
    manifest = to_manifest(r)
    assert parse_manifest(manifest, document="prop") == r
    # through real YAML and JSON text too
    assert json.loads(json.dumps(manifest)) == manifest
    result = load_documents(yaml.safe_dump(manifest), source="prop.yaml")
    assert result.errors == () and result.resources == (r,)
