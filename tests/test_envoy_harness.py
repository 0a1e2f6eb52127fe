"""Tests of the real-Envoy harness: the binary is found and an Envoy starts and answers on admin."""

from __future__ import annotations

import os
import urllib.request
from typing import Any

import pytest

from smc.testing.envoy import ENVOY_VERSION, EnvoyError, EnvoyProcess, ads_bootstrap, envoy_binary
from smc.testing.ports import free_port

pytestmark = pytest.mark.envoy


def _static_bootstrap(*, admin_port: int, listener_port: int) -> dict[str, Any]:
    # A listener answering every request with a fixed 200 body, no upstream needed.
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "harness",
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": "harness-ok"},
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "l0",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listener_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def test_binary_is_found_and_runs() -> None:
    path = envoy_binary()
    assert path.is_file()
    assert os.access(path, os.X_OK)
    import subprocess

    out = subprocess.run(
        [str(path), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"/{ENVOY_VERSION}/" in out


def test_envoy_starts_admin_answers_and_serves() -> None:
    admin, lport = free_port(), free_port()
    with EnvoyProcess(bootstrap=_static_bootstrap(admin_port=admin, listener_port=lport)) as envoy:
        envoy.start_ready()
        assert envoy.is_live()
        stats = envoy.stats()
        assert stats["server.state"] == 0  # LIVE
        with urllib.request.urlopen(f"http://127.0.0.1:{lport}/x", timeout=5) as resp:
            assert resp.read() == b"harness-ok"
        assert envoy.stats()["http.harness.downstream_rq_2xx"] == 1
        dump = envoy.config_dump()
        assert any("bootstrap" in c for c in dump["configs"])
        assert envoy.log_path.exists()
        first_pid = envoy.pid
        envoy.restart()
        assert envoy.pid != first_pid
        envoy.block_until_live()
        with urllib.request.urlopen(f"http://127.0.0.1:{lport}/y", timeout=5) as resp:
            assert resp.read() == b"harness-ok"
    assert not envoy.running()


def test_two_envoys_get_distinct_base_ids() -> None:
    a = EnvoyProcess(bootstrap=_static_bootstrap(admin_port=free_port(), listener_port=free_port()))
    b = EnvoyProcess(bootstrap=_static_bootstrap(admin_port=free_port(), listener_port=free_port()))
    try:
        assert a.base_id != b.base_id
        a.start_ready()
        b.start_ready()
        assert a.is_live() and b.is_live()
    finally:
        a.close()
        b.close()


def test_bad_bootstrap_is_reported_with_envoys_reason() -> None:
    boot = _static_bootstrap(admin_port=free_port(), listener_port=free_port())
    boot["static_resources"]["clusters"] = [{"name": "c", "connect_timeout": "-1s"}]
    with EnvoyProcess(bootstrap=boot) as envoy, pytest.raises(EnvoyError, match="exited"):
        envoy.start()


def test_bootstrap_without_admin_is_refused() -> None:
    with pytest.raises(EnvoyError, match="admin"):
        EnvoyProcess(bootstrap={"static_resources": {}})


def test_ads_bootstrap_shapes() -> None:
    sotw = ads_bootstrap(
        node_id="n", cluster="c", ads_host="127.0.0.1", ads_port=1, delta=False, admin_port=2
    )
    delta = ads_bootstrap(
        node_id="n", cluster="c", ads_host="127.0.0.1", ads_port=1, delta=True, admin_port=2
    )
    assert sotw["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert delta["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    for boot in (sotw, delta):
        assert boot["dynamic_resources"]["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
        assert boot["dynamic_resources"]["ads_config"]["transport_api_version"] == "V3"
