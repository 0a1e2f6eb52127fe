"""End to end through a real kube-apiserver: Kubernetes objects -> ``smc serve --kube`` -> Envoy.

A labelled namespace holds two ServiceAccounts, two Pods (``client`` and ``server``) whose IPs
(``127.x.y.1``/``.2``, so each Envoy can bind its listeners) are patched into their status the
way a kubelet would, a Service selecting the server and its EndpointSlice (no controller-manager
runs, so the test writes the slice; the apiserver refuses loopback addresses in a slice, so its
endpoints are TEST-NET-1 addresses ``192.0.2.x``, never dialled). ``smc serve --kube
KUBECONFIG`` watches the apiserver; a real Envoy per pod connects over ADS (state of the world)
with node id ``<ns>/<pod>``. The test then checks, each within a bounded wait, that:

1. the client's Envoy has its ``outbound`` listener, and (SMI denies by default) no cluster for
   the service yet; the server's inbound route carries no policy for the client;
2. an SMI HTTPRouteGroup + TrafficTarget created through the apiserver give the server's
   snapshot (``/debug/config_dump``) an RBAC policy whose principal is the client's identity,
   and the client's Envoy an EDS cluster for the service whose only host is the server pod's
   endpoint (Envoy admin ``/config_dump`` and ``/clusters?format=json``);
3. a second endpoint added to the EndpointSlice shows up in the client Envoy's cluster hosts;
4. deleting the Service removes the cluster from the client's Envoy (its listener stays), and
   no Envoy rejected an update; serve then stops cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smc.testing.envoy import (
    EnvoyError,
    EnvoyProcess,
    ads_bootstrap,
    envoy_binary,
    write_validate_secret,
)
from smc.testing.kube import KubeAPIServer, create_http_traffic_target, kube_apiserver_fixture
from smc.testing.ports import free_port
from smc.testing.serve import ServeProcess, http_json
from smc.testing.serve import eventually as _eventually

pytestmark = [pytest.mark.kube, pytest.mark.envoy, pytest.mark.timeout(150)]

WAIT = 20.0  # seconds, for each change to reach its destination


def _http(url: str) -> tuple[int, Any]:
    return http_json(url)


def eventually(check: Callable[[], Any], *, what: str, diag: Callable[[], str]) -> Any:
    return _eventually(check, what=what, diag=diag, wait=WAIT)


@pytest.fixture
def kube() -> Iterator[KubeAPIServer]:
    yield from kube_apiserver_fixture(watch_cache=False)


def pod(name: str, sa: str, app: str, port: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "serviceAccountName": sa,
            "containers": [
                {
                    "name": "app",
                    "image": "example.invalid/app:1",
                    "ports": [{"name": "http", "containerPort": port}],
                }
            ],
        },
    }


def running_status(ip: str) -> dict[str, Any]:
    """What a kubelet would report for a started, ready pod."""
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    }


def slice_endpoint(ns: str, ip: str, pod_name: str) -> dict[str, Any]:
    return {
        "addresses": [ip],
        "conditions": {"ready": True},
        "targetRef": {"kind": "Pod", "name": pod_name, "namespace": ns},
    }


def cluster_hosts(envoy: EnvoyProcess, name: str) -> set[tuple[str, int]] | None:
    """``(address, port)`` of the hosts of cluster ``name`` in Envoy, None if it has none."""
    status, body = _http(envoy.admin_url + "/clusters?format=json")
    assert status == 200, body
    for c in body.get("cluster_statuses", []):
        if c.get("name") == name:
            return {
                (
                    h["address"]["socket_address"]["address"],
                    int(h["address"]["socket_address"]["port_value"]),
                )
                for h in c.get("host_statuses", [])
            }
    return None


def envoy_clusters(envoy: EnvoyProcess) -> set[str]:
    names: set[str] = set()
    for conf in envoy.config_dump(resource="dynamic_active_clusters").get("configs", []):
        names.add(conf["cluster"]["name"])
    return names


def test_kube_objects_reach_envoy(tmp_path: Path, kube: KubeAPIServer) -> None:
    from kubernetes import client

    try:
        envoy_binary()
    except EnvoyError as exc:
        pytest.skip(f"no Envoy binary: {exc}")
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    a, b = random.randint(2, 250), random.randint(2, 120)
    # Pod IPs are loopback addresses so each Envoy can bind its listeners; the apiserver
    # refuses loopback addresses in EndpointSlices, so the slice carries TEST-NET-1 ones.
    client_ip, server_ip = f"127.{a}.{b}.1", f"127.{a}.{b}.2"
    server_ep, extra_ep = f"192.0.2.{b}", f"192.0.2.{b + 1}"
    svc_cluster = f"outbound|{ns}/server|80"

    with kube.api_client() as api:
        core = client.CoreV1Api(api)
        discovery = client.DiscoveryV1Api(api)
        custom = client.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": ns, "labels": {"smc.dev/monitored": "true"}}})
        for sa in ("client", "server"):
            core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
        core.create_namespaced_pod(ns, pod("client", "client", "client", 9090))
        core.create_namespaced_pod(ns, pod("server", "server", "server", 8080))
        core.patch_namespaced_pod_status("client", ns, running_status(client_ip))
        core.patch_namespaced_pod_status("server", ns, running_status(server_ip))
        core.create_namespaced_service(
            ns,
            {
                "metadata": {"name": "server"},
                "spec": {
                    "selector": {"app": "server"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                },
            },
        )
        slice_meta = {"name": "server-x1", "labels": {"kubernetes.io/service-name": "server"}}
        discovery.create_namespaced_endpoint_slice(
            ns,
            {
                "metadata": slice_meta,
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [slice_endpoint(ns, server_ep, "server")],
            },
        )

        serve = ServeProcess(tmp_path, args=["--kube", str(kube.kubeconfig_path)])
        envoys: list[EnvoyProcess] = []
        try:
            serve.wait_ready()

            def start_envoy(pod_name: str) -> EnvoyProcess:
                boot = ads_bootstrap(
                    node_id=f"{ns}/{pod_name}",
                    cluster=pod_name,
                    ads_host="127.0.0.1",
                    ads_port=serve.xds_port,
                    delta=False,
                    admin_port=free_port(),
                )
                # the test is the pod's host: a throwaway key of its own where the pod's agent
                # would write one (serve makes none; its cleartext ADS carries no key)
                home = tmp_path / f"proxy-{pod_name}"
                write_validate_secret(home)
                envoy = EnvoyProcess(
                    bootstrap=boot,
                    workdir=tmp_path / f"envoy-{pod_name}",
                    log_level="warning",
                    cwd=home,
                )
                envoys.append(envoy)
                envoy.start()
                return envoy

            client_envoy = start_envoy("client")
            start_envoy("server")

            def diag() -> str:
                dump = serve.dump(f"{ns}/client") or {}
                snap = {t: [r["name"] for r in rs] for t, rs in dump.get("resources", {}).items()}
                with contextlib.suppress(Exception):
                    snap["envoy"] = sorted(envoy_clusters(client_envoy))
                return f"--- client snapshot: {snap}\n--- serve:\n{serve.tail()}"

            # 1. The client's Envoy gets its outbound listener; SMI denies by default, so no
            #    cluster for the service yet; the server's inbound route has no policy.
            t0 = time.monotonic()
            eventually(
                lambda: "outbound" in client_envoy.active_listeners(),
                what="the client Envoy's outbound listener",
                diag=diag,
            )
            first_sync = time.monotonic() - t0
            assert svc_cluster not in envoy_clusters(client_envoy)

            # 2. SMI through the apiserver: the server's RBAC allows the client's identity...
            def server_rbac() -> str:
                dump = serve.dump(f"{ns}/server")
                if dump is None:
                    return ""
                routes = {r["name"]: r for r in dump["resources"].get("RouteConfiguration", [])}
                return json.dumps(routes.get("inbound|8080", {}))

            principal = f"/ns/{ns}/sa/client"
            before = eventually(server_rbac, what="the server's inbound route", diag=diag)
            assert principal not in before
            create_http_traffic_target(
                custom,
                ns,
                name="client-to-server",
                source="client",
                destination="server",
                matches=[{"name": "all", "pathRegex": ".*", "methods": ["*"]}],
            )

            def rbac_with_principal() -> str:
                rbac = server_rbac()
                return rbac if principal in rbac else ""

            rbac = eventually(
                rbac_with_principal,
                what="the client's principal in the server's RBAC",
                diag=diag,
            )
            assert f"TrafficTarget/{ns}/client-to-server" in rbac

            # ... and the client's Envoy: the service's cluster with the server pod's endpoint.
            hosts = eventually(
                lambda: cluster_hosts(client_envoy, svc_cluster),
                what=f"{svc_cluster} with a host in the client Envoy",
                diag=diag,
            )
            assert hosts == {(server_ep, 8080)}
            assert svc_cluster in envoy_clusters(client_envoy)

            # 3. A second endpoint in the slice reaches the client Envoy's cluster.
            discovery.patch_namespaced_endpoint_slice(
                "server-x1",
                ns,
                {
                    "endpoints": [
                        slice_endpoint(ns, server_ep, "server"),
                        {"addresses": [extra_ep], "conditions": {"ready": True}},
                    ]
                },
            )
            eventually(
                lambda: (
                    cluster_hosts(client_envoy, svc_cluster)
                    == {(server_ep, 8080), (extra_ep, 8080)}
                ),
                what="the added endpoint in the client Envoy",
                diag=diag,
            )

            # 4. Deleting the Service removes its cluster from the client's Envoy.
            core.delete_namespaced_service("server", ns)
            eventually(
                lambda: (
                    svc_cluster not in envoy_clusters(client_envoy)
                    and cluster_hosts(client_envoy, svc_cluster) is None
                ),
                what=f"{svc_cluster} to leave the client Envoy",
                diag=diag,
            )
            assert "outbound" in client_envoy.active_listeners()
            assert first_sync < WAIT
            for envoy in envoys:
                rejected = {
                    k: v for k, v in envoy.stats().items() if k.endswith("update_rejected") and v
                }
                assert not rejected, rejected
        finally:
            for envoy in envoys:
                envoy.close()
            code = serve.stop()
        assert code == 0, serve.tail()
        assert "Traceback" not in serve.tail(200_000)
