"""The bookstore mesh of ``smc demo``: control plane, sidecars, applications and traffic.

Role: :class:`BookstoreDemo` starts, in order, the control plane of :mod:`smc.testing.mesh`
(event log, projection runner, mesh-change API, xDS controller and ADS server over mTLS, the
certificate service of a local CA) on the log the user chose, the five applications of :mod:`smc.demo._apps`, registers
the four Kubernetes-style pods (the events the Kubernetes informer appends for a Pod, its
ServiceAccount and the EndpointSlices of its services), applies ``smc/demo/bookstore.yaml``
(services, the bookwarehouse VM, SMI policy, traffic split) through the declarative API with
actor ``demo``, starts one real Envoy sidecar per workload on its own loopback address
``<net>.N`` with an SMC agent beside it, as its own process (``python -m smc.agent``: the
proxy's key is made by the agent in the proxy's own directory, never in this process; its
certificate is per proxy, proven with a one-time join token), waits until the policy is in
effect, then runs the client loops (bookbuyer and
bookthief to bookstore, both bookstore versions to bookwarehouse). :meth:`BookstoreDemo.status`
is a point-in-time view for the screen; :meth:`BookstoreDemo.summary` the final report as data.
:meth:`BookstoreDemo.close` stops everything it started, in reverse order, also after a failed
or interrupted start.
Concurrency: one asyncio loop (grpc.aio, aiohttp and the projection runner are bound to it);
blocking work (Envoy start/stop and admin calls, log appends) runs in worker threads.
Layout: options, workloads and status values in :mod:`smc.demo._model`; the set-up helpers
(Envoy, manifests, pod events, the user's log) in :mod:`smc.demo._setup`; the screen view and
the final report in :mod:`smc.demo._report` (bases of :class:`BookstoreDemo`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from smc.api import ChangeReport
from smc.demo._apps import BookApp, Flow, client_loop, probe
from smc.demo._errors import DemoError
from smc.demo._model import (
    ACTOR,
    DEFAULT_MANIFESTS,
    STORE_HOST,
    WAREHOUSE_HOST,
    WORKLOADS,
    DemoOptions,
    DemoStatus,
    _Started,
    parse_split,
)
from smc.demo._report import _DemoReport
from smc.smi import load_documents
from smc.testing.mesh import ControlPlane, Sidecar
from smc.testing.ports import free_port

__all__ = [
    "DEFAULT_MANIFESTS",
    "WORKLOADS",
    "BookstoreDemo",
    "DemoOptions",
    "DemoStatus",
    "parse_split",
]


class BookstoreDemo(_DemoReport):
    """The whole demo; see the module docstring. ``say`` prints one progress line (stderr)."""

    def __init__(self, options: DemoOptions, *, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        self.run_id = uuid.uuid4().hex[:12]
        self.cp: ControlPlane | None = None
        self.flows: dict[str, Flow] = {}
        self.envoy_pids: list[int] = []
        self.agent_pids: list[int] = []
        self.console_url: str | None = None
        self._console: web.AppRunner | None = None
        self.traffic_started: float | None = None
        self.traffic_stopped: float | None = None
        self.ready_after: float | None = None
        self.apply_report: dict[str, Any] = {}
        self._s = _Started()
        self._traffic_stop = asyncio.Event()
        self._rejected: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ start

    async def start(self, stop: asyncio.Event) -> bool:
        """Start everything; False when ``stop`` was set meanwhile (then call :meth:`close`)."""
        t0 = time.monotonic()
        opts = self.options
        # A signal stops the traffic at once: on a terminal, Ctrl-C also reaches the Envoys
        # (same process group), and requests failing after it are not the mesh's errors.
        self._traffic_stop = stop
        await self._ensure_envoy()
        if stop.is_set():
            return False
        log = self._open_log()
        cp = ControlPlane(workdir=opts.workdir, agents=True)
        if log is not None:  # the harness opened <workdir>/log.db; use the user's log instead
            cp.log.close()
            cp.log = log
        self.cp = cp
        await cp.start()
        self._s.cp_started = True
        self.say(
            f"control plane up: log {cp.log.url}, local CA in {opts.workdir / 'ca'}, "
            f"ADS over mTLS on 127.0.0.1:{cp.port}, certificate service on 127.0.0.1:{cp.ca_port}"
        )
        if opts.console is not None:
            await self._start_console(opts.console)
        # applications (their ports go into the registry)
        for w in WORKLOADS:
            sidecar = Sidecar(
                namespace=w.namespace, name=w.name, address=self._address(w), workdir=opts.workdir
            )
            app = BookApp(name=w.label, role=w.role, version=w.version, port=sidecar.app_port)
            await app.start()
            self._s.apps[w.name] = app
            self._s.sidecars[w.name] = sidecar
        # Kubernetes-style pods, then the declarative manifests
        events = self._pod_events(self._s.apps)
        await asyncio.to_thread(cp.log.append, events)
        target = await asyncio.to_thread(cp.log.end_position)
        await cp.live.wait_for(target)
        self.say(f"registered {sum(w.kind == 'pod' for w in WORKLOADS)} Kubernetes-style pods")
        await self._apply(self._manifests(self._s.apps))
        if stop.is_set():
            return False
        # one SMC agent per sidecar, each its own process (`python -m smc.agent`, as in a pod
        # or on a VM): it makes the proxy's key in its proxy dir and gets its certificate with
        # a one-time join token (the demo's pods run outside Kubernetes, like VMs); this
        # process, which hosts the control plane, never sees a workload key
        workloads = {w.name: w for w in WORKLOADS}
        await asyncio.gather(
            *(
                s.start_agent_process(
                    cp, service_account=workloads[name].service_account, kind=workloads[name].kind
                )
                for name, s in self._s.sidecars.items()
            )
        )
        for s in self._s.sidecars.values():
            assert s.agent_process is not None
            self.agent_pids.append(s.agent_process.pid)
        self.say(
            f"{len(self._s.sidecars)} SMC agent processes made their proxies' keys and got "
            "per-proxy certificates"
        )
        if stop.is_set():
            return False
        # one Envoy sidecar per workload
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    s.start_envoy, ads_port=cp.port, delta=opts.delta, stats_sink=True
                )
                for s in self._s.sidecars.values()
            )
        )
        for s in self._s.sidecars.values():
            assert s.envoy is not None and s.envoy.pid is not None
            self.envoy_pids.append(s.envoy.pid)
        self.say(
            f"{len(self._s.sidecars)} Envoy sidecars started on {opts.net}.1-"
            f"{len(self._s.sidecars)} ({'delta' if opts.delta else 'state-of-the-world'} ADS)"
        )
        self._s.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        if not await self._wait_ready(stop):
            return False
        self.ready_after = time.monotonic() - t0
        self.say(f"mesh ready in {self.ready_after:.1f}s; traffic running")
        self._start_traffic()
        return True

    async def _start_console(self, where: tuple[str, int]) -> None:
        assert self.cp is not None
        from smc.console._serve import start_console_app

        cp = self.cp
        host, port = where[0], where[1] or free_port()
        try:
            app, url, token_file = await start_console_app(
                runner=cp.runner,
                live=cp.live,
                host=host,
                port=port,
                server=cp.server,
                controller=cp.controller,
                traffic=cp.traffic,
            )
        except OSError as exc:
            raise DemoError(f"cannot serve the console on {host}:{port}: {exc}") from exc
        self._console = app
        self.console_url = url
        self.say(f"console: {url} (bearer token in {token_file})")

    async def _apply(self, text: str) -> None:
        assert self.cp is not None
        loaded = load_documents(text, source=str(self.options.manifests))
        if loaded.errors:
            raise DemoError("bad demo manifests: " + "; ".join(str(e) for e in loaded.errors[:5]))
        report: ChangeReport = await self.cp.live.apply(
            loaded.resources, actor=ACTOR, source="demo", request_id=f"demo-{self.run_id}"
        )
        data = report.as_dict()
        self.apply_report = data
        if not report.ok:
            raise DemoError(f"the control plane refused the demo manifests: {data}")
        self.say(
            f"applied {len(loaded.resources)} manifests as actor {ACTOR!r} "
            f"({len(report.appended)} events; TrafficSplit bookstore v1/v2 = "
            f"{self.options.split[0]}/{self.options.split[1]})"
        )

    async def _wait_ready(self, stop: asyncio.Event) -> bool:
        """Wait until every Envoy is live and the policy is in effect on real traffic."""
        session = self._s.session
        assert session is not None
        sc = self._s.sidecars
        deadline = time.monotonic() + self.options.ready_timeout
        for s in sc.values():
            assert s.envoy is not None
            await s.envoy.wait_live(timeout=max(1.0, deadline - time.monotonic()))
        checks = (
            ("bookbuyer-1", STORE_HOST, "GET", "/books", 200),
            ("bookthief-1", STORE_HOST, "GET", "/books", 403),
            ("bookstore-v1-1", WAREHOUSE_HOST, "POST", "/restock", 200),
            ("bookstore-v2-1", WAREHOUSE_HOST, "POST", "/restock", 200),
        )
        last: dict[str, int] = {}
        while not stop.is_set():
            ok = True
            for name, host, method, path, want in checks:
                status, _ = await probe(
                    session, outbound=sc[name].outbound, host=host, method=method, path=path
                )
                last[f"{name} {method} {host}{path}"] = status
                ok = ok and status == want
            if ok:
                for app in self._s.apps.values():  # count only the demo's own traffic
                    app.served.clear()
                    app.callers.clear()
                return True
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the mesh did not converge within {self.options.ready_timeout:.0f}s; "
                    f"last answers: {last} (workdir {self.options.workdir})"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.1)
        return False

    def _start_traffic(self) -> None:
        session = self._s.session
        assert session is not None
        sc = self._s.sidecars
        opts = self.options
        plan = (
            ("bookbuyer", "bookbuyer-1", "bookstore", STORE_HOST, "GET", "/books", opts.buyer_rate),
            ("bookthief", "bookthief-1", "bookstore", STORE_HOST, "GET", "/books", opts.thief_rate),
            (
                "bookstore-v1",
                "bookstore-v1-1",
                "bookwarehouse",
                WAREHOUSE_HOST,
                "POST",
                "/restock",
                opts.restock_rate,
            ),
            (
                "bookstore-v2",
                "bookstore-v2-1",
                "bookwarehouse",
                WAREHOUSE_HOST,
                "POST",
                "/restock",
                opts.restock_rate,
            ),
        )
        self.traffic_started = time.monotonic()
        for source, workload, dest, host, method, path, rate in plan:
            flow = Flow(source=source, destination=dest, method=method, path=path)
            self.flows[flow.key] = flow
            self._s.tasks.append(
                asyncio.create_task(
                    client_loop(
                        session=session,
                        flow=flow,
                        outbound=sc[workload].outbound,
                        host=host,
                        rate=rate,
                        stop=self._traffic_stop,
                    )
                )
            )

    # ------------------------------------------------------------------ views

    # ------------------------------------------------------------------ stop

    async def stop_traffic(self) -> None:
        """Stop the client loops (their late answers are not counted)."""
        self._traffic_stop.set()
        if self.traffic_started is not None and self.traffic_stopped is None:
            self.traffic_stopped = time.monotonic()
        tasks, self._s.tasks = self._s.tasks, []
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def close(self) -> None:
        """Stop everything that was started, in reverse order; safe after a partial start."""
        await self.stop_traffic()
        if self._s.session is not None:
            await self._s.session.close()
            self._s.session = None
        sidecars = list(self._s.sidecars.values())
        await asyncio.gather(*(s.stop() for s in sidecars), return_exceptions=True)
        for app in self._s.apps.values():
            with contextlib.suppress(Exception):
                await app.stop()
        if self._console is not None:
            await self._console.cleanup()
            self._console = None
        cp = self.cp
        if cp is not None:
            if self._s.cp_started:
                await cp.stop()
                self._s.cp_started = False
            cp.close()
            self.cp = None
