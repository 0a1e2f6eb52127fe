"""Type URLs of the xDS resources SMC serves, their message classes and their push order.

Role: constants shared by the snapshot, the cache and the ADS server.
Concurrency: immutable module-level data; safe everywhere.
"""

from __future__ import annotations

from typing import Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import Message

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "MESSAGE_CLASSES",
    "PUSH_ORDER",
    "ROUTE",
    "SECRET",
    "SHORT_NAMES",
    "WILDCARD_TYPES",
]

_PREFIX: Final = "type.googleapis.com/"

LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET: Final = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

#: Make-before-break order: a cluster (and its endpoints) reaches Envoy before the listener or
#: route that points at it; secrets last (Envoy asks for them by name once referenced).
PUSH_ORDER: Final[tuple[str, ...]] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

#: Types whose empty SotW request means "everything" (legacy wildcard). EDS/RDS/SDS are named.
WILDCARD_TYPES: Final[frozenset[str]] = frozenset({LISTENER, CLUSTER})

MESSAGE_CLASSES: Final[dict[str, type[Message]]] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    SECRET: secret_pb2.Secret,
}

#: Short names used as metric label values (never node ids).
SHORT_NAMES: Final[dict[str, str]] = {
    LISTENER: "Listener",
    ROUTE: "RouteConfiguration",
    CLUSTER: "Cluster",
    ENDPOINT: "ClusterLoadAssignment",
    SECRET: "Secret",
}


def short_name(type_url: str) -> str:
    """A bounded label value for a type URL (unknown types collapse to ``other``)."""
    return SHORT_NAMES.get(type_url, "other")
