"""A real global rate-limit service (envoyproxy/ratelimit on a real Redis) for tests.

Role: :class:`RateLimitService` starts ``redis-server`` (Debian's package, installed when
missing, see :mod:`smc.testing._apt`) and Envoy's reference rate-limit service
``github.com/envoyproxy/ratelimit`` (built once from the Go module proxy at
:data:`RATELIMIT_VERSION` into ``~/.cache/smc/ratelimit-<version>/``, or ``$SMC_RATELIMIT``),
on 127.0.0.1 and free ports, with the rate-limit configuration given as YAML (domains and
descriptors). Envoy talks to it over the rate-limit service gRPC protocol
(``envoy.service.ratelimit.v3.RateLimitService``) on :attr:`grpc_port`; counters live in Redis,
so every sidecar shares them (a *global* limit).
Concurrency: blocking methods; one process pair per instance.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from smc.errors import SMCError
from smc.testing._apt import ensure_commands
from smc.testing._gobuild import GoBuildError, go_build_module
from smc.testing.ports import free_port

__all__ = ["RATELIMIT_VERSION", "RateLimitError", "RateLimitService", "ensure_ratelimit"]

RATELIMIT_VERSION = "v1.4.1-0.20260122083618-3fb702589d36"
_MODULE = "github.com/envoyproxy/ratelimit"


class RateLimitError(SMCError):
    """The rate-limit service or Redis could not be built or started."""


def ensure_ratelimit() -> Path:
    """The path of a built ``ratelimit`` binary (built on first use; needs ``go``)."""
    env_path = os.environ.get("SMC_RATELIMIT")
    if env_path:
        return Path(env_path)
    cache = Path.home() / ".cache" / "smc" / f"ratelimit-{RATELIMIT_VERSION}"
    try:
        return go_build_module(
            module=_MODULE,
            version=RATELIMIT_VERSION,
            package="./src/service_cmd",
            cache=cache,
            name="ratelimit",
        )
    except GoBuildError as exc:
        raise RateLimitError(str(exc)) from None


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RateLimitError(
                f"{proc.args!r} exited {proc.returncode}: {log.read_text(errors='replace')[-1500:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RateLimitError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RateLimitService:
    """Redis plus envoyproxy/ratelimit serving ``config`` (rate-limit YAML)."""

    def __init__(self, *, workdir: Path, config: str, grpc_host: str = "127.0.0.1") -> None:
        """``grpc_host``: where the rate-limit gRPC service listens (``0.0.0.0`` when sidecars
        in pod network namespaces ask it)."""
        self.workdir = workdir
        self.grpc_host = grpc_host
        self.config = config
        self.redis_port = free_port()
        self.grpc_port = free_port()
        self._http_port = free_port()
        self._debug_port = free_port()
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, *, timeout: float = 30.0) -> None:
        found = ensure_commands({"redis-server": "redis-server"})
        binary = ensure_ratelimit()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn(
            [
                str(found["redis-server"]),
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            "redis.log",
            self.redis_port,
            timeout,
            env=None,
        )
        conf = self.workdir / "runtime" / "ratelimit" / "config"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "config.yaml").write_text(self.config)
        env = {
            **os.environ,
            "REDIS_SOCKET_TYPE": "tcp",
            "REDIS_URL": f"127.0.0.1:{self.redis_port}",
            "RUNTIME_ROOT": str(self.workdir / "runtime"),
            "RUNTIME_SUBDIRECTORY": "ratelimit",
            "RUNTIME_WATCH_ROOT": "false",
            "USE_STATSD": "false",
            "HOST": "127.0.0.1",
            "PORT": str(self._http_port),
            "GRPC_HOST": self.grpc_host,
            "GRPC_PORT": str(self.grpc_port),
            "DEBUG_HOST": "127.0.0.1",
            "DEBUG_PORT": str(self._debug_port),
            "LOG_LEVEL": "warn",
        }
        self._spawn([str(binary)], "ratelimit.log", self.grpc_port, timeout, env=env)

    def _spawn(
        self,
        cmd: list[str],
        log_name: str,
        port: int,
        timeout: float,
        *,
        env: dict[str, str] | None,
    ) -> None:
        log_path = self.workdir / log_name
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self._procs.append(proc)
        try:
            _wait_port(port, proc, log_path, timeout)
        except RateLimitError:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []
