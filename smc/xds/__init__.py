"""SMC's xDS layer: content-versioned snapshots, the snapshot cache and the ADS server.

Role: the generic part under the snapshot builder. The builder makes one :class:`Snapshot` per
proxy (node id) and publishes it with :meth:`SnapshotCache.set_snapshot`; :class:`AdsServer`
serves it over ADS, state of the world and delta, to Envoy.
Concurrency: snapshots are immutable; the cache may be written from any thread; the server runs
on one asyncio event loop (grpc.aio). See each module for details.
"""

from smc.xds._cache import SnapshotCache, SnapshotSource, Unwatch
from smc.xds._errors import InconsistentSnapshot, InvalidResource, XdsError
from smc.xds._server import AdsServer, NackRecord, ProxyStatus, TypeStatus, XdsMetrics
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
    "CHANGE_HISTORY",
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "MESSAGE_CLASSES",
    "PUSH_ORDER",
    "ROUTE",
    "SECRET",
    "WILDCARD_TYPES",
    "AdsServer",
    "InconsistentSnapshot",
    "InvalidResource",
    "NackRecord",
    "ProxyStatus",
    "ResourceEntry",
    "Snapshot",
    "SnapshotCache",
    "SnapshotSource",
    "TypeChange",
    "TypeResources",
    "TypeStatus",
    "Unwatch",
    "XdsError",
    "XdsMetrics",
    "make_entry",
    "resource_name",
]
