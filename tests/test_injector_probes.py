"""Probe rewriting at injection and its undoing: which probes move to the proxy, what the
proxy's bootstrap gains (validated by a real Envoy), what iptables leaves alone, and that
uninjection gives back the pod as it was. The traffic itself is tested on real network
namespaces in ``test_transparent_e2e``."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch  # type: ignore[import-untyped]
import pytest

from smc.injector import (
    ANNOTATION_ORIGINAL_PROBES,
    INIT_CONTAINER,
    PROBE_BASE_PORT,
    PROXY_CONTAINER,
    TCP_PROBE_PATH,
    AdsAddress,
    AgentSidecar,
    InjectorConfig,
    InvalidPod,
    mutate,
    uninject,
)
from smc.testing.envoy import envoy_binary

LABELS = {"smc.dev/inject": "enabled"}
CONFIG = InjectorConfig(ads=AdsAddress(host="10.0.0.1", port=15010), tls=False)


def pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "labels": {"app": "web"},
            "annotations": {"smc.dev/exclude-inbound-ports": "9100", "team": "a"},
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [
                {
                    "name": "app",
                    "image": "app:1",
                    "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 7000}],
                    "livenessProbe": {
                        "httpGet": {
                            "path": "/healthz",
                            "port": "http",
                            "httpHeaders": [{"name": "X-Probe", "value": "live"}],
                        },
                        "periodSeconds": 3,
                    },
                    "readinessProbe": {"tcpSocket": {"port": 7000}, "failureThreshold": 2},
                    "startupProbe": {"grpc": {"port": 9090, "service": "app"}},
                },
                {
                    "name": "metrics",
                    "image": "exporter:1",
                    "livenessProbe": {"httpGet": {"path": "/", "port": 9100}},
                    "readinessProbe": {"exec": {"command": ["true"]}},
                },
            ],
        },
    }


def injected() -> dict[str, Any]:
    original = pod()
    ops = mutate(copy.deepcopy(original), namespace_labels=LABELS, config=CONFIG)
    return jsonpatch.apply_patch(copy.deepcopy(original), ops)


def bootstrap_of(p: dict[str, Any]) -> dict[str, Any]:
    proxy = next(c for c in p["spec"]["containers"] if c["name"] == PROXY_CONTAINER)
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    return json.loads(env["SMC_ENVOY_BOOTSTRAP"])


def test_mesh_port_probes_move_to_the_proxy_and_others_stay() -> None:
    p = injected()
    app, metrics = p["spec"]["containers"][0], p["spec"]["containers"][1]
    live, ready, start = app["livenessProbe"], app["readinessProbe"], app["startupProbe"]
    assert live == {
        "httpGet": {
            "path": "/healthz",
            "port": PROBE_BASE_PORT,
            "httpHeaders": [{"name": "X-Probe", "value": "live"}],
        },
        "periodSeconds": 3,
    }
    # a TCP probe through a proxy would always connect: it becomes the proxy's health check
    assert ready == {
        "httpGet": {"path": TCP_PROBE_PATH, "port": PROBE_BASE_PORT + 1, "scheme": "HTTP"},
        "failureThreshold": 2,
    }
    assert start == {"grpc": {"port": PROBE_BASE_PORT + 2, "service": "app"}}
    # excluded port and exec probe: untouched
    assert metrics["livenessProbe"] == {"httpGet": {"path": "/", "port": 9100}}
    assert metrics["readinessProbe"] == {"exec": {"command": ["true"]}}
    originals = json.loads(p["metadata"]["annotations"][ANNOTATION_ORIGINAL_PROBES])
    assert originals == {
        "app": {
            k: pod()["spec"]["containers"][0][k]
            for k in ("livenessProbe", "readinessProbe", "startupProbe")
        }
    }
    static = bootstrap_of(p)["static_resources"]
    by_name = {x["name"]: x for x in static["listeners"]}
    clusters = {x["name"]: x for x in static["clusters"]}
    for port, app_port in (
        (PROBE_BASE_PORT, 8080),
        (PROBE_BASE_PORT + 1, 7000),
        (PROBE_BASE_PORT + 2, 9090),
    ):
        name = f"smc_probe_{port}"
        assert by_name[name]["address"]["socket_address"] == {
            "address": "0.0.0.0",
            "port_value": port,
        }
        ep = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert ep["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": app_port}
    assert "tcp_health_check" in clusters[f"smc_probe_{PROBE_BASE_PORT + 1}"]["health_checks"][0]
    assert "http2_protocol_options" in json.dumps(clusters[f"smc_probe_{PROBE_BASE_PORT + 2}"])
    # the probe ports are not intercepted (kubelet reaches the proxy's plaintext listener)
    init = next(c for c in p["spec"]["initContainers"] if c["name"] == INIT_CONTAINER)
    script = init["command"][-1]
    for port in (PROBE_BASE_PORT, PROBE_BASE_PORT + 1, PROBE_BASE_PORT + 2, 9100):
        assert f"--dport {port} -j RETURN" in script
    assert "--dport 8080 -j RETURN" not in script


@pytest.mark.parametrize("agent", [False, True])
def test_uninjection_gives_the_pod_back(agent: bool) -> None:
    config = (
        dataclasses.replace(CONFIG, tls=True, agent=AgentSidecar(ca_pem="x")) if agent else CONFIG
    )
    ops = mutate(copy.deepcopy(pod()), namespace_labels=LABELS, config=config)
    p = jsonpatch.apply_patch(copy.deepcopy(pod()), ops)
    assert any(c["name"] == "smc-agent" for c in p["spec"]["initContainers"]) == agent
    assert jsonpatch.apply_patch(copy.deepcopy(p), uninject(p)) == pod()
    assert uninject(pod()) == []


def test_bad_probe_ports_are_named() -> None:
    bad = pod()
    bad["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = "nope"
    with pytest.raises(
        InvalidPod,
        match=r"spec.containers\[0\].livenessProbe.httpGet.port: no container port is named 'nope'",
    ):
        mutate(bad, namespace_labels=LABELS, config=CONFIG)
    bad["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = 70000
    with pytest.raises(InvalidPod, match="70000 is not a port"):
        mutate(bad, namespace_labels=LABELS, config=CONFIG)


def test_real_envoy_accepts_the_bootstrap(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap_of(injected())))
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def tls_pod() -> dict[str, Any]:
    """An app that serves its health over HTTPS on a mesh port."""
    p = pod()
    p["spec"]["containers"].append(
        {
            "name": "tls",
            "image": "tls:1",
            "ports": [{"name": "https", "containerPort": 8443}],
            "livenessProbe": {
                "httpGet": {"path": "/live?full=1", "port": "https", "scheme": "HTTPS"},
            },
        }
    )
    return p


def test_https_probes_reach_the_proxy_in_plaintext_and_the_app_over_tls() -> None:
    original = tls_pod()
    ops = mutate(copy.deepcopy(original), namespace_labels=LABELS, config=CONFIG)
    p = jsonpatch.apply_patch(copy.deepcopy(original), ops)
    live = p["spec"]["containers"][2]["livenessProbe"]
    port = PROBE_BASE_PORT + 3
    assert live == {"httpGet": {"path": "/live?full=1", "port": port, "scheme": "HTTP"}}
    static = bootstrap_of(p)["static_resources"]
    cluster = next(c for c in static["clusters"] if c["name"] == f"smc_probe_{port}")
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    assert "validation_context" not in json.dumps(tls)  # as kubelet: the app's cert unverified
    # uninjection gives the HTTPS probe back
    assert jsonpatch.apply_patch(copy.deepcopy(p), uninject(p)) == original


def test_a_probe_port_forwards_the_probe_and_nothing_else() -> None:
    """A probe port is plaintext past the mesh's mTLS: it must not become a way in."""
    ops = mutate(tls_pod(), namespace_labels=LABELS, config=CONFIG)
    static = bootstrap_of(jsonpatch.apply_patch(tls_pod(), ops))["static_resources"]
    routes = {}
    for listener in static["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["@type"].endswith("HttpConnectionManager")  # no TCP pass-through anywhere
        (vhost,) = hcm["route_config"]["virtual_hosts"]
        routes[listener["name"]] = vhost["routes"]
    forwarded = {
        name: [(r["match"], r["route"]["cluster"]) for r in rs if "route" in r]
        for name, rs in routes.items()
    }
    get = [{"name": ":method", "string_match": {"exact": "GET"}}]
    name = f"smc_probe_{PROBE_BASE_PORT}"
    assert forwarded[name] == [({"path": "/healthz", "headers": get}, name)]
    name = f"smc_probe_{PROBE_BASE_PORT + 1}"  # TCP: the health-check filter answers, no route
    assert forwarded[name] == []
    name = f"smc_probe_{PROBE_BASE_PORT + 2}"
    assert forwarded[name] == [({"path": "/grpc.health.v1.Health/Check", "grpc": {}}, name)]
    name = f"smc_probe_{PROBE_BASE_PORT + 3}"  # the query is not part of the route's path
    assert forwarded[name] == [({"path": "/live", "headers": get}, name)]
    for rs in routes.values():  # anything else: the proxy's own 404
        assert rs[-1]["match"] == {"prefix": "/"} and rs[-1]["direct_response"]["status"] == 404


def test_real_envoy_accepts_the_https_probe_bootstrap(tmp_path: Path) -> None:
    p = jsonpatch.apply_patch(tls_pod(), mutate(tls_pod(), namespace_labels=LABELS, config=CONFIG))
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap_of(p)))
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
