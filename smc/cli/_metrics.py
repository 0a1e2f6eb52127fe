"""The operator metrics of ``smc serve`` (Prometheus, on ``GET /metrics``).

Role: one :class:`ServeMetrics` per serve process, in its own registry beside the ADS server's:

- the event log, read at scrape time: ``smc_log_position`` / ``smc_log_end_offset`` /
  ``smc_log_lag`` per stream and partition (the end offsets come from serve's one-second probe,
  so a scrape never waits on the log), ``smc_log_caught_up``, ``smc_log_available``,
  ``smc_log_fatal``, ``smc_log_applied_events_total``;
- appends made by the change service (API, VM providers): ``smc_log_append_seconds`` and
  ``smc_log_append_errors_total{reason}`` (unavailable, full, corrupt, other), plus
  ``smc_api_group_commit_requests`` (requests per durable write);
- certificates, from the events the runner applies: ``smc_certificates_issued_total``,
  ``..._renewed_total``, ``..._revoked_total`` and ``smc_certificate_earliest_expiry_seconds``
  (seconds until the earliest active workload certificate expires; absent with none): the
  agents' per-proxy certificates (``ProxyCertificate*``) and the older per-identity ones;
- the HTTP API: ``smc_http_requests_total{route,method,status}`` and
  ``smc_http_request_duration_seconds{route,method}``, labelled by the route *pattern*
  (``/v1/services``, ``unmatched``), never by raw paths or identities;
- process metrics (``process_*``, ``python_*``) from prometheus_client's collectors.

:func:`zero_ads_series` makes the ADS server's per-type series exist at zero before the first
stream, so an alert on ``smc_xds_connected_proxies == 0`` or a NACK rate has data to match.
No label ever carries a node id, key, token or manifest content.
Concurrency: collectors run on the scrape (the event loop's thread); counters are thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from smc.events import (
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    Event,
    LogCorrupt,
    LogFull,
    LogUnavailable,
    ProxyCertificateIssued,
    ProxyCertificateRevoked,
)
from smc.projections import ProjectionRunner
from smc.projections._certs import CertsProjection

__all__ = ["ServeMetrics", "zero_ads_series"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

del GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR  # the default registry's; ours below


class _LogCollector(Collector):
    def __init__(self, metrics: ServeMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runner = self.m.runner
        health = runner.health
        end = runner.health.end
        pos = GaugeMetricFamily(
            "smc_log_position",
            "Next offset the projections will apply, per stream and partition",
            labels=["stream", "partition"],
        )
        high = GaugeMetricFamily(
            "smc_log_end_offset",
            "The log's end offset (high watermark) at the last probe",
            labels=["stream", "partition"],
        )
        lag = GaugeMetricFamily(
            "smc_log_lag",
            "Records on the log not yet applied by the projections",
            labels=["stream", "partition"],
        )
        parts = {tp for tp, _ in runner.position.items()} | {tp for tp, _ in end.items()}
        for stream, part in sorted(parts):
            labels = [stream, str(part)]
            at = runner.position.get((stream, part))
            top = max(end.get((stream, part)), at)  # the log holds at least what was read
            pos.add_metric(labels, at)
            high.add_metric(labels, top)
            lag.add_metric(labels, max(top - at, 0))
        yield pos
        yield high
        yield lag
        yield GaugeMetricFamily(
            "smc_log_caught_up",
            "1 once the projections caught up with the log at start",
            value=1 if runner.caught_up.is_set() else 0,
        )
        yield GaugeMetricFamily(
            "smc_log_available",
            "1 while the log can be read and written (0: /readyz answers 503)",
            value=1 if health.available else 0,
        )
        yield GaugeMetricFamily(
            "smc_log_fatal",
            "1 once the log was found corrupt (/healthz fails)",
            value=0 if health.fatal is None else 1,
        )
        yield GaugeMetricFamily(
            "smc_log_applied_events",
            "Events applied to the projections by this process",
            value=runner.applied,
        )
        expiry = self.m.earliest_expiry()
        if expiry is not None:
            yield GaugeMetricFamily(
                "smc_certificate_earliest_expiry_seconds",
                "Seconds until the earliest active workload certificate expires",
                value=expiry,
            )


class ServeMetrics:
    """The metrics of one serve process (see the module docstring)."""

    def __init__(self, runner: ProjectionRunner, *, process: bool = True) -> None:
        self.runner = runner
        self.registry = CollectorRegistry()
        reg = self.registry
        self.append_seconds = Histogram(
            "smc_log_append_seconds",
            "Duration of one durable append (a group commit round)",
            buckets=_LATENCY,
            registry=reg,
        )
        self.append_errors = Counter(
            "smc_log_append_errors",
            "Appends that failed, by reason",
            ["reason"],
            registry=reg,
        )
        for reason in ("unavailable", "full", "corrupt", "other"):
            self.append_errors.labels(reason)
        self.group = Histogram(
            "smc_api_group_commit_requests",
            "Change requests carried by one durable append",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=reg,
        )
        self.certs = {
            CertificateIssued.TYPE: Counter(
                "smc_certificates_issued", "Workload certificates issued", registry=reg
            ),
            CertificateRenewed.TYPE: Counter(
                "smc_certificates_renewed", "Workload certificates renewed", registry=reg
            ),
            CertificateRevoked.TYPE: Counter(
                "smc_certificates_revoked", "Workload certificates revoked", registry=reg
            ),
        }
        self.http_requests = Counter(
            "smc_http_requests",
            "HTTP API requests by route pattern, method and status",
            ["route", "method", "status"],
            registry=reg,
        )
        self.http_seconds = Histogram(
            "smc_http_request_duration_seconds",
            "HTTP API request duration by route pattern and method",
            ["route", "method"],
            buckets=_LATENCY,
            registry=reg,
        )
        reg.register(_LogCollector(self))
        if process:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
        runner.listeners.append(self._on_events)
        runner.health.append_observers.append(self._on_append)

    # -- feeds ------------------------------------------------------------------------------
    def _on_events(self, events: list[Event]) -> None:
        certs = self.certs
        for ev in events:
            c = certs.get(type(ev).TYPE)
            if c is not None:
                c.inc()
            elif isinstance(ev, ProxyCertificateIssued):  # agents: one certificate per proxy
                certs[
                    CertificateRenewed.TYPE if ev.previous_serial else CertificateIssued.TYPE
                ].inc()
            elif isinstance(ev, ProxyCertificateRevoked):
                certs[CertificateRevoked.TYPE].inc()

    def _on_append(self, seconds: float, requests: int, error: BaseException | None) -> None:
        if error is None:
            self.append_seconds.observe(seconds)
            self.group.observe(requests)
            return
        if isinstance(error, LogFull):
            reason = "full"
        elif isinstance(error, LogUnavailable):
            reason = "unavailable"
        elif isinstance(error, LogCorrupt):
            reason = "corrupt"
        else:
            reason = "other"
        self.append_errors.labels(reason).inc()

    def earliest_expiry(self) -> float | None:
        certs = next((p for p in self.runner.projections if isinstance(p, CertsProjection)), None)
        if certs is None:
            return None
        soonest: datetime | None = None
        for identity, serial in certs.current.items():
            rec = certs.certs.get(identity, {}).get(serial)
            if rec is None or rec.status != "active":
                continue
            if soonest is None or rec.not_after < soonest:
                soonest = rec.not_after
        for proxy, serial in certs.proxy_current.items():  # agents' per-proxy certificates
            prec = certs.proxy_certs.get(proxy, {}).get(serial)
            if prec is None or prec.status != "active":
                continue
            if soonest is None or prec.not_after < soonest:
                soonest = prec.not_after
        if soonest is None:
            return None
        return (soonest - datetime.now(UTC)).total_seconds()

    # -- HTTP -------------------------------------------------------------------------------
    def middleware(self) -> Any:
        """aiohttp middleware counting requests by route pattern (add it first)."""
        requests, seconds = self.http_requests, self.http_seconds

        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                info = request.match_info.route.resource
                route = info.canonical if info is not None else "unmatched"
                requests.labels(route, request.method, str(status)).inc()
                seconds.labels(route, request.method).observe(time.perf_counter() - started)

        return count


def zero_ads_series(xds_metrics: Any) -> None:
    """Create the ADS server's per-type and per-kind series at zero (see module docstring)."""
    from smc.xds._types import SHORT_NAMES

    for type_url in SHORT_NAMES:
        xds_metrics.for_type(type_url)
    for kind in ("sotw", "delta"):
        xds_metrics.connected.labels(kind)
