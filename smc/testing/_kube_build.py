"""Building and finding the binaries of the test Kubernetes API: kube-apiserver, built once per
machine from the ``k8s.io/kubernetes`` Go module into ``~/.cache/smc``, and Debian's etcd.

Role: :func:`ensure_kube_apiserver` and :func:`ensure_etcd` for :mod:`smc.testing.kube` (which
re-exports them; see its docstring for the recipe and the remembered build failures); the
harness's errors :class:`KubeHarnessError` / :class:`KubeBuildError`.
Concurrency: the build cache is guarded by a file lock, so several processes may ask at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from smc.errors import SMCError
from smc.testing._apt import PackageError, ensure_commands

#: The ``k8s.io/kubernetes`` release built; keep in step with ``deploy/k8s/apiserver/go.mod``.
KUBERNETES_VERSION = "v1.37.2"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_RECIPE = _REPO_ROOT / "deploy" / "k8s" / "apiserver"
#: The SMI CustomResourceDefinitions :meth:`KubeAPIServer.install_smi_crds` applies.
CRD_DIR = _REPO_ROOT / "deploy" / "k8s" / "crds"
_BINARY = "kube-apiserver"
_FAILED = "build-error.txt"


class KubeHarnessError(SMCError):
    """etcd or kube-apiserver could not be installed, started, stopped or used."""


class KubeBuildError(KubeHarnessError):
    """kube-apiserver could not be built on this machine; the message holds the Go error."""


def kube_apiserver_cache_dir() -> Path:
    """``~/.cache/smc/kube-apiserver-<version>``: where the built binary is kept."""
    return Path.home() / ".cache" / "smc" / f"kube-apiserver-{KUBERNETES_VERSION}"


def _recipe_digest() -> str:
    h = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        path = _RECIPE / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def _tail(text: str, *, limit: int = 4000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _ldflags() -> str:
    """``-s`` plus the version stamps Kubernetes' own build scripts set (``/version``)."""
    major, minor, _ = KUBERNETES_VERSION.lstrip("v").split(".", 2)
    pkg = "k8s.io/component-base/version"
    stamps = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
    }
    return "-ldflags=-s " + " ".join(f"-X {pkg}.{k}={v}" for k, v in stamps.items())


def ensure_kube_apiserver(*, build: bool = True, timeout: float = 7200.0) -> Path:
    """Path of a runnable ``kube-apiserver``, building it once per machine if needed.

    ``$SMC_KUBE_APISERVER`` wins when set (it must be an executable file). Otherwise the
    binary in :func:`kube_apiserver_cache_dir` is used; if absent and ``build`` is true it is
    built with ``go build -trimpath -ldflags=-s`` (plus version stamps) from ``deploy/k8s/apiserver`` under
    ``nice -n 19`` with one compile job at a time (``GOFLAGS=-p=1``, ``GOMAXPROCS=1``), which
    takes tens of minutes on a small machine. A failed build leaves ``build-error.txt`` in the
    cache folder: as long as the recipe is unchanged, later calls raise :class:`KubeBuildError`
    with that error at once (delete the file to try again).
    """
    env_path = os.environ.get("SMC_KUBE_APISERVER")
    if env_path:
        path = Path(env_path).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise KubeHarnessError(f"SMC_KUBE_APISERVER={env_path!r} is not an executable file")
        return path
    cache = kube_apiserver_cache_dir()
    binary = cache / _BINARY
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    digest = _recipe_digest()
    failed = cache / _FAILED

    def previous_failure() -> None:
        if failed.is_file():
            text = failed.read_text(encoding="utf-8", errors="replace")
            first, _, rest = text.partition("\n")
            if first.strip() == digest:
                raise KubeBuildError(
                    f"kube-apiserver {KUBERNETES_VERSION} could not be built here "
                    f"(remembered in {failed}; delete it to retry):\n{rest.strip()}"
                )

    previous_failure()
    if not build:
        raise KubeHarnessError(f"{binary} is missing and building it was not allowed")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        previous_failure()
        go = shutil.which("go")
        if go is None:
            raise KubeBuildError("`go` is not on PATH: it is needed to build kube-apiserver")
        tmp = cache / f".{_BINARY}.{os.getpid()}.tmp"
        env = dict(os.environ)
        env.update(GOFLAGS="-p=1 -buildvcs=false", GOMAXPROCS="1", CGO_ENABLED="0")
        nice = shutil.which("nice")
        argv = [*([nice, "-n", "19"] if nice else []), go, "build", "-trimpath", _ldflags()]
        argv += ["-o", str(tmp), "k8s.io/kubernetes/cmd/kube-apiserver"]
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                cwd=_RECIPE,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            tmp.unlink(missing_ok=True)
            raise KubeBuildError(f"go build of kube-apiserver took over {timeout:.0f}s") from exc
        if proc.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            error = _tail(proc.stdout + proc.stderr)
            if proc.returncode > 0 and error:  # a real build error, not a killed build
                failed.write_text(f"{digest}\nexit {proc.returncode}\n{error}\n", encoding="utf-8")
            raise KubeBuildError(
                f"go build of kube-apiserver {KUBERNETES_VERSION} failed "
                f"(exit {proc.returncode}) in {_RECIPE}:\n{error}"
            )
        tmp.rename(binary)
        (cache / "build-seconds.txt").write_text(
            f"{time.monotonic() - started:.0f}\n", encoding="utf-8"
        )
        return binary


def ensure_etcd() -> tuple[Path, Path]:
    """Paths of ``etcd`` and ``etcdctl``, installing Debian's ``etcd-server`` and ``etcd-client``
    with apt-get when either is missing (needs root)."""
    try:
        found = ensure_commands({"etcd": "etcd-server", "etcdctl": "etcd-client"})
    except PackageError as exc:
        raise KubeHarnessError(str(exc)) from exc
    return found["etcd"], found["etcdctl"]
