"""Public records, callback types and Prometheus metrics of the ADS server.

Role: the data the ADS server reports (refusals, NACKs, per-stream debug status), the hooks it
calls (:data:`AckCallback`, :data:`SubscriptionCallback`, :data:`Authorize`, :data:`Placement`)
and :class:`XdsMetrics`. Concurrency: plain frozen records; metrics are updated on the server's
event loop only.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from smc.ca import SpiffeId
from smc.xds._types import short_name

__all__ = [
    "UNPLACED_GRACE",
    "AckCallback",
    "Authorize",
    "NackRecord",
    "Placement",
    "ProxyStatus",
    "RefusalReason",
    "RefusalRecord",
    "StreamKind",
    "SubscriptionCallback",
    "TypeStatus",
    "XdsMetrics",
]

StreamKind = Literal["sotw", "delta"]

#: ``on_ack(node_id, type_url, version, acked_at)``: a proxy ACKed ``version`` of ``type_url``
#: (``acked_at``: wall-clock seconds).
AckCallback = Callable[[str, str, str, float], None]
#: ``on_subscription(node_id, type_url, watched)``: a proxy started (True) or stopped (False)
#: watching a named type (EDS/RDS/SDS) at all.
SubscriptionCallback = Callable[[str, str, bool], None]
#: ``authorize(node_id, peer_identity)``: may a proxy whose client certificate carries
#: ``peer_identity`` be served the config of ``node_id``? Called on the server's loop, at most
#: once per stream, once the node has a snapshot; must not block.
Authorize = Callable[[str, SpiffeId], bool]
#: ``placement(node_id)``: None when SMC can place the node id (it names a registry workload),
#: else why not. Asked on the server's loop while a ready server has no snapshot for the node.
Placement = Callable[[str], str | None]

RefusalReason = Literal[
    "no_client_certificate",
    "bad_identity",
    "identity_mismatch",
    "invalid_node_id",
    "unplaced",
    "key_withheld",  # a Secret with a private key not sent (stream not verified: _key_guard)
]
#: How long a well-formed node id naming no workload waits (the workload may be joining) before
#: its stream ends with NOT_FOUND.
UNPLACED_GRACE = 5.0
_REFUSALS_KEPT = 256

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class RefusalRecord:
    """One stream refused by the identity check: why, for which claimed node id (empty when
    refused before the first request), and the certificate identity presented (empty if none)."""

    node_id: str
    peer_identity: str
    peer: str
    reason: RefusalReason
    message: str
    at: float  # wall-clock seconds (time.time())


@dataclass(frozen=True, kw_only=True, slots=True)
class NackRecord:
    """One NACK: which node rejected which version of which type, when, and why."""

    node_id: str
    type_url: str
    version: str
    nonce: str
    message: str
    code: int
    at: float  # wall-clock seconds (time.time())


@dataclass(frozen=True, kw_only=True, slots=True)
class TypeStatus:
    """Debug view of one type on one stream."""

    type_url: str
    wildcard: bool
    names: tuple[str, ...]
    sent_version: str | None
    acked_version: str | None
    last_nonce: str | None
    pending: bool
    last_nack: NackRecord | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ProxyStatus:
    """Debug view of one connected ADS stream."""

    node_id: str
    stream_id: int
    kind: StreamKind
    peer: str
    connected_at: float
    types: Mapping[str, TypeStatus]


class XdsMetrics:
    """Prometheus metrics of the ADS server, registered in the given registry. Labels carry only
    the resource type and stream kind, never node ids.

    The per-response series (pushes, resources and bytes sent, push and ACK latency, NACKs) are
    plain counters on the server's loop, exported by a collector when scraped: a
    ``prometheus_client`` child takes a lock and several checks per call, which at thousands
    of streams was a measurable share of a change's CPU."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connected = Gauge(
            "smc_xds_connected_proxies", "Open ADS streams", ["kind"], registry=registry
        )
        self.refused = Counter(
            "smc_xds_refused_streams",
            "ADS streams refused by the client-certificate identity check",
            ["reason"],
            registry=registry,
        )
        self._by_type: dict[str, _TypeMetrics] = {}
        registry.register(_TypeCollector(self._by_type))

    def for_type(self, type_url: str) -> _TypeMetrics:
        """The series of one type (created at zero on first use)."""
        found = self._by_type.get(type_url)
        if found is None:
            found = self._by_type[type_url] = _TypeMetrics(short_name(type_url))
        return found


class _Count:
    """A counter updated on one thread (the loop) and read by the collector."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Latency:
    """A histogram over :data:`_LATENCY_BUCKETS` (upper bounds, inclusive)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip(
            (*map(floatToGoString, _LATENCY_BUCKETS), "+Inf"), self.counts, strict=True
        ):
            total += count
            out.append((bound, float(total)))
        return out


class _TypeMetrics:
    __slots__ = (
        "ack_latency",
        "bytes_sent",
        "label",
        "nacks",
        "push_latency",
        "pushes_delta",
        "pushes_sotw",
        "resources_sent",
    )

    def __init__(self, label: str) -> None:
        self.label = label
        self.pushes_sotw = _Count()
        self.pushes_delta = _Count()
        self.resources_sent = _Count()
        self.bytes_sent = _Count()
        self.nacks = _Count()
        self.push_latency = _Latency()
        self.ack_latency = _Latency()


class _TypeCollector(Collector):
    """Exports the per-type series under their established names and labels."""

    def __init__(self, by_type: Mapping[str, _TypeMetrics]) -> None:
        self._by_type = by_type

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> list[Metric]:
        return list(self._families(list(self._by_type.values())))

    @staticmethod
    def _families(types: list[_TypeMetrics]) -> Iterator[Metric]:
        pushes = CounterMetricFamily(
            "smc_xds_pushes", "xDS responses sent", labels=["type", "kind"]
        )
        resources = CounterMetricFamily(
            "smc_xds_resources_sent", "Resources carried by xDS responses", labels=["type"]
        )
        sent = CounterMetricFamily(
            "smc_xds_resource_bytes_sent", "Serialised resource bytes sent", labels=["type"]
        )
        nacks = CounterMetricFamily("smc_xds_nacks", "NACKs received", labels=["type"])
        push_latency = HistogramMetricFamily(
            "smc_xds_push_latency_seconds",
            "Time from a snapshot change (or request) to the response being written",
            labels=["type"],
        )
        ack_latency = HistogramMetricFamily(
            "smc_xds_ack_latency_seconds",
            "Time from a response being written to its ACK or NACK",
            labels=["type"],
        )
        for tm in types:
            pushes.add_metric([tm.label, "sotw"], tm.pushes_sotw.value)
            pushes.add_metric([tm.label, "delta"], tm.pushes_delta.value)
            resources.add_metric([tm.label], tm.resources_sent.value)
            sent.add_metric([tm.label], tm.bytes_sent.value)
            nacks.add_metric([tm.label], tm.nacks.value)
            push_latency.add_metric([tm.label], tm.push_latency.buckets(), tm.push_latency.sum)
            ack_latency.add_metric([tm.label], tm.ack_latency.buckets(), tm.ack_latency.sum)
        yield from (pushes, resources, sent, push_latency, ack_latency, nacks)
