"""``InventoryDirectoryProvider``: VMs (and MeshServices) from a directory of YAML/JSON files.

Role: the VM provider shipped with SMC (entry point ``inventory`` in group ``smc.vm_providers``).
It polls a directory tree every ``interval`` seconds (file mtimes and sizes; no extra
dependencies), re-reads files that changed, and when anything changed reports the full desired
set: every valid VirtualMachine and MeshService in ``*.yaml``, ``*.yml`` and ``*.json`` files
(hidden files are skipped). A VM whose file disappeared is therefore removed. A file that became
invalid keeps its last valid content in force (a half-written file never drops VMs) and its
errors are reported. The cause of each resource's events is ``path + sha256(content) + mtime``,
so two replicas watching the same directory derive the same event ids and the log holds each
change once, while writing back an older content later is still a new change.
Concurrency: ``run`` is a coroutine on the serve loop; directory scans run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from smc.informers._vm import VMReport, VMSink
from smc.smi import (
    ManifestError,
    MeshService,
    Resource,
    VirtualMachine,
    load_documents,
    resource_key,
)

__all__ = ["MAX_FILE_BYTES", "InventoryDirectoryProvider"]

log = logging.getLogger("smc.informers.inventory")

MAX_FILE_BYTES = 8 * 1024 * 1024
_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, kw_only=True, slots=True)
class _FileState:
    stamp: tuple[int, int]  # (mtime_ns, size)
    digest: str
    resources: tuple[Resource, ...]
    errors: tuple[ManifestError, ...]


class InventoryDirectoryProvider:
    """Watches ``directory`` (recursively) for VirtualMachine and MeshService manifests."""

    def __init__(
        self, directory: str | os.PathLike[str], *, interval: float = 2.0, name: str = "inventory"
    ) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self.name = name
        self._files: dict[str, _FileState] = {}
        self._good: dict[str, tuple[Resource, ...]] = {}
        self.scans = 0

    # -- scanning ---------------------------------------------------------------------------
    def scan(self) -> tuple[bool, VMReport]:
        """Look at the directory once; returns (changed since last scan, full report)."""
        self.scans += 1
        seen: dict[str, _FileState] = {}
        errors: list[ManifestError] = []
        changed = False
        if not self.directory.is_dir():
            errors.append(
                ManifestError(
                    document=str(self.directory), path="", reason="inventory directory not found"
                )
            )
        else:
            for path in sorted(self.directory.rglob("*")):
                rel = path.relative_to(self.directory).as_posix()
                if path.suffix not in _SUFFIXES or any(p.startswith(".") for p in rel.split("/")):
                    continue
                try:
                    st = path.stat()
                    if not path.is_file():
                        continue
                except OSError:
                    continue  # removed while scanning
                stamp = (st.st_mtime_ns, st.st_size)
                old = self._files.get(rel)
                if old is not None and old.stamp == stamp:
                    seen[rel] = old
                    continue
                changed = True
                seen[rel] = self._read(path, rel, stamp)
        if set(seen) != set(self._files):
            changed = True
        self._files = seen
        resources: list[Resource] = []
        causes: dict[str, str] = {}
        for rel, fs in sorted(seen.items()):
            errors.extend(fs.errors)
            if fs.errors and rel in self._good:
                chosen = self._good[rel]  # keep the last valid content of a broken file
            else:
                chosen = fs.resources
                if not fs.errors:
                    self._good[rel] = fs.resources
            for r in chosen:
                key = resource_key(r)
                if key in causes:
                    errors.append(
                        ManifestError(
                            document=rel,
                            path="",
                            reason=f"{key} is also defined in another inventory file",
                            kind=r.KIND,
                            name=f"{r.namespace}/{r.name}",
                        )
                    )
                    continue
                causes[key] = f"{rel}\x1f{fs.digest}\x1f{fs.stamp[0]}"
                resources.append(r)
        for rel in list(self._good):
            if rel not in seen:
                del self._good[rel]
        snapshot = hashlib.sha256(
            "\n".join(
                f"{rel}\x1f{fs.digest}\x1f{fs.stamp[0]}" for rel, fs in sorted(seen.items())
            ).encode()
        ).hexdigest()
        report = VMReport(
            full=True,
            resources=tuple(resources),
            cause=f"inventory-snapshot:{snapshot}",
            causes=causes,
            errors=tuple(errors),
        )
        return changed, report

    def _read(self, path: Path, rel: str, stamp: tuple[int, int]) -> _FileState:
        if stamp[1] > MAX_FILE_BYTES:
            err = ManifestError(
                document=rel, path="", reason=f"file is larger than {MAX_FILE_BYTES} bytes"
            )
            return _FileState(stamp=stamp, digest="", resources=(), errors=(err,))
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            err = ManifestError(document=rel, path="", reason=f"not UTF-8 (byte {exc.start})")
            return _FileState(stamp=stamp, digest="", resources=(), errors=(err,))
        except OSError as exc:
            err = ManifestError(document=rel, path="", reason=f"cannot read: {exc.strerror}")
            return _FileState(stamp=stamp, digest="", resources=(), errors=(err,))
        digest = hashlib.sha256(raw).hexdigest()
        res = load_documents(text, source=rel)
        errors = list(res.errors)
        kept: list[Resource] = []
        for r in res.resources:
            if isinstance(r, VirtualMachine | MeshService):
                kept.append(r)
            else:
                errors.append(
                    ManifestError(
                        document=rel,
                        path="kind",
                        reason=f"an inventory holds VirtualMachine and MeshService only, "
                        f"not {r.KIND}",
                        kind=r.KIND,
                        name=f"{r.namespace}/{r.name}",
                    )
                )
        return _FileState(stamp=stamp, digest=digest, resources=tuple(kept), errors=tuple(errors))

    # -- the provider loop ------------------------------------------------------------------
    async def run(self, *, sink: VMSink, stop: asyncio.Event) -> None:
        """Scan every ``interval`` seconds and report the full set whenever it changed (and
        again after a failed report) until ``stop`` is set."""
        dirty = True
        while not stop.is_set():
            try:
                changed, report = await asyncio.to_thread(self.scan)
            except OSError:  # the tree changed under the walk: look again next tick
                log.warning("inventory %s: scan failed; retrying", self.directory, exc_info=True)
                changed, report = False, None
            if report is not None and (changed or dirty):
                try:
                    await sink.report(report)
                    dirty = False
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("inventory %s: report failed; retrying", self.directory)
                    dirty = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
