"""Event builders and hypothesis strategies shared by the foundation tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from smc.events import (
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    Endpoint,
    EndpointsChanged,
    Event,
    JoinTokenIssued,
    MeshConfigChanged,
    ProxyCertificateIssued,
    ProxyCertificateRevoked,
    ServiceAccountRemoved,
    ServiceAccountUpserted,
    ServicePort,
    ServiceRemoved,
    ServiceUpserted,
    SmiResourceApplied,
    SmiResourceDeleted,
    TrustBundleChanged,
    VmGroupStatusChanged,
    VmInstanceChanged,
    WorkloadJoined,
    WorkloadLeft,
    WorkloadPort,
    make_event,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
names = st.sampled_from(["a", "b", "c", "d"])
nss = st.sampled_from(["ns1", "ns2"])
text = st.text(alphabet="abcdefghij-./:é", max_size=12)
ports = st.integers(min_value=1, max_value=65535)
labels = st.dictionaries(st.sampled_from(["app", "version", "tier"]), text, max_size=3)
times = st.integers(min_value=0, max_value=10**7).map(lambda s: T0 + timedelta(seconds=s))

_common = {
    "source": st.sampled_from(["api", "cli", "k8s-informer"]),
    "actor": st.sampled_from(["alice", "bob", "system:serviceaccount:x"]),
    "event_id": st.uuids().map(str),
    "occurred_at": times,
    "causation_id": st.none() | st.uuids().map(str),
    "correlation_id": st.none() | st.uuids().map(str),
}


def _ev(cls: type[Event], **payload: st.SearchStrategy) -> st.SearchStrategy[Event]:  # type: ignore[type-arg]
    return st.builds(lambda **kw: make_event(cls, **kw), **_common, **payload)


service_port = st.builds(
    ServicePort, name=text, port=ports, protocol=st.sampled_from(["http", "tcp"]), target_port=ports
)
endpoint = st.builds(
    Endpoint,
    address=st.ip_addresses(v=4).map(str),
    port=ports,
    workload=st.none() | text,
    ready=st.booleans(),
)
wport = st.builds(WorkloadPort, name=text, port=ports, protocol=st.sampled_from(["http", "tcp"]))

EVENTS: dict[type[Event], st.SearchStrategy[Event]] = {
    ServiceUpserted: _ev(
        ServiceUpserted,
        namespace=nss,
        name=names,
        ports=st.lists(service_port, max_size=3).map(tuple),
        backing=st.sampled_from(["kubernetes", "vm"]),
        selector=labels,
        labels=labels,
    ),
    ServiceRemoved: _ev(ServiceRemoved, namespace=nss, name=names),
    EndpointsChanged: _ev(
        EndpointsChanged,
        namespace=nss,
        service=names,
        endpoints=st.lists(endpoint, max_size=3).map(tuple),
    ),
    WorkloadJoined: _ev(
        WorkloadJoined,
        kind=st.sampled_from(["pod", "vm"]),
        namespace=nss,
        name=names,
        address=st.ip_addresses(v=4).map(str),
        service_account=names,
        labels=labels,
        ports=st.lists(wport, max_size=2).map(tuple),
    ),
    WorkloadLeft: _ev(WorkloadLeft, kind=st.sampled_from(["pod", "vm"]), namespace=nss, name=names),
    VmInstanceChanged: _ev(
        VmInstanceChanged,
        namespace=nss,
        group=names,
        instance_id=st.sampled_from(["i-1", "i-2", "i-3"]),
        workload=names,
        phase=st.sampled_from(["joined", "draining", "left"]),
        cause=st.sampled_from(["scale-out", "scale-in", "stopped"]),
        provider=st.just("aws"),
        address=st.ip_addresses(v=4).map(str),
        state=st.sampled_from(["running", "stopped", ""]),
    ),
    VmGroupStatusChanged: _ev(
        VmGroupStatusChanged,
        namespace=nss,
        group=names,
        status=st.sampled_from(["ok", "stale", "removed"]),
        reason=text,
        instances=st.integers(min_value=0, max_value=1000),
    ),
    ServiceAccountUpserted: _ev(ServiceAccountUpserted, namespace=nss, name=names),
    ServiceAccountRemoved: _ev(ServiceAccountRemoved, namespace=nss, name=names),
    SmiResourceApplied: _ev(
        SmiResourceApplied,
        kind=st.sampled_from(["TrafficTarget", "TrafficSplit"]),
        api_version=st.just("v1"),
        namespace=nss,
        name=names,
        manifest_json=text,
    ),
    SmiResourceDeleted: _ev(
        SmiResourceDeleted,
        kind=st.sampled_from(["TrafficTarget", "TrafficSplit"]),
        namespace=nss,
        name=names,
    ),
    MeshConfigChanged: _ev(
        MeshConfigChanged,
        permissive=st.booleans(),
        trust_domain=text,
        cert_lifetime_seconds=st.integers(min_value=60, max_value=10**6),
        settings=labels,
    ),
    CertificateIssued: _ev(
        CertificateIssued,
        serial=st.sampled_from(["01", "02", "03", "04"]),
        identity=names,
        not_before=times,
        not_after=times,
        issuer=st.just("local"),
        fingerprint=text,
    ),
    CertificateRenewed: _ev(
        CertificateRenewed,
        serial=st.sampled_from(["05", "06"]),
        previous_serial=st.sampled_from(["01", "02"]),
        identity=names,
        not_before=times,
        not_after=times,
        issuer=st.just("local"),
        fingerprint=text,
    ),
    CertificateRevoked: _ev(
        CertificateRevoked, serial=st.sampled_from(["01", "05"]), identity=names, reason=text
    ),
    TrustBundleChanged: _ev(
        TrustBundleChanged,
        issuer=st.sampled_from(["local", "vault"]),
        roots_pem=st.lists(text, max_size=2).map(tuple),
    ),
    ProxyCertificateIssued: _ev(
        ProxyCertificateIssued,
        proxy=st.sampled_from(["default/p1", "default/p2", "vm/default/vm1"]),
        serial=st.sampled_from(["11", "12", "13"]),
        previous_serial=st.sampled_from(["", "11"]),
        identity=names,
        not_before=times,
        not_after=times,
        issuer=st.just("local"),
        fingerprint=text,
        proof=st.sampled_from(["service-account-token", "certificate:11", "join-token:ab"]),
    ),
    ProxyCertificateRevoked: _ev(
        ProxyCertificateRevoked,
        proxy=st.sampled_from(["default/p1", "default/p2"]),
        serial=st.sampled_from(["11", "12"]),
        identity=names,
        reason=text,
    ),
    JoinTokenIssued: _ev(
        JoinTokenIssued,
        token_sha256=st.sampled_from(["ab", "cd"]),
        proxy=st.sampled_from(["vm/default/vm1", "vm/default/vm2"]),
        identity=names,
        expires_at=times,
    ),
}

any_event = st.one_of(*EVENTS.values())


def service(i: int, *, actor: str = "alice", event_id: str | None = None) -> ServiceUpserted:
    return make_event(
        ServiceUpserted,
        source="api",
        actor=actor,
        event_id=event_id,
        namespace="ns",
        name=f"svc{i}",
        ports=(ServicePort(name="http", port=80, protocol="http", target_port=8080),),
        backing="kubernetes",
        selector={"app": f"svc{i}"},
    )
