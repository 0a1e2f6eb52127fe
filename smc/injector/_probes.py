"""Kubelet probes through the sidecar: rewrite at injection, serve in the proxy, restore.

Why: the inbound chain of a mesh port requires mTLS, and kubelet probes arrive in plaintext
from the node, so an injected pod with a probe on a mesh port would never become ready (or
be restarted forever). Every liveness/readiness/startup probe of an application container
whose port is intercepted (any port not listed in ``smc.dev/exclude-inbound-ports``) is
rewritten to a port of the proxy's own, :data:`PROBE_BASE_PORT` + n (one per probe), which the
proxy serves in plaintext and forwards to the application on ``127.0.0.1``:

- ``httpGet``: the port changes, path and headers stay; the proxy's listener proxies HTTP/1.1
  to the application. An ``HTTPS`` probe becomes ``HTTP`` to the proxy, which speaks TLS to
  the application without verifying its certificate (as kubelet does), as Istio's prober
  does: a TLS pass-through (OSM's way) would hand the whole application port to anyone who
  reaches the probe port, while here the proxy can check the request;
- ``grpc``: the port changes, the service name stays; the listener proxies HTTP/2 (the gRPC
  health check protocol) to the application;
- ``tcpSocket``: a TCP probe through a proxy would always connect, whatever the application
  does, so it becomes an ``httpGet`` of ``/smc/probe/tcp`` on the proxy's port, answered by the
  proxy's health-check filter: 200 while its active TCP health check (connect every
  :data:`TCP_CHECK_INTERVAL` seconds) reaches the application's port, 503 when it does not.

A probe port is a plaintext door past the mesh's mTLS, so it opens on the probe only: the
proxy forwards ``GET`` of the probe's path (an HTTP probe) or the gRPC health ``Check`` (a gRPC
probe) and answers anything else 404 itself, never reaching the application; a TCP probe's
port forwards nothing at all.

The listeners and clusters go into the proxy's bootstrap as static resources (known when the
pod is admitted; probes keep working while the control plane is unreachable, so an outage of
SMC never makes kubelet restart workloads). The probe ports are excluded from inbound
interception. The original probes are kept in the ``smc.dev/original-probes`` annotation, from
which :func:`restore_probe_ops` (used by :func:`smc.injector.uninject`) puts them back.
Concurrency: pure functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smc.injector._errors import InvalidPod

__all__ = [
    "ANNOTATION_ORIGINAL_PROBES",
    "PROBE_BASE_PORT",
    "PROBE_KINDS",
    "TCP_CHECK_INTERVAL",
    "TCP_PROBE_PATH",
    "ProbePlan",
    "plan_probes",
    "probe_static_resources",
    "restore_probe_ops",
]

ANNOTATION_ORIGINAL_PROBES = "smc.dev/original-probes"
PROBE_KINDS = ("livenessProbe", "readinessProbe", "startupProbe")
PROBE_BASE_PORT = 15901
_MAX_PROBES = 90  # ports 15901-15990
TCP_PROBE_PATH = "/smc/probe/tcp"
TCP_CHECK_INTERVAL = 1.0

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_UPSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_GRPC_HEALTH = "/grpc.health.v1.Health/Check"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_HEALTH = _T + "envoy.extensions.filters.http.health_check.v3.HealthCheck"
_HTTP_OPTIONS = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True, kw_only=True, slots=True)
class _Probe:
    container: int
    kind: str
    handler: str  # httpGet | tcpSocket | grpc
    app_port: int
    proxy_port: int
    https: bool
    path: str = "/"  # an httpGet probe's path (without its query)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbePlan:
    """The probes to rewrite: the JSONPatch operations, the proxy ports to exclude from
    interception, the bootstrap additions and the originals (for the annotation)."""

    ops: tuple[dict[str, Any], ...]
    ports: tuple[int, ...]
    probes: tuple[_Probe, ...]
    originals: Mapping[str, Mapping[str, Any]]

    @property
    def annotation(self) -> str:
        return json.dumps(self.originals, sort_keys=True, separators=(",", ":"))


def _port(value: Any, container: Mapping[str, Any], where: str) -> int:
    if isinstance(value, bool):
        raise InvalidPod(f"{where}: {value!r} is not a port")
    if isinstance(value, int):
        if 0 < value < 65536:
            return value
        raise InvalidPod(f"{where}: {value} is not a port (1-65535)")
    if isinstance(value, str):
        if value.isdigit():
            return _port(int(value), container, where)
        for p in container.get("ports") or []:
            if isinstance(p, Mapping) and p.get("name") == value:
                return _port(p.get("containerPort"), container, where)
        raise InvalidPod(f"{where}: no container port is named {value!r}")
    raise InvalidPod(f"{where}: {value!r} is not a port")


def plan_probes(
    spec: Mapping[str, Any], *, excluded: Sequence[int], skip: Sequence[str] = ()
) -> ProbePlan:
    """Plan the rewrite of ``spec``'s probes (see the module docstring); containers named in
    ``skip`` (the proxy itself) are left alone. Raises :class:`InvalidPod` naming the field."""
    ops: list[dict[str, Any]] = []
    probes: list[_Probe] = []
    originals: dict[str, dict[str, Any]] = {}
    containers = spec.get("containers") or []
    for ci, c in enumerate(containers):
        if not isinstance(c, Mapping) or c.get("name") in skip:
            continue
        for kind in PROBE_KINDS:
            probe = c.get(kind)
            if not isinstance(probe, Mapping):
                continue
            where = f"spec.containers[{ci}].{kind}"
            handler = next((h for h in ("httpGet", "tcpSocket", "grpc") if h in probe), None)
            if handler is None:  # exec probes run in the container: nothing to route
                continue
            body = probe[handler]
            if not isinstance(body, Mapping):
                raise InvalidPod(f"{where}.{handler}: must be an object")
            app_port = _port(body.get("port"), c, f"{where}.{handler}.port")
            if app_port in excluded:  # not intercepted: kubelet reaches the app directly
                continue
            if len(probes) >= _MAX_PROBES:
                raise InvalidPod(f"{where}: more than {_MAX_PROBES} probes to route")
            proxy_port = PROBE_BASE_PORT + len(probes)
            https = handler == "httpGet" and str(body.get("scheme", "HTTP")).upper() == "HTTPS"
            path = str(body.get("path") or "/").split("?", 1)[0]
            probes.append(
                _Probe(
                    container=ci,
                    kind=kind,
                    handler=handler,
                    app_port=app_port,
                    proxy_port=proxy_port,
                    https=https,
                    path=path if path.startswith("/") else "/" + path,
                )
            )
            originals.setdefault(str(c.get("name", ci)), {})[kind] = dict(probe)
            new = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket", "grpc")}
            if handler == "tcpSocket":
                new["httpGet"] = {"path": TCP_PROBE_PATH, "port": proxy_port, "scheme": "HTTP"}
            elif https:  # kubelet -> proxy in plaintext; the proxy does the TLS
                new[handler] = {**body, "port": proxy_port, "scheme": "HTTP"}
            else:
                new[handler] = {**body, "port": proxy_port}
            ops.append({"op": "replace", "path": f"/spec/containers/{ci}/{kind}", "value": new})
    return ProbePlan(
        ops=tuple(ops),
        ports=tuple(p.proxy_port for p in probes),
        probes=tuple(probes),
        originals=originals,
    )


def _cluster(p: _Probe) -> dict[str, Any]:
    name = f"smc_probe_{p.proxy_port}"
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": p.app_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if p.handler == "grpc":
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if p.https:  # as kubelet: TLS, the application's certificate not verified
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": _UPSTREAM_TLS, "common_tls_context": {}},
        }
    if p.handler == "tcpSocket":
        interval = f"{TCP_CHECK_INTERVAL:g}s"
        cluster["health_checks"] = [
            {
                "timeout": "1s",
                "interval": interval,
                "no_traffic_interval": interval,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "tcp_health_check": {},
            }
        ]
    return cluster


def _listener(p: _Probe) -> dict[str, Any]:
    name = f"smc_probe_{p.proxy_port}"
    address = {"socket_address": {"address": "0.0.0.0", "port_value": p.proxy_port}}
    filters: list[dict[str, Any]] = []
    if p.handler == "tcpSocket":
        filters.append(
            {
                "name": "envoy.filters.http.health_check",
                "typed_config": {
                    "@type": _HEALTH,
                    "pass_through_mode": False,
                    "headers": [{"name": ":path", "string_match": {"exact": TCP_PROBE_PATH}}],
                    "cluster_min_healthy_percentages": {name: {"value": 100.0}},
                },
            }
        )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}})
    hcm = {
        "@type": _HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": [*_probe_routes(p, name), _NOT_A_PROBE],
                }
            ],
        },
        "http_filters": filters,
    }
    return {
        "name": name,
        "address": address,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


#: Anything but the probe: answered by the proxy, never forwarded.
_NOT_A_PROBE: dict[str, Any] = {
    "match": {"prefix": "/"},
    "direct_response": {"status": 404, "body": {"inline_string": "not a probe\n"}},
}


def _probe_routes(p: _Probe, cluster: str) -> list[dict[str, Any]]:
    """The one request a probe port forwards: the gRPC health check, or a GET of the HTTP
    probe's path (kubelet sends nothing else); a TCP probe's port forwards nothing."""
    if p.handler == "grpc":
        match: dict[str, Any] = {"path": _GRPC_HEALTH, "grpc": {}}
    elif p.handler == "httpGet":
        method = {"name": ":method", "string_match": {"exact": "GET"}}
        match = {"path": p.path, "headers": [method]}
    else:
        return []
    timeout = "0s" if p.handler == "grpc" else "10s"
    return [{"match": match, "route": {"cluster": cluster, "timeout": timeout}}]


def probe_static_resources(plan: ProbePlan, bootstrap: dict[str, Any]) -> None:
    """Add the probe listeners and clusters to ``bootstrap`` (in place)."""
    if not plan.probes:
        return
    static = bootstrap.setdefault("static_resources", {})
    static.setdefault("listeners", []).extend(_listener(p) for p in plan.probes)
    static.setdefault("clusters", []).extend(_cluster(p) for p in plan.probes)


def restore_probe_ops(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The operations that put back the probes recorded in ``smc.dev/original-probes``."""
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(ANNOTATION_ORIGINAL_PROBES)
    if not raw:
        return []
    try:
        originals = json.loads(raw)
    except ValueError as exc:
        raise InvalidPod(
            f"metadata.annotations[{ANNOTATION_ORIGINAL_PROBES!r}]: not JSON ({exc})"
        ) from None
    if not isinstance(originals, dict):
        raise InvalidPod(f"metadata.annotations[{ANNOTATION_ORIGINAL_PROBES!r}]: not an object")
    ops: list[dict[str, Any]] = []
    for ci, c in enumerate((pod.get("spec") or {}).get("containers") or []):
        mine = originals.get(str(c.get("name", ci)))
        if not isinstance(mine, dict):
            continue
        for kind, probe in sorted(mine.items()):
            if kind in PROBE_KINDS:
                op = "replace" if kind in c else "add"
                ops.append({"op": op, "path": f"/spec/containers/{ci}/{kind}", "value": probe})
    return ops
