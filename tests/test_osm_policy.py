"""OSM's policy kinds (policy.openservicemesh.io/v1alpha1) and MeshConfig observability settings:
accepted verbatim, normalised, rejected with field paths, appended as events, shown by
``smc get`` and ``smc audit`` (real SQLite log, the real CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from smc.cli import cli
from smc.smi import (
    EgressPolicy,
    IngressBackendPolicy,
    ManifestErrors,
    MeshConfig,
    RetryPolicy,
    UpstreamTrafficSetting,
    load_documents,
    parse_manifest,
    to_manifest,
)

POLICIES = Path(__file__).parent / "data" / "osm" / "policies.yaml"


def run(db: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--log", f"sqlite:///{db}", *args], input=input)


def test_osm_kinds_parse_normalise_and_round_trip() -> None:
    loaded = load_documents(POLICIES.read_text(), source="policies.yaml")
    assert loaded.errors == ()
    by_kind = {type(r).__name__: r for r in loaded.resources}
    retry = by_kind["RetryPolicy"]
    assert isinstance(retry, RetryPolicy)
    assert retry.destinations == ("shop/api",) and retry.retry_on == "5xx"
    assert (retry.per_try_timeout_ms, retry.num_retries, retry.backoff_base_ms) == (1000, 5, 1)
    uts = by_kind["UpstreamTrafficSetting"]
    assert isinstance(uts, UpstreamTrafficSetting)
    assert uts.service == "shop/api" and uts.max_pending_requests == 10
    assert uts.local_http is not None and uts.local_http.headers == (("x-limited", "yes"),)
    assert uts.routes[0].timeout_ms == 500 and uts.outlier is not None
    egress = by_kind["EgressPolicy"]
    assert isinstance(egress, EgressPolicy) and egress.hosts == ("httpbin.org",)
    ib = by_kind["IngressBackendPolicy"]
    assert isinstance(ib, IngressBackendPolicy) and ib.backends[0].protocol == "https"
    cfg = by_kind["MeshConfig"]
    assert isinstance(cfg, MeshConfig) and cfg.enable_egress is False
    obs = json.loads(cfg.observability)
    assert obs["accessLog"] == {
        "enabled": True,
        "format": "json",
        "path": "/var/log/envoy/access.log",
    }
    assert obs["tracing"]["sampling"] == 10.0 and obs["tracing"]["endpoint"] == "/api/v2/spans"
    for r in loaded.resources:
        assert parse_manifest(to_manifest(r), document="again") == r
    # The same meaning written differently compares equal (host forms, duration spelling).
    other = to_manifest(uts)
    spec = other["spec"]
    assert isinstance(spec, dict)
    spec["host"] = "api.shop"
    spec["httpRoutes"][0]["timeout"] = "0.5s"
    again = parse_manifest(other, document="x")
    assert isinstance(again, UpstreamTrafficSetting) and again.routes == uts.routes


@pytest.mark.parametrize(
    ("doc", "path", "reason"),
    [
        (
            "kind: Retry\nspec: {source: {kind: ServiceAccount, name: a}, destinations: "
            '[{kind: Service, name: b}], retryPolicy: {retryOn: "5xx,nope"}}',
            "spec.retryPolicy.retryOn",
            "unknown retry condition 'nope'",
        ),
        (
            "kind: Retry\nspec: {source: {kind: ServiceAccount, name: a}, destinations: "
            "[{kind: Pod, name: b}], retryPolicy: {retryOn: 5xx}}",
            "spec.destinations[0].kind",
            "must be Service",
        ),
        (
            "kind: Retry\nspec: {source: {kind: ServiceAccount, name: a}, destinations: "
            "[{kind: Service, name: b}], retryPolicy: {retryOn: 5xx, perTryTimeout: soon}}",
            "spec.retryPolicy.perTryTimeout",
            "not a duration",
        ),
        (
            "kind: UpstreamTrafficSetting\nspec: {host: a.b.svc.d}",
            "spec.host",
            "not a mesh service host",
        ),
        (
            "kind: UpstreamTrafficSetting\nspec: {host: api, rateLimit: {local: {http: "
            "{requests: 1, unit: day}}}}",
            "spec.rateLimit.local.http.unit",
            "second, minute, hour",
        ),
        (
            "kind: UpstreamTrafficSetting\nspec: {host: api, rateLimit: {local: {http: "
            "{requests: 1, unit: second, responseStatusCode: 200}}}}",
            "spec.rateLimit.local.http.responseStatusCode",
            "between 400 and 599",
        ),
        (
            "kind: UpstreamTrafficSetting\nspec: {host: api, connectionSettings: {tcp: "
            "{maxConnections: -1}}}",
            "spec.connectionSettings.tcp.maxConnections",
            "between 1 and",
        ),
        (
            "kind: UpstreamTrafficSetting\nspec: {host: api, httpRoutes: [{path: '(?=x)'}]}",
            "spec.httpRoutes[0].path",
            "lookahead",
        ),
        (
            "kind: Egress\nspec: {sources: [{kind: ServiceAccount, name: a}], ipAddresses: "
            "[10.0.0.0/33], ports: [{number: 22, protocol: tcp}]}",
            "spec.ipAddresses[0]",
            "CIDR",
        ),
        (
            "kind: Egress\nspec: {sources: [{kind: ServiceAccount, name: a}], hosts: [x.org], "
            "ports: [{number: 80, protocol: udp}]}",
            "spec.ports[0].protocol",
            "http, https, tcp",
        ),
        (
            "kind: Egress\nspec: {sources: [{kind: ServiceAccount, name: a}], hosts: [x.org], "
            "ports: [{number: 22, protocol: tcp}]}",
            "spec.ports",
            "ipAddresses must be given",
        ),
        (
            "kind: IngressBackend\nspec: {backends: [{name: api, port: {number: 80, protocol: "
            "http}}], sources: [{kind: Pod, name: x}]}",
            "spec.sources[0].kind",
            "Service, AuthenticatedPrincipal, IPRange",
        ),
        (
            "kind: IngressBackend\nspec: {backends: [{name: api, port: {number: 80, protocol: "
            "https}}], sources: [{kind: IPRange, name: 10.0.0.0/8}]}",
            "spec.sources",
            "AuthenticatedPrincipal source must be given",
        ),
        (
            "kind: IngressBackend\nspec: {backends: [{name: api, port: {number: 80, protocol: "
            "http}}], sources: [{kind: Service, name: x}]}",
            "spec.sources[0].namespace",
            "required",
        ),
    ],
)
def test_bad_osm_documents_name_the_field(doc: str, path: str, reason: str) -> None:
    text = f"apiVersion: policy.openservicemesh.io/v1alpha1\nmetadata: {{name: p, namespace: ns}}\n{doc}\n"
    loaded = load_documents(text, source="bad.yaml")
    assert loaded.resources == ()
    errors = [e for e in loaded.errors if e.path == path]
    assert errors, [(e.path, e.reason) for e in loaded.errors]
    assert reason in errors[0].reason


def test_bad_observability_names_the_field() -> None:
    base = {"apiVersion": "smc.dev/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "m"}}
    cases = [
        ({"accessLog": {"format": "xml"}}, "spec.observability.accessLog.format"),
        ({"accessLog": {"path": "relative.log"}}, "spec.observability.accessLog.path"),
        (
            {"tracing": {"address": "j", "port": 9411, "sampling": 101}},
            "spec.observability.tracing.sampling",
        ),
        (
            {"tracing": {"address": "j", "port": 9411, "provider": "x"}},
            "spec.observability.tracing.provider",
        ),
        ({"tracing": {"port": 9411}}, "spec.observability.tracing.address"),
    ]
    for obs, path in cases:
        with pytest.raises(ManifestErrors) as exc:
            parse_manifest({**base, "spec": {"observability": obs}}, document="m")
        assert [e.path for e in exc.value.errors] == [path], exc.value


def test_apply_get_audit_delete(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    res = run(db, "apply", "-f", str(POLICIES), "--as", "osm-user")
    assert res.exit_code == 0, res.output
    for key in (
        "Retry/shop/client-retry",
        "UpstreamTrafficSetting/shop/api-settings",
        "Egress/shop/web-egress",
        "IngressBackend/shop/api-ingress",
    ):
        assert f"{key} created" in res.output
    again = run(db, "apply", "-f", str(POLICIES))
    assert again.output.count("unchanged") == 5, again.output
    for plural, name in (
        ("retries", "client-retry"),
        ("upstreamtrafficsettings", "api-settings"),
        ("egresses", "web-egress"),
        ("ingressbackends", "api-ingress"),
    ):
        got = json.loads(run(db, "get", plural, "-o", "json").output)
        assert [g["name"] for g in got] == [name]
        assert got[0]["apiVersion"] == "policy.openservicemesh.io/v1alpha1"
        assert name in run(db, "get", plural).output
    cfg = json.loads(run(db, "get", "meshconfig", "-o", "json").output)
    assert cfg["settings"]["enableEgress"] == "false"
    assert json.loads(cfg["settings"]["observability"])["tracing"]["port"] == 9411
    audit = json.loads(run(db, "audit", "--actor", "osm-user", "--json").output)
    assert len(audit["events"]) == 5
    assert "Retry/shop/client-retry" in json.dumps(audit["diff"])
    # A changed retry budget is one new event; deleting removes the policy.
    changed = POLICIES.read_text().replace("numRetries: 5", "numRetries: 3")
    res = run(db, "apply", "-f", "-", input=changed)
    assert "Retry/shop/client-retry configured" in res.output
    assert res.output.count("configured") == 1
    res = run(db, "delete", "-f", str(POLICIES))
    assert res.exit_code == 0 and res.output.count(" deleted") == 5
    assert json.loads(run(db, "get", "retries", "-o", "json").output) == []


@pytest.mark.parametrize(
    ("host", "service"),
    [
        ("api", "shop/api"),
        ("api.web", "web/api"),
        ("api.web.svc", "web/api"),
        ("api.web.svc.cluster.local", "web/api"),
        ("api.github.com", ""),  # outside the mesh: for the Egress policies naming it
    ],
)
def test_upstream_setting_host_names_a_service_or_an_external_host(host: str, service: str) -> None:
    uts = parse_manifest(
        {
            "apiVersion": "policy.openservicemesh.io/v1alpha1",
            "kind": "UpstreamTrafficSetting",
            "metadata": {"name": "s", "namespace": "shop"},
            "spec": {"host": host, "connectionSettings": {"tcp": {"maxConnections": 1}}},
        },
        document="uts",
    )
    assert isinstance(uts, UpstreamTrafficSetting) and uts.service == service
