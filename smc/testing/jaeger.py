"""A real Jaeger (v2, all-in-one) trace collector for tracing tests.

Role: :func:`ensure_jaeger` finds the ``jaeger`` binary (``$SMC_JAEGER``, else
``~/.cache/smc/jaeger-<version>/jaeger``) or builds it once from the Go module
``github.com/jaegertracing/jaeger`` at :data:`JAEGER_VERSION` (``./cmd/jaeger``, see
:func:`smc.testing._gobuild.go_build_module`). :class:`Jaeger` runs it on 127.0.0.1 with a generated config on
free ports: a Zipkin receiver (HTTP JSON, ``/api/v2/spans``), an OTLP gRPC receiver, in-memory
storage and the query service, whose HTTP API (``/api/traces``) the tests read.
Concurrency: one process per :class:`Jaeger`; its methods are blocking (call them from a worker
thread inside an event loop).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from smc.errors import SMCError
from smc.testing._gobuild import GoBuildError, go_build_module
from smc.testing.ports import free_port

__all__ = ["JAEGER_VERSION", "Jaeger", "JaegerError", "ensure_jaeger"]

JAEGER_VERSION = "v1.75.0"
_MODULE = "github.com/jaegertracing/jaeger"


class JaegerError(SMCError):
    """Jaeger could not be built or did not start."""


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "smc" / f"jaeger-{JAEGER_VERSION.lstrip('v')}"


def ensure_jaeger() -> Path:
    """The path of a built ``jaeger`` binary (built on first use; needs ``go``)."""
    env_path = os.environ.get("SMC_JAEGER")
    if env_path:
        return Path(env_path)
    try:
        return go_build_module(
            module=_MODULE,
            version=JAEGER_VERSION,
            package="./cmd/jaeger",
            cache=_cache_dir(),
            name="jaeger",
        )
    except GoBuildError as exc:
        raise JaegerError(str(exc)) from None


_CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp, zipkin]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {receivers}:{otlp}
  zipkin:
    endpoint: {receivers}:{zipkin}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


class Jaeger:
    """A Jaeger all-in-one process: Zipkin on :attr:`zipkin_port`, OTLP gRPC on
    :attr:`otlp_port`, the query API on :attr:`query_port`."""

    def __init__(self, *, workdir: Path, receiver_host: str = "127.0.0.1") -> None:
        """``receiver_host``: where the Zipkin and OTLP receivers listen (``0.0.0.0`` when
        sidecars in pod network namespaces send spans too)."""
        self.workdir = workdir
        self.receiver_host = receiver_host
        self.zipkin_port = free_port()
        self.otlp_port = free_port()
        self.query_port = free_port()
        self._query_grpc = free_port()
        self._health = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 60.0) -> None:
        binary = ensure_jaeger()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "jaeger.yaml"
        config.write_text(
            _CONFIG.format(
                query=self.query_port,
                query_grpc=self._query_grpc,
                health=self._health,
                otlp=self.otlp_port,
                zipkin=self.zipkin_port,
                receivers=self.receiver_host,
            )
        )
        log = open(self.workdir / "jaeger.log", "wb")  # noqa: SIM115 - handed to the process
        self._proc = subprocess.Popen(
            [str(binary), f"--config=file:{config}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = (self.workdir / "jaeger.log").read_text(errors="replace")[-2000:]
                raise JaegerError(f"jaeger exited with {self._proc.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self._health}/status", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise JaegerError(f"jaeger did not become healthy within {timeout}s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def traces(self, service: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """Traces with a span of ``service`` (the query API's ``data`` list)."""
        query = urllib.parse.urlencode({"service": service, "limit": limit, "lookback": "1h"})
        url = f"http://127.0.0.1:{self.query_port}/api/traces?{query}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return list(data.get("data") or [])

    def services(self) -> list[str]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.query_port}/api/services", timeout=5
        ) as resp:
            return list(json.loads(resp.read()).get("data") or [])
