"""What the demo shows and reports: :meth:`status` (a point-in-time :class:`DemoStatus` for the
screen), :meth:`collect_rejections` (each running Envoy's rejected-update counters) and
:meth:`summary` (the final report as data), as the base ``_DemoReport`` of
:class:`~smc.demo.BookstoreDemo`.

Concurrency: called on the demo's asyncio loop; Envoy admin reads run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from smc.demo._model import WORKLOADS, DemoStatus
from smc.demo._setup import _DemoBase
from smc.errors import SMCError


class _DemoReport(_DemoBase):
    """The screen view and the final report of the demo."""

    def status(self) -> DemoStatus:
        cp = self.cp
        buyer = self.flows.get("bookbuyer -> bookstore")
        split = (
            (buyer.backends.get("bookstore-v1", 0), buyer.backends.get("bookstore-v2", 0))
            if buyer is not None
            else (0, 0)
        )
        end = self.traffic_stopped or time.monotonic()
        running = sum(
            1 for s in self._s.sidecars.values() if s.envoy is not None and s.envoy.running()
        )
        if cp is not None and self._s.cp_started:
            proxies = len({p.node_id for p in cp.server.proxies()})
            nacks = len(cp.server.nacks())
            events = cp.runner.applied
            position = cp.runner.position.to_json()
        else:
            proxies = nacks = events = 0
            position = {}
        return DemoStatus(
            uptime=0.0 if self.traffic_started is None else end - self.traffic_started,
            flows=tuple(self.flows.values()),
            split_target=self.options.split,
            split_counts=split,
            served={a.name: a.total_served for a in self._s.apps.values()},
            log_events=events,
            log_position=position,
            proxies=proxies,
            expected_proxies=len(WORKLOADS),
            nacks=nacks,
            envoys_running=running,
        )

    async def collect_rejections(self) -> None:
        """Read every running Envoy's ``*update_rejected`` counters (a NACK each)."""
        for name, s in self._s.sidecars.items():
            if s.envoy is not None and s.envoy.running():
                with contextlib.suppress(SMCError, OSError, ValueError):
                    self._rejected[name] = await asyncio.to_thread(s.rejected)

    def summary(self, *, stopped_by: str) -> dict[str, Any]:
        st = self.status()
        cp = self.cp
        nacks = (
            [
                {"node": n.node_id, "type": n.type_url, "version": n.version, "message": n.message}
                for n in cp.server.nacks()
            ]
            if cp is not None and self._s.cp_started
            else []
        )
        return {
            "stopped_by": stopped_by,
            "run_id": self.run_id,
            "console_url": self.console_url,
            "ready_after_s": None if self.ready_after is None else round(self.ready_after, 2),
            "traffic_seconds": round(st.uptime, 2),
            "flows": {f.key: f.as_dict() for f in st.flows},
            "split": {
                "target": {"bookstore-v1": st.split_target[0], "bookstore-v2": st.split_target[1]},
                "observed": {
                    "bookstore-v1": st.split_counts[0],
                    "bookstore-v2": st.split_counts[1],
                },
            },
            "served": {
                a.name: {
                    "total": a.total_served,
                    "requests": dict(a.served),
                    "callers": dict(a.callers),
                }
                for a in self._s.apps.values()
            },
            "workloads": {
                f"{w.namespace}/{w.name}": {"kind": w.kind, "address": self._address(w)}
                for w in WORKLOADS
            },
            "log": {
                "url": cp.log.url if cp is not None else self.options.log_url,
                "events": st.log_events,
                "position": st.log_position,
            },
            "proxies_connected": st.proxies,
            "nacks": nacks,
            "envoy_rejected": {k: v for k, v in self._rejected.items() if v},
            "envoy_pids": self.envoy_pids,
            "agent_pids": self.agent_pids,
            "workdir": str(self.options.workdir),
        }
