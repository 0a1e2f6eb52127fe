"""``promtool`` (Prometheus' rule checker) for the tests, built once per machine from Go.

Role: :func:`ensure_promtool` returns a runnable ``promtool``: ``$SMC_PROMTOOL`` if set, else
the cached build in ``~/.cache/smc/promtool-<version>/``, else it builds one with ``go build``
from the recipe ``deploy/monitoring/promtool/go.mod`` (a ``tool`` directive pinning the
``github.com/prometheus/prometheus`` module; ``go install ...@version`` refuses that module
because its go.mod has replace directives). Prometheus release binaries are not on PyPI; the Go
module proxy is the reproducible source. It is built with Prometheus' ``remove_all_sd`` tag
(no service-discovery plugins, which rule checks never use), once per machine.
``python -m smc.testing.promtool`` builds it ahead (``scripts/test.sh`` does).
Concurrency: a file lock serialises builds across processes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from smc.errors import SMCError

__all__ = ["PROMTOOL_MODULE_VERSION", "PromtoolError", "ensure_promtool"]

PROMTOOL_MODULE_VERSION = "v0.316.0"
_RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "promtool"


class PromtoolError(SMCError):
    """promtool could not be found or built."""


def _cache() -> Path:
    base = Path(os.environ.get("SMC_CACHE_DIR", Path.home() / ".cache" / "smc"))
    return base / f"promtool-{PROMTOOL_MODULE_VERSION}"


def ensure_promtool(*, timeout: float = 3600.0) -> Path:
    """Path of a runnable promtool (see the module docstring); raises :class:`PromtoolError`."""
    env_path = os.environ.get("SMC_PROMTOOL")
    if env_path:
        path = Path(env_path).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PromtoolError(f"SMC_PROMTOOL={env_path!r} is not an executable file")
        return path
    cache = _cache()
    binary = cache / "promtool"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    go = shutil.which("go")
    if go is None:
        raise PromtoolError("`go` is not on PATH: it is needed to build promtool")
    if not (_RECIPE / "go.mod").is_file():
        raise PromtoolError(f"the promtool recipe {_RECIPE / 'go.mod'} is missing")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        # build from a copy of the recipe: a checkout that changes meanwhile (a rebase, a
        # branch switch) cannot pull the module files from under the build
        recipe = cache / "recipe"
        recipe.mkdir(exist_ok=True)
        for name in ("go.mod", "go.sum"):
            shutil.copyfile(_RECIPE / name, recipe / name)
        tmp = cache / f".promtool.{os.getpid()}.tmp"
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"}
        nice = shutil.which("nice")
        # remove_all_sd: Prometheus' own build tag that leaves out the service-discovery
        # plugins (cloud SDKs), which rule checks and rule unit tests never use; it cuts the
        # build to a fraction
        argv = [*([nice, "-n", "19"] if nice else []), go, "build", "-trimpath", "-ldflags=-s"]
        argv += ["-tags", "remove_all_sd"]
        argv += ["-o", str(tmp), "github.com/prometheus/prometheus/cmd/promtool"]
        try:
            proc = subprocess.run(
                argv, cwd=recipe, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            tmp.unlink(missing_ok=True)
            raise PromtoolError(f"go build of promtool took over {timeout:.0f}s") from exc
        if proc.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            out = (proc.stdout + proc.stderr)[-3000:]
            raise PromtoolError(f"go build of promtool failed (exit {proc.returncode}):\n{out}")
        tmp.rename(binary)
    return binary


if __name__ == "__main__":
    print(ensure_promtool())
