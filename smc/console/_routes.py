"""The console's HTTP routes: the static page and the JSON it reads.

Role: :func:`mount_console` adds to the API application of ``smc serve``

- ``GET /console/`` and ``/console/static/*``: the page (HTML, JS, CSS, the vendored graph
  library and its licence); no mesh data, so it loads before the browser has a credential;
- ``GET /v1/console/graph[?at=SEQ|TIME][&namespace=NS]``: the mesh map now, or as it was after
  timeline entry ``SEQ`` (or at ``TIME``), rebuilt from the log;
- ``GET /v1/console/timeline?offset&limit&actor&kind&namespace&since&until``: a page of changes;
  ``/v1/console/timeline/facets``: the actors, kinds and namespaces to filter by;
- ``GET /v1/console/events/{seq}``: one change with its payload and diff;
- ``GET /v1/console/why?from=NS/SA&to=NS/SA[&path&method&port&at]``: allow or deny, and the
  changes that decided it;
- ``GET /v1/console/proxy?node=ID``: a proxy's current config (keys redacted) and ADS state;
- ``GET /v1/console/stream``: server-sent events (``rows``: new timeline entries, ``graph``: the
  map changed), fed from the log tail.

The data routes are ordinary API routes: the API's authentication and authorization apply to
them as to every read.
Concurrency: handlers run on the serve loop; log reads and rebuilds run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from aiohttp import web

from smc.api._http import _err, _errors
from smc.api._views import policy_check
from smc.audit import access_history, proxy_config_at
from smc.console._graph import ProxyState, mesh_graph
from smc.console._timeline import Timeline, TimelineQuery
from smc.console._travel import PastState, TimeMachine
from smc.events import ChainVerifier, EventLog, Position
from smc.projections import ProjectionRunner
from smc.projections._policyview import PolicyView
from smc.xds._metrics_sink import EdgeTraffic

__all__ = ["ConsoleHub", "mount_console"]

_IDENTITY = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
_STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".txt": "text/plain",
    ".svg": "image/svg+xml",
}
_MAX_PAGE = 1000


def _bad(field: str, reason: str, status: int = 400) -> web.Response:
    """The API's error answer, naming ``field``."""
    return _errors(status, _err(reason, field=field))


def _time_ms(text: str, field: str) -> int:
    t = text.strip()
    if t.lstrip("-").isdigit():
        return int(t)
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise web.HTTPBadRequest(
            reason=f"{field}: {text!r} is not a time (ISO 8601 or milliseconds)"
        ) from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name}: {raw!r} is not a number") from None
    if not lo <= v <= hi:
        raise web.HTTPBadRequest(reason=f"{name}: must be between {lo} and {hi}")
    return v


class ConsoleHub:
    """The console's live state: the timeline, the time machine and the SSE subscribers."""

    def __init__(
        self,
        *,
        runner: ProjectionRunner,
        view: PolicyView,
        open_log: Callable[[], EventLog],
        proxies: Callable[[], Iterable[ProxyState]] = lambda: (),
        traffic: Callable[[], Iterable[EdgeTraffic]] = lambda: (),
        config_dump: Callable[[str], dict[str, Any] | None] | None = None,
        verifier: Callable[[], ChainVerifier | None] = lambda: None,
    ) -> None:
        self.runner = runner
        self.view = view
        self.proxies = proxies
        self.traffic = traffic
        self.config_dump = config_dump
        self.timeline = Timeline(open_log())
        self.machine = TimeMachine(open_log, verifier=verifier)
        self._subscribers: set[asyncio.Queue[tuple[str, Any]]] = set()
        self._dirty = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._warming: asyncio.Task[None] | None = None
        runner.listeners.append(lambda _events: self._dirty.set())

    # -- feeding ----------------------------------------------------------------------------
    async def refresh(self) -> range:
        """Read what the log gained since the last refresh into the timeline."""
        async with self._refresh_lock:
            rows, pos = await asyncio.to_thread(self.timeline.read_new)
            return self.timeline.extend(rows, pos)

    async def run(self) -> None:
        """Follow the log: refresh on every applied batch (and every few seconds), tell
        subscribers. Once the projections are current, the map is built once so the first
        page does not pay for evaluating the policy set."""
        self._dirty.set()
        self._warming = asyncio.create_task(self._warm())
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=2.0)
            self._dirty.clear()
            try:
                added = await self.refresh()
            except Exception as exc:  # the log is unavailable: say so, keep following
                self._publish("error", {"reason": f"cannot read the log: {exc}"})
                await asyncio.sleep(1.0)
                continue
            if len(added):
                tl = self.timeline
                self._publish(
                    "rows",
                    {
                        "total": len(tl.rows),
                        "resorted": added.start < len(tl.rows) - len(added),
                        "items": [tl.rows[i].to_json(i) for i in added[-200:]],
                    },
                )
                self._publish("graph", {"applied": self.runner.applied})

    async def _warm(self) -> None:
        await self.runner.caught_up.wait()
        mesh_graph(self.view)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def close(self) -> None:
        for task in (self._task, self._warming):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.timeline.log.close()

    def _publish(self, kind: str, data: Any) -> None:
        for q in list(self._subscribers):
            if q.full():  # a slow reader: it re-reads everything instead of missing rows
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        q.get_nowait()
                q.put_nowait(("resync", {}))
            else:
                q.put_nowait((kind, data))

    # -- resolving ``at`` -------------------------------------------------------------------
    async def _past(self, at: str | None) -> tuple[PastState, dict[str, Any]] | None:
        """The state after timeline entry ``at`` (a number) or at time ``at``; None: now."""
        if at is None or at == "":
            return None
        await self.refresh()
        tl = self.timeline
        if at.isdigit() and len(at) < 12:
            seq = int(at)
            if seq >= len(tl.rows):
                raise web.HTTPBadRequest(reason=f"at: no timeline entry {seq}")
        else:
            seq = tl.seq_at_time(_time_ms(at, "at"))
        position = tl.position_after(seq)
        state = await asyncio.to_thread(self.machine.state_at, position)
        info = {
            "seq": seq,
            "position": position.to_json(),
            "events": state.runner.applied,
            "at": tl.rows[seq].to_json(seq)["at"] if seq >= 0 else None,
        }
        return state, info

    async def _past_view(self, at: str | None) -> tuple[PolicyView, dict[str, Any] | None]:
        past = await self._past(at)
        return (self.view, None) if past is None else (past[0].view, past[1])

    # -- handlers ---------------------------------------------------------------------------
    async def graph(self, request: web.Request) -> web.Response:
        view, info = await self._past_view(request.query.get("at"))
        ns = request.query.get("namespace") or None
        live = info is None  # a past map has no proxies nor traffic to show
        body = mesh_graph(
            view,
            proxies=list(self.proxies()) if live else [],
            traffic=list(self.traffic()) if live else [],
            namespace=ns,
        )
        body["timeTravel"] = info
        return web.json_response(body)

    def _query(self, request: web.Request) -> TimelineQuery:
        q = request.query
        return TimelineQuery(
            actor=q.get("actor") or None,
            kind=q.get("kind") or None,
            namespace=q.get("namespace") or None,
            since_ms=_time_ms(q["since"], "since") if q.get("since") else None,
            until_ms=_time_ms(q["until"], "until") if q.get("until") else None,
        )

    async def timeline_page(self, request: web.Request) -> web.Response:
        offset = _int(request, "offset", 0, 0, 10**9)
        limit = _int(request, "limit", 100, 1, _MAX_PAGE)
        query = self._query(request)
        await self.refresh()  # read your writes: what the log holds now is on the page
        return web.json_response(self.timeline.page(query, offset=offset, limit=limit))

    async def facets(self, request: web.Request) -> web.Response:
        await self.refresh()
        return web.json_response(self.timeline.facets())

    async def event(self, request: web.Request) -> web.Response:
        raw = request.match_info["seq"]
        await self.refresh()
        tl = self.timeline
        if not raw.isdigit() or int(raw) >= len(tl.rows):
            return _bad("seq", f"no timeline entry {raw!r}", status=404)
        seq = int(raw)
        prev = tl.previous_of(seq)
        previous = None if prev is None else (prev, tl.rows[prev])
        body = await asyncio.to_thread(tl.detail, seq, tl.rows[seq], previous)
        return web.json_response(body)

    async def why(self, request: web.Request) -> web.Response:
        q = request.query
        for name in ("from", "to"):
            v = q.get(name, "")
            if not _IDENTITY.match(v):
                return _bad(name, f"{v!r} is not an identity namespace/serviceaccount")
        port = _int(request, "port", 0, 0, 65535) or None
        view, info = await self._past_view(q.get("at"))
        answer = policy_check(
            view,
            source=q["from"],
            destination=q["to"],
            path=q.get("path") or None,
            method=q.get("method") or None,
            port=port,
        )
        position = (
            Position.from_json(info["position"]) if info is not None else self.timeline.position
        )
        answer["decidedBy"] = await asyncio.to_thread(
            self._history, q["from"], q["to"], q.get("path"), q.get("method"), port, position
        )
        answer["timeTravel"] = info
        return web.json_response(answer)

    def _history(
        self,
        source: str,
        destination: str,
        path: str | None,
        method: str | None,
        port: int | None,
        end: Position,
    ) -> list[dict[str, Any]]:
        """The changes that moved access for the pair (``smc audit why``), with their
        timeline entries (worker thread: replays the log up to ``end``)."""
        log = self.machine.open_log()
        try:
            rows = access_history(
                log,
                source=source,
                destination=destination,
                path=path or None,
                method=method or None,
                port=port,
                verifier=self.machine.verifier(),
                end=end,
            )
        finally:
            log.close()
        seqs = self.timeline.seqs_by_position()
        return [{**r, "seq": seqs.get(r["position"])} for r in rows]

    async def proxy(self, request: web.Request) -> web.Response:
        node = request.query.get("node", "")
        if not node:
            return _bad("node", "required (a node id namespace/workload)")
        past = await self._past(request.query.get("at"))
        if past is not None:  # what the log says it was served then
            config = await asyncio.to_thread(
                proxy_config_at, past[0].runner.log, node, past[0].position, runner=past[0].runner
            )
            return web.json_response({"node_id": node, "timeTravel": past[1], "past": config})
        state = next((p for p in self.proxies() if p.node_id == node), None)
        dump = self.config_dump(node) if self.config_dump is not None else None
        if dump is None and state is None:
            return _bad("node", f"no proxy {node!r} is connected or has a snapshot", status=404)
        return web.json_response(
            {
                "node_id": node,
                "connected": state is not None,
                "acked": bool(state and state.acked),
                "nacked": bool(state and state.nacked),
                "config": dump,
            }
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=256)
        self._subscribers.add(queue)
        try:
            await resp.write(
                f"event: hello\ndata: {json.dumps({'total': len(self.timeline.rows)})}\n\n".encode()
            )
            while True:
                try:
                    kind, data = await asyncio.wait_for(queue.get(), timeout=15.0)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._subscribers.discard(queue)
        return resp


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name", "index.html")
    if not re.fullmatch(r"[a-z0-9][-a-z0-9_.]*\.(html|js|css|txt|svg)", name):
        raise web.HTTPNotFound()
    base = resources.files("smc.console") / "static"
    try:
        body = (base / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise web.HTTPNotFound() from None
    ctype = _STATIC_TYPES[name[name.rindex(".") :]]
    return web.Response(
        body=body,
        content_type=ctype,
        charset="utf-8",
        headers={
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'",
        },
    )


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/console/")


def mount_console(app: web.Application, hub: ConsoleHub) -> None:
    """Add the console's routes to ``app`` (before it starts); start ``hub`` with the app."""
    app.add_routes(
        [
            web.get("/console", _redirect),
            web.get("/console/", _static),
            web.get("/console/static/{name}", _static),
            web.get("/v1/console/graph", hub.graph),
            web.get("/v1/console/timeline", hub.timeline_page),
            web.get("/v1/console/timeline/facets", hub.facets),
            web.get("/v1/console/events/{seq}", hub.event),
            web.get("/v1/console/why", hub.why),
            web.get("/v1/console/proxy", hub.proxy),
            web.get("/v1/console/stream", hub.stream),
        ]
    )

    async def on_startup(_app: web.Application) -> None:
        hub.start()

    async def on_cleanup(_app: web.Application) -> None:
        await hub.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
