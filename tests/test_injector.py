"""The sidecar injector: the pure Pod -> JSONPatch translation, its bootstrap checked by real
Envoy, the HTTPS AdmissionReview server (bad bodies answered, never a crash), and the webhook
registered in a real kube-apiserver, mutating Pods created through it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch  # type: ignore[import-untyped]
import pytest
from cryptography import x509

from smc.ca import LocalIssuer, verify_certificate
from smc.injector import (
    AGENT_CONTAINER,
    ANNOTATION_BOOTSTRAP_SECRET,
    ANNOTATION_INJECT,
    ANNOTATION_NODE_ID,
    ANNOTATION_STATUS,
    BOOTSTRAP_LABEL,
    BOOTSTRAP_MOUNT,
    BOOTSTRAP_VOLUME,
    CA_SDS_FILE,
    CERT_SDS_FILE,
    INIT_CONTAINER,
    NAMESPACE_LABEL,
    PROXY_CONTAINER,
    PROXY_VOLUME,
    BootstrapCredentials,
    BootstrapSecrets,
    InjectorConfig,
    InvalidAdmissionReview,
    InvalidPod,
    WebhookServer,
    injection_decision,
    issue_serving_certificate,
    issuer_credentials,
    kube_namespace_labels,
    mutate,
    parse_ads_address,
    parse_review,
    server_ssl_context,
)
from smc.testing.envoy import envoy_binary

TD = "cluster.local"
ENABLED = {NAMESPACE_LABEL: "enabled"}
#: Namespaces for the module's registered webhook (the process test registers its own).
FIXTURE = {"smc-test": "fixture"}


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> LocalIssuer:
    return LocalIssuer(directory=tmp_path_factory.mktemp("ca"), trust_domain=TD)


@pytest.fixture(scope="module")
def config() -> InjectorConfig:
    return InjectorConfig(ads=parse_ads_address("127.0.0.1:15010"), trust_domain=TD)


def creds_for(
    issuer: LocalIssuer, config: InjectorConfig, ns: str, sa: str
) -> BootstrapCredentials:
    return issuer_credentials(issuer, trust_domain=TD, config=config)(ns, sa)


def pod(name: str = "web-0", **annotations: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop", "labels": {"app": "web"}}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "example.invalid/web:1"}],
        },
    }


def apply(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(doc), ops)
    return out


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


# ---------------------------------------------------------------------------- pure translation
def test_mutate_adds_sidecar_init_container_volume_and_annotations(
    issuer: LocalIssuer, config: InjectorConfig
) -> None:
    p = pod(**{"smc.dev/exclude-inbound-ports": "9090", "other": "x"})
    ops = mutate(
        p,
        namespace_labels=ENABLED,
        config=config,
        credentials=creds_for(issuer, config, "shop", "web"),
    )
    out = apply(p, ops)
    assert [c["name"] for c in out["spec"]["containers"]] == ["app", PROXY_CONTAINER]
    assert [c["name"] for c in out["spec"]["initContainers"]] == [INIT_CONTAINER]
    assert out["spec"]["volumes"] == [{"name": PROXY_VOLUME, "emptyDir": {}}]
    ann = out["metadata"]["annotations"]
    assert ann["other"] == "x" and ann[ANNOTATION_NODE_ID] == "shop/web-0"
    assert json.loads(ann[ANNOTATION_STATUS])["containers"] == [PROXY_CONTAINER]
    proxy = out["spec"]["containers"][1]
    assert proxy["image"] == "envoyproxy/envoy:v1.40.0"
    assert proxy["securityContext"]["runAsUser"] == 1337
    env = env_of(proxy)
    boot = json.loads(env["SMC_ENVOY_BOOTSTRAP"])
    assert boot["node"]["id"] == "shop/web-0"
    addr = boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    assert addr["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 15010,
    }
    # The bootstrap certificate is the pod's identity, from our CA.
    leaf = x509.load_pem_x509_certificate(env["SMC_PROXY_CERT"].encode())
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [u.value for u in uris] == [f"spiffe://{TD}/ns/shop/sa/web"]
    sid = verify_certificate(cert_pem=env["SMC_PROXY_CERT"], trust_bundle=issuer.trust_bundle())
    assert sid.uri == f"spiffe://{TD}/ns/shop/sa/web"
    script = out["spec"]["initContainers"][0]["command"][2]
    assert "--to-ports 15006" in script and "--to-ports 15001" in script
    assert "--uid-owner 1337 -j RETURN" in script
    assert "--dport 9090 -j RETURN" in script
    assert set(out["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"]) == {
        "NET_ADMIN",
        "NET_RAW",
    }


def test_mutate_is_idempotent(issuer: LocalIssuer, config: InjectorConfig) -> None:
    p = pod()
    once = apply(
        p,
        mutate(
            p,
            namespace_labels=ENABLED,
            config=config,
            credentials=creds_for(issuer, config, "shop", "web"),
        ),
    )
    assert mutate(once, namespace_labels=ENABLED, config=config, credentials=None) == []
    # A pod that carries the proxy container but lost the annotation is still left alone.
    del once["metadata"]["annotations"][ANNOTATION_STATUS]
    assert mutate(once, namespace_labels=ENABLED, config=config) == []


def test_opt_in_and_opt_out(config: InjectorConfig) -> None:
    assert mutate(pod(), namespace_labels={}, config=config) == []
    assert mutate(pod(), namespace_labels={NAMESPACE_LABEL: "disabled"}, config=config) == []
    assert (
        mutate(pod(**{ANNOTATION_INJECT: "false"}), namespace_labels=ENABLED, config=config) == []
    )
    host = pod()
    host["spec"]["hostNetwork"] = True
    assert not injection_decision(host, namespace_labels=ENABLED).inject
    assert injection_decision(pod(**{ANNOTATION_INJECT: "true"}), namespace_labels=ENABLED).inject


def test_pod_without_annotations_metadata_namespace_or_name(config: InjectorConfig) -> None:
    plain = InjectorConfig(ads=config.ads, tls=False)
    p = pod()
    del p["metadata"]["namespace"]
    p["metadata"]["name"] = None
    p["metadata"]["generateName"] = "web-"
    out = apply(p, mutate(p, namespace_labels=ENABLED, config=plain, namespace="shop"))
    proxy = out["spec"]["containers"][1]
    # generateName: the node id is completed by Envoy from the pod's real name.
    assert proxy["args"][-4:-2] == ["--service-node", "$(POD_NAMESPACE)/$(POD_NAME)"]
    assert ANNOTATION_NODE_ID not in out["metadata"]["annotations"]
    boot = json.loads(env_of(proxy)["SMC_ENVOY_BOOTSTRAP"])
    assert "transport_socket" not in boot["static_resources"]["clusters"][0]


def test_init_image_with_iptables_runs_with_network_capabilities_only() -> None:
    cfg = InjectorConfig(
        ads=parse_ads_address("[fd00::1]:15010"),
        tls=False,
        init_image="x/iptables:1",
        init_install="",
    )
    out = apply(pod(), mutate(pod(), namespace_labels=ENABLED, config=cfg))
    init = out["spec"]["initContainers"][0]
    assert init["image"] == "x/iptables:1" and "apk" not in init["command"][2]
    assert init["securityContext"]["capabilities"] == {
        "add": ["NET_ADMIN", "NET_RAW"],
        "drop": ["ALL"],
    }
    boot = json.loads(env_of(out["spec"]["containers"][1])["SMC_ENVOY_BOOTSTRAP"])
    addr = boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    assert addr["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] == "fd00::1"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p["spec"].update(containers={}), "spec.containers"),
        (lambda p: p["spec"].update(containers=[]), "spec.containers"),
        (lambda p: p.update(spec=[1]), "spec"),
        (lambda p: p["metadata"].update(annotations={"a": 1}), "metadata.annotations"),
        (
            lambda p: p["metadata"].update(annotations={"smc.dev/exclude-inbound-ports": "http"}),
            "exclude-inbound-ports",
        ),
        (lambda p: p["spec"].update(serviceAccountName="Bad_SA"), "spec.serviceAccountName"),
    ],
)
def test_bad_pods_are_refused_naming_the_field(
    config: InjectorConfig, change: Any, field: str
) -> None:
    p = pod()
    change(p)
    plain = InjectorConfig(ads=config.ads, tls=False)
    with pytest.raises(InvalidPod, match=field.replace(".", r"\.")):
        mutate(p, namespace_labels=ENABLED, config=plain)


@pytest.mark.envoy
def test_injected_bootstrap_validates_with_real_envoy(
    issuer: LocalIssuer, config: InjectorConfig
) -> None:
    p = pod()
    out = apply(
        p,
        mutate(
            p,
            namespace_labels=ENABLED,
            config=config,
            credentials=creds_for(issuer, config, "shop", "web"),
        ),
    )
    proxy = out["spec"]["containers"][1]
    env = dict(os.environ, **env_of(proxy))
    argv = [
        str(envoy_binary()),
        "--mode",
        "validate",
        *[a.replace("$(SMC_ENVOY_BOOTSTRAP)", env["SMC_ENVOY_BOOTSTRAP"]) for a in proxy["args"]],
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
    # A broken key is caught by Envoy: the test can fail.
    env["SMC_PROXY_KEY"] = "not a key"
    bad = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0


# ---------------------------------------------------------------------------- webhook server
class ThreadedWebhook:
    """A :class:`WebhookServer` on its own loop in a thread (the tests and the apiserver call
    it synchronously)."""

    def __init__(self, server: WebhookServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedWebhook:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}/mutate"


def _webhook(issuer: LocalIssuer, config: InjectorConfig, **kwargs: Any) -> WebhookServer:
    serving = issue_serving_certificate(
        issuer, dns_names=["smc-injector.smc-system.svc"], ip_addresses=["127.0.0.1"]
    )
    return WebhookServer(
        config=config,
        credentials=issuer_credentials(issuer, trust_domain=TD, config=config),
        ssl_context=server_ssl_context(serving),
        **kwargs,
    )


def _client_ctx(issuer: LocalIssuer) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata="".join(issuer.trust_bundle()))
    return ctx  # verifies the chain and the IP SAN 127.0.0.1


def _post(hook: ThreadedWebhook, issuer: LocalIssuer, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(hook.url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=_client_ctx(issuer), timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def review(obj: Any = None, *, uid: str = "u-1", **overrides: Any) -> dict[str, Any]:
    req: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": "shop",
        "object": obj if obj is not None else pod(),
    }
    req.update(overrides)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}


@pytest.fixture(scope="module")
def webhook(issuer: LocalIssuer, config: InjectorConfig) -> Iterator[ThreadedWebhook]:
    with ThreadedWebhook(_webhook(issuer, config)) as hook:
        yield hook


def test_serving_certificate_names_service_and_loopback(issuer: LocalIssuer) -> None:
    cert = issue_serving_certificate(
        issuer, dns_names=["inj.smc-system.svc"], ip_addresses=["127.0.0.1"]
    )
    san = cert.certificate().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["inj.smc-system.svc"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(Exception, match="not an IP address"):
        issue_serving_certificate(issuer, ip_addresses=["nope"])


def test_webhook_answers_a_pod_review_with_a_jsonpatch(
    webhook: ThreadedWebhook, issuer: LocalIssuer
) -> None:
    status, answer = _post(webhook, issuer, json.dumps(review(uid="abc-123")).encode())
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    resp = answer["response"]
    assert resp["uid"] == "abc-123" and resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    out = apply(pod(), json.loads(base64.b64decode(resp["patch"])))
    assert PROXY_CONTAINER in [c["name"] for c in out["spec"]["containers"]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "expected a JSON object"),
        (json.dumps({**review(), "apiVersion": "admission.k8s.io/v1beta1"}).encode(), "apiVersion"),
        (json.dumps({**review(), "kind": "Pod"}).encode(), "kind"),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            "request",
        ),
        (json.dumps(review(uid="")).encode(), "request.uid"),
    ],
)
def test_unreadable_reviews_get_http_400_with_a_message(
    webhook: ThreadedWebhook, issuer: LocalIssuer, body: bytes, message: str
) -> None:
    status, answer = _post(webhook, issuer, body)
    assert status == 400 and message in answer["error"], answer


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (review(uid="u-obj", object=None), "request.object is missing"),
        (review(uid="u-kind", kind="Pod"), "request.kind"),
        (
            review(
                uid="u-pod",
                object={"kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": "app"}},
            ),
            "spec.containers",
        ),
        (
            review(
                uid="u-ns", namespace="Not_A_Namespace", object={**pod(), "metadata": {"name": "x"}}
            ),
            "namespace",
        ),
    ],
)
def test_reviews_with_a_uid_are_denied_with_a_reason(
    webhook: ThreadedWebhook, issuer: LocalIssuer, doc: dict[str, Any], message: str
) -> None:
    status, answer = _post(webhook, issuer, json.dumps(doc).encode())
    assert status == 200
    resp = answer["response"]
    assert resp["uid"] == doc["request"]["uid"] and resp["allowed"] is False
    assert message in resp["status"]["message"], resp


def test_other_kinds_and_operations_pass_unchanged(
    webhook: ThreadedWebhook, issuer: LocalIssuer
) -> None:
    for doc in (
        review(
            uid="svc",
            kind={"group": "", "version": "v1", "kind": "Service"},
            object={"kind": "Service"},
        ),
        review(uid="del", operation="DELETE", object=None),
        review(uid="opt", object=pod(**{ANNOTATION_INJECT: "false"})),
    ):
        status, answer = _post(webhook, issuer, json.dumps(doc).encode())
        assert status == 200 and answer["response"] == {
            "uid": doc["request"]["uid"],
            "allowed": True,
        }
    # Still serving after all of the above.
    with urllib.request.urlopen(
        webhook.url.replace("/mutate", "/healthz"), context=_client_ctx(issuer), timeout=5
    ) as r:
        assert r.read() == b"ok"


def test_parse_review_keeps_the_uid_for_denials() -> None:
    with pytest.raises(InvalidAdmissionReview) as info:
        parse_review(json.dumps(review(uid="k", operation=None)).encode())
    assert info.value.uid == "k" and "request.operation" in str(info.value)


# ---------------------------------------------------------------------------- real apiserver
@pytest.fixture(scope="module")
def kube() -> Iterator[Any]:
    from smc.testing.kube import kube_apiserver_fixture

    yield from kube_apiserver_fixture(smi_crds=False)


def webhook_configuration(
    name: str,
    client_config: dict[str, str],
    namespace_labels: dict[str, str],
    *,
    side_effects: str = "None",
    reinvocation: str | None = None,
) -> dict[str, Any]:
    """A MutatingWebhookConfiguration sending pod CREATEs in namespaces with these labels."""
    hook: dict[str, Any] = {
        "name": "inject.smc.dev",
        "admissionReviewVersions": ["v1"],
        "sideEffects": side_effects,
        "failurePolicy": "Fail",
        "timeoutSeconds": 10,
        "clientConfig": client_config,
        "namespaceSelector": {"matchLabels": namespace_labels},
        "rules": [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ],
    }
    if reinvocation is not None:
        hook["reinvocationPolicy"] = reinvocation
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [hook],
    }


@pytest.fixture(scope="module")
def registered(
    kube: Any, issuer: LocalIssuer, config: InjectorConfig
) -> Iterator[tuple[Any, ThreadedWebhook]]:

    api = kube.api_client()
    server = _webhook(issuer, config, namespace_labels=kube_namespace_labels(api))
    try:
        with registered_webhook(api, server, issuer, {**ENABLED, **FIXTURE}) as (hook, _):
            yield api, hook
    finally:
        api.close()


@contextlib.contextmanager
def registered_webhook(
    api: Any,
    server: WebhookServer,
    issuer: LocalIssuer,
    namespace_labels: dict[str, str],
    *,
    side_effects: str = "None",
) -> Iterator[tuple[ThreadedWebhook, str]]:
    """``server`` running, and registered in the apiserver for pods in namespaces with
    ``namespace_labels``; yields the hook and the configuration's name."""
    from kubernetes import client

    with ThreadedWebhook(server) as hook:
        bundle = base64.b64encode("".join(issuer.trust_bundle()).encode()).decode()
        name = f"smc-injector-{uuid.uuid4().hex[:6]}"
        adm: Any = client.AdmissionregistrationV1Api(api)
        adm.create_mutating_webhook_configuration(
            webhook_configuration(
                name,
                {"url": hook.url, "caBundle": bundle},
                namespace_labels,
                side_effects=side_effects,
                reinvocation="IfNeeded",
            )
        )
        try:
            yield hook, name
        finally:
            adm.delete_mutating_webhook_configuration(name)


def _namespace(api: Any, **labels: str) -> str:
    from kubernetes import client

    name = f"inj-{uuid.uuid4().hex[:8]}"
    core: Any = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": labels}})
    return name


def _create_pod(api: Any, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    from kubernetes import client

    core: Any = client.CoreV1Api(api)
    created = core.create_namespaced_pod(ns, body)
    out: dict[str, Any] = api.sanitize_for_serialization(created)
    return out


def _app_pod(name: str, **annotations: str) -> dict[str, Any]:
    p = pod(name, **annotations)
    del p["metadata"]["namespace"]
    return p


@pytest.mark.kube
@pytest.mark.timeout(600)
def test_pod_created_through_the_apiserver_comes_back_mutated(
    registered: tuple[Any, ThreadedWebhook], issuer: LocalIssuer, config: InjectorConfig
) -> None:
    api, hook = registered
    ns = _namespace(api, **ENABLED, **FIXTURE)
    before = hook.server.injected
    got = _create_pod(api, ns, _app_pod("web-0"))
    assert hook.server.injected == before + 1
    assert [c["name"] for c in got["spec"]["containers"]] == ["app", PROXY_CONTAINER]
    assert [c["name"] for c in got["spec"]["initContainers"]] == [INIT_CONTAINER]
    assert got["metadata"]["annotations"][ANNOTATION_NODE_ID] == f"{ns}/web-0"
    assert ANNOTATION_STATUS in got["metadata"]["annotations"]
    assert PROXY_VOLUME in [v["name"] for v in got["spec"]["volumes"]]
    proxy = got["spec"]["containers"][1]
    boot = json.loads(env_of(proxy)["SMC_ENVOY_BOOTSTRAP"])
    assert boot["node"]["id"] == f"{ns}/web-0"
    leaf = x509.load_pem_x509_certificate(env_of(proxy)["SMC_PROXY_CERT"].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [u.value for u in san] == [f"spiffe://{TD}/ns/{ns}/sa/web"]
    # Re-invocation on what the apiserver stored: nothing more to add.
    assert mutate(got, namespace_labels=ENABLED, config=config) == []
    assert mutate(got, namespace_labels=ENABLED, config=config) == []


@pytest.mark.kube
@pytest.mark.timeout(600)
def test_opted_out_and_unlabelled_pods_are_not_mutated(
    registered: tuple[Any, ThreadedWebhook],
) -> None:
    api, hook = registered
    ns = _namespace(api, **ENABLED, **FIXTURE)
    reviews = hook.server.reviews
    got = _create_pod(api, ns, _app_pod("batch-0", **{ANNOTATION_INJECT: "false"}))
    assert hook.server.reviews == reviews + 1  # asked, and declined
    assert [c["name"] for c in got["spec"]["containers"]] == ["app"]
    assert not got["spec"].get("initContainers")
    assert ANNOTATION_STATUS not in (got["metadata"].get("annotations") or {})
    plain = _namespace(api, **FIXTURE)
    got = _create_pod(api, plain, _app_pod("web-0"))
    assert hook.server.reviews == reviews + 1  # the namespaceSelector keeps it away
    assert [c["name"] for c in got["spec"]["containers"]] == ["app"]


@pytest.mark.kube
@pytest.mark.timeout(600)
def test_generate_name_pod_through_the_apiserver(registered: tuple[Any, ThreadedWebhook]) -> None:
    api, _ = registered
    ns = _namespace(api, **ENABLED, **FIXTURE)
    body = _app_pod("x")
    del body["metadata"]["name"]
    body["metadata"]["generateName"] = "web-"
    got = _create_pod(api, ns, body)
    assert got["metadata"]["name"].startswith("web-")
    proxy = got["spec"]["containers"][1]
    assert "--service-node" in proxy["args"]
    assert {e["name"]: e.get("valueFrom") for e in proxy["env"]}["POD_NAME"] == {
        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}
    }


# ---------------------------------------------------------------------------- deploy manifests
SMC_YAML = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "smc.yaml"
#: kind -> (API path prefix, plural, namespaced) for every kind smc.yaml may hold.
KINDS: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Service": ("/api/v1", "services", True),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "Job": ("/apis/batch/v1", "jobs", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "MutatingWebhookConfiguration": (
        "/apis/admissionregistration.k8s.io/v1",
        "mutatingwebhookconfigurations",
        False,
    ),
}


def _post_to_apiserver(
    kube: Any, doc: dict[str, Any], *, dry_run: bool
) -> tuple[int, dict[str, Any]]:
    prefix, plural, namespaced = KINDS[doc["kind"]]
    assert doc["apiVersion"] == prefix.removeprefix("/api/").removeprefix("/apis/"), doc[
        "apiVersion"
    ]
    path = (
        prefix
        + (f"/namespaces/{doc['metadata']['namespace']}" if namespaced else "")
        + f"/{plural}"
    )
    query = "?fieldValidation=Strict" + ("&dryRun=All" if dry_run else "")
    req = urllib.request.Request(
        kube.host + path + query,
        data=json.dumps(doc).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {kube.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, context=kube.ssl_context(), timeout=30) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


@pytest.mark.kube
@pytest.mark.timeout(600)
def test_every_deploy_manifest_passes_a_server_side_dry_run(kube: Any) -> None:
    import yaml

    docs = [d for d in yaml.safe_load_all(SMC_YAML.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    for needed in (
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "MutatingWebhookConfiguration",
        "Job",
        "NetworkPolicy",
    ):
        assert needed in kinds
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    status, body = _post_to_apiserver(kube, namespace, dry_run=False)  # the others need it
    assert status == 201, body
    for doc in docs:
        if doc is namespace:
            continue
        status, body = _post_to_apiserver(kube, doc, dry_run=True)
        assert status in (200, 201), (doc["kind"], doc["metadata"]["name"], body)
        assert body["kind"] == doc["kind"] and body["metadata"]["name"] == doc["metadata"]["name"]
    # Dry run: nothing was stored.
    status, _ = kube.get("/apis/apps/v1/namespaces/smc-system/deployments/smc")
    assert status == 404
    # The control plane runs two replicas on the Kafka log; the webhook matches the injector.
    smc = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "smc")
    assert smc["spec"]["replicas"] == 2
    env = {e["name"]: e["value"] for e in smc["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SMC_LOG"].startswith("kafka://")
    hook = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["clientConfig"]["service"]["path"] == "/mutate"
    assert hook["namespaceSelector"]["matchLabels"] == ENABLED
    job = next(d for d in docs if d["kind"] == "Job")
    assert "create_topics.py" in " ".join(
        job["spec"]["template"]["spec"]["containers"][0]["command"]
    )
    # The dry run really validates: a broken Deployment is refused, naming the field.
    broken = copy.deepcopy(smc)
    broken["spec"]["replicas"] = "two"
    status, body = _post_to_apiserver(kube, broken, dry_run=True)
    assert status == 400, body
    broken = copy.deepcopy(smc)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    status, body = _post_to_apiserver(kube, broken, dry_run=True)
    assert status == 400 and "imagePullPolicyy" in body["message"], body


@pytest.mark.kube
@pytest.mark.timeout(600)
def test_injector_process_registers_its_ca_bundle_and_mutates(
    kube: Any, issuer: LocalIssuer, tmp_path: Path
) -> None:
    """``python -m smc.injector`` as operators run it: it writes the CA into the webhook
    configuration (created without caBundle, as deploy/k8s/smc.yaml does), reads namespace
    labels from the apiserver, and the apiserver's pods come back mutated."""
    import subprocess
    import sys
    import time

    from kubernetes import client

    from smc.testing.ports import free_port

    port = free_port()
    name = f"smc-injector-{uuid.uuid4().hex[:6]}"
    api = kube.api_client()
    adm: Any = client.AdmissionregistrationV1Api(api)
    adm.create_mutating_webhook_configuration(
        webhook_configuration(
            name, {"url": f"https://127.0.0.1:{port}/mutate"}, {"proc-test": name}
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smc.injector",
            "--listen",
            f"127.0.0.1:{port}",
            "--ca",
            f"local:{issuer.directory}",
            "--trust-domain",
            TD,
            "--ads",
            "smc.smc-system.svc:15010",
            "--ip",
            "127.0.0.1",
            "--register",
            name,
            "--kubeconfig",
            str(kube.kubeconfig_path),
            "--lookup-namespaces",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/healthz", context=_client_ctx(issuer), timeout=2
                ) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "injector did not come up"
            time.sleep(0.1)
        current = adm.read_mutating_webhook_configuration(name)
        bundle = base64.b64decode(current.webhooks[0].client_config.ca_bundle).decode()
        assert bundle == "".join(issuer.trust_bundle())
        # Labelled for this webhook but not opted in: asked, looked up, declined.
        ns = _namespace(api, **{"proc-test": name})
        got = _create_pod(api, ns, _app_pod("web-0"))
        assert [c["name"] for c in got["spec"]["containers"]] == ["app"]
        ns = _namespace(api, **{"proc-test": name, **ENABLED})
        got = _create_pod(api, ns, _app_pod("web-0"))
        assert [c["name"] for c in got["spec"]["containers"]] == ["app", PROXY_CONTAINER]
        boot = json.loads(env_of(got["spec"]["containers"][1])["SMC_ENVOY_BOOTSTRAP"])
        assert boot["node"]["id"] == f"{ns}/web-0"
        sock = boot["static_resources"]["clusters"][0]
        assert sock["type"] == "STRICT_DNS"
        assert sock["transport_socket"]["typed_config"]["sni"] == "smc.smc-system.svc"
        # The pod's key is made in the pod by its agent: no Secret, no key in the pod.
        assert AGENT_CONTAINER in {c["name"] for c in got["spec"]["initContainers"]}
        assert ANNOTATION_BOOTSTRAP_SECRET not in got["metadata"].get("annotations", {})
        assert "PRIVATE KEY" not in json.dumps(got)
        listed: Any = client.CoreV1Api(api).list_namespaced_secret(ns)
        assert [x.metadata.name for x in listed.items] == []
    finally:
        adm.delete_mutating_webhook_configuration(name)
        proc.terminate()
        proc.wait(timeout=15)
        api.close()


def test_injector_and_builder_agree_on_ports_and_the_interception_label() -> None:
    """The webhook does not import the xDS layer; its constants must still match it."""
    from smc.injector import LABEL_INTERCEPTION, AdsAddress
    from smc.xds import INBOUND_PORT, INTERCEPTION_LABEL, OUTBOUND_PORT

    config = InjectorConfig(ads=AdsAddress(host="10.0.0.1", port=15010), tls=False)
    assert (config.inbound_port, config.outbound_port) == (INBOUND_PORT, OUTBOUND_PORT)
    assert LABEL_INTERCEPTION == INTERCEPTION_LABEL
    pod = {"metadata": {"name": "p", "labels": {"app": "a"}}, "spec": {"containers": [{}]}}
    ops = mutate(pod, namespace_labels={"smc.dev/inject": "enabled"}, config=config, namespace="n")
    mutated = jsonpatch.apply_patch(copy.deepcopy(pod), ops)
    assert mutated["metadata"]["labels"] == {"app": "a", LABEL_INTERCEPTION: "iptables"}
    bare = {"metadata": {"name": "p"}, "spec": {"containers": [{}]}}
    ops = mutate(bare, namespace_labels={"smc.dev/inject": "enabled"}, config=config, namespace="n")
    assert jsonpatch.apply_patch(bare, ops)["metadata"]["labels"] == {
        LABEL_INTERCEPTION: "iptables"
    }


def test_secret_credentials_keep_the_key_out_of_the_pod_spec(
    issuer: LocalIssuer, config: InjectorConfig
) -> None:
    creds = dataclasses.replace(creds_for(issuer, config, "shop", "web"), secret_name="s-1")
    ops = mutate(pod(), namespace_labels=ENABLED, config=config, credentials=creds)
    got = apply(pod(), ops)
    assert "PRIVATE KEY" not in json.dumps(ops) and "CERTIFICATE" not in json.dumps(ops)
    assert got["metadata"]["annotations"][ANNOTATION_BOOTSTRAP_SECRET] == "s-1"
    proxy = got["spec"]["containers"][1]
    assert not {"SMC_PROXY_CERT", "SMC_PROXY_KEY", "SMC_PROXY_CA"} & set(env_of(proxy))
    volumes = {v["name"]: v for v in got["spec"]["volumes"]}
    assert volumes[BOOTSTRAP_VOLUME] == {
        "name": BOOTSTRAP_VOLUME,
        "secret": {"secretName": "s-1", "defaultMode": 0o444},
    }
    mount = {"name": BOOTSTRAP_VOLUME, "mountPath": BOOTSTRAP_MOUNT, "readOnly": True}
    assert mount in proxy["volumeMounts"]
    # The bootstrap reads both files through file-based SDS and watches the mount.
    ctx = json.loads(env_of(proxy)["SMC_ENVOY_BOOTSTRAP"])["static_resources"]["clusters"][0]
    common = ctx["transport_socket"]["typed_config"]["common_tls_context"]
    (cert_sds,) = common["tls_certificate_sds_secret_configs"]
    source = cert_sds["sds_config"]["path_config_source"]
    assert source == {
        "path": f"{BOOTSTRAP_MOUNT}/{CERT_SDS_FILE}",
        "watched_directory": {"path": BOOTSTRAP_MOUNT},
    }
    ca_sds = common["combined_validation_context"]["validation_context_sds_secret_config"]
    assert ca_sds["sds_config"]["path_config_source"]["path"].endswith(CA_SDS_FILE)


@pytest.mark.kube
@pytest.mark.timeout(600)
def test_webhook_stores_bootstrap_secrets_and_collects_orphans(
    kube: Any, issuer: LocalIssuer, config: InjectorConfig
) -> None:
    """Through the real apiserver: an injected pod's credentials land in a Secret of its
    namespace (none for a dry run); the collector keeps it while the pod names it and deletes
    it once the pod is gone."""
    from cryptography.hazmat.primitives import serialization
    from kubernetes import client

    api = kube.api_client()
    secrets = BootstrapSecrets(api, grace=datetime.timedelta(0))
    server = _webhook(issuer, config, namespace_labels=kube_namespace_labels(api), secrets=secrets)
    core: Any = client.CoreV1Api(api)
    label = {"secret-test": uuid.uuid4().hex[:8]}
    with registered_webhook(api, server, issuer, label, side_effects="NoneOnDryRun"):
        try:
            ns = _namespace(api, **label, **ENABLED)

            def bootstrap_secrets() -> set[str]:
                found = core.list_namespaced_secret(ns, label_selector=f"{BOOTSTRAP_LABEL}=true")
                return {s.metadata.name for s in found.items}

            dry = core.create_namespaced_pod(ns, _app_pod("dry-0"), dry_run="All")
            assert dry.metadata.annotations[ANNOTATION_BOOTSTRAP_SECRET]
            assert bootstrap_secrets() == set()  # no side effect on a dry run
            got = _create_pod(api, ns, _app_pod("web-0"))
            secret_name = got["metadata"]["annotations"][ANNOTATION_BOOTSTRAP_SECRET]
            assert bootstrap_secrets() == {secret_name}
            assert "PRIVATE KEY" not in json.dumps(got)

            def stored_pems(name: str) -> tuple[bytes, bytes]:
                data = core.read_namespaced_secret(name, ns).data
                sds = json.loads(base64.b64decode(data[CERT_SDS_FILE]))
                tls = sds["resources"][0]["tls_certificate"]
                return (
                    tls["certificate_chain"]["inline_string"].encode(),
                    tls["private_key"]["inline_string"].encode(),
                )

            cert_pem, key_pem = stored_pems(secret_name)
            leaf = x509.load_pem_x509_certificate(cert_pem)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert [u.value for u in san] == [f"spiffe://{TD}/ns/{ns}/sa/web"]
            key = serialization.load_pem_private_key(key_pem, password=None)
            assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
            sid = verify_certificate(cert_pem=cert_pem.decode(), trust_bundle=issuer.trust_bundle())
            assert str(sid).endswith(f"/ns/{ns}/sa/web")
            # Renewal: nothing is due now; a day later every Secret gets a fresh certificate.
            issue = issuer_credentials(issuer, trust_domain=TD, config=config)
            assert secrets.renew(issue) == []
            later = datetime.datetime.now(datetime.UTC) + config.bootstrap_lifetime
            assert f"{ns}/{secret_name}" in secrets.renew(issue, now=later)
            fresh = x509.load_pem_x509_certificate(stored_pems(secret_name)[0])
            assert fresh.serial_number != leaf.serial_number
            assert fresh.not_valid_after_utc >= leaf.not_valid_after_utc
            san = fresh.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert [u.value for u in san] == [f"spiffe://{TD}/ns/{ns}/sa/web"]
            # An orphan (its pod never came to be) goes; the live pod's Secret stays.
            secrets.store(
                namespace=ns,
                name="smc-bootstrap-orphan",
                identity=f"{ns}/web",
                credentials=creds_for(issuer, config, ns, "web"),
            )
            assert f"{ns}/smc-bootstrap-orphan" in secrets.collect()
            assert bootstrap_secrets() == {secret_name}
            core.delete_namespaced_pod("web-0", ns, grace_period_seconds=0)
            assert f"{ns}/{secret_name}" in secrets.collect()
            assert bootstrap_secrets() == set()
        finally:
            api.close()


def test_deploy_container_arguments_parse_with_the_real_command_lines() -> None:
    """Every ``smc serve`` and ``python -m smc.injector`` command line in smc.yaml is
    accepted by the CLI it runs (option names, values and combinations)."""
    import yaml

    from smc.cli._serve import _tls_options, serve
    from smc.injector.__main__ import _parser

    seen = {"serve": 0, "injector": 0}
    for doc in yaml.safe_load_all(SMC_YAML.read_text()):
        if not doc or doc.get("kind") != "Deployment":
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            args = list(c.get("args") or [])
            command = list(c.get("command") or [])
            if args[:1] == ["serve"]:
                p = serve.make_context("serve", args[1:]).params
                assert p["xds_tls"], c["name"]
                _tls_options(  # the combination checks serve makes before starting
                    host="0.0.0.0",
                    sans=p["xds_san"],
                    cert_file=p["xds_cert"],
                    key_file=p["xds_key"],
                    follow=p["ca"] == "follow",
                    ca=p["ca"],
                    cert_out=p["xds_cert_out"],
                )
                seen["serve"] += 1
            elif command[:3] == ["python", "-m", "smc.injector"]:
                parsed = _parser().parse_args(command[3:])
                assert not parsed.plaintext_ads and parsed.credentials == "agent"
                assert parsed.ca_address == "smc-ca.smc-system.svc:15012"
                assert parsed.ads_server_name == "smc.smc-system.svc"
                seen["injector"] += 1
    assert seen == {"serve": 2, "injector": 1}
    # least privilege: with agents nothing in SMC touches Secrets through the API
    for doc in yaml.safe_load_all(SMC_YAML.read_text()):
        if doc and doc.get("kind") in ("ClusterRole", "Role"):
            for rule in doc.get("rules") or []:
                assert "secrets" not in rule.get("resources", []), doc["metadata"]["name"]


def test_webhook_serving_certificate_is_renewed_in_place(
    issuer: LocalIssuer, config: InjectorConfig
) -> None:
    """With a third of its life left the serving certificate is re-issued into the running
    server's TLS context: the next handshake presents it, the caBundle (the CA) is unchanged."""

    def reissue() -> Any:
        return issue_serving_certificate(issuer, ip_addresses=["127.0.0.1"])

    first = reissue()
    server = WebhookServer(
        config=config,
        credentials=issuer_credentials(issuer, trust_domain=TD, config=config),
        ssl_context=server_ssl_context(first),
        serving=first,
        reissue_serving=reissue,
        gc_interval=3600,
    )

    def presented(hook: ThreadedWebhook) -> int:
        ctx = _client_ctx(issuer)
        with (
            socket.create_connection(("127.0.0.1", hook.server.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def renew(hook: ThreadedWebhook, now: datetime.datetime) -> bool:
        done = asyncio.run_coroutine_threadsafe(server.renew_serving(now=now), hook.loop)
        return bool(done.result(timeout=30))

    with ThreadedWebhook(server) as hook:
        assert presented(hook) == int(first.serial, 16)
        assert not renew(hook, datetime.datetime.now(datetime.UTC))
        assert renew(hook, first.not_after - datetime.timedelta(hours=1))
        assert server.serving is not None and server.serving.serial != first.serial
        assert presented(hook) == int(server.serving.serial, 16)
        status, answer = _post(hook, issuer, json.dumps(review()).encode())
        assert status == 200 and answer["response"]["allowed"] is True
