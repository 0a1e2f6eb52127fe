"""SMC's structural CRDs for OSM's policy kinds, on a real kube-apiserver.

``deploy/k8s/crds/policy-*.yaml`` (Egress, IngressBackend, Retry, UpstreamTrafficSetting of
policy.openservicemesh.io/v1alpha1) carry structural ``openAPIV3Schema`` s. The apiserver
accepts them (Established, served); OSM users' manifests (``tests/data/osm/users.yaml`` and the
SMC examples in ``policies.yaml``) apply with strict field validation and read back unchanged
(nothing pruned), and SMC's own parser accepts each; objects that break the schema (wrong
types, out-of-range numbers, values outside an enum, missing required fields, two kinds in one
rate-limit descriptor entry, unknown fields) are refused with an error naming the field, and
SMC's parser refuses each of them too.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from smc.smi import ManifestErrors, parse_manifest
from smc.testing.kube import CRD_DIR, KubeAPIServer, kube_apiserver_fixture

pytestmark = [pytest.mark.kube, pytest.mark.timeout(3600)]

DATA = Path(__file__).parent / "data" / "osm"
GROUP, VERSION = "policy.openservicemesh.io", "v1alpha1"
PLURAL = {
    "Egress": "egresses",
    "IngressBackend": "ingressbackends",
    "Retry": "retries",
    "UpstreamTrafficSetting": "upstreamtrafficsettings",
}


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeAPIServer]:
    yield from kube_apiserver_fixture(watch_cache=False)


@pytest.fixture(scope="module")
def custom(kube: KubeAPIServer) -> Iterator[Any]:
    with kube.api_client() as api:
        yield client.CustomObjectsApi(api)


@pytest.fixture(scope="module")
def ns(kube: KubeAPIServer) -> str:
    name = f"osm-{uuid.uuid4().hex[:8]}"
    with kube.api_client() as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


def osm_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] in PLURAL]


USERS = osm_documents(DATA / "users.yaml")
EXAMPLES = osm_documents(DATA / "policies.yaml")


def create(custom: Any, ns: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Create ``doc`` in ``ns`` with strict field validation (kubectl's default)."""
    body = copy.deepcopy(doc)
    body["metadata"] = {"name": f"{doc['metadata']['name']}-{uuid.uuid4().hex[:6]}"}
    made: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL[doc["kind"]], body, field_validation="Strict"
    )
    return made


def test_crds_are_structural_and_established(kube: KubeAPIServer) -> None:
    with kube.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        for kind, plural in PLURAL.items():
            crd = api.sanitize_for_serialization(
                ext.read_custom_resource_definition(f"{plural}.{GROUP}")
            )
            conds = {c["type"]: c for c in crd["status"]["conditions"]}
            assert conds["Established"]["status"] == "True", conds
            # the apiserver reports a schema that is not structural with this condition
            assert "NonStructuralSchema" not in conds, conds
            schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            assert "x-kubernetes-preserve-unknown-fields" not in schema, kind
            spec = schema["properties"]["spec"]
            assert "x-kubernetes-preserve-unknown-fields" not in spec, kind
            assert spec["required"] and spec["properties"], kind
            assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"]
    text = "".join(p.read_text() for p in sorted(CRD_DIR.glob("policy-*.yaml")))
    assert text.count("x-kubernetes-preserve-unknown-fields") == 4  # status only


@pytest.mark.parametrize(
    "doc",
    USERS + EXAMPLES,
    ids=[f"{d['kind']}-{d['metadata']['name']}" for d in USERS + EXAMPLES],
)
def test_osm_manifests_apply_unchanged(custom: Any, ns: str, doc: dict[str, Any]) -> None:
    made = create(custom, ns, doc)
    assert made["spec"] == doc["spec"]  # nothing pruned or defaulted away
    got = custom.get_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL[doc["kind"]], made["metadata"]["name"]
    )
    assert got["spec"] == doc["spec"]
    parse_manifest(doc, document=doc["metadata"]["name"])  # SMC reads it as well


def _by_name(name: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in USERS if d["metadata"]["name"] == name))


def _set(name: str, path: str, value: Any) -> Callable[[], dict[str, Any]]:
    """The user manifest ``name`` with the field at ``path`` (dots, [i]) set (or deleted
    when ``value`` is ``...``)."""

    def make() -> dict[str, Any]:
        doc = _by_name(name)
        keys: list[str | int] = []
        for part in path.split("."):
            field, _, index = part.partition("[")
            keys.append(field)
            if index:
                keys.append(int(index.rstrip("]")))
        target: Any = doc
        for k in keys[:-1]:
            target = target[k]
        if value is ...:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
        return doc

    return make


TWO_KINDS = [{"genericKey": {"value": "a"}, "remoteAddress": {}}]
INVALID: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("egress-port-zero", _set("httpbin-80", "spec.ports[0].number", 0), "spec.ports[0].number"),
    (
        "egress-protocol",
        _set("httpbin-80", "spec.ports[0].protocol", "udp"),
        "spec.ports[0].protocol",
    ),
    ("egress-no-sources", _set("httpbin-80", "spec.sources", ...), "spec.sources"),
    (
        "egress-source-kind",
        _set("httpbin-80", "spec.sources[0].kind", "User"),
        "spec.sources[0].kind",
    ),
    (
        "egress-match-kind",
        _set("httpbin-get-only", "spec.matches[0].kind", "Service"),
        "spec.matches[0].kind",
    ),
    (
        "retry-type",
        _set("retry", "spec.retryPolicy.numRetries", "five"),
        "spec.retryPolicy.numRetries",
    ),
    (
        "retry-range",
        _set("retry", "spec.retryPolicy.numRetries", 1001),
        "spec.retryPolicy.numRetries",
    ),
    (
        "retry-dest-kind",
        _set("retry", "spec.destinations[0].kind", "Pod"),
        "spec.destinations[0].kind",
    ),
    (
        "retry-no-retry-on",
        _set("retry", "spec.retryPolicy.retryOn", ...),
        "spec.retryPolicy.retryOn",
    ),
    ("retry-unknown", _set("retry", "spec.retryPolicy.retryon", "5xx"), "retryon"),
    (
        "ingress-protocol",
        _set("httpbin", "spec.backends[0].port.protocol", "grpc"),
        "spec.backends[0].port.protocol",
    ),
    ("ingress-source-kind", _set("httpbin", "spec.sources[0].kind", "Pod"), "spec.sources[0].kind"),
    ("ingress-no-backends", _set("httpbin", "spec.backends", []), "spec.backends"),
    ("uts-no-host", _set("tcp-rate-limit", "spec.host", ...), "spec.host"),
    (
        "uts-unit",
        _set("tcp-rate-limit", "spec.rateLimit.local.tcp.unit", "day"),
        "spec.rateLimit.local.tcp.unit",
    ),
    (
        "uts-status",
        _set("http-rate-limit", "spec.rateLimit.local.http.responseStatusCode", 200),
        "spec.rateLimit.local.http.responseStatusCode",
    ),
    (
        "uts-connections",
        _set("http-circuit-breaking", "spec.connectionSettings.tcp.maxConnections", -1),
        "spec.connectionSettings.tcp.maxConnections",
    ),
    (
        "uts-two-kinds",
        _set("global-rate-limit", "spec.rateLimit.global.http.descriptors[0].entries", TWO_KINDS),
        "spec.rateLimit.global.http.descriptors[0].entries[0]",
    ),
    (
        "uts-header-two-ways",
        _set(
            "global-rate-limit",
            "spec.rateLimit.global.http.descriptors[3].entries[0].headerValueMatch.headers[0]",
            {"name": "x-foo", "exact": "bar", "prefix": "b"},
        ),
        "headerValueMatch.headers[0]",
    ),
    (
        "uts-route-global",
        _set("global-rate-limit", "spec.httpRoutes[0].rateLimit.global.descriptors", ...),
        "spec.httpRoutes[0].rateLimit.global.descriptors",
    ),
    (
        "uts-unknown",
        _set("http-rate-limit", "spec.rateLimit.local.http.request", 3),
        "spec.rateLimit.local.http.request",
    ),
    (
        "uts-ejection",
        _set("http-circuit-breaking", "spec.outlierDetection", {"maxEjectionPercent": 101}),
        "spec.outlierDetection.maxEjectionPercent",
    ),
]


#: Unknown fields are refused by strict decoding (400) before the schema is checked (422).
UNKNOWN = {"retry-unknown", "uts-unknown"}


@pytest.mark.parametrize("case,make,field", INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_objects_are_refused_naming_the_field(
    custom: Any, ns: str, case: str, make: Callable[[], dict[str, Any]], field: str
) -> None:
    doc = make()
    with pytest.raises(ApiException) as err:
        create(custom, ns, doc)
    assert err.value.status == (400 if case in UNKNOWN else 422), err.value.body
    body = json.loads(err.value.body)
    assert field in body["message"], body["message"]
    if case in UNKNOWN:
        assert "unknown field" in body["message"]
    # SMC's own validation agrees (the informers would report the document, not apply it).
    with pytest.raises(ManifestErrors):
        parse_manifest(doc, document="invalid")
