"""SnapshotCache watches: a publish on the watcher's loop calls the watch at once, a publish
from another thread (or with that loop stopped) hands it to the loop, on asyncio's loops and
on a loop that does not say which thread runs it (uvloop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from smc.xds import Snapshot, SnapshotCache, make_entry
from smc.xds._cache import _runs_here


def _snapshot(n: int) -> Snapshot:
    from envoy.config.cluster.v3 import cluster_pb2

    return Snapshot.from_entries(
        [make_entry(cluster_pb2.Cluster(name=f"c{n}", connect_timeout={"seconds": 1}))]
    )


def _loops() -> list[Callable[[], asyncio.AbstractEventLoop]]:
    makers: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the test extra
        return makers
    makers.append(uvloop.new_event_loop)
    return makers


_T = TypeVar("_T")


def _run(make_loop: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` to its end on a fresh loop of ``make_loop``'s kind, then close it."""
    loop = make_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


@pytest.mark.parametrize("make_loop", _loops())
def test_publish_on_the_loop_calls_the_watch_at_once(
    make_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    cache = SnapshotCache()
    calls: list[str] = []

    async def main() -> list[str]:
        cache.watch("n1", lambda: calls.append(threading.current_thread().name))
        assert _runs_here(asyncio.get_running_loop(), threading.get_ident())
        cache.set_snapshot(node_id="n1", snapshot=_snapshot(1))
        seen = list(calls)  # before any await: called synchronously
        await asyncio.sleep(0)
        return seen

    assert _run(make_loop, main()) == [threading.current_thread().name]


@pytest.mark.parametrize("make_loop", _loops())
def test_publish_from_another_thread_runs_the_watch_on_the_loop(
    make_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    cache = SnapshotCache()
    on_loop_thread: list[bool] = []

    async def main() -> None:
        woken = asyncio.Event()
        me = threading.get_ident()

        def callback() -> None:
            on_loop_thread.append(threading.get_ident() == me)
            woken.set()

        cache.watch("n1", callback)
        worker = threading.Thread(
            target=lambda: cache.set_snapshot(node_id="n1", snapshot=_snapshot(2))
        )
        worker.start()
        await asyncio.wait_for(woken.wait(), 5)
        worker.join()

    _run(make_loop, main())
    assert on_loop_thread == [True]


def test_a_stopped_loop_is_not_running_here() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert not _runs_here(loop, threading.get_ident())
    finally:
        loop.close()
