"""ACK tracking of the xDS controller: the causal chain from an event to every proxy's ACK.

Role: :class:`AckTracking` (a base of :class:`~smc.xds.XdsController`) hears the ADS server's
ACKs and watch changes, releases lingering removals once the listeners and routes are ACKed, and
answers when the snapshot versions that carried an event were ACKed by every proxy
(:meth:`trace`, :meth:`acked_by_all`, :meth:`wait_acked`). Concurrency: the asyncio loop of
the projection runner only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from typing import Any

from smc.xds._controller_publish import _HISTORY, Publishing
from smc.xds._types import LISTENER, ROUTE, short_name

__all__ = ["AckTracking"]


class AckTracking(Publishing):
    """ACKs, watch changes and traces (a base of :class:`~smc.xds.XdsController`)."""

    _acks: dict[tuple[str, str], deque[tuple[int, float]]]
    _ack_waiters: list[asyncio.Future[None]]
    _unsubscribed: set[tuple[str, str]]

    def _on_ack(self, node_id: str, type_url: str, version: str, at: float) -> None:
        self._acked[(node_id, type_url)] = version
        if type_url in (LISTENER, ROUTE):
            node = self._nodes.get(node_id)
            if (
                node is not None
                and node.linger
                and node.release
                == (self._acked.get((node_id, LISTENER)), self._acked.get((node_id, ROUTE)))
            ):
                loop = self._loop
                if loop is not None and not loop.is_closed():
                    loop.call_soon(self._release, node_id)
                else:
                    self._release(node_id)
        hist = self._published.get((node_id, type_url))
        if not hist:
            return
        seq = None
        for s, v in reversed(hist):
            if v == version:
                seq = s
                break
        if seq is None:
            return
        acks = self._acks.setdefault((node_id, type_url), deque(maxlen=_HISTORY))
        if acks and acks[-1][0] >= seq:
            return
        acks.append((seq, at))
        self._wake_ack_waiters()

    def _on_subscription(self, node_id: str, type_url: str, subscribed: bool) -> None:
        key = (node_id, type_url)
        if subscribed:
            self._unsubscribed.discard(key)
        elif key not in self._unsubscribed:
            self._unsubscribed.add(key)
            self._wake_ack_waiters()

    def _wake_ack_waiters(self) -> None:
        if self._ack_waiters:
            waiters, self._ack_waiters = self._ack_waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    def _ack_time(self, node_id: str, type_url: str, seq: int) -> float | None:
        """When ``node_id`` ACKed publication ``seq`` (or a later one) of ``type_url``."""
        for s, at in self._acks.get((node_id, type_url), ()):
            if s >= seq:
                return at
        return None

    def trace(self, event_id: str) -> dict[str, Any] | None:
        """The causal chain of ``event_id``: the runner position after its batch, the snapshot
        versions that carried it per node and type, and when each node ACKed them (None:
        not yet). None if the event is unknown (not seen since start, or too old)."""
        pub = self._traces.get(event_id)
        if pub is None:
            return None
        nodes: dict[str, Any] = {}
        for node_id, types in pub.nodes.items():
            per_type = {}
            times: list[float] = []
            complete = True
            for t, v in types.items():
                watched = (node_id, t) not in self._unsubscribed
                at = self._ack_time(node_id, t, pub.seq) if watched else None
                per_type[short_name(t)] = {"version": v, "acked_at": at, "watched": watched}
                if at is not None:
                    times.append(at)
                elif watched:
                    complete = False
            nodes[node_id] = {
                "types": per_type,
                "acked_at": (max(times) if times else pub.published_at) if complete else None,
            }
        return {
            "event_id": event_id,
            "batch": pub.seq,
            "position": pub.position,
            "received_at": pub.first_event_at,
            "published_at": pub.published_at,
            "events_in_batch": len(pub.event_ids),
            "proxies": nodes,
        }

    def acked_by_all(self, event_id: str, node_ids: Iterable[str] | None = None) -> float | None:
        """Wall time when the last of ``node_ids`` (default: every node whose config the event
        changed) ACKed the config carrying ``event_id``; None if some has not yet. A node the
        event did not change counts as done at publication time."""
        pub = self._traces.get(event_id)
        if pub is None:
            return None
        wanted = list(pub.nodes) if node_ids is None else list(node_ids)
        last = pub.published_at
        for node_id in wanted:
            types = pub.nodes.get(node_id)
            if not types:
                continue
            for t in types:
                if (node_id, t) in self._unsubscribed:
                    continue  # a named type the node does not watch: nothing to ACK
                at = self._ack_time(node_id, t, pub.seq)
                if at is None:
                    return None
                last = max(last, at)
        return last

    async def wait_acked(
        self, event_id: str, *, node_ids: Iterable[str] | None = None, timeout: float = 10.0
    ) -> float:
        """Wait until :meth:`acked_by_all` answers; returns its time. Raises TimeoutError."""
        wanted = None if node_ids is None else list(node_ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if event_id in self._traces:
                at = self.acked_by_all(event_id, wanted)
                if at is not None:
                    return at
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"event {event_id} not ACKed by every proxy in {timeout}s")
            fut: asyncio.Future[None] = loop.create_future()
            self._ack_waiters.append(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout=min(left, 0.05))
