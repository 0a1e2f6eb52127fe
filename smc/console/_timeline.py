"""The console's timeline: a compact, filterable index of every change on the log.

Role: :class:`Timeline` reads the log with its own handle (records are decoded once, in a worker
thread) and keeps one small row per record: when it was appended, where it lives, its type,
aggregate, actor, namespace and kind. Pages of rows are served by index, so a browser scrolls
100,000 events while holding only the rows on screen; :meth:`Timeline.detail` reads one record
back for its whole payload and its difference from the aggregate's previous event.
Concurrency: :meth:`Timeline.read_new` runs in a worker thread and touches no shared state;
:meth:`Timeline.extend` and every query run on the event loop thread.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from smc.auth import actor_matches
from smc.events import Event, EventLog, Position, Record, default_codec

__all__ = ["Row", "Timeline", "TimelineQuery", "diff_values", "kind_of", "namespace_of"]

_KIND_BY_TYPE = {
    "ServiceUpserted": "Service",
    "ServiceRemoved": "Service",
    "EndpointsChanged": "Endpoints",
    "ServiceAccountUpserted": "ServiceAccount",
    "ServiceAccountRemoved": "ServiceAccount",
    "MeshConfigChanged": "MeshConfig",
    "CertificateIssued": "Certificate",
    "CertificateRenewed": "Certificate",
    "CertificateRevoked": "Certificate",
    "TrustBundleChanged": "TrustBundle",
}


def kind_of(event: Event) -> str:
    """The kind of thing an event changes (``TrafficTarget``, ``Service``, ``VirtualMachine``)."""
    short = type(event).TYPE.rsplit(".", 1)[-1]
    if short in ("WorkloadJoined", "WorkloadLeft"):
        return "VirtualMachine" if getattr(event, "kind", "") == "vm" else "Pod"
    kind = getattr(event, "kind", None)
    if isinstance(kind, str) and kind[:1].isupper():
        return kind
    return _KIND_BY_TYPE.get(short, short)


def namespace_of(event: Event) -> str:
    """The namespace an event belongs to ('' for mesh-wide changes)."""
    ns = getattr(event, "namespace", None)
    if isinstance(ns, str):
        return ns
    ident = getattr(event, "identity", None)
    if isinstance(ident, str):
        if ident.startswith("spiffe://"):  # spiffe://<domain>/ns/<ns>/sa/<sa>
            parts = ident.split("/")
            return parts[4] if len(parts) > 5 and parts[3] == "ns" else ""
        if "/" in ident:
            return ident.split("/", 1)[0]
    return ""


@dataclass(frozen=True, slots=True)
class Row:
    """One timeline entry (all a page of the timeline shows)."""

    ts_ms: int
    stream: str
    partition: int
    offset: int
    type: str
    aggregate: str
    actor: str
    source: str
    namespace: str
    kind: str

    @property
    def where(self) -> str:
        return f"{self.stream}[{self.partition}]@{self.offset}"

    def to_json(self, seq: int) -> dict[str, Any]:
        return {
            "seq": seq,
            "position": self.where,
            "at": datetime.fromtimestamp(self.ts_ms / 1000, UTC).isoformat(),
            "ts": self.ts_ms,
            "type": self.type,
            "aggregate": self.aggregate,
            "actor": self.actor,
            "source": self.source,
            "namespace": self.namespace,
            "kind": self.kind,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class TimelineQuery:
    """Filters of a timeline page; ``None`` fields do not filter."""

    actor: str | None = None
    kind: str | None = None
    namespace: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, datetime):
        return v.isoformat()
    if hasattr(v, "__dataclass_fields__"):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    return v


def payload_of(event: Event) -> dict[str, Any]:
    """An event's fields (envelope aside) as plain JSON; SMI manifests parsed."""
    out: dict[str, Any] = {}
    for f in fields(event):
        if f.name == "envelope":
            continue
        value = _plain(getattr(event, f.name))
        if f.name == "manifest_json" and isinstance(value, str):
            try:
                out["manifest"] = json.loads(value)
                continue
            except ValueError:
                pass
        out[f.name] = value
    return out


def diff_values(before: Any, after: Any, path: str = "") -> list[dict[str, Any]]:
    """Leaf differences between two JSON values, as ``{path, before, after}`` (``None`` for a
    side where the path does not exist)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[dict[str, Any]] = []
        for k in sorted(set(before) | set(after), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in before:
                out.append({"path": sub, "before": None, "after": after[k]})
            elif k not in after:
                out.append({"path": sub, "before": before[k], "after": None})
            else:
                out.extend(diff_values(before[k], after[k], sub))
        return out
    if before == after:
        return []
    return [{"path": path or "(value)", "before": before, "after": after}]


class Timeline:
    """Rows of every record on the log, in append-time order (see the module docstring)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.codec = default_codec()
        self.rows: list[Row] = []
        self.position = Position()
        self._by_aggregate: dict[str, list[int]] = {}
        self._filtered: tuple[TimelineQuery, int, list[int]] | None = None

    # -- feeding (worker thread, then loop thread) ------------------------------------------
    def read_new(self, *, limit: int = 200_000) -> tuple[list[Row], Position]:
        """Rows of the records after :attr:`position` (worker thread: shares nothing)."""
        decode = self.codec.decode
        pos = self.position
        out: list[Row] = []
        while len(out) < limit:
            recs = self.log.read(start=pos, max_records=5000)
            if not recs:
                break
            for rec in recs:
                out.append(self._row(rec, decode(rec.value, where=rec.where)))
            pos = pos.advanced(recs)
        return out, pos

    @staticmethod
    def _row(rec: Record, ev: Event) -> Row:
        env = ev.envelope
        return Row(
            rec.timestamp_ms,
            rec.stream,
            rec.partition,
            rec.offset,
            type(ev).TYPE.rsplit(".", 1)[-1],
            env.aggregate,
            env.actor,
            env.source,
            namespace_of(ev),
            kind_of(ev),
        )

    def extend(self, rows: Sequence[Row], position: Position) -> range:
        """Add rows read by :meth:`read_new`; returns the sequence numbers they got."""
        if not rows:
            self.position = position
            return range(len(self.rows), len(self.rows))
        start = len(self.rows)
        ordered = sorted(rows, key=lambda r: r.ts_ms)  # stable: ties keep the read order
        if self.rows and ordered[0].ts_ms < self.rows[-1].ts_ms:
            # a partition delivered older records late: keep the timeline in time order. Only
            # the rows newer than the oldest late one move (the same order a stable sort of
            # everything gives), so a late record costs the tail it lands in, not the log
            start = bisect.bisect_right(self.rows, ordered[0].ts_ms, key=_ts)
            moved = self.rows[start:]
            for agg in {r.aggregate for r in moved}:
                seqs = self._by_aggregate[agg]
                del seqs[bisect.bisect_left(seqs, start) :]
                if not seqs:
                    del self._by_aggregate[agg]
            merged = sorted([*moved, *ordered], key=lambda r: r.ts_ms)
            del self.rows[start:]
            for i, r in enumerate(merged, start):
                self._by_aggregate.setdefault(r.aggregate, []).append(i)
            self.rows.extend(merged)
        else:
            for i, r in enumerate(ordered, start):
                self._by_aggregate.setdefault(r.aggregate, []).append(i)
            self.rows.extend(ordered)
        self.position = position
        self._filtered = None
        return range(start, len(self.rows))

    # -- queries (loop thread) --------------------------------------------------------------
    def matching(self, q: TimelineQuery) -> list[int]:
        """Sequence numbers of the rows ``q`` keeps (cached for the last query)."""
        cached = self._filtered
        if cached is not None and cached[0] == q and cached[1] == len(self.rows):
            return cached[2]
        rows = self.rows
        lo = 0 if q.since_ms is None else bisect.bisect_left(rows, q.since_ms, key=_ts)
        hi = len(rows) if q.until_ms is None else bisect.bisect_right(rows, q.until_ms, key=_ts)
        if q.actor is None and q.kind is None and q.namespace is None:
            out = list(range(lo, hi))
        else:
            out = [
                i
                for i in range(lo, hi)
                if (q.actor is None or actor_matches(rows[i].actor, q.actor))
                and (q.kind is None or rows[i].kind == q.kind or rows[i].type == q.kind)
                and (q.namespace is None or rows[i].namespace == q.namespace)
            ]
        self._filtered = (q, len(rows), out)
        return out

    def page(self, q: TimelineQuery, *, offset: int, limit: int) -> dict[str, Any]:
        """Rows ``offset .. offset+limit`` of the filtered timeline, with its total size."""
        seqs = self.matching(q)
        chosen = seqs[offset : offset + limit]
        return {
            "total": len(seqs),
            "offset": offset,
            "items": [self.rows[i].to_json(i) for i in chosen],
        }

    def facets(self) -> dict[str, list[str]]:
        """The actors, kinds and namespaces seen (for the filter menus)."""
        return {
            "actors": sorted({r.actor for r in self.rows}),
            "kinds": sorted({r.kind for r in self.rows}),
            "namespaces": sorted({r.namespace for r in self.rows if r.namespace}),
        }

    def position_after(self, seq: int) -> Position:
        """The log position just after row ``seq`` (and every row before it in time order)."""
        offsets: dict[tuple[str, int], int] = {}
        for r in self.rows[: seq + 1]:
            tp = (r.stream, r.partition)
            if r.offset + 1 > offsets.get(tp, 0):
                offsets[tp] = r.offset + 1
        return Position(offsets)

    def seq_at_time(self, ts_ms: int) -> int:
        """The last row appended at or before ``ts_ms`` (-1: none)."""
        return bisect.bisect_right(self.rows, ts_ms, key=_ts) - 1

    def seqs_by_position(self) -> dict[str, int]:
        """Timeline entry of every record, by its position (``stream[partition]@offset``)."""
        return {r.where: i for i, r in enumerate(self.rows)}

    def seqs_of(self, aggregate: str) -> list[int]:
        return list(self._by_aggregate.get(aggregate, ()))

    # -- one record back (worker thread) ----------------------------------------------------
    def read_event(self, row: Row) -> Event:
        """Decode the record behind ``row`` (worker thread: reads the log)."""
        return self._read_one(row)

    def _read_one(self, row: Row) -> Event:
        end = dict(self.position.items())
        end[(row.stream, row.partition)] = row.offset
        for r in self.log.read(start=Position(end), max_records=64):
            if (r.stream, r.partition, r.offset) == (row.stream, row.partition, row.offset):
                return self.codec.decode(r.value, where=r.where)
        raise LookupError(f"record {row.where} is no longer readable")

    def previous_of(self, seq: int) -> int | None:
        """The row of the same aggregate just before row ``seq`` (loop thread)."""
        earlier = [i for i in self._by_aggregate.get(self.rows[seq].aggregate, ()) if i < seq]
        return earlier[-1] if earlier else None

    def detail(self, seq: int, row: Row, previous: tuple[int, Row] | None = None) -> dict[str, Any]:
        """Row ``seq`` with its envelope, payload and the difference from ``previous`` (the
        aggregate's event before it). Worker thread: reads the log; takes the rows resolved
        on the loop thread (:meth:`previous_of`)."""
        ev = self._read_one(row)
        env = ev.envelope
        payload = payload_of(ev)
        before = payload_of(self._read_one(previous[1])) if previous is not None else {}
        return {
            **row.to_json(seq),
            "eventId": env.event_id,
            "occurredAt": env.occurred_at.isoformat(),
            "causationId": env.causation_id,
            "correlationId": env.correlation_id,
            "payload": payload,
            "previousSeq": None if previous is None else previous[0],
            "diff": diff_values(before, payload),
        }

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)


def _ts(r: Row) -> int:
    return r.ts_ms
