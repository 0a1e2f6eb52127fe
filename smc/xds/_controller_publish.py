"""Publishing of the xDS controller: snapshots into the cache, with lingering removals.

Role: :class:`Publishing` (a base of :class:`~smc.xds.XdsController`) publishes a rebuilt
snapshot of one node through :meth:`~smc.xds.Snapshot.replace`, records the per-type versions
that carried each batch (:class:`Publication`, the causal chain), and keeps clusters/endpoints a
rebuild dropped *lingering* until the proxy ACKed the listeners and routes that stopped using
them (make-before-break for removals; see :mod:`smc.xds._controller`). Concurrency: the asyncio
loop of the projection runner only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from smc.xds._cache import SnapshotCache
from smc.xds._snapshot import ResourceEntry, Snapshot
from smc.xds._types import CLUSTER, ENDPOINT, LISTENER, ROUTE

__all__ = ["Publication", "Publishing"]

log = logging.getLogger("smc.xds.controller")

_HISTORY = 64


@dataclass(slots=True)
class Publication:
    """One rebuild batch: the events it folded in, where the runner was, and the per-node
    versions of every type whose content changed."""

    seq: int
    position: dict[str, Any]
    first_event_at: float  # wall clock of the first event's arrival
    published_at: float = 0.0  # wall clock
    event_ids: list[str] = field(default_factory=list)
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> type -> version


@dataclass(slots=True)
class _Node:
    node_id: str
    watchers: int = 0
    deps: frozenset[str] = frozenset()
    identity: str | None = None
    reason: str = ""
    logged: str = ""
    #: (type, name) of removed clusters/endpoints still published, and the LDS/RDS versions
    #: whose ACK releases them.
    linger: frozenset[tuple[str, str]] = frozenset()
    release: tuple[str | None, str | None] = (None, None)
    linger_timer: asyncio.TimerHandle | None = None


class Publishing:
    """Publishing snapshots and lingering removals (a base of :class:`~smc.xds.XdsController`)."""

    cache: SnapshotCache
    linger_timeout: float
    _nodes: dict[str, _Node]
    _seq: int
    _publishes: Counter
    _traces: OrderedDict[str, Publication]
    _published: dict[tuple[str, str], deque[tuple[int, str]]]
    _acked: dict[tuple[str, str], str]  # (node, type) -> latest ACKed version
    _loop: asyncio.AbstractEventLoop | None

    def _publish(
        self, node_id: str, built: Snapshot, pub: Publication | None, *, release: bool = False
    ) -> None:
        old = self.cache.get(node_id)
        node = self._nodes.get(node_id)
        if old is not None and node is not None and node.watchers > 0 and not release:
            built = self._with_lingering(node, old, built)
        if old is None:
            snapshot = built
        else:
            upsert: list[ResourceEntry] = []
            remove: list[tuple[str, str]] = []
            for type_url in set(old.types) | set(built.types):
                new_entries = built.entries(type_url)
                old_entries = old.entries(type_url)
                for name, entry in new_entries.items():
                    if old_entries.get(name) is not entry:
                        upsert.append(entry)
                for name in old_entries:
                    if name not in new_entries:
                        remove.append((type_url, name))
            snapshot = old.replace(upsert=upsert, remove=remove) if upsert or remove else old
        if snapshot is old:
            return
        changed = self.cache.set_snapshot(node_id=node_id, snapshot=snapshot)
        if not changed:
            return
        self._publishes.inc()
        seq = pub.seq if pub is not None else (self._seq if release else 0)
        versions = snapshot.versions()
        old_versions = old.versions() if old is not None else {}
        changed_types = {t: v for t, v in versions.items() if old_versions.get(t) != v}
        for t, v in changed_types.items():
            hist = self._published.setdefault((node_id, t), deque(maxlen=_HISTORY))
            hist.append((seq, v))
        if pub is not None:
            pub.nodes[node_id] = changed_types

    # ------------------------------------------------------------------ lingering removals

    def _with_lingering(self, node: _Node, old: Snapshot, built: Snapshot) -> Snapshot:
        """``built`` plus the clusters/endpoints of ``old`` it drops, while the proxy has not
        ACKed ``built``'s listeners and routes (which no longer reference them)."""
        linger: list[ResourceEntry] = []
        for type_url in (CLUSTER, ENDPOINT):
            new_entries = built.entries(type_url)
            linger.extend(e for n, e in old.entries(type_url).items() if n not in new_entries)
        release = (built.version(LISTENER), built.version(ROUTE))
        acked = (
            self._acked.get((node.node_id, LISTENER)),
            self._acked.get((node.node_id, ROUTE)),
        )
        if not linger or acked == release:
            self._set_linger(node, frozenset(), (None, None))
            return built
        self._set_linger(node, frozenset((e.type_url, e.name) for e in linger), release)
        return built.replace(upsert=linger)

    def _set_linger(
        self,
        node: _Node,
        linger: frozenset[tuple[str, str]],
        release: tuple[str | None, str | None],
    ) -> None:
        node.linger, node.release = linger, release
        if node.linger_timer is not None:
            node.linger_timer.cancel()
            node.linger_timer = None
        if linger and self._loop is not None and not self._loop.is_closed():
            node.linger_timer = self._loop.call_later(
                self.linger_timeout, self._release, node.node_id
            )

    def _release(self, node_id: str) -> None:
        """Remove the lingering clusters/endpoints of ``node_id`` (its proxy ACKed the
        listeners and routes that stopped using them, or the linger timed out)."""
        node = self._nodes.get(node_id)
        if node is None or not node.linger:
            return
        linger = node.linger
        self._set_linger(node, frozenset(), (None, None))
        current = self.cache.get(node_id)
        if current is None:
            return
        remove = [(t, n) for t, n in linger if n in current.entries(t)]
        if remove:
            log.debug("proxy %s: removing %d lingering resources", node_id, len(remove))
            self._publish(node_id, current.replace(remove=remove), None, release=True)
