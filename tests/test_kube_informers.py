"""Kubernetes informers against a real kube-apiserver: namespace membership, the mapping of
Services/EndpointSlices/Pods/ServiceAccounts/SMI objects to events, deterministic ids across
replicas (the log keeps each change once), resuming after cut connections, relisting after 410
Gone (etcd compaction) without losing or duplicating a change, and invalid SMI objects skipped."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from smc.events import (
    EndpointsChanged,
    Event,
    Position,
    ServiceAccountUpserted,
    ServiceRemoved,
    ServiceUpserted,
    SmiResourceApplied,
    SmiResourceDeleted,
    SqliteLog,
    WorkloadJoined,
)
from smc.informers import KubeConfigError, KubeEndpoint, KubeInformers, LogSink
from smc.testing.kube import KubeAPIServer, TcpCutter, kube_apiserver_fixture

# The first test may build kube-apiserver (once per machine, tens of minutes at nice 19)
# unless `python -m smc.testing.kube` ran before: allow for it.
pytestmark = [pytest.mark.kube, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeAPIServer]:
    yield from kube_apiserver_fixture(watch_cache=False)


@pytest.fixture
def api(kube: KubeAPIServer) -> Iterator[Any]:
    with kube.api_client() as api_client:
        yield api_client


class Collect:
    """An EventSink keeping every event it got (and optionally appending to a log)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def emit(self, events: Sequence[Event]) -> None:
        self.events.extend(events)

    def of(self, ns: str) -> list[Event]:
        return [e for e in self.events if getattr(e, "namespace", None) == ns]


async def until(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(informers: KubeInformers) -> AsyncIterator[KubeInformers]:
    stop = asyncio.Event()
    task = asyncio.create_task(informers.run(stop=stop))
    try:
        waiter = asyncio.ensure_future(informers.synced.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=60, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        assert waiter in done, "informers did not sync within 60s"
        yield informers
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)


def endpoint(kube: KubeAPIServer, host: str | None = None) -> KubeEndpoint:
    return KubeEndpoint(host=host or kube.host, token=kube.token, ca_file=str(kube.ca_path))


def new_ns(api: Any, label: str | None) -> str:
    name = f"i-{uuid.uuid4().hex[:10]}"
    labels = {label: "true"} if label else {}
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name, "labels": labels}})
    return name


def populate(api: Any, ns: str) -> None:
    """A small mesh in ``ns``: service accounts, a service, a running pod, a slice, SMI."""
    core = client.CoreV1Api(api)
    for sa in ("api", "web"):
        core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
    core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": "api", "labels": {"tier": "backend"}},
            "spec": {
                "selector": {"app": "api"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "tcp-db", "port": 5432, "targetPort": 5432},
                    {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
                ],
            },
        },
    )
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "api-0", "labels": {"app": "api"}},
            "spec": {
                "serviceAccountName": "api",
                "containers": [
                    {
                        "name": "app",
                        "image": "example.invalid/api:1",
                        "ports": [{"name": "http", "containerPort": 8080}],
                    }
                ],
            },
        },
    )
    # No kubelet here: give the pod its IP the way a kubelet would, through the status.
    core.patch_namespaced_pod_status(
        "api-0", ns, {"status": {"podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}]}}
    )
    client.DiscoveryV1Api(api).create_namespaced_endpoint_slice(
        ns,
        {
            "metadata": {"name": "api-x1", "labels": {"kubernetes.io/service-name": "api"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": ["10.1.0.7"],
                    "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "name": "api-0", "namespace": ns},
                },
                {"addresses": ["10.1.0.8"], "conditions": {"ready": False}},
            ],
        },
    )
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(
        "access.smi-spec.io",
        "v1alpha2",
        ns,
        "traffictargets",
        {
            "apiVersion": "access.smi-spec.io/v1alpha2",
            "kind": "TrafficTarget",
            "metadata": {"name": "web-to-api"},
            "spec": {
                "destination": {
                    "kind": "ServiceAccount",
                    "name": "api",
                    "namespace": ns,
                    "port": 8080,  # only v1alpha1/v1alpha2 have it
                },
                "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": ns}],
                "rules": [{"kind": "HTTPRouteGroup", "name": "routes", "matches": ["all"]}],
            },
        },
    )
    custom.create_namespaced_custom_object(
        "specs.smi-spec.io",
        "v1alpha1",
        ns,
        "httproutegroups",
        {
            "apiVersion": "specs.smi-spec.io/v1alpha1",
            "kind": "HTTPRouteGroup",
            "metadata": {"name": "routes"},
            "matches": [{"name": "all", "pathRegex": ".*", "methods": ["*"]}],
        },
    )


def by_type(events: Sequence[Event]) -> Counter[str]:
    return Counter(type(e).__name__ for e in events)


async def test_membership_and_mapping(kube: KubeAPIServer, api: Any) -> None:
    label = f"smc-test-{uuid.uuid4().hex[:6]}/monitored"
    member, other = new_ns(api, label), new_ns(api, None)
    populate(api, member)
    populate(api, other)
    sink = Collect()
    informers = KubeInformers(endpoint=endpoint(kube), sink=sink, member_label=label, backoff=0.2)
    async with running(informers):
        await until(lambda: len(sink.of(member)) >= 7, "the member namespace's events")
        await asyncio.sleep(0.5)
        got = sink.of(member)
        assert by_type(got) == {
            "ServiceAccountUpserted": 2,
            "ServiceUpserted": 1,
            "EndpointsChanged": 1,
            "WorkloadJoined": 1,
            "SmiResourceApplied": 2,
        }
        assert sink.of(other) == []  # not in the mesh
        svc = next(e for e in got if isinstance(e, ServiceUpserted))
        assert [(p.name, p.port, p.protocol, p.target_port) for p in svc.ports] == [
            ("http", 80, "http", 8080),
            ("tcp-db", 5432, "tcp", 5432),
            ("dns", 53, "udp", 53),
        ]
        assert (svc.backing, dict(svc.selector), dict(svc.labels)) == (
            "kubernetes",
            {"app": "api"},
            {"tier": "backend"},
        )
        eps = next(e for e in got if isinstance(e, EndpointsChanged))
        assert eps.service == "api"
        assert [(e.address, e.port, e.workload, e.ready) for e in eps.endpoints] == [
            ("10.1.0.7", 8080, f"{member}/api-0", True),
            ("10.1.0.8", 8080, None, False),
        ]
        pod = next(e for e in got if isinstance(e, WorkloadJoined))
        assert (pod.kind, pod.name, pod.address, pod.service_account) == (
            "pod",
            "api-0",
            "10.1.0.7",
            "api",
        )
        assert [(p.name, p.port, p.protocol) for p in pod.ports] == [("http", 8080, "http")]
        smi = {e.kind: e for e in got if isinstance(e, SmiResourceApplied)}
        # Written as v1alpha2 / v1alpha1 and watched at the storage version (v1alpha3 /
        # v1alpha4, no conversion): each is parsed as the version it was written in, or the
        # destination port (v1alpha2) and top-level matches (v1alpha1) would be rejected.
        assert smi["TrafficTarget"].api_version == "access.smi-spec.io/v1alpha2"
        assert json.loads(smi["TrafficTarget"].manifest_json)["spec"]["destination"]["port"] == 8080
        assert (
            json.loads(smi["HTTPRouteGroup"].manifest_json)["spec"]["matches"][0]["name"] == "all"
        )

        # The other namespace joins: its objects are emitted.
        core = client.CoreV1Api(api)
        core.patch_namespace(other, {"metadata": {"labels": {label: "true"}}})
        await until(lambda: len(sink.of(other)) >= 7, "the joining namespace's events")
        # The member leaves: everything it had is removed.
        core.patch_namespace(member, {"metadata": {"labels": {label: None}}})
        await until(
            lambda: any(isinstance(e, ServiceRemoved) for e in sink.of(member)),
            "removals of the leaving namespace",
        )
        await asyncio.sleep(0.5)
        left = sink.of(member)[7:]
        assert by_type(left) == {
            "ServiceAccountRemoved": 2,
            "ServiceRemoved": 1,
            "EndpointsChanged": 1,
            "WorkloadLeft": 1,
            "SmiResourceDeleted": 2,
        }
        assert next(e for e in left if isinstance(e, EndpointsChanged)).endpoints == ()

        # Live changes: pod deleted, service account deleted, service updated.
        core.delete_namespaced_pod("api-0", other, grace_period_seconds=0)
        core.delete_namespaced_service_account("web", other)
        core.patch_namespaced_service("api", other, {"metadata": {"labels": {"tier": "edge"}}})
        await until(
            lambda: (
                by_type(sink.of(other))["ServiceUpserted"] == 2
                and by_type(sink.of(other))["WorkloadLeft"] == 1
                and by_type(sink.of(other))["ServiceAccountRemoved"] == 1
            ),
            "live changes",
        )
    ids = [e.event_id for e in sink.events]
    assert len(ids) == len(set(ids)), "an event id was emitted twice"


async def test_replicas_emit_the_same_ids_and_the_log_keeps_one(
    kube: KubeAPIServer, api: Any, tmp_path: Path
) -> None:
    label = f"smc-test-{uuid.uuid4().hex[:6]}/monitored"
    ns = new_ns(api, label)
    populate(api, ns)
    a, b = Collect(), Collect()
    ia = KubeInformers(endpoint=endpoint(kube), sink=a, member_label=label)
    ib = KubeInformers(endpoint=endpoint(kube), sink=b, member_label=label)
    async with running(ia), running(ib):
        await until(lambda: len(a.of(ns)) >= 7 and len(b.of(ns)) >= 7, "both replicas")
        client.CoreV1Api(api).create_namespaced_service_account(ns, {"metadata": {"name": "x"}})
        await until(lambda: len(a.of(ns)) >= 8 and len(b.of(ns)) >= 8, "both replicas, live")

    # Resources are watched concurrently, so only each aggregate's order is fixed.
    def per_aggregate(events: list[Event]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for e in events:
            out.setdefault(e.aggregate, []).append(e.event_id)
        return out

    assert per_aggregate(a.events) == per_aggregate(b.events)
    log = SqliteLog(tmp_path / "log.db")
    try:
        await LogSink(log).emit(a.events)
        again = log.append(b.events)  # the second replica's appends are all duplicates
        assert again and all(x.duplicate for x in again)
        assert len(log.read(start=Position(), max_records=10_000)) == len(a.events)
    finally:
        log.close()


async def test_cut_connection_resumes_without_relist(kube: KubeAPIServer, api: Any) -> None:
    label = f"smc-test-{uuid.uuid4().hex[:6]}/monitored"
    ns = new_ns(api, label)
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "a"}})
    sink = Collect()
    with TcpCutter(target_port=kube.port) as cutter:
        informers = KubeInformers(
            endpoint=endpoint(kube, cutter.host), sink=sink, member_label=label, backoff=0.2
        )
        async with running(informers):
            await until(lambda: len(sink.of(ns)) == 1, "the first service account")
            lists = {k: s.lists for k, s in informers.stats.items()}
            cutter.cut()
            await asyncio.sleep(0.3)
            core.create_namespaced_service_account(ns, {"metadata": {"name": "b"}})
            core.delete_namespaced_service_account("a", ns)
            await asyncio.sleep(0.5)
            assert len(sink.of(ns)) == 1  # nothing can arrive while cut
            cutter.resume()
            await until(lambda: len(sink.of(ns)) == 3, "the changes made while cut")
            await asyncio.sleep(0.5)
            stats = informers.stats
            assert stats["ServiceAccount"].resumes >= 1
            assert stats["ServiceAccount"].relists_after_gone == 0
            assert {k: s.lists for k, s in stats.items()} == lists  # resumed, not relisted
    got = [(type(e).__name__, getattr(e, "name", "")) for e in sink.of(ns)]
    assert got == [
        ("ServiceAccountUpserted", "a"),
        ("ServiceAccountUpserted", "b"),
        ("ServiceAccountRemoved", "a"),
    ]


async def test_gone_after_compaction_relists_without_loss_or_duplicates(
    kube: KubeAPIServer, api: Any
) -> None:
    label = f"smc-test-{uuid.uuid4().hex[:6]}/monitored"
    ns = new_ns(api, label)
    core = client.CoreV1Api(api)
    for name in ("keep", "drop"):
        core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
    sink = Collect()
    with TcpCutter(target_port=kube.port) as cutter:
        informers = KubeInformers(
            endpoint=endpoint(kube, cutter.host), sink=sink, member_label=label, backoff=0.2
        )
        async with running(informers):
            await until(lambda: len(sink.of(ns)) == 2, "the first service accounts")
            cutter.cut()
            core.create_namespaced_service_account(ns, {"metadata": {"name": "new"}})
            core.create_namespaced_service_account(ns, {"metadata": {"name": "brief"}})
            core.delete_namespaced_service_account("brief", ns)  # born and gone while cut
            core.delete_namespaced_service_account("drop", ns)
            kube.compact_etcd()
            cutter.resume()
            await until(lambda: len(sink.of(ns)) == 4, "the changes found by the relist")
            await asyncio.sleep(0.5)
            assert informers.stats["ServiceAccount"].relists_after_gone >= 1
    got = [(type(e).__name__, getattr(e, "name", "")) for e in sink.of(ns)]
    assert sorted(got[2:]) == [("ServiceAccountRemoved", "drop"), ("ServiceAccountUpserted", "new")]
    ids = [e.event_id for e in sink.events]
    assert len(ids) == len(set(ids))


async def test_apiserver_restart_is_survived(kube: KubeAPIServer, api: Any) -> None:
    label = f"smc-test-{uuid.uuid4().hex[:6]}/monitored"
    ns = new_ns(api, label)
    sink = Collect()
    informers = KubeInformers(endpoint=endpoint(kube), sink=sink, member_label=label, backoff=0.2)
    async with running(informers):
        # From this thread: the children die with the thread that started them.
        kube.restart(kill=True)  # a crash: the watches die without a goodbye
        with kube.api_client() as fresh:
            client.CoreV1Api(fresh).create_namespaced_service_account(
                ns, {"metadata": {"name": "after-restart"}}
            )
        await until(lambda: len(sink.of(ns)) == 1, "a change after the restart", timeout=60)
    assert isinstance(sink.of(ns)[0], ServiceAccountUpserted)


async def test_invalid_smi_object_is_skipped_not_fatal(kube: KubeAPIServer, api: Any) -> None:
    label = f"smc-test-{uuid.uuid4().hex[:6]}/monitored"
    ns = new_ns(api, label)
    custom = client.CustomObjectsApi(api)
    sink = Collect()
    informers = KubeInformers(endpoint=endpoint(kube), sink=sink, member_label=label, backoff=0.2)
    async with running(informers):
        for name, spec in (
            ("bad", {"service": "api", "backends": "not-a-list"}),
            ("good", {"service": "api", "backends": [{"service": "api-v1", "weight": 1}]}),
        ):
            custom.create_namespaced_custom_object(
                "split.smi-spec.io",
                "v1alpha4",
                ns,
                "trafficsplits",
                {
                    "apiVersion": "split.smi-spec.io/v1alpha4",
                    "kind": "TrafficSplit",
                    "metadata": {"name": name},
                    "spec": spec,
                },
            )
        await until(lambda: len(sink.of(ns)) >= 1, "the valid split")
        custom.delete_namespaced_custom_object(
            "split.smi-spec.io", "v1alpha4", ns, "trafficsplits", "bad"
        )
        custom.delete_namespaced_custom_object(
            "split.smi-spec.io", "v1alpha4", ns, "trafficsplits", "good"
        )
        await until(lambda: len(sink.of(ns)) >= 2, "the deletion")
        await asyncio.sleep(0.3)
    got = [(type(e).__name__, getattr(e, "name", "")) for e in sink.of(ns)]
    # The invalid one never reached the log, so its deletion is not emitted either.
    assert got == [("SmiResourceApplied", "good"), ("SmiResourceDeleted", "good")]
    assert isinstance(sink.of(ns)[1], SmiResourceDeleted)


def test_kubeconfig_endpoint(kube: KubeAPIServer, tmp_path: Path) -> None:
    ep = KubeEndpoint.from_kubeconfig(kube.kubeconfig_path)
    assert (ep.host, ep.token, ep.ca_file) == (kube.host, kube.token, str(kube.ca_path))
    assert kube.token not in repr(ep)
    # certificate-authority-data (inline) works too: the endpoint really connects.
    doc = yaml.safe_load(kube.kubeconfig_path.read_text())
    cluster = doc["clusters"][0]["cluster"]
    pem = Path(cluster.pop("certificate-authority")).read_bytes()
    cluster["certificate-authority-data"] = base64.b64encode(pem).decode()
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump(doc))
    ep2 = KubeEndpoint.from_kubeconfig(inline)
    req = urllib.request.Request(
        f"{ep2.host}/readyz", headers={"Authorization": f"Bearer {ep2.token}"}
    )
    with urllib.request.urlopen(req, context=ep2.ssl_context(), timeout=5) as resp:
        assert resp.read() == b"ok"
    # Bad kubeconfigs get a clear error naming the file and the problem.
    del doc["users"][0]["user"]["token"]
    inline.write_text(yaml.safe_dump(doc))
    with pytest.raises(KubeConfigError, match="has no bearer token"):
        KubeEndpoint.from_kubeconfig(inline)
    inline.write_text("- just\n- a list\n")
    with pytest.raises(KubeConfigError, match="must be a mapping"):
        KubeEndpoint.from_kubeconfig(inline)


async def test_bookmarks_advance_the_resume_point() -> None:
    """With the watch cache on (the default of a real cluster), the apiserver sends bookmarks:
    the reflector's resourceVersion moves on although its own resource did not change."""
    with KubeAPIServer(watch_cache=True) as kube, kube.api_client() as api:
        label = "smc-test/monitored"
        ns = new_ns(api, label)
        sink = Collect()
        informers = KubeInformers(
            endpoint=endpoint(kube), sink=sink, member_label=label, smi=False, watch_timeout=5
        )
        async with running(informers):
            sa = informers._reflectors["ServiceAccount"]
            before = int(sa.rv or 0)
            # Other resources change; service accounts do not.
            for i in range(3):
                client.CoreV1Api(api).create_namespaced_config_map(
                    ns, {"metadata": {"name": f"cm-{i}"}}
                )
            await until(lambda: sa.stats.bookmarks >= 1, "a bookmark", timeout=30)
            await until(lambda: int(sa.rv or 0) > before, "the bookmark's resourceVersion")
            assert sa.stats.relists_after_gone == 0 and sa.stats.lists == 1
        assert sink.of(ns) == []


async def test_informer_records_are_signed_and_another_clusters_forgery_skipped(
    kube: KubeAPIServer, api: Any, tmp_path: Path
) -> None:
    """The informer seals what it appends with its cluster's writer key; every record it
    wrote from the real apiserver verifies, and a record another cluster's informer key
    forges for this cluster's namespace never changes state."""
    from smc.audit import issue_writer, load_trust, verify_log
    from smc.ca import LocalIssuer
    from smc.events import ChainVerifier, ServiceRemoved, Signer, WorkloadPort, make_event
    from smc.projections import ProjectionRunner, RegistryProjection, all_projections

    ca = LocalIssuer(directory=tmp_path / "ca", trust_domain="cluster.local")
    for cluster in ("east", "west"):
        issue_writer(
            ca, trust_domain="cluster.local", role="informer", name=cluster,
            directory=tmp_path / cluster,
        )  # fmt: skip
    trust = load_trust(tmp_path / "east" / "trust.pem")
    label = f"smc-test-{uuid.uuid4().hex[:6]}/monitored"
    ns = new_ns(api, label)
    populate(api, ns)
    log = SqliteLog(tmp_path / "log.db", signer=Signer.from_dir(tmp_path / "east"))
    try:
        informers = KubeInformers(endpoint=endpoint(kube), sink=LogSink(log), member_label=label)
        async with running(informers):
            await until(lambda: informers.emitted >= 7, "the namespace's objects on the log")
        emitted = informers.emitted
        # cluster west's informer key forges a move of this cluster's pod and a removal
        west = Signer.from_dir(tmp_path / "west")
        forged = [
            make_event(
                WorkloadJoined, source="k8s", actor="k8s-informer", kind="pod", namespace=ns,
                name="api-0", address="192.0.2.66", service_account="api", labels={"app": "api"},
                ports=(WorkloadPort(name="http", port=8080, protocol="http"),),
            ),
            make_event(ServiceRemoved, source="k8s", actor="k8s-informer", namespace=ns, name="api"),
        ]  # fmt: skip
        log.append(forged, signer=west)
        report = verify_log(log, trust)
        assert [f.kind for f in report.findings] == ["not-entitled", "not-entitled"], (
            report.findings
        )
        assert all("cluster west" in f.detail for f in report.findings)
        assert report.verified == report.records - 2 >= emitted
        ids = {w["identity"] for w in report.writers.values()}
        assert ids == {"spiffe://cluster.local/ns/smc-writers/sa/informer.east"}
        runner = ProjectionRunner(
            log=log, projections=all_projections(), verifier=ChainVerifier(trust=trust)
        )
        runner.catch_up()
        registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
        assert registry.workloads[("pod", ns, "api-0")].address == "10.1.0.7"
        assert (ns, "api") in registry.services  # the forged removal never happened
        assert runner.skipped == 2
    finally:
        log.close()
