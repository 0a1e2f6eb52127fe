"""A memory cgroup (v1) for one test process: what the kernel charges it, as for a pod.

Role: :class:`MemoryCgroup` makes ``/sys/fs/cgroup/memory/<name>`` (optionally with
``memory.limit_in_bytes``), gives the argv prefix that moves a command into it before it
execs (:meth:`MemoryCgroup.wrap`: the process is charged from its first page), and reads the
kernel's figures (:meth:`MemoryCgroup.figures`): ``max_usage`` (the peak of everything
charged: anonymous memory, the page cache this group brought in, kernel memory counted
there), ``rss`` (anonymous memory and swap cache), ``mapped_file`` (file pages mapped by the
group's processes that are charged to it), ``cache`` (page cache charged to it, tmpfs
included) and ``failcnt`` (times the limit was hit). As in Kubernetes, a file page is
charged to the group that first brought it into memory: pages of the Python binary or
libcrypto already cached by another group are not charged again, so ``mapped_file`` is a
lower bound of what the group maps; a process's own ``VmHWM`` counts every mapped page and
is the upper bound. Needs root and a cgroup v1 memory hierarchy; :func:`available` says
whether there is one.
Concurrency: plain blocking file operations; one owner per group.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["ROOT", "MemoryCgroup", "available"]

ROOT = Path("/sys/fs/cgroup/memory")


def available() -> bool:
    return os.geteuid() == 0 and (ROOT / "cgroup.procs").exists() and os.access(ROOT, os.W_OK)


class MemoryCgroup:
    """One memory cgroup (see the module docstring); remove it with :meth:`remove`."""

    def __init__(self, name: str, *, limit_bytes: int | None = None) -> None:
        self.path = ROOT / name
        self.path.mkdir()
        if limit_bytes is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this group from its first instruction (same pid: exec)."""
        return ["/bin/sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stat(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self._read("memory.stat").splitlines():
            key, _, value = line.partition(" ")
            out[key] = int(value)
        return out

    def figures(self) -> dict[str, float]:
        """The kernel's figures in MB (``failcnt``, ``oom_kills``: counts)."""
        stat = self.stat()
        mb = 1024 * 1024
        oom = 0
        for line in self._read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                oom = int(value)
        return {
            "max_usage_mb": int(self._read("memory.max_usage_in_bytes")) / mb,
            "usage_mb": int(self._read("memory.usage_in_bytes")) / mb,
            "rss_mb": stat.get("rss", 0) / mb,
            "mapped_file_mb": stat.get("mapped_file", 0) / mb,
            "cache_mb": stat.get("cache", 0) / mb,
            "failcnt": int(self._read("memory.failcnt")),
            "oom_kills": oom,
        }

    def pids(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def remove(self, *, timeout: float = 10.0) -> None:
        """Remove the group once its processes are gone (they must have been stopped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                with contextlib.suppress(OSError):
                    (self.path / "memory.force_empty").write_text("0")
                time.sleep(0.05)
