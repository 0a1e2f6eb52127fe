"""Free TCP ports on 127.0.0.1 for the real parts started by tests and benchmarks.

Role: helper. Ports are picked at random below the kernel's ephemeral range
(``net.ipv4.ip_local_port_range``) and checked bindable: a port from inside that range can be
taken, between the check and the server's bind, as the source port of any outgoing
connection on the machine (seen as Envoy's "cannot bind: Address already in use"). A port is
not handed out twice by one process. Concurrency: thread-safe; a port is only known free at
the moment of the call.
"""

from __future__ import annotations

import os
import random
import socket
import threading

__all__ = ["free_port"]

_given: set[int] = set()
_lock = threading.Lock()
_rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    low = _ephemeral_low()
    first, last = max(1024, low - 12_000), low - 1
    with _lock:
        if last - first >= 1000:
            for _ in range(200):
                port = _rng.randint(first, last)
                if port not in _given and _bindable(port):
                    _given.add(port)
                    return port
        # No room below the ephemeral range: let the kernel choose.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            chosen: int = s.getsockname()[1]
        _given.add(chosen)
        return chosen
