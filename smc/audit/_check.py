"""``verify_log``: check a whole log's chains, seals, writers and entitlements.

Role: reads every record from the start of the log to its end (a chain can only be checked
from its beginning) through a :class:`~smc.events.ChainVerifier` and reports the findings
that fall in the requested range, the first of them, the writers seen and the chain heads
reached. Concurrency: blocking, one thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from smc.events import ChainVerifier, EventLog, Finding, Position, WriterTrust
from smc.events._verify import CHAIN_BREAK, TRUNCATED

__all__ = ["VerifyReport", "verify_log"]


@dataclass(kw_only=True)
class VerifyReport:
    """The outcome of :func:`verify_log`."""

    records: int = 0
    verified: int = 0
    findings: list[Finding] = field(default_factory=list)
    writers: dict[str, dict[str, Any]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    #: The last seal of each partition: ``"stream:partition" -> "offset:head"`` (keep it:
    #: a later verification given it as ``previous`` reports a truncation before it).
    seals: dict[str, str] = field(default_factory=dict)
    end: Position = field(default_factory=Position)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "verified": self.verified,
            "first_bad": self.findings[0].where if self.findings else None,
            "findings": [f.to_json() for f in self.findings],
            "writers": self.writers,
            "heads": self.heads,
            "seals": self.seals,
            "end": self.end.to_json(),
            "seconds": round(self.seconds, 3),
        }


def verify_log(
    log: EventLog,
    trust: WriterTrust,
    *,
    start: Position | None = None,
    end: Position | None = None,
    batch: int = 5000,
    progress: Callable[[int], None] | None = None,
    previous: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Verify ``log`` up to its end; report findings at or after ``start`` and before
    ``end`` (default: the whole log). ``previous`` (a former report's ``seals``) adds a
    ``truncated`` finding for each partition that now ends before the last seal seen then,
    and a ``chain-break`` where that seal is no longer the one seen then."""
    t0 = time.perf_counter()
    found: list[Finding] = []
    verifier = ChainVerifier(
        trust=trust, codec=getattr(log, "codec", None), on_finding=found.append
    )
    target = log.end_position()
    pos = Position()
    report = VerifyReport(end=target)
    writers: dict[bytes, dict[str, Any]] = {}
    stalled = time.monotonic()
    while not pos.covers(target):
        recs = log.read(start=pos, max_records=batch, timeout=0.5)
        recs = [r for r in recs if r.offset < target.get((r.stream, r.partition))]
        if not recs:
            if time.monotonic() - stalled > 30:
                break
            continue
        stalled = time.monotonic()
        pos = pos.advanced(recs)
        report.records += len(recs)
        released = verifier.feed(recs)
        for w in verifier.released_by:
            info = writers.get(w.key_id)
            if info is None:
                info = writers[w.key_id] = {
                    "identity": w.identity,
                    "role": w.role,
                    "serial": format(w.serial, "x"),
                    "not_after": w.not_after.isoformat(),
                    "records": 0,
                }
            info["records"] += 1
        report.verified += len(released)
        if progress is not None:
            progress(report.records)
    verifier.finish()
    for key, was in sorted((previous or {}).items()):
        stream, _, part = key.rpartition(":")
        off, _, head = was.partition(":")
        tp, at = (stream, int(part)), int(off)
        now = verifier.seals.get(tp, {}).get(at)
        if at >= target.get(tp):
            found.append(
                Finding(
                    stream, int(part), target.get(tp), TRUNCATED,
                    f"the partition ends at @{target.get(tp)}, before the seal at @{at} a "
                    "previous verification saw: its last records were removed",
                )
            )  # fmt: skip
        elif now is not None and now.hex() != head:
            found.append(
                Finding(
                    stream, int(part), at, CHAIN_BREAK,
                    f"the seal at @{at} is not the one a previous verification saw there "
                    "(the partition was rewritten)",
                )
            )  # fmt: skip
        elif now is None and at >= verifier.seal_floor.get(tp, 0):
            found.append(
                Finding(
                    stream, int(part), at, CHAIN_BREAK,
                    f"no verified seal at @{at}, where a previous verification saw one",
                )
            )  # fmt: skip

    def in_range(f: Finding) -> bool:
        tp = (f.stream, f.partition)
        return (start is None or f.offset >= start.get(tp)) and (
            end is None or f.offset < end.get(tp)
        )

    report.findings = sorted(
        (f for f in found if in_range(f)), key=lambda f: (f.stream, f.partition, f.offset)
    )
    report.writers = {k.hex(): v for k, v in writers.items()}
    report.heads = {f"{s}:{p}": h.hex() for (s, p), h in sorted(verifier.heads.items())}
    report.heads.update(
        {f"{s}:{p}:{sid.hex()}": h.hex() for (s, p, sid), h in sorted(verifier.wheads.items())}
    )
    report.seals = {
        f"{s}:{p}": f"{max(kept)}:{kept[max(kept)].hex()}"
        for (s, p), kept in sorted(verifier.seals.items())
        if kept
    }
    report.seconds = time.perf_counter() - t0
    return report
