"""``SqliteLog``: the embedded default event log, one SQLite file in WAL mode.

Role: an :class:`~smc.events.EventLog` for a single host. Every stream is one partition
(partition 0) with contiguous offsets from 0, as in a Kafka partition; a global row id keeps the
order of appends across streams. ``event_id`` is UNIQUE: a retried or duplicated append is
stored once and reported as a duplicate. An append returns only after its transaction is durable
(``synchronous=FULL``).
Concurrency: one writer connection behind a lock; readers use one connection per thread (WAL
lets them run beside the writer). Several processes may share the file (SQLite's file locks);
readers in other processes see new records on their next poll.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from smc.events._codec import Codec, default_codec
from smc.events._errors import LogError, LogUnavailable
from smc.events._log import Appended, Position, Record
from smc.events._types import STREAMS, Event

__all__ = ["SqliteLog"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY,
    stream   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    key      TEXT NOT NULL,
    type     TEXT NOT NULL,
    event_id TEXT NOT NULL UNIQUE,
    ts       INTEGER NOT NULL,
    value    BLOB NOT NULL,
    UNIQUE (stream, seq)
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
INSERT OR IGNORE INTO meta (k, v) VALUES ('format', '1');
"""
_POLL = 0.05


class SqliteLog:
    """The embedded event log (``sqlite:///path``)."""

    dedupes_on_append = True

    def __init__(self, path: str | os.PathLike[str], *, codec: Codec | None = None) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.codec = codec or default_codec()
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = self._connect()
            self._writer.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LogUnavailable(f"cannot open SQLite log {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._local = threading.local()
        self._cond = threading.Condition()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def append(self, events: Sequence[Event]) -> list[Appended]:
        if self._closed:
            raise LogError("log is closed")
        if not events:
            return []
        now = int(time.time() * 1000)
        encode = self.codec.encode
        rows = [
            (
                type(ev).STREAM,
                ev.envelope.aggregate,
                type(ev).TYPE,
                ev.envelope.event_id,
                now,
                encode(ev),
            )
            for ev in events
        ]
        try:
            with self._lock:
                w = self._writer
                w.execute("BEGIN IMMEDIATE")
                try:
                    out = self._append_locked(w, rows)
                    w.execute("COMMIT")
                except BaseException:
                    w.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise LogUnavailable(f"append to {self.path} failed: {exc}") from exc
        with self._cond:
            self._cond.notify_all()
        return out

    def _append_locked(
        self, w: sqlite3.Connection, rows: list[tuple[str, str, str, str, int, bytes]]
    ) -> list[Appended]:
        existing: dict[str, tuple[str, int]] = {}
        unique = list(dict.fromkeys(r[3] for r in rows))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            q = ",".join("?" * len(chunk))
            for eid, stream, seq in w.execute(
                f"SELECT event_id, stream, seq FROM events WHERE event_id IN ({q})", chunk
            ):
                existing[eid] = (stream, seq)
        next_seq: dict[str, int] = {}
        new_rows = []
        out: list[Appended] = []
        for stream, key, etype, eid, ts, value in rows:
            if eid in existing:
                st, seq = existing[eid]
                out.append(
                    Appended(event_id=eid, stream=st, partition=0, offset=seq, duplicate=True)
                )
                continue
            if stream not in next_seq:
                (mx,) = w.execute(
                    "SELECT MAX(seq) FROM events WHERE stream = ?", (stream,)
                ).fetchone()
                next_seq[stream] = 0 if mx is None else mx + 1
            seq = next_seq[stream]
            next_seq[stream] = seq + 1
            existing[eid] = (stream, seq)
            new_rows.append((stream, seq, key, etype, eid, ts, value))
            out.append(
                Appended(event_id=eid, stream=stream, partition=0, offset=seq, duplicate=False)
            )
        w.executemany(
            "INSERT INTO events (stream, seq, key, type, event_id, ts, value) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            new_rows,
        )
        return out

    def _read_once(self, start: Position, max_records: int) -> list[Record]:
        conn = self._reader()
        # Find the append order (row id) of each stream's next record; scan from the lowest.
        first_ids = []
        for stream in STREAMS:
            row = conn.execute(
                "SELECT id FROM events WHERE stream = ? AND seq >= ? ORDER BY seq LIMIT 1",
                (stream, start.get((stream, 0))),
            ).fetchone()
            if row is not None:
                first_ids.append(row[0])
        if not first_ids:
            return []
        rows = conn.execute(
            "SELECT stream, seq, ts, key, value, type, event_id FROM events "
            "WHERE id >= ? ORDER BY id LIMIT ?",
            (min(first_ids), max_records),
        ).fetchall()
        floor = {s: start.get((s, 0)) for s in STREAMS}
        new = Record._make
        return [new((s, 0, o, ts, k, v, t, e)) for s, o, ts, k, v, t, e in rows if o >= floor[s]]

    def scan(
        self,
        *,
        start: Position,
        max_records: int = 10_000,
        timeout: float = 0.0,
        end: Position | None = None,
    ) -> tuple[list[tuple[str, int, int, str, bytes]], Position]:
        """Lean read for replay: (stream, partition, offset, key, value) before ``end`` and
        the next position."""
        recs = self.read(start=start, max_records=max_records, timeout=timeout)
        if end is not None:
            recs = [r for r in recs if r[2] < end.get((r[0], 0))]
        return [(r[0], 0, r[2], r[4], r[5]) for r in recs], start.advanced(recs)

    def read(
        self, *, start: Position, max_records: int = 10_000, timeout: float = 0.0
    ) -> list[Record]:
        deadline = time.monotonic() + timeout
        try:
            while True:
                recs = self._read_once(start, max_records)
                left = deadline - time.monotonic()
                if recs or left <= 0 or self._closed:
                    return recs
                with self._cond:
                    self._cond.wait(min(_POLL, left))
        except sqlite3.Error as exc:
            raise LogUnavailable(f"read from {self.path} failed: {exc}") from exc

    def end_position(self) -> Position:
        conn = self._reader()
        out = {}
        for stream in STREAMS:
            (mx,) = conn.execute(
                "SELECT MAX(seq) FROM events WHERE stream = ?", (stream,)
            ).fetchone()
            if mx is not None:
                out[(stream, 0)] = mx + 1
        return Position(out)

    def position_at(self, when: datetime) -> Position:
        conn = self._reader()
        ms = int(when.timestamp() * 1000)
        end = self.end_position()
        out = {}
        for stream in STREAMS:
            (mn,) = conn.execute(
                "SELECT MIN(seq) FROM events WHERE stream = ? AND ts >= ?", (stream, ms)
            ).fetchone()
            out[(stream, 0)] = mn if mn is not None else end.get((stream, 0))
        return Position(out)

    def close(self) -> None:
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        with self._lock:
            self._writer.close()
