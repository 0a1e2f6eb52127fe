"""SMC's xDS layer: content-versioned snapshots, the snapshot cache and the ADS server.

Role: the snapshot builder (:class:`BuildPass`: projections -> per-proxy resources), the
controller that keeps the cache current (:class:`XdsController`), and the generic part under
them. The builder makes one :class:`Snapshot` per
proxy (node id) and publishes it with :meth:`SnapshotCache.set_snapshot`; :class:`AdsServer`
serves it over ADS, state of the world and delta, to Envoy.
Concurrency: snapshots are immutable; the cache may be written from any thread; the server runs
on one asyncio event loop (grpc.aio). See each module for details.
"""

from smc.xds._builder import (
    APP_PORT_LABEL,
    INBOUND_LISTENER,
    INBOUND_PORT,
    INTERCEPTION_LABEL,
    OUTBOUND_LISTENER,
    OUTBOUND_PORT,
    OUTBOUND_ROUTE,
    PASSTHROUGH_CLUSTER,
    ROOT_SECRET,
    WORKLOAD_SECRET,
    BuildPass,
    ProxyBuild,
    inbound_name,
    outbound_cluster_name,
)
from smc.xds._cache import SnapshotCache, SnapshotSource, Unwatch
from smc.xds._certs import (
    CertsListener,
    CertSource,
    IssuerCache,
    IssuingCertSource,
    KeyStoreCertSource,
    issuer_crls,
)
from smc.xds._controller import Publication, XdsController
from smc.xds._errors import InconsistentSnapshot, InvalidResource, XdsError
from smc.xds._identity import InvalidNodeId, NodeRef, find_workload, parse_node_id
from smc.xds._server import (
    AckCallback,
    AdsServer,
    Authorize,
    NackRecord,
    ProxyStatus,
    RefusalRecord,
    ServerTLS,
    SubscriptionCallback,
    TypeStatus,
    XdsMetrics,
    workload_authorizer,
)
from smc.xds._snapshot import (
    CHANGE_HISTORY,
    ResourceEntry,
    Snapshot,
    TypeChange,
    TypeResources,
    make_entry,
    resource_name,
)
from smc.xds._types import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    MESSAGE_CLASSES,
    PUSH_ORDER,
    ROUTE,
    SECRET,
    WILDCARD_TYPES,
)

__all__ = [
    "APP_PORT_LABEL",
    "CHANGE_HISTORY",
    "CLUSTER",
    "ENDPOINT",
    "INBOUND_LISTENER",
    "INBOUND_PORT",
    "INTERCEPTION_LABEL",
    "LISTENER",
    "MESSAGE_CLASSES",
    "OUTBOUND_LISTENER",
    "OUTBOUND_PORT",
    "OUTBOUND_ROUTE",
    "PASSTHROUGH_CLUSTER",
    "PUSH_ORDER",
    "ROOT_SECRET",
    "ROUTE",
    "SECRET",
    "WILDCARD_TYPES",
    "WORKLOAD_SECRET",
    "AckCallback",
    "AdsServer",
    "Authorize",
    "BuildPass",
    "CertSource",
    "CertsListener",
    "InconsistentSnapshot",
    "InvalidNodeId",
    "InvalidResource",
    "IssuerCache",
    "IssuingCertSource",
    "KeyStoreCertSource",
    "NackRecord",
    "NodeRef",
    "ProxyBuild",
    "ProxyStatus",
    "Publication",
    "RefusalRecord",
    "ResourceEntry",
    "ServerTLS",
    "Snapshot",
    "SnapshotCache",
    "SnapshotSource",
    "SubscriptionCallback",
    "TypeChange",
    "TypeResources",
    "TypeStatus",
    "Unwatch",
    "XdsController",
    "XdsError",
    "XdsMetrics",
    "find_workload",
    "inbound_name",
    "issuer_crls",
    "make_entry",
    "outbound_cluster_name",
    "parse_node_id",
    "resource_name",
    "workload_authorizer",
]
