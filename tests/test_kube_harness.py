"""Tests of the real Kubernetes API harness: kube-apiserver (built from k8s.io/kubernetes) on
Debian's etcd, with the SMI CRDs installed; core objects, SMI objects of every version, list,
watch (with bookmarks), 410 Gone after etcd compaction, and restarts."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from smc.testing.kube import (
    CRD_DIR,
    KUBERNETES_VERSION,
    KubeAPIServer,
    kube_apiserver_fixture,
)

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


def _ns(api: Any, **labels: str) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    client.CoreV1Api(api).create_namespace(
        {"metadata": {"name": name, "labels": {"smc.dev/monitored": "true", **labels}}}
    )
    return name


def test_version_and_readyz(kube: KubeAPIServer, api: Any) -> None:
    info = client.VersionApi(api).get_code()
    assert info.git_version == KUBERNETES_VERSION
    assert kube.running and kube.startup_seconds > 0
    status, body = kube.get("/readyz")
    assert (status, body) == (200, b"ok")


def test_wrong_token_is_rejected(kube: KubeAPIServer) -> None:
    cfg = kube.configuration()
    cfg.api_key = {"authorization": "not-the-token"}
    with client.ApiClient(cfg) as bad, pytest.raises(ApiException) as info:
        client.CoreV1Api(bad).list_namespace()
    assert info.value.status == 401


def test_kubeconfig_file_works(kube: KubeAPIServer) -> None:
    doc = yaml.safe_load(kube.kubeconfig_path.read_text())
    assert doc["clusters"][0]["cluster"]["server"] == kube.host
    api_client = config.new_client_from_config(config_file=str(kube.kubeconfig_path))
    with api_client:
        names = {n.metadata.name for n in client.CoreV1Api(api_client).list_namespace().items}
    assert {"default", "kube-system"} <= names


def test_core_objects(api: Any) -> None:
    core = client.CoreV1Api(api)
    ns = _ns(api)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "bookstore"}})
    svc = core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": "bookstore", "labels": {"app": "bookstore"}},
            "spec": {
                "selector": {"app": "bookstore"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        },
    )
    assert svc.spec.cluster_ip.startswith("10.96.")
    pod = core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "bookstore-0", "labels": {"app": "bookstore"}},
            "spec": {
                "serviceAccountName": "bookstore",
                "containers": [{"name": "app", "image": "example.invalid/bookstore:1"}],
            },
        },
    )
    assert pod.metadata.uid and pod.metadata.resource_version
    # No scheduler or kubelet: the pod is accepted and stays Pending.
    assert core.read_namespaced_pod("bookstore-0", ns).status.phase == "Pending"
    slices = client.DiscoveryV1Api(api)
    slices.create_namespaced_endpoint_slice(
        ns,
        {
            "metadata": {
                "name": "bookstore-abc",
                "labels": {"kubernetes.io/service-name": "bookstore"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.7"], "conditions": {"ready": True}},
            ],
        },
    )
    got = slices.list_namespaced_endpoint_slice(
        ns, label_selector="kubernetes.io/service-name=bookstore"
    )
    assert [s.endpoints[0].addresses for s in got.items] == [["10.1.0.7"]]
    assert [p.metadata.name for p in core.list_namespaced_pod(ns).items] == ["bookstore-0"]
    assert [a.metadata.name for a in core.list_namespaced_service_account(ns).items] == [
        "bookstore"
    ]


def _crd_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _osm_user_docs() -> list[dict[str, Any]]:
    path = Path(__file__).parent / "data" / "osm" / "users.yaml"
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_smi_crds_established_with_every_version(api: Any) -> None:
    ext = client.ApiextensionsV1Api(api)
    seen: dict[str, list[str]] = {}
    for doc in _crd_docs():
        crd = ext.read_custom_resource_definition(doc["metadata"]["name"])
        conds = {c.type: c.status for c in crd.status.conditions}
        assert conds["Established"] == "True"
        assert conds["NamesAccepted"] == "True"
        seen[crd.spec.names.kind] = [v.name for v in crd.spec.versions if v.served]
        assert [v.name for v in crd.spec.versions if v.storage] == [seen[crd.spec.names.kind][-1]]
    assert seen == {
        "TrafficTarget": ["v1alpha1", "v1alpha2", "v1alpha3"],
        "HTTPRouteGroup": ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"],
        "TCPRoute": ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"],
        "UDPRoute": ["v1alpha4"],
        "TrafficSplit": ["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"],
        # OSM's policy kinds (policy.openservicemesh.io), watched beside SMI
        "Egress": ["v1alpha1"],
        "IngressBackend": ["v1alpha1"],
        "Retry": ["v1alpha1"],
        "UpstreamTrafficSetting": ["v1alpha1"],
    }
    groups = {g.name: g for g in client.ApisApi(api).get_api_versions().groups}
    assert [v.version for v in groups["policy.openservicemesh.io"].versions] == ["v1alpha1"]
    assert [v.version for v in groups["access.smi-spec.io"].versions] == [
        "v1alpha3",
        "v1alpha2",
        "v1alpha1",
    ]


def _traffic_target(version: str, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": f"access.smi-spec.io/{version}",
        "kind": "TrafficTarget",
        "metadata": {"name": name},
    }
    if version == "v1alpha1":
        doc["destination"] = {"kind": "ServiceAccount", "name": "api", "port": "8080"}
        doc["sources"] = [{"kind": "ServiceAccount", "name": "web"}]
        doc["specs"] = [{"kind": "HTTPRouteGroup", "name": "routes", "matches": ["all"]}]
    else:
        spec: dict[str, Any] = {
            "destination": {"kind": "ServiceAccount", "name": "api"},
            "sources": [{"kind": "ServiceAccount", "name": "web"}],
            "rules": [{"kind": "HTTPRouteGroup", "name": "routes", "matches": ["all"]}],
        }
        if version == "v1alpha2":
            spec["destination"]["port"] = 8080
        doc["spec"] = spec
    return doc


@pytest.mark.parametrize("version", ["v1alpha1", "v1alpha2", "v1alpha3"])
def test_traffic_target_of_each_version(api: Any, version: str) -> None:
    custom = client.CustomObjectsApi(api)
    ns = _ns(api)
    name = f"tt-{version}"
    body = _traffic_target(version, name)
    created = custom.create_namespaced_custom_object(
        "access.smi-spec.io", version, ns, "traffictargets", body
    )
    assert created["metadata"]["uid"]
    got = custom.get_namespaced_custom_object(
        "access.smi-spec.io", version, ns, "traffictargets", name
    )
    assert got["apiVersion"] == f"access.smi-spec.io/{version}"
    for key in ("destination", "sources", "specs", "spec"):
        assert got.get(key) == body.get(key)  # unknown fields are preserved as written
    # Conversion strategy None: every served version returns the same object.
    other = custom.get_namespaced_custom_object(
        "access.smi-spec.io", "v1alpha3", ns, "traffictargets", name
    )
    assert other["metadata"]["uid"] == created["metadata"]["uid"]
    assert other["apiVersion"] == "access.smi-spec.io/v1alpha3"


def test_every_smi_kind_and_version_accepts_an_object(api: Any) -> None:
    custom = client.CustomObjectsApi(api)
    ns = _ns(api)
    made = 0
    for doc in _crd_docs():
        spec = doc["spec"]
        for v in spec["versions"]:
            name = f"{spec['names']['singular']}-{v['name']}"
            body = {
                "apiVersion": f"{spec['group']}/{v['name']}",
                "kind": spec["names"]["kind"],
                "metadata": {"name": name},
                "spec": {"matches": [{"name": "m", "ports": [53]}], "service": "root"},
            }
            if spec["group"] == "policy.openservicemesh.io":  # structural schemas: a valid spec
                body["spec"] = next(
                    d["spec"] for d in _osm_user_docs() if d["kind"] == spec["names"]["kind"]
                )
            custom.create_namespaced_custom_object(
                spec["group"], v["name"], ns, spec["names"]["plural"], body
            )
            listed = custom.list_namespaced_custom_object(
                spec["group"], v["name"], ns, spec["names"]["plural"]
            )
            assert name in {i["metadata"]["name"] for i in listed["items"]}
            made += 1
    assert made == 20  # 16 SMI kind/versions and OSM's 4 policy kinds
    with pytest.raises(ApiException) as info:
        custom.create_namespaced_custom_object(
            "specs.smi-spec.io",
            "v1alpha1",
            ns,
            "udproutes",
            {
                "apiVersion": "specs.smi-spec.io/v1alpha1",
                "kind": "UDPRoute",
                "metadata": {"name": "x"},
            },
        )
    assert info.value.status == 404  # UDPRoute exists only from specs v1alpha4


def _watch_in_thread(
    fn: Any, out: queue.Queue[Any], **kwargs: Any
) -> tuple[watch.Watch, threading.Thread]:
    w = watch.Watch()

    def run() -> None:
        try:
            for ev in w.stream(fn, **kwargs):
                out.put(ev)
        except Exception as exc:  # handed to the test thread
            out.put(exc)
        out.put(None)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return w, t


def _next(out: queue.Queue[Any], timeout: float = 20.0) -> Any:
    return out.get(timeout=timeout)


def test_list_then_watch_from_resource_version(api: Any) -> None:
    core = client.CoreV1Api(api)
    ns = _ns(api)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "before"}})
    listed = core.list_namespaced_service_account(ns)
    assert [a.metadata.name for a in listed.items] == ["before"]
    out: queue.Queue[Any] = queue.Queue()
    w, _ = _watch_in_thread(
        core.list_namespaced_service_account,
        out,
        namespace=ns,
        resource_version=listed.metadata.resource_version,
        allow_watch_bookmarks=True,
        timeout_seconds=30,
    )
    core.create_namespaced_service_account(ns, {"metadata": {"name": "after"}})
    core.delete_namespaced_service_account("after", ns)
    got = []
    while len(got) < 2:
        ev = _next(out)
        assert not isinstance(ev, Exception), ev
        if ev["type"] != "BOOKMARK":
            got.append((ev["type"], ev["object"].metadata.name))
    assert got == [("ADDED", "after"), ("DELETED", "after")]  # "before" is not replayed
    w.stop()


def test_compaction_makes_old_resource_versions_gone(kube: KubeAPIServer, api: Any) -> None:
    core = client.CoreV1Api(api)
    ns = _ns(api)
    old_rv = core.list_namespaced_service_account(ns).metadata.resource_version
    for i in range(3):
        core.create_namespaced_service_account(ns, {"metadata": {"name": f"sa-{i}"}})
    rev = kube.compact_etcd()
    assert rev > int(old_rv)
    out: queue.Queue[Any] = queue.Queue()
    _watch_in_thread(
        core.list_namespaced_service_account,
        out,
        namespace=ns,
        resource_version=old_rv,
        timeout_seconds=10,
    )
    ev = _next(out)
    # The watch is answered with an ERROR event carrying 410 Gone (an "Expired" Status).
    if isinstance(ev, ApiException):
        assert ev.status == 410
    else:
        assert ev["type"] == "ERROR" and ev["raw_object"]["code"] == 410, ev
    fresh = core.list_namespaced_service_account(ns)
    assert sorted(a.metadata.name for a in fresh.items) == ["sa-0", "sa-1", "sa-2"]


def test_restart_keeps_data_and_cuts_watches(kube: KubeAPIServer, api: Any) -> None:
    core = client.CoreV1Api(api)
    ns = _ns(api)
    rv = core.list_namespaced_service_account(ns).metadata.resource_version
    out: queue.Queue[Any] = queue.Queue()
    _, t = _watch_in_thread(
        core.list_namespaced_service_account,
        out,
        namespace=ns,
        resource_version=rv,
        timeout_seconds=120,
    )
    time.sleep(0.5)
    pid = kube.apiserver_pid
    kube.restart()
    assert kube.apiserver_pid != pid and kube.running
    t.join(timeout=30)
    assert not t.is_alive(), "the watch survived an apiserver restart"
    with kube.api_client() as fresh:
        assert client.CoreV1Api(fresh).read_namespace(ns).metadata.name == ns
