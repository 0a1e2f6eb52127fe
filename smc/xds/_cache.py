"""The snapshot cache: the latest consistent :class:`Snapshot` per node id, with change watches.

Role: the snapshot builder publishes per-proxy snapshots here with :meth:`SnapshotCache.set_snapshot`
(which refuses inconsistent ones); the ADS server sees only the narrow :class:`SnapshotSource`
protocol (``get`` and ``watch``). A watch is a plain callback, so an open stream costs one tuple
entry here and no task.

Concurrency: the cache may be written from any thread; a watch callback always runs on the event
loop that registered it (directly when the writer is on that loop, else via
``call_soon_threadsafe``). Reads are lock-free dictionary lookups.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Protocol

from smc.xds._snapshot import Snapshot

__all__ = ["SnapshotCache", "SnapshotSource", "Unwatch"]

Unwatch = Callable[[], None]


class SnapshotSource(Protocol):
    """What the ADS server needs from a cache."""

    def get(self, node_id: str) -> Snapshot | None:
        """The current snapshot of ``node_id``, or None if none was published yet."""
        ...

    def watch(self, node_id: str, callback: Callable[[], None]) -> Unwatch:
        """Call ``callback`` (on the caller's event loop) whenever ``node_id``'s snapshot changes;
        returns a function that removes the watch."""
        ...


class _Watch:
    __slots__ = ("callback", "loop")

    def __init__(self, callback: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self.callback = callback
        self.loop = loop


class SnapshotCache:
    """Latest snapshot per node id; implements :class:`SnapshotSource`."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        # node id -> its watches, a tuple replaced (never mutated) on watch/unwatch, so a
        # publish reads it without copying it
        self._watches: dict[str, tuple[_Watch, ...]] = {}
        self._lock = threading.Lock()

    def set_snapshot(self, *, node_id: str, snapshot: Snapshot) -> bool:
        """Publish ``snapshot`` for ``node_id`` after checking its consistency.

        Raises :class:`~smc.xds.InconsistentSnapshot` (and keeps the previous snapshot) if a
        referenced EDS/RDS/SDS resource is missing. Returns False, and wakes nobody, when the
        content equals the current snapshot's.
        """
        if not node_id:
            raise ValueError("node_id must be a non-empty string")
        if not snapshot._consistent:  # (known consistent: most snapshots made by replace)
            snapshot.check_consistency(node_id=node_id)
        with self._lock:
            if snapshot.same_content(self._snapshots.get(node_id)):
                return False
            self._snapshots[node_id] = snapshot
            watches = self._watches.get(node_id, ())
        if watches:
            self._notify(watches)
        return True

    def clear(self, *, node_id: str) -> None:
        """Forget ``node_id``'s snapshot (open streams keep what they were sent)."""
        with self._lock:
            self._snapshots.pop(node_id, None)

    def get(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def poke(self, *, node_id: str) -> None:
        """Wake ``node_id``'s watchers without a snapshot change (e.g. the controller found
        it cannot place the node: its streams should say so)."""
        with self._lock:
            watches = self._watches.get(node_id, ())
        self._notify(watches)

    def node_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._snapshots)

    def watch(self, node_id: str, callback: Callable[[], None]) -> Unwatch:
        entry = _Watch(callback, asyncio.get_running_loop())
        with self._lock:
            self._watches[node_id] = (*self._watches.get(node_id, ()), entry)

        def unwatch() -> None:
            with self._lock:
                bucket = self._watches.get(node_id)
                if bucket is not None and entry in bucket:
                    rest = tuple(w for w in bucket if w is not entry)
                    if rest:
                        self._watches[node_id] = rest
                    else:
                        del self._watches[node_id]

        return unwatch

    def watched(self, node_id: str) -> bool:
        """Whether a stream watches ``node_id`` here (in this process)."""
        return node_id in self._watches

    def watch_count(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._watches.values())

    @staticmethod
    def _notify(watches: tuple[_Watch, ...]) -> None:
        me = threading.get_ident()
        for w in watches:
            if _runs_here(w.loop, me):
                w.callback()
            elif not w.loop.is_closed():
                w.loop.call_soon_threadsafe(w.callback)


def _runs_here(loop: asyncio.AbstractEventLoop, thread: int) -> bool:
    """Whether ``loop`` is the loop running on ``thread`` (the caller's). asyncio's own loops
    keep the thread they run on (``_thread_id``, what ``call_soon`` checks in debug mode):
    comparing it costs no system call, where ``asyncio.get_running_loop()`` makes one
    (``getpid``, CPython 3.11) per call, i.e. per proxy published. Other loops: asked."""
    running = getattr(loop, "_thread_id", _UNKNOWN)
    if running is not _UNKNOWN:
        return running == thread
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


_UNKNOWN = object()
