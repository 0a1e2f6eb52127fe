"""Envoy's metrics service (``envoy.service.metrics.v3.MetricsService``) on the ADS port:
which edges of the mesh carry traffic, at what rate, with which error and deny ratios.

Role: proxies whose bootstrap has the ``envoy.stat_sinks.metrics_service`` sink (see
:func:`stats_sink_bootstrap`, used by the test harness and the demo) stream their stats to the
control plane at every stats flush, over the connection they already have to it.
:class:`MetricsSink` keeps, per proxy and outbound cluster ``outbound|<ns>/<svc>|<port>``, the
cumulative counts of completed requests, 5xx (errors) and 403 (denied by the destination's
RBAC) and turns them into rates over a sliding window; everything else a proxy sends is dropped.
Over mTLS a stream is accepted only when the certificate may speak for the node id it names
(the ADS server's own check), so no proxy can report traffic as another.
The wire messages are declared here as descriptors (the xds-protos package does not ship the
metrics service); only the fields read are declared, the parser skips the rest.
Concurrency: runs on the ADS server's event loop; :meth:`MetricsSink.edges` reads there too.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["METRICS_SERVICE", "EdgeTraffic", "MetricsSink", "stats_sink_bootstrap"]

_log = logging.getLogger("smc.xds.metrics")

METRICS_SERVICE = "envoy.service.metrics.v3.MetricsService"
_STAT = re.compile(r"^cluster\.outbound\|([^|]+)\|(\d+)\.upstream_rq_(\dxx|403)$")

#: Checks that a TLS peer may speak for a node id; returns why not, or None when it may.
AuthorizePeer = Callable[[str, grpc.aio.ServicerContext], Awaitable[str | None]]


def _messages() -> tuple[Any, Any]:
    f = descriptor_pb2.FileDescriptorProto(
        name="smc/wire/envoy_metrics_service.proto", package="smc.wire.envoymetrics"
    )
    fdp = descriptor_pb2.FieldDescriptorProto
    opt, rep = fdp.LABEL_OPTIONAL, fdp.LABEL_REPEATED
    pkg = ".smc.wire.envoymetrics."

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, label, ftype, type_name in fields:
            fd = m.field.add(name=fname, number=number, label=label, type=ftype)  # type: ignore[arg-type]
            if type_name:
                fd.type_name = type_name

    message("Counter", ("value", 1, opt, fdp.TYPE_DOUBLE, ""))
    message("Metric", ("counter", 3, opt, fdp.TYPE_MESSAGE, pkg + "Counter"))
    message(
        "MetricFamily",
        ("name", 1, opt, fdp.TYPE_STRING, ""),
        ("metric", 4, rep, fdp.TYPE_MESSAGE, pkg + "Metric"),
    )
    # Identifier.node is envoy.config.core.v3.Node: kept as bytes, parsed with xds-protos.
    message("Identifier", ("node", 1, opt, fdp.TYPE_BYTES, ""))
    message(
        "StreamMetricsMessage",
        ("identifier", 1, opt, fdp.TYPE_MESSAGE, pkg + "Identifier"),
        ("envoy_metrics", 2, rep, fdp.TYPE_MESSAGE, pkg + "MetricFamily"),
    )
    message("StreamMetricsResponse")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    classes = message_factory.GetMessages([f], pool=pool)
    return (
        classes["smc.wire.envoymetrics.StreamMetricsMessage"],
        classes["smc.wire.envoymetrics.StreamMetricsResponse"],
    )


StreamMetricsMessage, StreamMetricsResponse = _messages()


def stats_sink_bootstrap(*, cluster_name: str, flush_seconds: float = 2.0) -> dict[str, Any]:
    """The bootstrap fields that make an Envoy stream its stats to the control plane reached
    through its static cluster ``cluster_name`` (the ADS cluster)."""
    return {
        "stats_flush_interval": f"{flush_seconds}s",
        "stats_sinks": [
            {
                "name": "envoy.stat_sinks.metrics_service",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.config.metrics.v3.MetricsServiceConfig",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}},
                },
            }
        ],
    }


@dataclass(frozen=True, kw_only=True, slots=True)
class EdgeTraffic:
    """What one proxy sent to one service over the window: requests/s and the share of them
    answered 5xx (errors) or 403 (denied)."""

    node_id: str
    service: str
    rps: float
    requests: int
    error_ratio: float
    deny_ratio: float


# samples of (monotonic time, completed, errors, denied), per (node id, service)
_Sample = tuple[float, float, float, float]


class MetricsSink:
    """The metrics service (see the module docstring)."""

    def __init__(
        self,
        *,
        window: float = 30.0,
        authorize: AuthorizePeer | None = None,
        max_nodes: int = 20_000,
    ) -> None:
        self.window = window
        self.authorize = authorize
        self.max_nodes = max_nodes
        self._samples: dict[tuple[str, str], collections.deque[_Sample]] = {}
        self._nodes: set[str] = set()
        self.refused = 0

    def add_to(self, server: grpc.aio.Server) -> None:
        """Mount the service on a grpc.aio server (before it starts)."""
        handler = grpc.stream_unary_rpc_method_handler(
            self.StreamMetrics,
            request_deserializer=StreamMetricsMessage.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(METRICS_SERVICE, {"StreamMetrics": handler}),)
        )

    async def StreamMetrics(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> Any:
        node_id = ""
        async for msg in requests:
            if not node_id:
                node_id = base_pb2.Node.FromString(msg.identifier.node).id
                if not node_id:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "identifier.node.id: the first message must name the proxy's node id",
                    )
                if self.authorize is not None:
                    problem = await self.authorize(node_id, context)
                    if problem is not None:
                        self.refused += 1
                        _log.warning("refused metrics stream of %r: %s", node_id, problem)
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
                if node_id not in self._nodes and len(self._nodes) >= self.max_nodes:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "too many proxies report metrics"
                    )
                self._nodes.add(node_id)
            self.record(node_id, msg.envoy_metrics)
        return StreamMetricsResponse()

    def record(self, node_id: str, families: Any, *, now: float | None = None) -> None:
        """Fold one flush of ``node_id``'s counters in (``families``: MetricFamily messages)."""
        t = time.monotonic() if now is None else now
        totals: dict[str, list[float]] = {}
        for fam in families:
            m = _STAT.match(fam.name)
            if m is None or not fam.metric:
                continue
            value = fam.metric[0].counter.value
            acc = totals.setdefault(m.group(1), [0.0, 0.0, 0.0])
            kind = m.group(3)
            if kind == "403":
                acc[2] += value
            else:
                acc[0] += value
                if kind == "5xx":
                    acc[1] += value
        for service, (done, errors, denied) in totals.items():
            q = self._samples.setdefault((node_id, service), collections.deque())
            q.append((t, done, errors, denied))
            while len(q) > 2 and t - q[1][0] >= self.window:
                q.popleft()

    def edges(self, *, now: float | None = None) -> list[EdgeTraffic]:
        """Traffic per (proxy, service) over the window; edges whose proxy stopped reporting
        for a whole window are dropped."""
        t = time.monotonic() if now is None else now
        out = []
        for key, q in list(self._samples.items()):
            if t - q[-1][0] > self.window:
                del self._samples[key]
                continue
            if len(q) < 2:
                continue
            (t0, d0, e0, x0), (t1, d1, e1, x1) = q[0], q[-1]
            done = max(0.0, d1 - d0)
            if t1 <= t0 or done <= 0:
                continue
            out.append(
                EdgeTraffic(
                    node_id=key[0],
                    service=key[1],
                    rps=done / (t1 - t0),
                    requests=int(done),
                    error_ratio=max(0.0, e1 - e0) / done,
                    deny_ratio=max(0.0, x1 - x0) / done,
                )
            )
        return out
