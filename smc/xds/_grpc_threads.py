"""gRPC core's I/O threads scheduled as batch work, so they do not preempt the event loop.

Role: gRPC core reads and writes sockets on its own threads (``event_engine``: the event
engine's pool; ``grpc_global_tim``: its timer thread) and hands each completion to the asyncio
loop's thread. Under the normal policy (SCHED_OTHER) each of those threads, woken by an ACK
arriving, preempts the loop's thread when they share a core: a context switch, one
``recvmsg`` and one ``epoll_wait`` per ACK, and a switch back. At 1,000 streams that is 1.2
reads per stream per change against 0.55 when the ACKs are read in batches. Linux's
SCHED_BATCH keeps their share of the CPU but turns off wake-up preemption: they run when the
loop's thread waits (or its time slice ends), and then read every ACK that arrived meanwhile.
Measured in docs/ads-scale.md ("gRPC's I/O threads as batch work").

:func:`batch_grpc_io_threads` sets the policy on those of this process's threads that still
have the normal one (a thread gRPC starts later inherits the policy of the thread starting it,
which for the pool's growth is a pool thread; :class:`IoThreadsKeeper` looks again every few
seconds for the rest). Nothing else changes: same priority range, same CPU share, and no
privilege is needed to lower one's own threads this way. Elsewhere than on Linux nothing is
changed and 0 is returned.
Concurrency: plain functions; the keeper is an asyncio task on the server's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

__all__ = ["GRPC_IO_THREADS", "IoThreadsKeeper", "batch_grpc_io_threads"]

_log = logging.getLogger("smc.xds.server")

#: Name prefixes (``/proc/self/task/TID/comm``, 15 characters at most) of gRPC core's I/O threads.
GRPC_IO_THREADS = ("event_engine", "grpc_global_tim")

_TASKS = Path("/proc/self/task")


def batch_grpc_io_threads(*, prefixes: tuple[str, ...] = GRPC_IO_THREADS) -> int:
    """Put this process's threads whose name starts with one of ``prefixes`` and whose policy
    is the normal one (SCHED_OTHER) under SCHED_BATCH; returns how many were changed. Threads
    under another policy (set by the operator: real-time, idle) are left as they are."""
    batch = getattr(os, "SCHED_BATCH", None)
    other = getattr(os, "SCHED_OTHER", None)
    if batch is None or other is None or not _TASKS.is_dir():
        return 0
    changed = 0
    for task in _TASKS.iterdir():
        try:
            name = (task / "comm").read_text().strip()
            if not name.startswith(prefixes):
                continue
            tid = int(task.name)
            if os.sched_getscheduler(tid) != other:
                continue
            os.sched_setscheduler(tid, batch, os.sched_param(0))
        except (OSError, ValueError):  # the thread ended meanwhile, or a refusal: leave it
            continue
        changed += 1
    return changed


class IoThreadsKeeper:
    """Applies :func:`batch_grpc_io_threads` now and every ``interval`` seconds (threads gRPC
    starts from a thread under the normal policy, e.g. for a new channel, get it too)."""

    def __init__(self, *, interval: float = 10.0) -> None:
        self.interval = interval
        #: Threads put under SCHED_BATCH so far.
        self.batched = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> int:
        """Apply once, then keep applying on the running loop; returns the threads changed."""
        self.batched += batch_grpc_io_threads()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self.batched

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            n = batch_grpc_io_threads()
            if n:
                _log.debug("%d new gRPC I/O thread(s) scheduled as batch work", n)
                self.batched += n

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
