"""The reflector: list + watch of one Kubernetes resource with a cache of what it has seen.

Role: :class:`_Reflector` lists (paginated), watches from the listed ``resourceVersion`` with
bookmarks, resumes after a cut connection and relists after ``410 Gone``, handing each change
to the informers' handler (see :mod:`smc.informers._kube`).
Concurrency: one reflector is one task on the informers' asyncio loop; its cache is touched
only from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from smc.informers._kube_api import KubeEndpoint, KubeResource, _Gone, _Transient

log = logging.getLogger("smc.informers.kube")


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
