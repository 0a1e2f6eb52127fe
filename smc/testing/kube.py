"""A real Kubernetes API (kube-apiserver + etcd) on 127.0.0.1, for tests.

Role: :func:`ensure_kube_apiserver` builds ``kube-apiserver`` once per machine from the
``k8s.io/kubernetes`` Go module (recipe: ``deploy/k8s/apiserver/go.mod``, which requires
``k8s.io/kubernetes`` and replaces its staging modules with their published ``v0.X.Y``) into
``~/.cache/smc/kube-apiserver-<version>/`` (``$SMC_KUBE_APISERVER`` names a ready binary
instead); a failed build is remembered there with its error so later runs report it at once.
:func:`ensure_etcd` installs Debian's ``etcd-server``/``etcd-client`` when ``etcd`` is missing.
:class:`KubeAPIServer` starts etcd (data in a temporary folder, on tmpfs when there is one) and
kube-apiserver on free ports, with a serving certificate and a service-account signing key it
generates, a static bearer token for an admin user in ``system:masters`` and RBAC, waits for
``/readyz``, writes a kubeconfig, and hands out :mod:`kubernetes` client configurations.
:meth:`KubeAPIServer.install_smi_crds` applies ``deploy/k8s/crds/*.yaml`` and waits until every
CRD is Established and every served version answers; :meth:`KubeAPIServer.compact_etcd`
compacts etcd's history (watches from before then get 410 Gone); :meth:`KubeAPIServer.restart`
restarts the apiserver (and optionally etcd) on the same ports and data. :class:`TcpCutter` is
a TCP forwarder in front of it whose connections a test can reset (watch cut, outage).
No controller-manager, scheduler or kubelet runs: Pods stay Pending, namespaces are never
finalized, and the ``ServiceAccount`` admission plugin is disabled (it needs the token
controller), so Pods are admitted without a ServiceAccount object.
Concurrency: a server object is driven from one thread (start/stop/restart block). Children are
killed at interpreter exit (``atexit``) and when the thread that started them ends
(``PR_SET_PDEATHSIG``): call start()/restart() from a long-lived thread such as the main thread,
never through ``asyncio.to_thread`` or another short-lived worker.
The build cache is guarded by a file lock so several processes may ask for it at once.
Layout: the build and etcd install live in :mod:`smc.testing._kube_build`, the throwaway PKI in
:mod:`smc.testing._kube_pki`, :class:`TcpCutter` in :mod:`smc.testing._kube_tcp`,
:func:`create_http_traffic_target` in :mod:`smc.testing._kube_smi`; every public name is
re-exported here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from smc.testing._kube_build import (
    CRD_DIR,
    KUBERNETES_VERSION,
    KubeBuildError,
    KubeHarnessError,
    ensure_etcd,
    ensure_kube_apiserver,
    kube_apiserver_cache_dir,
)
from smc.testing._kube_pki import _SERVICE_CIDR, _write_pki
from smc.testing._kube_smi import create_http_traffic_target
from smc.testing._kube_tcp import TcpCutter
from smc.testing._proc import die_with_parent
from smc.testing.ports import free_port

__all__ = [
    "CRD_DIR",
    "KUBERNETES_VERSION",
    "KubeAPIServer",
    "KubeBuildError",
    "KubeHarnessError",
    "TcpCutter",
    "create_http_traffic_target",
    "ensure_etcd",
    "ensure_kube_apiserver",
    "kube_apiserver_cache_dir",
    "kube_apiserver_fixture",
]


def _stop_process(proc: subprocess.Popen[bytes] | None, *, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


class KubeAPIServer:
    """etcd + kube-apiserver on 127.0.0.1; use as a context manager or start()/stop().

    ``watch_cache=False`` serves watches straight from etcd, so a watch from a revision older
    than the last :meth:`compact_etcd` gets 410 Gone (with the watch cache, 410 depends on the
    cache's window instead). ``extra_args`` are appended to kube-apiserver's command line.
    """

    def __init__(
        self,
        *,
        binary: str | Path | None = None,
        watch_cache: bool = True,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        build: bool = True,
    ) -> None:
        self._binary = Path(binary) if binary is not None else None
        self._watch_cache = watch_cache
        self._extra_args = tuple(extra_args)
        self._startup_timeout = startup_timeout
        self._build = build
        self._token = f"smc-admin-{secrets.token_hex(16)}"
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._etcd_port = 0
        self._etcd_peer_port = 0
        self._port = 0
        self._etcdctl: Path | None = None
        self._etcd_bin: Path | None = None
        self._started_at = 0.0
        self.startup_seconds = 0.0
        """How long the last start() took until ``/readyz`` answered ``ok``."""

    def __repr__(self) -> str:
        return f"KubeAPIServer(host={self.host!r}, running={self.running})"

    # -- addresses and credentials -------------------------------------------------------
    @property
    def folder(self) -> Path:
        if self._dir is None:
            raise KubeHarnessError("the apiserver has not been started")
        return Path(self._dir.name)

    @property
    def host(self) -> str:
        """``https://127.0.0.1:<port>``."""
        return f"https://127.0.0.1:{self._port}" if self._port else "<not started>"

    @property
    def port(self) -> int:
        return self._port

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self._etcd_port}"

    @property
    def token(self) -> str:
        """Bearer token of the ``smc-admin`` user (group ``system:masters``)."""
        return self._token

    @property
    def ca_path(self) -> Path:
        """PEM CA that signed the apiserver's serving certificate."""
        return self.folder / "pki" / "ca.crt"

    @property
    def kubeconfig_path(self) -> Path:
        """A kubeconfig for the admin user (context ``smc-test``)."""
        return self.folder / "kubeconfig.yaml"

    @property
    def running(self) -> bool:
        return (
            self._apiserver is not None
            and self._apiserver.poll() is None
            and self._etcd is not None
            and self._etcd.poll() is None
        )

    @property
    def apiserver_pid(self) -> int | None:
        return self._apiserver.pid if self._apiserver is not None else None

    @property
    def etcd_pid(self) -> int | None:
        return self._etcd.pid if self._etcd is not None else None

    def log_tail(self, which: str = "apiserver", lines: int = 40) -> str:
        """Last lines of ``apiserver`` or ``etcd`` output."""
        if self._dir is None:
            return ""
        path = self.folder / f"{which}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def configuration(self) -> Any:
        """A fresh :class:`kubernetes.client.Configuration` for the admin user."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.host
        cfg.api_key = {"authorization": self._token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        cfg.ssl_ca_cert = str(self.ca_path)
        cfg.verify_ssl = True
        return cfg

    def api_client(self) -> Any:
        """A new :class:`kubernetes.client.ApiClient` (close it when done)."""
        from kubernetes import client

        return client.ApiClient(self.configuration())

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context trusting the apiserver's CA (for aiohttp / urllib)."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> KubeAPIServer:
        if self.running:
            return self
        binary = self._binary or ensure_kube_apiserver(build=self._build)
        self._binary = binary
        self._etcd_bin, self._etcdctl = ensure_etcd()
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="smc-kube-", dir=base)
        pki = self.folder / "pki"
        pki.mkdir()
        _write_pki(pki)
        (self.folder / "tokens.csv").write_text(
            f'{self._token},smc-admin,smc-admin-uid,"system:masters"\n', encoding="utf-8"
        )
        self._etcd_port, self._etcd_peer_port, self._port = free_port(), free_port(), free_port()
        self._write_kubeconfig()
        atexit.register(self.stop)
        try:
            self._start_etcd()
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop kube-apiserver and etcd and delete their data."""
        apiserver, self._apiserver = self._apiserver, None
        etcd, self._etcd = self._etcd, None
        _stop_process(apiserver)
        _stop_process(etcd)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def restart(self, *, etcd: bool = False, kill: bool = False) -> None:
        """Restart kube-apiserver (and etcd too with ``etcd=True``) on the same ports and data;
        open watches are cut. ``kill=True`` ends it with SIGKILL (a crash) instead of a graceful
        SIGTERM shutdown (which waits for open watches to drain). Returns once ``/readyz``
        answers ``ok`` again."""
        if self._dir is None:
            raise KubeHarnessError("restart(): the apiserver has never been started")
        if kill and self._apiserver is not None and self._apiserver.poll() is None:
            self._apiserver.kill()
            self._apiserver.wait(timeout=15)
        _stop_process(self._apiserver)
        self._apiserver = None
        if etcd:
            _stop_process(self._etcd)
            self._etcd = None
            self._start_etcd()
        self._start_apiserver()

    def __enter__(self) -> KubeAPIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.folder / log_name, "ab") as log:
            return subprocess.Popen(
                die_with_parent(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
            )

    def _start_etcd(self) -> None:
        assert self._etcd_bin is not None
        peer = f"http://127.0.0.1:{self._etcd_peer_port}"
        argv = [
            str(self._etcd_bin),
            "--name=smc-test",
            f"--data-dir={self.folder / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=smc-test={peer}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-level=warn",
            # Progress notifications let the apiserver's watch cache advance (and send
            # bookmarks) while a resource does not change, as in Kubernetes' own test clusters.
            "--experimental-watch-progress-notify-interval=2s",
        ]
        self._etcd = self._spawn(argv, "etcd.log")
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self._etcd.poll() is not None:
                raise KubeHarnessError(
                    f"etcd exited with code {self._etcd.returncode}:\n{self.log_tail('etcd')}"
                )
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=1.0) as resp:
                    if json.loads(resp.read()).get("health") in ("true", True):
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise KubeHarnessError(f"etcd on {self.etcd_url} not healthy after 30s")

    def _start_apiserver(self) -> None:
        assert self._binary is not None
        pki = self.folder / "pki"
        argv = [
            str(self._binary),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            "--etcd-compaction-interval=0",  # compaction only through compact_etcd()
            f"--secure-port={self._port}",
            f"--cert-dir={self.folder / 'certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={self.folder / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--anonymous-auth=false",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={_SERVICE_CIDR}",
            "--disable-admission-plugins=ServiceAccount",
            f"--watch-cache={'true' if self._watch_cache else 'false'}",
            "--profiling=false",
            "--v=0",
            *self._extra_args,
        ]
        started = time.monotonic()
        self._apiserver = self._spawn(argv, "apiserver.log")
        self._wait_ready(started)

    def get(self, path: str, *, timeout: float = 2.0) -> tuple[int, bytes]:
        """``GET path`` as the admin user: (HTTP status, body)."""
        req = urllib.request.Request(
            f"{self.host}{path}", headers={"Authorization": f"Bearer {self._token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def _wait_ready(self, started: float) -> None:
        deadline = started + self._startup_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self._apiserver is None or self._apiserver.poll() is not None:
                code = self._apiserver.returncode if self._apiserver is not None else None
                raise KubeHarnessError(
                    f"kube-apiserver exited with code {code}:\n{self.log_tail()}"
                )
            try:
                status, body = self.get("/readyz")
                if status == 200:
                    # The default namespace is created by a post-start hook shortly after.
                    if self.get("/api/v1/namespaces/default")[0] == 200:
                        self.startup_seconds = time.monotonic() - started
                        return
                    last = "namespace default not created yet"
                else:
                    last = f"/readyz {status}: {body[-300:].decode(errors='replace')}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise KubeHarnessError(
            f"kube-apiserver on {self.host} not ready after {self._startup_timeout}s "
            f"({last}):\n{self.log_tail()}"
        )

    def _write_kubeconfig(self) -> None:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "smc-test",
                    "cluster": {"server": self.host, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": "smc-admin", "user": {"token": self._token}}],
            "contexts": [
                {"name": "smc-test", "context": {"cluster": "smc-test", "user": "smc-admin"}}
            ],
            "current-context": "smc-test",
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")

    # -- etcd ----------------------------------------------------------------------------------
    def _etcdctl_run(self, *args: str) -> str:
        if self._etcdctl is None or self._etcd is None:
            raise KubeHarnessError("etcd is not running")
        proc = subprocess.run(
            [str(self._etcdctl), f"--endpoints={self.etcd_url}", *args],
            env=dict(os.environ, ETCDCTL_API="3"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise KubeHarnessError(
                f"etcdctl {' '.join(args)} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc.stdout

    def etcd_revision(self) -> int:
        """etcd's current revision (Kubernetes resourceVersions are etcd revisions)."""
        status = json.loads(self._etcdctl_run("endpoint", "status", "--write-out=json"))
        return int(status[0]["Status"]["header"]["revision"])

    def compact_etcd(self, revision: int | None = None) -> int:
        """Compact etcd's history up to ``revision`` (default: the current one) and return it;
        a watch or list from an older resourceVersion then answers 410 Gone (served from etcd,
        i.e. with ``watch_cache=False`` for watches)."""
        rev = revision if revision is not None else self.etcd_revision()
        self._etcdctl_run("compact", str(rev), "--physical")
        return rev

    # -- CRDs ------------------------------------------------------------------------------------
    def install_crds(self, paths: Sequence[Path], *, timeout: float = 60.0) -> list[str]:
        """Create (or replace) the CRDs in ``paths`` and wait until each is Established and
        every served version answers a list; returns the CRD names."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        docs: list[dict[str, Any]] = []
        for path in paths:
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if not doc:
                    continue
                if doc.get("kind") != "CustomResourceDefinition":
                    raise KubeHarnessError(f"{path}: not a CustomResourceDefinition")
                docs.append(doc)
        with self.api_client() as api:
            ext: Any = client.ApiextensionsV1Api(api)
            custom: Any = client.CustomObjectsApi(api)
            for doc in docs:
                name = doc["metadata"]["name"]
                try:
                    ext.create_custom_resource_definition(body=doc)
                except ApiException as exc:
                    if exc.status != 409:
                        raise KubeHarnessError(
                            f"creating CRD {name} failed: {exc.status} {exc.body}"
                        ) from exc
                    current = ext.read_custom_resource_definition(name)
                    body = dict(doc)
                    body["metadata"] = {
                        **doc["metadata"],
                        "resourceVersion": current.metadata.resource_version,
                    }
                    ext.replace_custom_resource_definition(name, body=body)
            deadline = time.monotonic() + timeout
            for doc in docs:
                name = doc["metadata"]["name"]
                while True:
                    crd = ext.read_custom_resource_definition(name)
                    conds = {c.type: c.status for c in (crd.status.conditions or [])}
                    if conds.get("Established") == "True":
                        break
                    if time.monotonic() > deadline:
                        raise KubeHarnessError(f"CRD {name} not Established: {conds}")
                    time.sleep(0.1)
                spec = doc["spec"]
                for version in spec["versions"]:
                    if not version.get("served", True):
                        continue
                    while True:
                        try:
                            custom.list_cluster_custom_object(
                                spec["group"], version["name"], spec["names"]["plural"], limit=1
                            )
                            break
                        except ApiException as exc:
                            if exc.status != 404 or time.monotonic() > deadline:
                                raise KubeHarnessError(
                                    f"{spec['group']}/{version['name']} "
                                    f"{spec['names']['plural']} not served: {exc.status}"
                                ) from exc
                            time.sleep(0.1)
        return [doc["metadata"]["name"] for doc in docs]

    def install_smi_crds(self, *, timeout: float = 60.0) -> list[str]:
        """Install ``deploy/k8s/crds/*.yaml`` (every SMI kind and version SMC reads)."""
        paths = sorted(CRD_DIR.glob("*.yaml"))
        if not paths:
            raise KubeHarnessError(f"no CRDs in {CRD_DIR}")
        return self.install_crds(paths, timeout=timeout)


def kube_apiserver_fixture(*, smi_crds: bool = True, **kwargs: Any) -> Iterator[KubeAPIServer]:
    """Start an apiserver (with the SMI CRDs unless ``smi_crds`` is false), yield it, stop it;
    skips the test when kube-apiserver cannot be built here. Wrap it in a pytest fixture of
    the scope you need::

        @pytest.fixture(scope="module")
        def kube() -> Iterator[KubeAPIServer]:
            yield from kube_apiserver_fixture(watch_cache=False)

    Keyword arguments go to :class:`KubeAPIServer`.
    """
    import pytest

    server = KubeAPIServer(**kwargs)
    try:
        server.start()
    except KubeBuildError as exc:
        pytest.skip(f"kube-apiserver could not be built on this machine: {exc}")
    try:
        if smi_crds:
            server.install_smi_crds()
        yield server
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m smc.testing.kube``: build (or find) kube-apiserver and install etcd, so a
    test run does not pay for the build; prints the binary's path."""
    del argv
    try:
        binary = ensure_kube_apiserver()
        ensure_etcd()
    except KubeHarnessError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
