"""One event-loop wake-up per batch of gRPC completions, not one per completion.

Role: grpc.aio (1.85) hands completions from gRPC core to the asyncio loop through a socket
pair: its poller thread queues each completion and writes one byte; the loop's reader
(``PollerCompletionQueue._handle_events``) reads ONE byte and then runs every completion queued.
So after a burst (a change pushed to 1,000 streams completes 1,000 writes and then 1,000 ACK
reads) the socket holds one byte per completion and the loop turns once more per byte: each
turn polls, calls the reader, reads a byte with a system call and finds the queue empty, a few
microseconds per completion for nothing. Newer gRPC reads up to 4,096 bytes at once.
:func:`coalesce_grpc_wakeups` wraps that reader: before calling it, it reads all but one of
the bytes waiting (``FIONREAD`` says how many), so one turn of the loop handles every
completion queued, and the reader still finds the one byte it reads. Nothing else changes:
every completion is still run by gRPC's own reader, on the loop, in order.

It applies only when the loop has exactly that reader (asyncio's selector loops with grpc.aio's
poller); otherwise (another loop implementation, another gRPC version) it changes nothing and
returns False. Concurrency: call on the loop's thread, after a grpc.aio server or channel
exists (the reader is added when gRPC binds the loop); the wrapper runs on the loop.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

try:  # POSIX only; elsewhere nothing is coalesced
    import fcntl
    import termios
except ImportError:  # pragma: no cover - not POSIX
    fcntl = termios = None  # type: ignore[assignment]

__all__ = ["coalesce_grpc_wakeups"]

_log = logging.getLogger("smc.xds.server")

_READER = "PollerCompletionQueue._handle_events"


def _poller_reader(loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, Callable[[], Any]]:
    """gRPC's wake-up socket on ``loop`` and its reader callback; raises LookupError."""
    selector: Any = getattr(loop, "_selector", None)
    if selector is None:
        raise LookupError("not a selector event loop")
    for key in list(selector.get_map().values()):
        handles = key.data
        reader = handles[0] if isinstance(handles, tuple) and handles else None
        callback = getattr(reader, "_callback", None)
        func = getattr(callback, "func", callback)  # a functools.partial(reader, loop)
        if getattr(func, "__qualname__", "") != _READER and not getattr(
            callback, "__smc_coalesced__", False
        ):
            continue
        if not isinstance(key.fileobj, socket.socket) or callback is None:
            continue
        return key.fileobj, callback
    raise LookupError("no grpc.aio poller reader on this loop")


def coalesce_grpc_wakeups(loop: asyncio.AbstractEventLoop) -> bool:
    """Make ``loop`` handle all queued gRPC completions in one turn (see the module); returns
    whether it applied (False: nothing changed). Idempotent."""
    if fcntl is None or termios is None:
        return False
    try:
        sock, handle_events = _poller_reader(loop)
    except LookupError as exc:
        _log.debug("gRPC wake-ups not coalesced: %s", exc)
        return False
    if getattr(handle_events, "__smc_coalesced__", False):
        return True
    fd = sock.fileno()
    waiting = array.array("i", [0])

    def drain_then_handle() -> None:
        fcntl.ioctl(fd, termios.FIONREAD, waiting, True)
        count = waiting[0]
        if count <= 0:
            return  # nothing to read (another loop took it): gRPC's reader would fail
        try:
            if count > 1:
                sock.recv(count - 1)  # leave the one byte gRPC's reader reads
            handle_events()
        except BlockingIOError:
            # Another loop bound to the same poller read the bytes first; it runs the queued
            # completions (handing ours to this loop), so there is nothing left to do here.
            return

    drain_then_handle.__smc_coalesced__ = True  # type: ignore[attr-defined]
    drain_then_handle.__wrapped__ = handle_events  # type: ignore[attr-defined]
    loop.remove_reader(sock)
    loop.add_reader(sock, drain_then_handle)
    return True
