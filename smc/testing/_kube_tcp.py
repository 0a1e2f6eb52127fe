"""A TCP forwarder on 127.0.0.1 in front of the test apiserver whose connections a test can
cut and restore (a dropped watch, an unreachable apiserver): :class:`TcpCutter`, re-exported by
:mod:`smc.testing.kube`.

Concurrency: one accepting thread and one pumping thread per connection; :meth:`TcpCutter.cut`
and :meth:`TcpCutter.resume` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from types import TracebackType

from smc.testing.ports import free_port


class TcpCutter:
    """A TCP forwarder on 127.0.0.1 in front of the apiserver whose connections a test can cut
    (real resets on real sockets: a dropped watch, an unreachable apiserver) and restore.

    TLS passes through untouched (the serving certificate names 127.0.0.1). Threads: one
    accepting, one pumping per connection; :meth:`cut` closes the listener and every connection
    (new ones are refused until :meth:`resume`, which listens on the same port again).
    """

    def __init__(self, *, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.cuts = 0

    @property
    def host(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> TcpCutter:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        self._thread = threading.Thread(target=self._accept, args=(ls,), daemon=True)
        self._thread.start()
        return self

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(a)
                self._conns.discard(b)
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones."""
        self.cuts += 1
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def resume(self) -> None:
        """Accept connections again (on the same port)."""
        if self._listener is None:
            self.start()

    def stop(self) -> None:
        self.cut()

    def __enter__(self) -> TcpCutter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
