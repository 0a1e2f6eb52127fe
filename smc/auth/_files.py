"""Where SMC keeps credentials on a machine, and how it writes secrets to disk.

Role: :func:`config_root` (``$SMC_CONFIG_DIR`` or ``~/.config/smc``, 0700) and
:func:`server_dir` (``<root>/servers/<host>-<port>``: the API's TLS material, its admin token
and the client credential file of one ``smc serve`` HTTP address); :func:`write_private`
writes a file 0600 atomically (never readable by others, even for an instant).
Concurrency: file operations only; writes are atomic renames.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["config_root", "make_private_dir", "server_dir", "write_private"]


def config_root() -> Path:
    """``$SMC_CONFIG_DIR``, else ``~/.config/smc`` (not created here)."""
    env = os.environ.get("SMC_CONFIG_DIR")
    return Path(env) if env else Path.home() / ".config" / "smc"


def server_dir(host: str, port: int, *, root: Path | None = None) -> Path:
    """The folder of the server listening on ``host:port`` (``0.0.0.0``/``::`` included)."""
    safe = host.strip("[]").replace(":", "_") or "127.0.0.1"
    return (root or config_root()) / "servers" / f"{safe}-{port}"


def make_private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700 (existing ones are left)."""
    for parent in reversed(path.parents):
        if not parent.exists():
            parent.mkdir(mode=0o700, exist_ok=True)
    path.mkdir(exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` with ``mode`` (0600 by default), atomically: the temporary
    file is created with that mode, flushed, fsynced and renamed over ``path``."""
    make_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
