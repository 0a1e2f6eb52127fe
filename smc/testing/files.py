"""Directories written the way the kubelet writes Secret and ConfigMap volumes.

Role: :func:`write_projected` (re)writes a folder of files atomically as the kubelet's atomic
writer does: the files live in a fresh hidden timestamped folder, ``..data`` is a symlink to
it, swapped by a rename, and each visible name is a symlink into ``..data``. A reader never
sees a mix of old and new files; a watcher of the folder sees one move. Tests use it to stand
in for a mounted Secret that is updated while a proxy runs.

Concurrency: one writer per folder.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["write_projected"]

_DATA = "..data"


def write_projected(directory: Path, files: Mapping[str, str], *, mode: int = 0o644) -> None:
    """Make ``directory`` hold exactly ``files`` (name -> text), switched atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime()) + f".{time.monotonic_ns()}"
    fresh = directory / f"..{stamp}"
    fresh.mkdir(mode=0o755)
    for name, text in files.items():
        path = fresh / name
        path.write_text(text)
        path.chmod(mode)
    data = directory / _DATA
    old = os.readlink(data) if data.is_symlink() else None
    tmp = directory / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(fresh.name)
    tmp.replace(data)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"{_DATA}/{name}")
    for entry in directory.iterdir():
        if entry.is_symlink() and entry.name not in files and entry.name != _DATA:
            entry.unlink()
    if old is not None and old != fresh.name:
        shutil.rmtree(directory / old, ignore_errors=True)
