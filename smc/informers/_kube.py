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
import base64
import contextlib
import dataclasses
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import aiohttp
import yaml

from smc.events import (
    Endpoint,
    EndpointsChanged,
    Event,
    EventLog,
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
from smc.informers._errors import InformersError
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

#: Label that puts a namespace in the mesh (value ``true``).
MEMBER_LABEL = "smc.dev/monitored"
_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(InformersError):
    """No usable apiserver address or credentials (kubeconfig, in-cluster files)."""


class _Gone(Exception):
    """The resourceVersion asked for was compacted away (HTTP 410 / watch ERROR 410)."""


class _Transient(Exception):
    """A failure worth retrying (apiserver unavailable, bad gateway, throttled...)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class KubeEndpoint:
    """Where the apiserver is and how to authenticate (bearer token, CA file)."""

    host: str
    token: str = field(repr=False)
    ca_file: str | None = None
    ca_data: str | None = field(default=None, repr=False)  # PEM, instead of ca_file

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)

    @classmethod
    def in_cluster(cls) -> KubeEndpoint:
        """From the pod's service-account files and ``KUBERNETES_SERVICE_HOST/PORT``."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token = _SA_DIR / "token"
        if not host or not token.is_file():
            raise KubeConfigError(
                f"not running in a pod: KUBERNETES_SERVICE_HOST or {token} is missing"
            )
        h = f"[{host}]" if ":" in host else host
        return cls(
            host=f"https://{h}:{port}",
            token=token.read_text().strip(),
            ca_file=str(_SA_DIR / "ca.crt"),
        )

    @classmethod
    def from_kubeconfig(cls, path: str | Path, *, context: str | None = None) -> KubeEndpoint:
        """From a kubeconfig whose user has a ``token`` (or ``tokenFile``)."""
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"{path}: cannot read kubeconfig: {exc}") from exc
        if not isinstance(doc, dict):
            raise KubeConfigError(f"{path}: a kubeconfig must be a mapping")

        def named(section: str, name: object) -> dict[str, Any]:
            for item in doc.get(section) or []:
                if isinstance(item, dict) and item.get("name") == name:
                    value = item.get(section[:-1])
                    if isinstance(value, dict):
                        return value
            raise KubeConfigError(f"{path}: {section[:-1]} {name!r} not found")

        ctx = named("contexts", context or doc.get("current-context"))
        cluster = named("clusters", ctx.get("cluster"))
        user = named("users", ctx.get("user"))
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = Path(str(user["tokenFile"])).read_text().strip()
        if not isinstance(token, str) or not token:
            raise KubeConfigError(f"{path}: user {ctx.get('user')!r} has no bearer token")
        server = cluster.get("server")
        if not isinstance(server, str) or not server.startswith("https://"):
            raise KubeConfigError(f"{path}: cluster server {server!r} is not an https URL")
        ca = cluster.get("certificate-authority")
        ca_data = None
        if cluster.get("certificate-authority-data"):
            try:
                ca_data = base64.b64decode(str(cluster["certificate-authority-data"])).decode()
            except ValueError as exc:
                raise KubeConfigError(f"{path}: certificate-authority-data: {exc}") from exc
        return cls(
            host=server.rstrip("/"),
            token=token,
            ca_file=str(ca) if ca and not ca_data else None,
            ca_data=ca_data,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class KubeResource:
    """One watched resource type: ``kind`` and where its collection lives."""

    kind: str
    group: str
    version: str
    plural: str

    @property
    def path(self) -> str:
        """Cluster-wide collection path, e.g. ``/api/v1/pods``."""
        if not self.group:
            return f"/api/{self.version}/{self.plural}"
        return f"/apis/{self.group}/{self.version}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


NAMESPACES = KubeResource(kind="Namespace", group="", version="v1", plural="namespaces")
CORE_RESOURCES: tuple[KubeResource, ...] = (
    KubeResource(kind="ServiceAccount", group="", version="v1", plural="serviceaccounts"),
    KubeResource(kind="Service", group="", version="v1", plural="services"),
    KubeResource(
        kind="EndpointSlice", group="discovery.k8s.io", version="v1", plural="endpointslices"
    ),
    KubeResource(kind="Pod", group="", version="v1", plural="pods"),
)
#: The SMI kinds, each watched at its newest (storage) version.
SMI_RESOURCES: tuple[KubeResource, ...] = (
    KubeResource(
        kind="TrafficTarget",
        group="access.smi-spec.io",
        version="v1alpha3",
        plural="traffictargets",
    ),
    KubeResource(
        kind="HTTPRouteGroup",
        group="specs.smi-spec.io",
        version="v1alpha4",
        plural="httproutegroups",
    ),
    KubeResource(
        kind="TCPRoute", group="specs.smi-spec.io", version="v1alpha4", plural="tcproutes"
    ),
    KubeResource(
        kind="UDPRoute", group="specs.smi-spec.io", version="v1alpha4", plural="udproutes"
    ),
    KubeResource(
        kind="TrafficSplit", group="split.smi-spec.io", version="v1alpha4", plural="trafficsplits"
    ),
    # Open Service Mesh's policy kinds (deploy/k8s/crds/policy-*.yaml).
    *(
        KubeResource(
            kind=kind, group="policy.openservicemesh.io", version="v1alpha1", plural=plural
        )
        for kind, plural in (
            ("Egress", "egresses"),
            ("IngressBackend", "ingressbackends"),
            ("Retry", "retries"),
            ("UpstreamTrafficSetting", "upstreamtrafficsettings"),
        )
    ),
)


@runtime_checkable
class EventSink(Protocol):
    """Receives the informers' events, in order; returns once they are durable."""

    async def emit(self, events: Sequence[Event]) -> None: ...


class LogSink:
    """Appends to an :class:`smc.events.EventLog` (in a worker thread)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    async def emit(self, events: Sequence[Event]) -> None:
        if events:
            await asyncio.to_thread(self.log.append, list(events))


@dataclass(kw_only=True, slots=True)
class WatchStats:
    """Counters of one reflector (for tests, metrics and debugging)."""

    lists: int = 0
    relists_after_gone: int = 0
    watches: int = 0
    resumes: int = 0
    bookmarks: int = 0
    errors: int = 0
    changes: int = 0
    last_error: str = ""


Change = Literal["upsert", "delete"]
Handler = Callable[[KubeResource, Change, dict[str, Any], dict[str, Any] | None], Awaitable[None]]


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or ""
    return f"{ns}/{meta.get('name', '')}"


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class _Reflector:
    """List + watch of one resource, keeping a cache of the objects it has seen."""

    def __init__(
        self,
        *,
        resource: KubeResource,
        endpoint: KubeEndpoint,
        session: aiohttp.ClientSession,
        handler: Handler,
        watch_timeout: int,
        backoff: float,
        page_size: int = 500,
    ) -> None:
        self.resource = resource
        self.endpoint = endpoint
        self.session = session
        self.handler = handler
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.page_size = page_size
        self.cache: dict[str, dict[str, Any]] = {}
        self.rv: str | None = None
        self.synced = asyncio.Event()
        self.stats = WatchStats()
        self._ssl = endpoint.ssl_context()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.endpoint.token}", "Accept": "application/json"}

    async def run(self, stop: asyncio.Event) -> None:
        delay = self.backoff
        while not stop.is_set():
            try:
                if self.rv is None:
                    await self._list()
                await self._watch(stop)
                delay = self.backoff
            except _Gone:
                self.stats.relists_after_gone += 1
                log.info(
                    "%s: resourceVersion %s is gone (410): relisting", self.resource.kind, self.rv
                )
                self.rv = None
            except (aiohttp.ClientError, TimeoutError, _Transient, ValueError) as exc:
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: %s; retrying in %.1fs", self.resource.kind, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                delay = min(delay * 2, 10.0)
                if self.rv is not None:
                    self.stats.resumes += 1

    async def _get_json(self, url: str, params: dict[str, str]) -> dict[str, Any]:
        async with self.session.get(
            url,
            params=params,
            headers=self._headers(),
            ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            body = await resp.read()
            if resp.status == 410:
                raise _Gone(body[:200])
            if resp.status != 200:
                raise _Transient(f"GET {self.resource.path} answered {resp.status}: {body[:300]!r}")
            data = json.loads(body)
            if not isinstance(data, dict):
                raise _Transient(f"GET {self.resource.path}: not a JSON object")
            return data

    async def _list(self) -> None:
        url = self.endpoint.host + self.resource.path
        items: dict[str, dict[str, Any]] = {}
        cont = ""
        rv = ""
        while True:
            params = {"limit": str(self.page_size)}
            if cont:
                params["continue"] = cont
            try:
                page = await self._get_json(url, params)
            except _Gone:  # the continue token expired: start the listing over
                items.clear()
                cont = ""
                continue
            for item in page.get("items") or []:
                item.setdefault("apiVersion", self.resource.api_version)
                item.setdefault("kind", self.resource.kind)
                items[_key(item)] = item
            meta = page.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or "")
            cont = str(meta.get("continue") or "")
            if not cont:
                break
        self.stats.lists += 1
        old = self.cache
        self.cache = items
        for key, gone in old.items():
            if key not in items:
                await self._changed("delete", gone, gone)
        for key, obj in items.items():
            before = old.get(key)
            if before is None or _rv(before) != _rv(obj):
                await self._changed("upsert", obj, before)
        self.rv = rv
        self.synced.set()

    async def _changed(
        self, change: Change, obj: dict[str, Any], prev: dict[str, Any] | None
    ) -> None:
        self.stats.changes += 1
        try:
            await self.handler(self.resource, change, obj, prev)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one odd object must not stop the watch
            self.stats.errors += 1
            self.stats.last_error = f"{_key(obj)}: {type(exc).__name__}: {exc}"
            log.exception("%s %s: translating the %s failed", self.resource.kind, _key(obj), change)

    async def _watch(self, stop: asyncio.Event) -> None:
        assert self.rv is not None
        params = {
            "watch": "true",
            "resourceVersion": self.rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout),
        }
        self.stats.watches += 1
        async with self.session.get(
            self.endpoint.host + self.resource.path,
            params=params,
            headers=self._headers(),
            ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=10, sock_read=self.watch_timeout + 30
            ),
        ) as resp:
            if resp.status == 410:
                raise _Gone()
            if resp.status != 200:
                body = await resp.read()
                raise _Transient(
                    f"watch {self.resource.path} answered {resp.status}: {body[:300]!r}"
                )
            stopper = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    line_task = asyncio.ensure_future(resp.content.readline())
                    done, _ = await asyncio.wait(
                        {line_task, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if stopper in done:
                        line_task.cancel()
                        return
                    line = line_task.result()
                    if not line:
                        return  # the server ended the watch (timeoutSeconds): watch again
                    await self._watch_event(json.loads(line))
            finally:
                stopper.cancel()

    async def _watch_event(self, ev: Mapping[str, Any]) -> None:
        kind = ev.get("type")
        obj = ev.get("object")
        if not isinstance(obj, dict):
            raise _Transient(f"watch event without an object: {str(ev)[:200]}")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(obj.get("message"))
            raise _Transient(f"watch error: {obj.get('code')} {obj.get('message')}")
        if kind == "BOOKMARK":
            self.stats.bookmarks += 1
            self.rv = _rv(obj) or self.rv
            return
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)
        key = _key(obj)
        if kind in ("ADDED", "MODIFIED"):
            prev = self.cache.get(key)
            self.cache[key] = obj
            self.rv = _rv(obj) or self.rv
            await self._changed("upsert", obj, prev)
        elif kind == "DELETED":
            prev = self.cache.pop(key, None)
            self.rv = _rv(obj) or self.rv
            await self._changed("delete", obj, prev)
        else:
            raise _Transient(f"unknown watch event type {kind!r}")


def _fingerprint(event: Event) -> tuple[Any, ...]:
    return (
        event.TYPE,
        *(
            (f.name, repr(getattr(event, f.name)))
            for f in dataclasses.fields(event)
            if f.name != "envelope"
        ),
    )


def _labels(meta: Mapping[str, Any]) -> dict[str, str]:
    raw = meta.get("labels") or {}
    return {str(k): str(v) for k, v in raw.items()}


def _port_protocol(protocol: object, app_protocol: object, name: object) -> str:
    if str(protocol or "TCP").upper() == "UDP":
        return "udp"
    for hint in (app_protocol, name):
        h = str(hint or "").lower().rsplit("/", 1)[-1]
        for proto in ("grpc", "http", "tcp"):
            if h == proto or h.startswith(proto + "-"):
                return proto
        if h in ("h2c", "http2", "https"):
            return "http"
    return "http"


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


def _authored_api_version(obj: Mapping[str, Any]) -> str | None:
    """The apiVersion of the newest write to the object's main resource (``managedFields``)."""
    best: tuple[str, int] | None = None
    found: str | None = None
    for i, entry in enumerate((obj.get("metadata") or {}).get("managedFields") or []):
        if not isinstance(entry, dict) or entry.get("subresource"):
            continue
        if entry.get("operation") not in ("Update", "Apply"):
            continue
        rank = (str(entry.get("time") or ""), i)
        if best is None or rank > best:
            best = rank
            found = str(entry.get("apiVersion") or "") or None
    return found


def _dedupe_aggregates(events: list[Event]) -> list[Event]:
    """Keep the last event per aggregate (a namespace join translates each slice of a service
    into the same EndpointsChanged)."""
    last: dict[str, Event] = {}
    for e in events:
        last.pop(e.aggregate, None)
        last[e.aggregate] = e
    return list(last.values())
