"""Build a Go command from a module of the Go module proxy into ``~/.cache/smc``.

Role: :func:`go_build_module` downloads ``module@version`` with ``go mod download`` (the Go
module proxy), copies its source to a scratch directory (modules with ``replace`` directives
cannot be built with ``go install module@version``) and runs ``go build`` of one package there,
writing the binary to ``cache/name``. An exclusive file lock in ``cache`` makes parallel test
processes build it once; a finished binary is reused.
Concurrency: blocking; safe across processes (file lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from smc.errors import SMCError

__all__ = ["GoBuildError", "go_build_module"]


class GoBuildError(SMCError):
    """The Go toolchain is missing or the module could not be downloaded or built."""


def _go() -> str:
    found = shutil.which("go")
    if found:
        return found
    if Path("/usr/local/go/bin/go").exists():
        return "/usr/local/go/bin/go"
    raise GoBuildError("building needs the Go toolchain ('go' not found)")


def go_build_module(
    *, module: str, version: str, package: str, cache: Path, name: str, timeout: float = 3600.0
) -> Path:
    """``cache/name``, built from ``package`` (e.g. ``./cmd/jaeger``) of ``module@version``."""
    binary = cache / name
    if binary.exists():
        return binary
    go = _go()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        env = {**os.environ, "GOFLAGS": "-mod=mod -buildvcs=false"}
        with tempfile.TemporaryDirectory(prefix=f"{name}-build-") as tmp:
            done = subprocess.run(
                [go, "mod", "download", "-json", f"{module}@{version}"],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if done.returncode != 0:
                raise GoBuildError(f"go mod download {module}@{version}: {done.stderr[-800:]}")
            work = Path(tmp) / "src"
            shutil.copytree(Path(json.loads(done.stdout)["Dir"]), work)
            for p in work.rglob("*"):
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | 0o200)
            out = cache / f"{name}.tmp"
            done = subprocess.run(
                [go, "build", "-o", str(out), package],
                cwd=work,
                env={**env, "GOFLAGS": "-buildvcs=false"},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if done.returncode != 0:
                raise GoBuildError(f"go build {package} ({module}): {done.stderr[-800:]}")
            out.rename(binary)
    return binary
