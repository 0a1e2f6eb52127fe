"""``smc serve`` as a child process, for end-to-end tests against real parts.

Role: :class:`ServeProcess` starts ``python -m smc.cli serve`` on a SQLite log in a work
folder (or ``log_url``) with the HTTP API on 127.0.0.1 and, unless told otherwise, a local CA
and ADS on ``xds_host`` (free ports), plus any extra arguments (``--kube KUBECONFIG``, ...);
output goes to ``serve-<http port>.log`` for diagnostics. :func:`http_json` and
:func:`eventually` are the small request and polling helpers those tests share.

Concurrency: used from one thread; the child dies with the test process.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from smc.testing._proc import die_with_parent
from smc.testing.ports import free_port

__all__ = ["ServeProcess", "eventually", "http_json"]


def http_json(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """One blocking request: the status and the body (parsed JSON when it is JSON, else
    text); an HTTP error status is returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), int(resp.status)
    except urllib.error.HTTPError as err:
        raw, status = err.read(), int(err.code)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def eventually(
    check: Callable[[], Any], *, what: str, diag: Callable[[], str], wait: float = 20.0
) -> Any:
    """Poll ``check`` until it returns something truthy (at most ``wait`` seconds); raises
    AssertionError naming ``what``, the last result and ``diag()``."""
    deadline = time.monotonic() + wait
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {wait}s waiting for {what} (last: {last!r})\n{diag()}"
            )
        time.sleep(0.1)


class ServeProcess:
    """``smc serve`` as a subprocess (see the module docstring)."""

    def __init__(
        self,
        tmp: Path,
        *,
        args: Sequence[str] = (),
        xds_host: str | None = "127.0.0.1",
        log_url: str | None = None,
    ) -> None:
        """``xds_host`` None: no ``--xds``/``--ca``/``--keys`` of its own (``args`` says)."""
        self.http_port = free_port()
        self.xds_port = free_port()
        self.xds_host = xds_host
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.out = tmp / f"serve-{self.http_port}.log"
        own = (
            []
            if xds_host is None
            else [
                "--xds",
                f"{xds_host}:{self.xds_port}",
                "--ca",
                f"local:{tmp / 'ca'}",
                "--keys",
                str(tmp / "keys"),
            ]
        )
        argv = [
            sys.executable,
            "-m",
            "smc.cli",
            "--log",
            log_url or f"sqlite:///{tmp / 'log.db'}",
            "serve",
            "--http",
            f"127.0.0.1:{self.http_port}",
            *own,
            *args,
        ]
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                die_with_parent(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def tail(self, n: int | None = 4000) -> str:
        """The last ``n`` characters of its output (all of it with None)."""
        text = self.out.read_text(errors="replace")
        return text if n is None else text[-n:]

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if http_json(self.base + "/readyz")[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"serve not ready in {timeout:.0f}s:\n{self.tail()}")

    def dump(self, node: str) -> dict[str, Any] | None:
        """The control plane's snapshot of ``node`` (``/debug/config_dump``), None if none."""
        status, body = http_json(f"{self.base}/debug/config_dump?node={node}")
        return body if status == 200 and isinstance(body, dict) else None

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed after 20 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
