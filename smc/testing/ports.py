"""Free TCP ports on 127.0.0.1 for the real parts started by tests and benchmarks.

Role: helper. Concurrency: thread-safe; a port is only known free at the moment of the call.
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
