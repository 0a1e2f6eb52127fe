"""Kubernetes informers: list + watch of Namespaces, Services, EndpointSlices, Pods,
ServiceAccounts and the SMI custom resources, turned into registry and policy events.

Role: a :class:`KubeInformers` runs one reflector per resource against the apiserver's REST API
(aiohttp, bearer token, the cluster CA). A reflector lists (paginated), then watches from the
listed ``resourceVersion`` with bookmarks; after a cut connection it resumes the watch from the
last version it saw (bookmarks keep that recent); on ``410 Gone`` (history compacted) it lists
again and derives the changes it missed by comparing the new listing with its cache (deletions
included). Only namespaces labelled ``smc.dev/monitored=true`` (configurable) are in the mesh:
objects elsewhere are ignored; when a namespace joins, its cached objects are emitted, when it
leaves, they are removed.

Mapping (every event carries the whole state of its aggregate):

- Service -> ``ServiceUpserted`` (backing ``kubernetes``; a port's protocol is ``udp`` for UDP,
  else taken from ``appProtocol`` or the port name's prefix ``http``/``grpc``/``tcp``, else
  ``http``; a named ``targetPort`` falls back to the service port) / ``ServiceRemoved``.
- EndpointSlices of a service (label ``kubernetes.io/service-name``) -> one
  ``EndpointsChanged`` with the union of its slices' endpoints (workload ``ns/pod`` from the
  ``targetRef``; ``ready`` unknown counts as ready).
- Pod with an IP, not finished and not being deleted -> ``WorkloadJoined(kind="pod")``
  (identity: its service account, ``default`` when unset); otherwise ``WorkloadLeft``.
- ServiceAccount -> ``ServiceAccountUpserted`` / ``ServiceAccountRemoved``.
- TrafficTarget, HTTPRouteGroup, TCPRoute, UDPRoute, TrafficSplit -> ``SmiResourceApplied``
  with the canonical manifest of :func:`smc.smi.to_manifest` / ``SmiResourceDeleted``. The CRDs
  convert with strategy None, so the version the author wrote is read from the newest
  ``managedFields`` entry and the object parsed as that version; an invalid one is logged
  (document, field, reason) and skipped, never fatal.

Event ids are deterministic, so several replicas watching the same cluster append each change
once: ``deterministic_id("k8s", uid, resourceVersion)`` for a change,
``deterministic_id("k8s", uid, last_seen_resourceVersion, "deleted")`` for a deletion (the same
whether seen as a watch event or found missing on a relist), and
``deterministic_id("k8s", "ns-joined"|"ns-left", ns_uid, ns_resourceVersion, aggregate)`` for
what a namespace's membership change emits. An event whose content equals the last one emitted
for its aggregate is not emitted again (a pod status change that moves nothing, a relist).

Concurrency: every reflector is a task on one asyncio loop; caches and membership are touched
only from that loop, between awaits. Emission to the :class:`EventSink` is awaited in order, so
one resource's events reach the log in watch order; a failing sink is retried, never skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp

from smc.events import (
    Endpoint,
    EndpointsChanged,
    Event,
    ServiceAccountRemoved,
    ServiceAccountUpserted,
    ServicePort,
    ServiceRemoved,
    ServiceUpserted,
    SmiResourceApplied,
    SmiResourceDeleted,
    WorkloadJoined,
    WorkloadLeft,
    WorkloadPort,
    deterministic_id,
    make_event,
)
from smc.informers._kube_api import (
    CORE_RESOURCES,
    MEMBER_LABEL,
    NAMESPACES,
    SMI_RESOURCES,
    EventSink,
    KubeConfigError,
    KubeEndpoint,
    KubeResource,
    LogSink,
)
from smc.informers._kube_mapping import (
    _authored_api_version,
    _dedupe_aggregates,
    _fingerprint,
    _labels,
    _port_protocol,
)
from smc.informers._kube_reflector import Change, WatchStats, _key, _Reflector, _rv
from smc.projections import canonical_json
from smc.smi import ManifestErrors, parse_manifest, to_manifest

__all__ = [
    "CORE_RESOURCES",
    "MEMBER_LABEL",
    "SMI_RESOURCES",
    "EventSink",
    "KubeConfigError",
    "KubeEndpoint",
    "KubeInformers",
    "KubeResource",
    "LogSink",
    "WatchStats",
]

log = logging.getLogger("smc.informers.kube")


class KubeInformers:
    """Watches one cluster and emits mesh events; ``run`` until ``stop`` is set."""

    def __init__(
        self,
        *,
        endpoint: KubeEndpoint,
        sink: EventSink,
        member_label: str = MEMBER_LABEL,
        member_value: str = "true",
        smi: bool = True,
        source: str = "k8s",
        actor: str = "k8s-informer",
        watch_timeout: int = 300,
        backoff: float = 0.5,
    ) -> None:
        self.endpoint = endpoint
        self.sink = sink
        self.member_label = member_label
        self.member_value = member_value
        self.source = source
        self.actor = actor
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.resources: tuple[KubeResource, ...] = CORE_RESOURCES + (SMI_RESOURCES if smi else ())
        #: Set once every resource has been listed once.
        self.synced = asyncio.Event()
        self.members: dict[str, tuple[str, str]] = {}  # namespace -> (uid, resourceVersion)
        self.emitted = 0
        self._reflectors: dict[str, _Reflector] = {}
        self._last: dict[str, tuple[Any, ...]] = {}

    @property
    def stats(self) -> dict[str, WatchStats]:
        """Per-kind reflector counters."""
        return {kind: r.stats for kind, r in self._reflectors.items()}

    async def run(self, *, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:

            def reflector(resource: KubeResource) -> _Reflector:
                r = _Reflector(
                    resource=resource,
                    endpoint=self.endpoint,
                    session=session,
                    handler=self._handle,
                    watch_timeout=self.watch_timeout,
                    backoff=self.backoff,
                )
                self._reflectors[resource.kind] = r
                return r

            ns = reflector(NAMESPACES)
            tasks: list[asyncio.Future[Any]] = [
                asyncio.create_task(ns.run(stop), name="k8s-Namespace")
            ]
            try:
                # Membership first: objects are only translated once it is known.
                waiter = asyncio.ensure_future(ns.synced.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if stop.is_set():
                    return
                others = [reflector(res) for res in self.resources]
                tasks += [
                    asyncio.create_task(r.run(stop), name=f"k8s-{r.resource.kind}") for r in others
                ]
                sync = asyncio.ensure_future(asyncio.gather(*(r.synced.wait() for r in others)))
                sync.add_done_callback(lambda f: None if f.cancelled() else self.synced.set())
                tasks.append(sync)
                await asyncio.gather(*tasks)
            finally:
                stop.set()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    # -- emission ----------------------------------------------------------------------------
    async def _emit(self, events: Sequence[Event]) -> None:
        fresh = [e for e in events if self._last.get(e.aggregate) != _fingerprint(e)]
        if not fresh:
            return
        delay = self.backoff
        while True:
            try:
                await self.sink.emit(fresh)
                break
            except Exception as exc:  # the log is down: keep the order, retry
                log.warning(
                    "emitting %d events failed (%s); retrying in %.1fs", len(fresh), exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        for e in fresh:
            self._last[e.aggregate] = _fingerprint(e)
        self.emitted += len(fresh)

    def _event(self, cls: type[Event], event_id: str, **payload: Any) -> Event:
        return make_event(cls, source=self.source, actor=self.actor, event_id=event_id, **payload)

    # -- dispatch ----------------------------------------------------------------------------
    async def _handle(
        self,
        resource: KubeResource,
        change: Change,
        obj: dict[str, Any],
        prev: dict[str, Any] | None,
    ) -> None:
        if resource.kind == "Namespace":
            await self._namespace(change, obj)
            return
        meta = obj.get("metadata") or {}
        ns = str(meta.get("namespace") or "")
        if ns not in self.members:
            return
        if change == "delete":
            last = prev if prev is not None else obj
            cause = deterministic_id("k8s", str(meta.get("uid", "")), _rv(last), "deleted")
        else:
            cause = deterministic_id("k8s", str(meta.get("uid", "")), _rv(obj))
        await self._emit(self._translate(resource, change, obj, cause))

    async def _namespace(self, change: Change, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        member = (
            change == "upsert"
            and _labels(meta).get(self.member_label) == self.member_value
            and not meta.get("deletionTimestamp")
        )
        was = name in self.members
        if member:
            self.members[name] = (str(meta.get("uid", "")), _rv(obj))
        else:
            self.members.pop(name, None)
        if member == was:
            return
        tag = "ns-joined" if member else "ns-left"
        ns_uid, ns_rv = str(meta.get("uid", "")), _rv(obj)
        for r in list(self._reflectors.values()):
            if r.resource.kind == "Namespace":
                continue
            objs = [
                o for o in r.cache.values() if (o.get("metadata") or {}).get("namespace") == name
            ]
            events: list[Event] = []
            for o in sorted(objs, key=_key):
                for e in self._translate(r.resource, "upsert" if member else "delete", o, ""):
                    events.append(
                        dataclasses.replace(
                            e,
                            envelope=dataclasses.replace(
                                e.envelope,
                                event_id=deterministic_id("k8s", tag, ns_uid, ns_rv, e.aggregate),
                            ),
                        )
                    )
            if not member:  # removals only for what was emitted
                events = [e for e in events if e.aggregate in self._last]
            await self._emit(_dedupe_aggregates(events))

    # -- translation ---------------------------------------------------------------------------
    def _translate(
        self, resource: KubeResource, change: Change, obj: dict[str, Any], event_id: str
    ) -> list[Event]:
        meta = obj.get("metadata") or {}
        ns = str(meta.get("namespace") or "")
        name = str(meta.get("name") or "")
        kind = resource.kind
        if kind == "ServiceAccount":
            if change == "delete":
                return self._removal(ServiceAccountRemoved, event_id, namespace=ns, name=name)
            return [self._event(ServiceAccountUpserted, event_id, namespace=ns, name=name)]
        if kind == "Service":
            if change == "delete":
                return self._removal(ServiceRemoved, event_id, namespace=ns, name=name)
            return [self._service(obj, event_id, ns, name)]
        if kind == "EndpointSlice":
            service = _labels(meta).get("kubernetes.io/service-name")
            if not service:
                return []
            return [self._endpoints(ns, service, event_id)]
        if kind == "Pod":
            return self._pod(change, obj, event_id, ns, name)
        if change == "delete":
            return self._removal(SmiResourceDeleted, event_id, kind=kind, namespace=ns, name=name)
        return self._smi(resource, obj, event_id, ns, name)

    def _removal(self, cls: type[Event], event_id: str, **payload: Any) -> list[Event]:
        e = self._event(cls, event_id, **payload)
        return [e] if e.aggregate in self._last else []

    def _service(self, obj: dict[str, Any], event_id: str, ns: str, name: str) -> Event:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        ports = []
        for p in spec.get("ports") or []:
            port = int(p.get("port") or 0)
            target = p.get("targetPort")
            ports.append(
                ServicePort(
                    name=str(p.get("name") or ""),
                    port=port,
                    protocol=_port_protocol(p.get("protocol"), p.get("appProtocol"), p.get("name")),
                    target_port=target if isinstance(target, int) else port,
                )
            )
        return self._event(
            ServiceUpserted,
            event_id,
            namespace=ns,
            name=name,
            ports=tuple(ports),
            backing="kubernetes",
            selector={str(k): str(v) for k, v in (spec.get("selector") or {}).items()},
            labels=_labels(meta),
        )

    def _endpoints(self, ns: str, service: str, event_id: str) -> Event:
        slices = self._reflectors["EndpointSlice"].cache.values()
        found: set[Endpoint] = set()
        for s in slices if ns in self.members else ():
            meta = s.get("metadata") or {}
            if (
                meta.get("namespace") != ns
                or _labels(meta).get("kubernetes.io/service-name") != service
            ):
                continue
            if s.get("addressType") not in ("IPv4", "IPv6"):
                continue
            ports = [int(p["port"]) for p in s.get("ports") or [] if p.get("port")]
            for ep in s.get("endpoints") or []:
                ref = ep.get("targetRef") or {}
                workload = (
                    f"{ns}/{ref['name']}" if ref.get("kind") == "Pod" and ref.get("name") else None
                )
                ready = (ep.get("conditions") or {}).get("ready") is not False
                for address in ep.get("addresses") or []:
                    for port in ports:
                        found.add(
                            Endpoint(
                                address=str(address), port=port, workload=workload, ready=ready
                            )
                        )
        endpoints = tuple(
            sorted(found, key=lambda e: (e.address, e.port, e.workload or "", e.ready))
        )
        return self._event(
            EndpointsChanged, event_id, namespace=ns, service=service, endpoints=endpoints
        )

    def _pod(
        self, change: Change, obj: dict[str, Any], event_id: str, ns: str, name: str
    ) -> list[Event]:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ip = status.get("podIP")
        live = (
            change == "upsert"
            and bool(ip)
            and status.get("phase") not in ("Succeeded", "Failed")
            and not meta.get("deletionTimestamp")
        )
        if not live:
            return self._removal(WorkloadLeft, event_id, kind="pod", namespace=ns, name=name)
        ports = []
        for c in spec.get("containers") or []:
            for p in c.get("ports") or []:
                ports.append(
                    WorkloadPort(
                        name=str(p.get("name") or ""),
                        port=int(p.get("containerPort") or 0),
                        protocol=_port_protocol(p.get("protocol"), None, p.get("name")),
                    )
                )
        return [
            self._event(
                WorkloadJoined,
                event_id,
                kind="pod",
                namespace=ns,
                name=name,
                address=str(ip),
                service_account=str(spec.get("serviceAccountName") or "default"),
                labels=_labels(meta),
                ports=tuple(ports),
            )
        ]

    def _smi(
        self, resource: KubeResource, obj: dict[str, Any], event_id: str, ns: str, name: str
    ) -> list[Event]:
        meta = obj.get("metadata") or {}
        doc = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
        doc["apiVersion"] = _authored_api_version(obj) or resource.api_version
        doc["kind"] = resource.kind
        doc["metadata"] = {"name": name, "namespace": ns}
        if meta.get("labels"):
            doc["metadata"]["labels"] = _labels(meta)
        document = f"{resource.kind}/{ns}/{name}@{_rv(obj)}"
        try:
            parsed = parse_manifest(doc, document=document)
        except ManifestErrors as exc:
            log.warning("%s is not valid SMI and is ignored: %s", document, exc)
            return []
        except Exception as exc:  # a parser bug must not stop the informer
            log.error("%s could not be parsed (%s: %s); ignored", document, type(exc).__name__, exc)
            return []
        manifest = to_manifest(parsed)
        return [
            self._event(
                SmiResourceApplied,
                event_id,
                kind=resource.kind,
                api_version=str(manifest["apiVersion"]),
                namespace=ns,
                name=name,
                manifest_json=canonical_json(manifest),
            )
        ]
