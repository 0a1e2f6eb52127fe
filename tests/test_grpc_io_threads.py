"""gRPC core's I/O threads scheduled as batch work (smc.xds._grpc_threads).

``AdsServer.start()`` puts gRPC's ``event_engine`` and timer threads under SCHED_BATCH (they
then stop preempting the event loop on every ACK; docs/ads-scale.md), never the loop's own
thread, never a thread an operator put under another policy, and keeps doing so for threads
started later. ``smc serve --xds-io-threads default`` leaves them alone.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from smc.testing.serve import ServeProcess
from smc.xds import AdsServer, SnapshotCache
from smc.xds._grpc_threads import GRPC_IO_THREADS, IoThreadsKeeper, batch_grpc_io_threads

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's"
)


@contextmanager
def _named_thread(name: str) -> Iterator[int]:
    """A live thread of this process whose kernel name is ``name``; yields its id."""
    started, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        Path(f"/proc/self/task/{tid[0]}/comm").write_text(name)
        started.set()
        done.wait(30)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield tid[0]
    finally:
        done.set()
        t.join(10)


def _threads(pid: int | str = "self") -> dict[int, tuple[str, int]]:
    """Thread id -> (kernel name, scheduling policy) of process ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = (
                (task / "comm").read_text().strip(),
                os.sched_getscheduler(int(task.name)),
            )
        except OSError:
            continue
    return out


def test_only_the_named_threads_under_the_normal_policy_become_batch() -> None:
    with (
        _named_thread("smctest_io_a") as io,
        _named_thread("smctest_other") as other,
        _named_thread("smctest_io_idle") as idle,
    ):
        # an operator's choice for one of them is kept
        os.sched_setscheduler(idle, os.SCHED_IDLE, os.sched_param(0))
        main = threading.get_native_id()
        main_policy = os.sched_getscheduler(main)
        assert batch_grpc_io_threads(prefixes=("smctest_io",)) == 1
        assert os.sched_getscheduler(io) == os.SCHED_BATCH
        assert os.sched_getscheduler(other) == os.SCHED_OTHER
        assert os.sched_getscheduler(idle) == os.SCHED_IDLE
        assert os.sched_getscheduler(main) == main_policy
        # already batch: nothing more to change
        assert batch_grpc_io_threads(prefixes=("smctest_io",)) == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_the_keeper_catches_threads_started_later() -> None:
    keeper = IoThreadsKeeper(interval=0.05)
    keeper.start()
    try:
        with _named_thread("event_engine") as late:  # started from a normal-policy thread
            assert os.sched_getscheduler(late) == os.SCHED_OTHER
            for _ in range(200):
                if os.sched_getscheduler(late) == os.SCHED_BATCH:
                    break
                await asyncio.sleep(0.02)
            assert os.sched_getscheduler(late) == os.SCHED_BATCH
    finally:
        await keeper.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_an_ads_server_batches_grpc_io_threads_but_not_the_loop() -> None:
    server = AdsServer(cache=SnapshotCache())
    await server.start()
    try:
        threads = _threads()
        io = {t: pol for t, (name, pol) in threads.items() if name.startswith(GRPC_IO_THREADS)}
        assert io, f"no gRPC I/O thread found among {sorted(n for n, _ in threads.values())}"
        assert set(io.values()) == {os.SCHED_BATCH}
        assert os.sched_getscheduler(threading.get_native_id()) != os.SCHED_BATCH
    finally:
        await server.stop()


@pytest.mark.parametrize("choice", ["batch", "default"])
def test_serve_flag_chooses_the_io_threads_policy(tmp_path: Path, choice: str) -> None:
    serve = ServeProcess(tmp_path, args=["--xds-io-threads", choice])
    try:
        serve.wait_ready()
        threads = _threads(serve.proc.pid)
        io = {pol for name, pol in threads.values() if name.startswith("event_engine")}
        assert io, "smc serve runs no gRPC event_engine thread"
        want = os.SCHED_BATCH if choice == "batch" else os.SCHED_OTHER
        assert io == {want}
        # the main thread (the event loop) keeps the normal policy either way
        assert threads[serve.proc.pid][1] == os.SCHED_OTHER
    finally:
        serve.stop()
