"""The bookstore applications of ``smc demo`` and the traffic their clients send.

Role: :class:`BookApp` is one small aiohttp application on ``127.0.0.1:<app port>`` (the local
side of a workload's Envoy sidecar) that counts what it serves and who called (the SPIFFE id the
sidecar forwards in ``x-forwarded-client-cert``). :class:`Flow` counts the answers one source got
from one destination: allowed (2xx), denied (403), errors (anything else, including connection
failures), and which backend application answered (the traffic split). :func:`client_loop`
sends requests at a fixed rate through a sidecar's outbound listener and records them in a flow.
Concurrency: everything runs on one asyncio loop; counters are plain ints touched only there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["BookApp", "Flow", "caller_identity", "client_loop", "probe"]

_BOOKS = (
    "The Hitchhiker's Guide to the Galaxy",
    "Dune",
    "A Wizard of Earthsea",
    "Neuromancer",
)


def caller_identity(xfcc: str) -> str:
    """The ``URI=`` (SPIFFE id of the client) of the last element of an XFCC header, or ``""``."""
    last = xfcc.rsplit(",", 1)[-1]
    for part in last.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == "URI":
            return value.strip().strip('"')
    return ""


class BookApp:
    """One workload's application: ``role`` is bookbuyer, bookthief, bookstore or bookwarehouse."""

    def __init__(self, *, name: str, role: str, version: str = "", port: int) -> None:
        self.name = name
        self.role = role
        self.version = version
        self.port = port
        self.served: Counter[str] = Counter()  # "GET /books 200" -> n
        self.callers: Counter[str] = Counter()  # SPIFFE id -> n
        self.stock = 0
        self._runner: web.AppRunner | None = None

    @property
    def total_served(self) -> int:
        return sum(self.served.values())

    def _answer(self, request: web.Request, status: int, body: dict[str, Any]) -> web.Response:
        caller = caller_identity(request.headers.get("x-forwarded-client-cert", ""))
        self.served[f"{request.method} {request.path} {status}"] += 1
        if caller:
            self.callers[caller] += 1
        return web.json_response({"app": self.name, "caller": caller, **body}, status=status)

    async def _handle(self, request: web.Request) -> web.Response:
        method, path = request.method, request.path
        if self.role == "bookstore":
            if method == "GET" and path.startswith("/books"):
                return self._answer(request, 200, {"version": self.version, "books": list(_BOOKS)})
            if method == "GET" and path.startswith("/preview"):
                return self._answer(request, 200, {"version": self.version, "books": [_BOOKS[0]]})
        elif self.role == "bookwarehouse":
            if method == "POST" and path.startswith("/restock"):
                self.stock += 1
                return self._answer(request, 200, {"shipped": self.stock})
        elif method == "GET" and path == "/":
            return self._answer(request, 200, {"role": self.role})
        return self._answer(request, 404, {"error": f"no {method} {path} here"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass(slots=True)
class Flow:
    """What ``source`` got back from ``destination`` (see the module docstring)."""

    source: str
    destination: str
    method: str
    path: str
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # "200", "403", "ClientOSError"...
    backends: Counter[str] = field(default_factory=Counter)  # app that answered a 2xx

    @property
    def key(self) -> str:
        return f"{self.source} -> {self.destination}"

    @property
    def total(self) -> int:
        return self.allowed + self.denied + self.errors

    def record(self, status: int, body: bytes) -> None:
        self.outcomes[str(status)] += 1
        if 200 <= status < 300:
            self.allowed += 1
            with contextlib.suppress(ValueError, AttributeError):
                app = json.loads(body).get("app")
                if isinstance(app, str):
                    self.backends[app] += 1
        elif status == 403:
            self.denied += 1
        else:
            self.errors += 1

    def record_error(self, what: str) -> None:
        self.outcomes[what] += 1
        self.errors += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "request": f"{self.method} {self.path}",
            "allowed": self.allowed,
            "denied": self.denied,
            "errors": self.errors,
            "outcomes": dict(self.outcomes),
            "backends": dict(self.backends),
        }


async def probe(
    session: aiohttp.ClientSession, *, outbound: str, host: str, method: str, path: str
) -> tuple[int, bytes]:
    """One request through a sidecar's outbound listener; ``(-1, b"")`` if it failed."""
    try:
        async with session.request(method, outbound + path, headers={"Host": host}) as resp:
            return resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return -1, b""


async def client_loop(
    *,
    session: aiohttp.ClientSession,
    flow: Flow,
    outbound: str,
    host: str,
    rate: float,
    stop: asyncio.Event,
) -> None:
    """Send ``flow.method flow.path`` to ``host`` via ``outbound`` about ``rate`` times a second
    until ``stop`` is set; answers arriving after ``stop`` are not counted."""
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    due = loop.time()
    while not stop.is_set():
        try:
            async with session.request(
                flow.method, outbound + flow.path, headers={"Host": host}
            ) as resp:
                status, body = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if stop.is_set():
                return
            flow.record_error(type(exc).__name__)
        else:
            if stop.is_set():
                return
            flow.record(status, body)
        due += interval
        now = loop.time()
        if due < now - interval:  # fell behind: do not burst to catch up
            due = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, due - now))
