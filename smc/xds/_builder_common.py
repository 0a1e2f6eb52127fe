"""Shared parts of the snapshot builder: names, ports, type URLs and the build pass's base.

Role: the constants of the resources SMC builds (listener, route, cluster and secret names, the
transparent ports, Envoy type URLs, SDS sources), the name helpers, and :class:`_PassBase`: the
state of one :class:`~smc.xds.BuildPass` and its memoised registry queries, which the inbound
(:mod:`smc.xds._builder_inbound`) and outbound (:mod:`smc.xds._builder_outbound`) sides extend.
Listener entries are memoised by content across passes. Concurrency: see :mod:`smc.xds._builder`
(the loop thread that applies events).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as _http_rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2 as _router_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import (  # noqa: F401
    original_dst_pb2 as _odst_pb2,
)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2 as _hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as _net_rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2 as _tcp_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2 as _tls_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message

from smc.agent._files import agent_sds_config
from smc.projections import PolicyView, Service, Workload
from smc.xds._certs import CertSource
from smc.xds._snapshot import ResourceEntry, make_entry
from smc.xds._traffic import NO_EGRESS, EgressParts, traffic_policy
from smc.xds._types import LISTENER

__all__ = [
    "APP_PORT_LABEL",
    "INBOUND_LISTENER",
    "INBOUND_PORT",
    "INTERCEPTION_LABEL",
    "OUTBOUND_LISTENER",
    "OUTBOUND_PORT",
    "OUTBOUND_ROUTE",
    "PASSTHROUGH_CLUSTER",
    "ROOT_SECRET",
    "WORKLOAD_SECRET",
    "inbound_name",
    "outbound_cluster_name",
]

log = logging.getLogger("smc.xds.builder")

#: Label naming the local port of a workload's application (one port per workload).
APP_PORT_LABEL = "smc.dev/app-port"
OUTBOUND_PORT = 15001
#: Port of the transparent inbound listener (where iptables sends a pod's inbound TCP).
INBOUND_PORT = 15006
INBOUND_LISTENER = "inbound"
#: Workload label choosing the sidecar model: ``iptables`` (transparent) or ``none``.
INTERCEPTION_LABEL = "smc.dev/interception"
#: ORIGINAL_DST cluster of the transparent listeners' pass-through chains.
PASSTHROUGH_CLUSTER = "passthrough"
OUTBOUND_LISTENER = "outbound"
OUTBOUND_ROUTE = "outbound"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_HTTP_RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
_HTTP_RBAC_PER_ROUTE = _T + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
_NET_RBAC = _T + "envoy.extensions.filters.network.rbac.v3.RBAC"
_TCP_PROXY = _T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_ORIGINAL_DST = _T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
_ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {"@type": _ORIGINAL_DST},
}
_DOWNSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_ADS: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
_SDS_CERT = [{"name": WORKLOAD_SECRET, "sds_config": _ADS}]
#: The SMC agent beside the proxy writes ``default`` to a file in Envoy's working directory,
#: which Envoy reads with file-based SDS (:func:`smc.agent.agent_sds_config`).
_AGENT_SDS: dict[str, Any] = agent_sds_config()
_SDS_CERT_AGENT = [{"name": WORKLOAD_SECRET, "sds_config": _AGENT_SDS}]
_SDS_ROOT = {"name": ROOT_SECRET, "sds_config": _ADS}
_ROUTER_FILTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
_RETRY = {"retry_on": "connect-failure,refused-stream,reset", "num_retries": 2}


def outbound_cluster_name(service: str, port: int) -> str:
    """``outbound|<ns>/<svc>|<port>``: the EDS cluster of one service port."""
    return f"outbound|{service}|{port}"


def inbound_name(port: int) -> str:
    """``inbound|<port>``: the inbound listener and local-application cluster of a port."""
    return f"inbound|{port}"


def _parse(data: dict[str, Any], message: Message) -> Message:
    return json_format.ParseDict(data, message)


def _sockaddr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


@dataclass(frozen=True, slots=True)
class _Outbound:
    """Identity-level outbound part: route config, clusters and endpoints, with its deps."""

    entries: tuple[ResourceEntry, ...]
    deps: frozenset[str]
    tcp: tuple[tuple[int, str], ...] = ()  # (service port, cluster) of outbound TCP listeners
    http_ports: tuple[int, ...] = ()  # HTTP service ports (the transparent listener's chains)
    egress: EgressParts = NO_EGRESS  # what its Egress policies allow (smc.xds._traffic)


class _PassBase:
    """State of one build pass and the memoised registry queries both sides read."""

    def __init__(
        self,
        *,
        view: PolicyView,
        certs: CertSource,
        outbound_port: int = OUTBOUND_PORT,
        inbound_port: int = INBOUND_PORT,
    ) -> None:
        self.view = view
        self.registry = view.registry
        self.certs = certs
        #: OSM policies and observability settings (see :mod:`smc.xds._traffic`).
        self.traffic = traffic_policy(view)
        self.outbound_port = outbound_port
        self.inbound_port = inbound_port
        self._passthrough: ResourceEntry | None = None
        self._svc_ids: dict[str, tuple[str, ...]] = {}
        self._svc_workloads: dict[str, tuple[Workload, ...]] = {}
        self._clusters: dict[tuple[str, int], tuple[ResourceEntry, ResourceEntry]] = {}
        self._outbound: dict[str, _Outbound] = {}
        self._secret: dict[str, ResourceEntry | None] = {}
        self._root: ResourceEntry | None = None
        self._services: tuple[str, ...] | None = None
        # A cert source with ``agent_sds`` True: the SMC agent beside each proxy writes its
        # key and certificate (``default``) to a file its Envoy reads (file-based SDS); the
        # control plane serves only ``ROOTCA`` (roots and CRLs) and never a key.
        self._agent = bool(getattr(certs, "agent_sds", False))
        self._sds_cert = _SDS_CERT_AGENT if self._agent else _SDS_CERT

    # ------------------------------------------------------------------ memoised queries

    def services(self) -> tuple[str, ...]:
        """Every service ``ns/name``, sorted."""
        if self._services is None:
            self._services = tuple(sorted(f"{ns}/{n}" for ns, n in self.registry.services))
        return self._services

    def service_workloads(self, service: str) -> tuple[Workload, ...]:
        found = self._svc_workloads.get(service)
        if found is None:
            found = self._svc_workloads[service] = self.view.workloads_of_service(service)
        return found

    def service_identities(self, service: str) -> tuple[str, ...]:
        """Identities (``ns/sa``) serving ``service``."""
        found = self._svc_ids.get(service)
        if found is None:
            found = self._svc_ids[service] = tuple(
                sorted({w.identity for w in self.service_workloads(service)})
            )
        return found

    def services_backed_by(self, workload: Workload) -> tuple[str, ...]:
        """Services (``ns/name``) ``workload`` backs."""
        prefix = workload.namespace + "/"
        return tuple(
            s
            for s in self.services()
            if s.startswith(prefix) and workload in self.service_workloads(s)
        )

    def _service(self, key: str) -> Service | None:
        ns, _, name = key.partition("/")
        return self.registry.services.get((ns, name))


_LISTENER_MEMO: OrderedDict[str, ResourceEntry] = OrderedDict()
_LISTENER_MEMO_MAX = 20_000


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster},
    }


def _passthrough_chain(stat_prefix: str) -> dict[str, Any]:
    return {"name": "passthrough", "filters": [_tcp_proxy(stat_prefix, PASSTHROUGH_CLUSTER)]}


def _listener(
    name: str,
    address: dict[str, Any],
    chains: list[dict[str, Any]],
    *,
    default: dict[str, Any] | None = None,
    listener_filters: list[dict[str, Any]] | None = None,
    direction: str | None = None,
) -> ResourceEntry:
    """A listener entry; with a ``default`` chain (transparent listeners) it also gets the
    ``original_dst`` listener filter, so chains match the original destination port;
    ``listener_filters`` come after it (e.g. the TLS inspector). ``direction`` (``INBOUND`` or
    ``OUTBOUND``) names the listener's traffic direction, which Envoy's tracers turn into the
    span's operation and kind (ingress/server, egress/client)."""
    spec: dict[str, Any] = {
        "name": name,
        "address": address,
        "enable_reuse_port": False,
        "filter_chains": chains,
    }
    if direction is not None:
        spec["traffic_direction"] = direction
    filters = list(listener_filters or ())
    if default is not None:
        spec["default_filter_chain"] = default
        filters.insert(0, _ORIGINAL_DST_FILTER)
    if filters:
        spec["listener_filters"] = filters
    # Listeners are per proxy and mostly unchanged between builds: converting the JSON form to
    # protobuf is most of their cost (access-log formats, tracing), so an identical JSON form
    # reuses its entry (a bounded memo; entries are immutable; builds run on one thread).
    key = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    found = _LISTENER_MEMO.get(key)
    if found is not None:
        _LISTENER_MEMO.move_to_end(key)
        return found
    made = make_entry(_parse(spec, listener_pb2.Listener()), type_url=LISTENER)
    _LISTENER_MEMO[key] = made
    if len(_LISTENER_MEMO) > _LISTENER_MEMO_MAX:
        _LISTENER_MEMO.popitem(last=False)
    return made


def _methods_matcher(methods: Sequence[str]) -> dict[str, Any]:
    return {
        "name": ":method",
        "string_match": {"safe_regex": {"regex": "|".join(sorted(methods))}},
    }
