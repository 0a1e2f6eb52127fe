"""Benchmark: SMC against sovereign (PyPI, a Python REST-xDS control plane) on the same Envoy.

Role: for each cluster count N (default 1,000 / 3,000 / 10,000) and each control plane, serves
N STATIC clusters (all pointing at one local backend address) to one real Envoy and measures:

- ``time_to_all_active_s``: from just before Envoy is started to the moment the last of the N
  clusters is in Envoy's active dynamic clusters (``/config_dump`` filtered to that one cluster,
  polled every ~5 ms), confirmed by ``cluster_manager.active_clusters`` = N + 1 (the static
  xDS cluster);
- ``change_latency_s``: from the change of one cluster at the control plane (SMC: a new snapshot
  set in the cache; sovereign: its instances file atomically replaced) to Envoy's config dump
  showing that cluster's new ``connect_timeout`` (p50/max over ``--changes`` changes);
  ``/stats`` is never polled in a timed window: at 10,000 clusters one call takes ~0.3 s of
  Envoy's main thread, which would slow down the very xDS updates being timed;
- control-plane CPU seconds (start-up, initial serve, per idle second, per change) and RSS
  (current and peak ``VmHWM``), read from ``/proc`` of the control-plane process;
- bytes the control plane sent to Envoy, read from Envoy's own counter
  ``cluster.<xds cluster>.upstream_cx_rx_bytes_total`` (same method for both planes).

SMC runs ``smc.xds`` (``AdsServer`` + ``SnapshotCache`` + ``Snapshot.from_entries``/``make_entry``)
in a child process of this script, pushing over ADS/gRPC: plane ``smc`` is state of the world
(every CDS update carries all N clusters), plane ``smc_delta`` is incremental xDS (a change
carries the one changed cluster). sovereign is
installed (pinned ``SOVEREIGN_VERSION``) into its own virtualenv under
``~/.cache/smc/sovereign-venv`` (its pins clash with ours), configured here with a file source
(one instance per cluster, re-read every ``--source-refresh-s`` seconds), a Python template for
``clusters`` and node matching off, and run as one uvicorn process. Envoy polls it over REST
(``api_type: REST``) every ``--refresh-s`` seconds: so sovereign's change latency is bounded
below by nothing and above by about source refresh + Envoy refresh + render time; both intervals
are written into the JSON. If sovereign cannot be installed or started, the exact error is
recorded in the JSON (``sovereign_error``) and no sovereign figure is made up.

Writes ``benchmarks/results/sovereign_compare.json``; prints a table with ratios
(sovereign / SMC: > 1 means SMC is faster or smaller). Not part of the test run.

Concurrency: one process drives everything synchronously (polling Envoy's admin API); each
control plane is a separate child process (SMC: this script with ``--smc-child``, its own asyncio
loop and grpc.aio server, driven by JSON lines over stdin/stdout), so its CPU and RSS are its own.

Usage: python benchmarks/sovereign_compare.py [--sizes 1000,3000,10000] [--changes 3]
       [--planes smc,smc_delta,sovereign] [--refresh-s 1] [--source-refresh-s 1]
       [--out benchmarks/results/sovereign_compare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from smc.testing.envoy import EnvoyProcess, envoy_binary  # noqa: E402
from smc.testing.ports import free_port  # noqa: E402

SOVEREIGN_VERSION = "0.32.12"
SOVEREIGN_VENV = Path.home() / ".cache" / "smc" / "sovereign-venv"
RESULTS = Path(__file__).resolve().parent / "results" / "sovereign_compare.json"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
NODE_ID = "bench-envoy"
NODE_CLUSTER = "bench"
SMC_XDS_CLUSTER = "smc_xds"
SOV_XDS_CLUSTER = "sovereign"
_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A step of the comparison failed; the message says which and why."""


# ---------------------------------------------------------------------- shared resources


def cluster_name(index: int) -> str:
    return f"svc-{index:05d}"


def cluster_dict(index: int, *, backend_port: int, timeout_s: int = 1) -> dict[str, Any]:
    """The Envoy Cluster (JSON form, without ``@type``) served by both control planes."""
    name = cluster_name(index)
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": f"{timeout_s}s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": backend_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


# ---------------------------------------------------------------------- /proc readings


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (children not included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of one process in MB."""
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


# ---------------------------------------------------------------------- SMC child process


def smc_child(clusters: int, backend_port: int) -> None:
    """Serve ``clusters`` STATIC clusters over ADS; commands as JSON lines on stdin."""
    import asyncio

    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    from smc.xds import CLUSTER, AdsServer, Snapshot, SnapshotCache, make_entry

    def entry(index: int, timeout_s: int = 1) -> Any:
        msg = json_format.ParseDict(
            cluster_dict(index, backend_port=backend_port, timeout_s=timeout_s),
            cluster_pb2.Cluster(),
        )
        return make_entry(msg)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        t = time.perf_counter()
        snapshot = Snapshot.from_entries(entry(i) for i in range(clusters))
        cache = SnapshotCache()
        cache.set_snapshot(node_id=NODE_ID, snapshot=snapshot)
        server = AdsServer(cache=cache)
        port = await server.start(host="127.0.0.1", port=0)
        server.mark_ready()
        say({"port": port, "prepare_s": time.perf_counter() - t})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "change":
                snap = cache.get(NODE_ID)
                assert snap is not None
                new = snap.replace(upsert=[entry(int(cmd["index"]), int(cmd["timeout_s"]))])
                cache.set_snapshot(node_id=NODE_ID, snapshot=new)
                say({"changed": True, "cds_version": new.version(CLUSTER)})
            elif cmd["op"] == "stop":
                break
        await server.stop(grace=0)
        say({"stopped": True})

    asyncio.run(serve())


class SmcPlane:
    """SMC's ADS server in a child process (this script with ``--smc-child``)."""

    xds_cluster = SMC_XDS_CLUSTER

    def __init__(self, *, clusters: int, backend_port: int, delta: bool = False) -> None:
        self.name = "smc_delta" if delta else "smc"
        self.delta = delta
        self.clusters = clusters
        self.backend_port = backend_port
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.prepare_s = 0.0
        kind = "incremental (delta)" if delta else "state of the world"
        self.info: dict[str, Any] = {"transport": f"ADS gRPC, {kind} (push)"}

    def start(self) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--smc-child",
            str(self.clusters),
            "--backend-port",
            str(self.backend_port),
        ]
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO)
        )
        hello = self._read()
        self.port = int(hello["port"])
        self.prepare_s = time.perf_counter() - t
        self.info["snapshot_build_s"] = round(float(hello["prepare_s"]), 3)

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"SMC child exited with {self.proc.wait()} before answering")
        out: dict[str, Any] = json.loads(line)
        return out

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def change(self, *, index: int, timeout_s: int) -> None:
        self._send({"op": "change", "index": index, "timeout_s": timeout_s})
        self._read()

    def config_source(self) -> dict[str, Any]:
        return {
            "ads_config": {
                "api_type": "DELTA_GRPC" if self.delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": SMC_XDS_CLUSTER}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        }

    def xds_cluster_def(self) -> dict[str, Any]:
        return _static_cluster(SMC_XDS_CLUSTER, self.port, http2=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self._send({"op": "stop"})
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------------- sovereign


def ensure_sovereign() -> tuple[Path, str]:
    """Return (python of the sovereign venv, installed version); install it if needed."""
    py = SOVEREIGN_VENV / "bin" / "python"
    probe = [str(py), "-c", "import importlib.metadata as m; print(m.version('sovereign'))"]
    if py.exists():
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return py, done.stdout.strip()
    SOVEREIGN_VENV.parent.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(SOVEREIGN_VENV)],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise BenchError(f"python -m venv {SOVEREIGN_VENV} failed: {made.stderr[-1500:]}")
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", f"sovereign=={SOVEREIGN_VERSION}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if pip.returncode != 0:
        raise BenchError(
            f"pip install sovereign=={SOVEREIGN_VERSION} failed (exit {pip.returncode}): "
            f"{(pip.stderr or pip.stdout)[-1500:]}"
        )
    done = subprocess.run(probe, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"sovereign installed but not importable: {done.stderr[-1500:]}")
    return py, done.stdout.strip()


_SOV_TEMPLATE = '''"""sovereign template (Python source) for the SMC comparison: one STATIC cluster per instance."""


def call(instances, **_context):
    for inst in instances:
        name = inst["name"]
        yield {
            "@type": "__CLUSTER_TYPE__",
            "name": name,
            "type": "STATIC",
            "connect_timeout": str(inst["timeout_s"]) + "s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": inst["port"]}}}}]}],
            },
        }
'''.replace("__CLUSTER_TYPE__", CLUSTER_TYPE)


class SovereignPlane:
    """sovereign (one uvicorn process) with a file source and a Python clusters template."""

    name = "sovereign"
    xds_cluster = SOV_XDS_CLUSTER

    def __init__(
        self,
        *,
        clusters: int,
        backend_port: int,
        python: Path,
        version: str,
        refresh_s: float,
        source_refresh_s: int,
        workdir: Path,
    ) -> None:
        self.clusters = clusters
        self.backend_port = backend_port
        self.python = python
        self.refresh_s = refresh_s
        self.source_refresh_s = source_refresh_s
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.prepare_s = 0.0
        self.timeouts = [1] * clusters
        self.log_path = workdir / "sovereign.log"
        self.info: dict[str, Any] = {
            "transport": "REST-JSON polling (Envoy api_type REST)",
            "version": version,
            "envoy_refresh_delay_s": refresh_s,
            "source_refresh_rate_s": source_refresh_s,
            "server": "uvicorn.run(sovereign.app.app), one process",
        }

    def _write_instances(self) -> None:
        data = [
            {"name": cluster_name(i), "timeout_s": t, "port": self.backend_port}
            for i, t in enumerate(self.timeouts)
        ]
        path = self.workdir / "instances.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_instances()
        template = self.workdir / "clusters_template.py"
        template.write_text(_SOV_TEMPLATE)
        config = {
            "templates": {
                "default": [
                    {"type": "clusters", "spec": {"protocol": "python", "path": str(template)}}
                ]
            },
            "sources": [
                {
                    "type": "file",
                    "scope": "default",
                    "config": {
                        "spec": {
                            "protocol": "file",
                            "serialization": "json",
                            "path": str(self.workdir / "instances.json"),
                        }
                    },
                }
            ],
            "source_config": {"refresh_rate": self.source_refresh_s},
            "matching": {"enabled": False},
            "logging": {"access_logs": {"enabled": False}, "application_logs": {"enabled": False}},
        }
        cfg_path = self.workdir / "sovereign.json"
        cfg_path.write_text(json.dumps(config, indent=1))
        self.port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SOVEREIGN_")},
            "SOVEREIGN_CONFIG": f"file+json://{cfg_path}",
            "SOVEREIGN_ENABLE_ACCESS_LOGS": "false",
            "SOVEREIGN_ENABLE_APPLICATION_LOGS": "false",
            "PYTHONPATH": "",
        }
        # As sovereign's own ``app.py`` main does: import the app (it loads config, sources and
        # templates at import, outside any event loop), then uvicorn.run it in this one process.
        code = (
            "import uvicorn, sovereign.app as a; "
            f"uvicorn.run(a.app, host='127.0.0.1', port={self.port}, "
            "log_level='warning', access_log=False)"
        )
        cmd = [str(self.python), "-c", code]
        self.info["command"] = code
        t = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.workdir),
                env=env,
            )
        deadline = time.monotonic() + 120
        url = f"http://127.0.0.1:{self.port}/healthcheck"
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"sovereign exited with {self.proc.returncode} at start-up: "
                    f"{self.log_path.read_text(errors='replace')[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(
                    "sovereign did not answer /healthcheck within 120 s: "
                    f"{self.log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.1)
        self.prepare_s = time.perf_counter() - t

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def change(self, *, index: int, timeout_s: int) -> None:
        self.timeouts[index] = timeout_s
        self._write_instances()

    def config_source(self) -> dict[str, Any]:
        return {
            "cds_config": {
                "resource_api_version": "V3",
                "api_config_source": {
                    "api_type": "REST",
                    "transport_api_version": "V3",
                    "cluster_names": [SOV_XDS_CLUSTER],
                    "refresh_delay": f"{self.refresh_s}s",
                    "request_timeout": "60s",
                },
            }
        }

    def xds_cluster_def(self) -> dict[str, Any]:
        return _static_cluster(SOV_XDS_CLUSTER, self.port, http2=False)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------------- Envoy side


def _static_cluster(name: str, port: int, *, http2: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return out


def bootstrap(plane: SmcPlane | SovereignPlane, admin_port: int) -> dict[str, Any]:
    return {
        "node": {"id": NODE_ID, "cluster": NODE_CLUSTER},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": plane.config_source(),
        "static_resources": {"clusters": [plane.xds_cluster_def()]},
    }


def envoy_stats(envoy: EnvoyProcess, xds_cluster: str) -> dict[str, int]:
    """A few counters/gauges only (the full stats of 10,000 clusters are megabytes)."""
    query = urllib.parse.urlencode(
        {
            "format": "json",
            "filter": rf"^(cluster_manager\.|server\.memory_allocated$|"
            rf"cluster\.{xds_cluster}\.upstream_cx_(rx|tx)_bytes_total$)",
        }
    )
    with urllib.request.urlopen(f"{envoy.admin_url}/stats?{query}", timeout=10) as resp:
        body = json.loads(resp.read())
    return {
        e["name"]: e["value"]
        for e in body.get("stats", [])
        if "name" in e and isinstance(e.get("value"), int)
    }


def cluster_config(envoy: EnvoyProcess, name: str) -> dict[str, Any] | None:
    """The active dynamic cluster ``name`` from ``/config_dump`` (None while absent)."""
    query = urllib.parse.urlencode(
        {"resource": "dynamic_active_clusters", "name_regex": f"^{name}$"}
    )
    with urllib.request.urlopen(f"{envoy.admin_url}/config_dump?{query}", timeout=10) as resp:
        body = json.loads(resp.read())
    for conf in body.get("configs", []):
        cluster = conf.get("cluster")
        if isinstance(cluster, dict) and cluster.get("name") == name:
            return cluster
    return None


def wait_cluster(
    envoy: EnvoyProcess, name: str, pred: Any, *, timeout: float, what: str
) -> tuple[float, dict[str, Any]]:
    """Poll one cluster's config every ~5 ms until ``pred(cluster)``; returns (time, cluster)."""
    deadline = time.monotonic() + timeout
    while True:
        if not envoy.running():
            raise BenchError(f"Envoy exited while waiting for {what}")
        try:
            cluster = cluster_config(envoy, name)
        except (OSError, urllib.error.URLError, ValueError):
            cluster = None
        if cluster is not None and pred(cluster):
            return time.perf_counter(), cluster
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}; last {cluster}")
        time.sleep(0.005)


def wait_stats(
    envoy: EnvoyProcess, xds_cluster: str, pred: Any, *, timeout: float, what: str
) -> tuple[float, dict[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        if not envoy.running():
            raise BenchError(f"Envoy exited while waiting for {what}")
        try:
            stats = envoy_stats(envoy, xds_cluster)
        except (OSError, urllib.error.URLError, ValueError):
            stats = {}
        if stats and pred(stats):
            return time.perf_counter(), stats
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}; last stats {stats}")
        time.sleep(0.01)


# ---------------------------------------------------------------------- one run


def run_one(
    plane: SmcPlane | SovereignPlane, *, clusters: int, changes: int, idle_s: float, timeout: float
) -> dict[str, Any]:
    binary = envoy_binary()
    plane.start()
    pid = plane.pid
    cpu_start = proc_cpu_s(pid)
    rss_ready, _ = proc_mem_mb(pid)
    out: dict[str, Any] = {
        "plane": plane.name,
        "clusters": clusters,
        "load_average_before": os.getloadavg(),
        **plane.info,
        "control_plane_start_s": round(plane.prepare_s, 3),
        "control_plane_start_cpu_s": round(cpu_start, 3),
        "control_plane_rss_ready_mb": round(rss_ready, 1),
    }
    envoy = EnvoyProcess(
        bootstrap=bootstrap(plane, free_port()), binary=binary, log_level="warning"
    )
    try:
        t0 = time.perf_counter()
        envoy.start(timeout=60)
        want = clusters + 1  # + the static xDS cluster
        # Timing polls only ask for one cluster's config (a few ms even with 10,000 clusters):
        # /stats walks every stat (~0.3 s at 10,000 clusters, on Envoy's main thread, which
        # also applies xDS), so it is read only outside the timed windows.
        t_first, _ = wait_cluster(
            envoy, cluster_name(0), lambda c: True, timeout=timeout, what="the first cluster"
        )
        out["time_to_first_cluster_s"] = round(t_first - t0, 3)
        t_last, _ = wait_cluster(
            envoy,
            cluster_name(clusters - 1),
            lambda c: True,
            timeout=timeout,
            what=f"cluster {cluster_name(clusters - 1)}",
        )
        stats = envoy_stats(envoy, plane.xds_cluster)
        if stats.get("cluster_manager.active_clusters", 0) < want:  # not all there yet
            t_last, stats = wait_stats(
                envoy,
                plane.xds_cluster,
                lambda s: s.get("cluster_manager.active_clusters", 0) >= want,
                timeout=timeout,
                what=f"{clusters} clusters active",
            )
        out["time_to_all_active_s"] = round(t_last - t0, 3)
        # Envoy's own CPU to get there: unlike wall time, not stretched by other load.
        assert envoy.pid is not None
        out["envoy_cpu_to_all_active_s"] = round(proc_cpu_s(envoy.pid), 3)
        out["active_clusters"] = stats.get("cluster_manager.active_clusters", 0)
        cpu_init = proc_cpu_s(pid)
        out["initial_serve_cpu_s"] = round(cpu_init - cpu_start, 3)
        out["control_plane_rss_after_initial_mb"] = round(proc_mem_mb(pid)[0], 1)
        out["envoy_memory_allocated_mb"] = round(stats.get("server.memory_allocated", 0) / 2**20, 1)
        rx0 = stats.get(f"cluster.{plane.xds_cluster}.upstream_cx_rx_bytes_total", 0)
        out["bytes_to_envoy_initial"] = rx0
        # Idle: what keeping Envoy current costs when nothing changes (REST polling re-renders).
        time.sleep(idle_s)
        cpu_idle = proc_cpu_s(pid)
        stats = envoy_stats(envoy, plane.xds_cluster)
        rx1 = stats.get(f"cluster.{plane.xds_cluster}.upstream_cx_rx_bytes_total", 0)
        modified0 = stats.get("cluster_manager.cluster_modified", 0)
        out["idle_window_s"] = idle_s
        out["idle_cpu_s_per_s"] = round((cpu_idle - cpu_init) / idle_s, 4)
        out["idle_bytes_to_envoy_per_s"] = round((rx1 - rx0) / idle_s, 1)
        latencies = []
        for k in range(changes):
            index = (k * 7919) % clusters
            new_timeout = f"{2 + k}s"
            t = time.perf_counter()
            plane.change(index=index, timeout_s=2 + k)
            t_done, _ = wait_cluster(
                envoy,
                cluster_name(index),
                lambda c, v=new_timeout: c.get("connect_timeout") == v,
                timeout=timeout,
                what=f"change {k + 1} (connect_timeout {new_timeout}) applied",
            )
            latencies.append(t_done - t)
            time.sleep(0.2)
        stats = envoy_stats(envoy, plane.xds_cluster)
        out["cluster_modified"] = stats.get("cluster_manager.cluster_modified", 0) - modified0
        cpu_end = proc_cpu_s(pid)
        rx2 = stats.get(f"cluster.{plane.xds_cluster}.upstream_cx_rx_bytes_total", 0)
        rss, hwm = proc_mem_mb(pid)
        out["change_latency_s"] = [round(x, 4) for x in latencies]
        out["change_latency_p50_s"] = round(statistics.median(latencies), 4) if latencies else None
        out["change_latency_max_s"] = round(max(latencies), 4) if latencies else None
        out["changes_window_cpu_s"] = round(cpu_end - cpu_idle, 3)
        out["bytes_to_envoy_changes_window"] = rx2 - rx1
        out["bytes_to_envoy_total"] = rx2
        out["bytes_from_envoy_total"] = stats.get(
            f"cluster.{plane.xds_cluster}.upstream_cx_tx_bytes_total", 0
        )
        out["control_plane_cpu_total_s"] = round(cpu_end, 3)
        out["control_plane_rss_mb"] = round(rss, 1)
        out["control_plane_peak_rss_mb"] = round(hwm, 1)
        out["cds_update_success"] = stats.get("cluster_manager.cds.update_success", 0)
        out["cds_update_rejected"] = stats.get("cluster_manager.cds.update_rejected", 0)
    finally:
        envoy.close()
        plane.stop()
    return out


# ---------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


SMC_VARIANTS = ("smc", "smc_delta")
RATIO_FIGURES = [
    ("time_to_all_active_s", "s", "time to all clusters active"),
    ("envoy_cpu_to_all_active_s", "CPU s", "Envoy CPU to all clusters active"),
    ("change_latency_p50_s", "s", "one-cluster change applied (p50)"),
    ("initial_serve_cpu_s", "CPU s", "control-plane CPU, initial serve"),
    ("idle_cpu_s_per_s", "CPU s/s", "control-plane CPU while idle"),
    ("control_plane_peak_rss_mb", "MB", "control-plane peak RSS"),
    ("bytes_to_envoy_total", "B", "bytes sent to Envoy (whole run)"),
]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (plane, N) over its repeats: best time to all active (Envoy-bound and
    load-sensitive), change latencies pooled, medians of CPU and bytes, highest peak RSS."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[int, str], str] = {}
    for r in runs:
        key = (r["clusters"], r["plane"])
        if "error" in r:
            errors.setdefault(key, r["error"])
        else:
            groups.setdefault(key, []).append(r)
    out: list[dict[str, Any]] = []
    for key in sorted(set(groups) | set(errors), key=lambda k: (k[0], k[1])):
        n, plane = key
        ok = groups.get(key, [])
        if not ok:
            out.append({"plane": plane, "clusters": n, "error": errors[key]})
            continue
        lat = [x for r in ok for x in r["change_latency_s"]]

        def med(name: str, rows: list[dict[str, Any]] = ok) -> float:
            return round(float(statistics.median(r[name] for r in rows)), 4)

        out.append(
            {
                "plane": plane,
                "clusters": n,
                "repeats": len(ok),
                "failed_repeats": len(
                    [r for r in runs if "error" in r and (r["clusters"], r["plane"]) == key]
                ),
                "time_to_all_active_s": min(r["time_to_all_active_s"] for r in ok),
                "time_to_all_active_all_s": [r["time_to_all_active_s"] for r in ok],
                "time_to_first_cluster_s": min(r["time_to_first_cluster_s"] for r in ok),
                "envoy_cpu_to_all_active_s": med("envoy_cpu_to_all_active_s"),
                "change_latency_p50_s": round(statistics.median(lat), 4),
                "change_latency_max_s": max(lat),
                "change_samples": len(lat),
                "initial_serve_cpu_s": med("initial_serve_cpu_s"),
                "idle_cpu_s_per_s": med("idle_cpu_s_per_s"),
                "control_plane_start_s": med("control_plane_start_s"),
                "control_plane_peak_rss_mb": max(r["control_plane_peak_rss_mb"] for r in ok),
                "bytes_to_envoy_initial": med("bytes_to_envoy_initial"),
                "bytes_to_envoy_total": med("bytes_to_envoy_total"),
                "envoy_memory_allocated_mb": med("envoy_memory_allocated_mb"),
                "cds_update_rejected": max(r["cds_update_rejected"] for r in ok),
            }
        )
    return out


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and SMC variant: sovereign / SMC for each figure (> 1: SMC faster / smaller)."""
    by: dict[tuple[int, str], dict[str, Any]] = {
        (r["clusters"], r["plane"]): r for r in runs if "error" not in r
    }
    out = []
    for n in sorted({r["clusters"] for r in runs}):
        sov = by.get((n, "sovereign"))
        for variant in SMC_VARIANTS:
            smc = by.get((n, variant))
            if smc is None or sov is None:
                continue
            row: dict[str, Any] = {"clusters": n, "smc_variant": variant}
            for key, _unit, _label in RATIO_FIGURES:
                row[key] = {
                    "smc": smc.get(key),
                    "sovereign": sov.get(key),
                    "sovereign_over_smc": _ratio(sov.get(key), smc.get(key)),
                }
            out.append(row)
    return out


def print_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    cols = [
        ("plane", "plane", 10),
        ("clusters", "N", 6),
        ("time_to_all_active_s", "all active s", 12),
        ("envoy_cpu_to_all_active_s", "Envoy CPU s", 11),
        ("change_latency_p50_s", "change p50 s", 12),
        ("change_latency_max_s", "change max s", 12),
        ("initial_serve_cpu_s", "init CPU s", 10),
        ("idle_cpu_s_per_s", "idle CPU/s", 10),
        ("control_plane_peak_rss_mb", "peak RSS MB", 11),
        ("bytes_to_envoy_total", "bytes->Envoy", 13),
    ]
    print(" ".join(f"{h:>{w}}" for _k, h, w in cols))
    for r in rows:
        if "error" in r:
            print(f"{r['plane']:>10} {r['clusters']:>6} ERROR: {r['error'][:200]}")
            continue
        cells = []
        for k, _h, w in cols:
            v = r.get(k)
            cells.append(f"{v:>{w}.3f}" if isinstance(v, float) else f"{v!s:>{w}}")
        print(" ".join(cells))
    for row in ratios:
        parts = [
            f"{label} {row[key]['sovereign_over_smc']}x"
            for key, _u, label in RATIO_FIGURES
            if row[key]["sovereign_over_smc"] is not None
        ]
        print(
            f"N={row['clusters']}: sovereign/{row['smc_variant']} (>1 = SMC better): "
            + "; ".join(parts)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,3000,10000", help="cluster counts, comma-separated")
    ap.add_argument("--changes", type=int, default=3, help="one-cluster changes per run")
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per plane and size (order alternates)"
    )
    ap.add_argument(
        "--planes", default="smc,smc_delta,sovereign", help="any of smc, smc_delta, sovereign"
    )
    ap.add_argument("--refresh-s", type=float, default=1.0, help="Envoy REST refresh_delay")
    ap.add_argument(
        "--source-refresh-s", type=int, default=1, help="sovereign source refresh (whole s)"
    )
    ap.add_argument("--idle-s", type=float, default=5.0, help="idle window for CPU/s")
    ap.add_argument("--timeout", type=float, default=300.0, help="per wait, seconds")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--smc-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smc_child is not None:
        smc_child(args.smc_child, args.backend_port)
        return
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        ap.error("--sizes needs at least one cluster count >= 1")
    planes = [p.strip() for p in args.planes.split(",") if p.strip()]
    unknown = set(planes) - {*SMC_VARIANTS, "sovereign"}
    if unknown:
        ap.error(f"--planes: unknown {sorted(unknown)}; use smc, smc_delta and/or sovereign")
    if args.repeats < 1 or args.changes < 1:
        ap.error("--repeats and --changes must be >= 1")
    if args.source_refresh_s < 1 or args.refresh_s <= 0:
        ap.error("--source-refresh-s must be >= 1 and --refresh-s > 0")

    result: dict[str, Any] = {
        "benchmark": "sovereign_compare",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "sizes": sizes,
        "changes": args.changes,
        "envoy_rest_refresh_delay_s": args.refresh_s,
        "sovereign_source_refresh_s": args.source_refresh_s,
        "note": (
            "sovereign is polled (Envoy REST refresh_delay) and re-reads its source every "
            "source_refresh_s, so its change latency is bounded by about refresh_delay + "
            "source refresh + render time; SMC pushes over ADS."
        ),
        "sovereign_error": None,
        "runs": [],
    }
    sov_python: Path | None = None
    if "sovereign" in planes:
        try:
            sov_python, version = ensure_sovereign()
            result["sovereign_version"] = version
        except BenchError as exc:
            result["sovereign_error"] = str(exc)
            print(f"sovereign unavailable: {exc}", file=sys.stderr)
    backend_port = free_port()
    with tempfile.TemporaryDirectory(prefix="smc-sov-") as tmp:
        for n in sizes:
            for rep in range(args.repeats):
                # Alternate the order per repeat so no plane always runs on a warmer machine.
                for name in planes if rep % 2 == 0 else planes[::-1]:
                    plane: SmcPlane | SovereignPlane
                    if name in SMC_VARIANTS:
                        plane = SmcPlane(
                            clusters=n, backend_port=backend_port, delta=name == "smc_delta"
                        )
                    elif sov_python is None:
                        continue
                    else:
                        plane = SovereignPlane(
                            clusters=n,
                            backend_port=backend_port,
                            python=sov_python,
                            version=result.get("sovereign_version", "?"),
                            refresh_s=args.refresh_s,
                            source_refresh_s=args.source_refresh_s,
                            workdir=Path(tmp) / f"sovereign-{n}-{rep}",
                        )
                    print(f"running {name} with {n} clusters (repeat {rep + 1}) ...", flush=True)
                    try:
                        r = run_one(
                            plane,
                            clusters=n,
                            changes=args.changes,
                            idle_s=args.idle_s,
                            timeout=args.timeout,
                        )
                    except Exception as exc:  # record any failure of one run, keep going
                        plane.stop()
                        r = {"plane": name, "clusters": n, "error": f"{type(exc).__name__}: {exc}"}
                        if name == "sovereign" and result["sovereign_error"] is None:
                            result["sovereign_error"] = r["error"]
                    r["repeat"] = rep + 1
                    result["runs"].append(r)
                    print(json.dumps(r), flush=True)
    result["summary"] = summarise(result["runs"])
    result["ratios"] = compare(result["summary"])
    print_table(result["summary"], result["ratios"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
