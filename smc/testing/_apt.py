"""Debian packages the test harnesses need (etcd for the apiserver, iptables for pod networks).

Role: :func:`ensure_commands` finds commands by name (``PATH``, then ``/usr/sbin`` and
``/usr/bin``) and, when some are missing and we are root, installs the Debian packages that
carry them with ``apt-get``. Concurrency: several test processes may call it at once; one
installs under an exclusive file lock while the others wait, and apt-get itself waits for a
dpkg lock held by anything else on the machine instead of failing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from smc.errors import SMCError

__all__ = ["PackageError", "ensure_commands"]

_LOCK = Path(os.environ.get("TMPDIR", "/tmp")) / "smc-apt.lock"
_WAIT = ["-o", "DPkg::Lock::Timeout=600"]


class PackageError(SMCError):
    """A command is missing and its Debian package could not be installed."""


def _find(command: str) -> Path | None:
    found = shutil.which(command)
    if found:
        return Path(found)
    for folder in ("/usr/sbin", "/usr/bin", "/sbin"):
        path = Path(folder) / command
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:].strip()


def ensure_commands(commands: Mapping[str, str]) -> dict[str, Path]:
    """Paths of ``commands`` (command -> the Debian package that carries it), installing the
    packages of the missing ones (root only). Raises :class:`PackageError` naming them."""
    missing = [c for c in commands if _find(c) is None]
    if missing:
        packages = sorted({commands[c] for c in missing})
        if os.geteuid() != 0:
            raise PackageError(
                f"{', '.join(missing)} missing: run `apt-get install -y {' '.join(packages)}`"
                " as root"
            )
        with open(_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if any(_find(c) is None for c in missing):  # not installed meanwhile
                    _install(packages)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    out: dict[str, Path] = {}
    for command in commands:
        path = _find(command)
        if path is None:
            raise PackageError(f"{commands[command]} installed but {command} not found")
        out[command] = path
    return out


def _install(packages: list[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (
        ["apt-get", *_WAIT, "update", "-qq"],
        ["apt-get", *_WAIT, "install", "-y", "-qq", *packages],
    ):
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        if proc.returncode != 0:
            raise PackageError(
                f"`{' '.join(argv)}` failed (exit {proc.returncode}):\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )
