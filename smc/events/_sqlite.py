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

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from smc.events._codec import Codec, default_codec
from smc.events._errors import LogCorrupt, LogError, LogFull, LogUnavailable
from smc.events._integrity import PARTITION, Signer, genesis
from smc.events._log import Appended, Position, Record
from smc.events._types import STREAMS, Event

__all__ = ["SqliteLog"]


def _errname(exc: sqlite3.Error) -> str:
    return str(getattr(exc, "sqlite_errorname", ""))


def _corrupt(exc: sqlite3.Error) -> bool:
    return _errname(exc).startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


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
CREATE TABLE IF NOT EXISTS chain (stream TEXT PRIMARY KEY, head BLOB NOT NULL);
"""
# Integrity data beside each record (docs/log-integrity.md): added to older files in place.
_COLUMNS = (("writer", "BLOB NOT NULL DEFAULT x''"), ("seal", "BLOB NOT NULL DEFAULT x''"))
_POLL = 0.05


@contextlib.contextmanager
def _one_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the queries inside on one snapshot of the file (a read transaction: WAL readers
    keep the snapshot of their first query until it ends), so an append that commits meanwhile
    is seen by all of them or by none."""
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteLog:
    """The embedded event log (``sqlite:///path``)."""

    dedupes_on_append = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        codec: Codec | None = None,
        signer: Signer | None = None,
        create: bool = True,
    ) -> None:
        """``create=False`` (read-only commands): a missing file is an error, never made."""
        self.path = Path(path)
        #: Seals every append that names no signer of its own (see ``docs/log-integrity.md``).
        self.signer = signer
        self.url = f"sqlite:///{self.path}"
        self.codec = codec or default_codec()
        if not create and not self.path.is_file():
            raise LogError(
                f"no event log at {self.path} ({self.url}); name one with --log or $SMC_LOG "
                "(smc apply and smc serve create it)"
            )
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = self._connect()
            self._writer.executescript(_SCHEMA)
            have = {row[1] for row in self._writer.execute("PRAGMA table_info(events)")}
            for name, decl in _COLUMNS:
                if name not in have:
                    self._writer.execute(f"ALTER TABLE events ADD COLUMN {name} {decl}")
        except sqlite3.DatabaseError as exc:
            if _corrupt(exc):
                raise LogCorrupt(where=f"{self.path} (file header)", reason=str(exc)) from exc
            raise LogUnavailable(f"cannot open SQLite log {self.path}: {exc}") from exc
        except OSError as exc:
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

    def append(self, events: Sequence[Event], *, signer: Signer | None = None) -> list[Appended]:
        """Append ``events`` in one transaction; with a signer (``signer`` or the log's),
        each stream's new records form one batch sealed on its last record, extending the
        stream's chain head (``PARTITION`` mode: the write lock makes it the true head)."""
        signer = signer or self.signer
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
                    out, sealed = self._append_locked(
                        w, rows, signer, [ev.envelope.actor for ev in events]
                    )
                    w.execute("COMMIT")
                except BaseException:
                    # SQLite rolls back by itself after some errors (a full disk): a second
                    # ROLLBACK would fail and hide the cause
                    if w.in_transaction:
                        w.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise self._append_error(exc) from exc
        if signer is not None:
            for stream, head, _ in sealed:
                signer.committed(stream, 0, head=head, mode=PARTITION)
        with self._cond:
            self._cond.notify_all()
        return out

    def _append_error(self, exc: sqlite3.Error) -> LogError:
        if _errname(exc).startswith("SQLITE_FULL"):
            return LogFull(
                f"append to {self.path} failed: the disk holding the log is full ({exc}); "
                "nothing was appended"
            )
        if _corrupt(exc):
            return LogCorrupt(where=f"{self.path} (appending)", reason=str(exc))
        return LogUnavailable(f"append to {self.path} failed: {exc}")

    def probe(self, *, write: bool = False, timeout: float = 2.0) -> None:
        """Raise unless the file can be read (and, with ``write``, written: one small
        transaction on the ``meta`` table). Thread-safe."""
        if not self.path.exists():
            raise LogUnavailable(f"SQLite log {self.path} is gone (deleted or unmounted)")
        try:
            self._reader().execute("SELECT MAX(id) FROM events").fetchone()
            if write:
                with self._lock:
                    w = self._writer
                    w.execute("BEGIN IMMEDIATE")
                    try:
                        w.execute(
                            "INSERT OR REPLACE INTO meta (k, v) VALUES ('probe', ?)",
                            (str(time.time()),),
                        )
                        w.execute("COMMIT")
                    except BaseException:
                        if w.in_transaction:
                            w.execute("ROLLBACK")
                        raise
        except sqlite3.Error as exc:
            raise self._append_error(exc) if write else self._read_error(exc, None) from exc

    def _read_error(self, exc: sqlite3.Error, start: Position | None) -> LogError:
        if not _corrupt(exc):
            return LogUnavailable(f"read from {self.path} failed: {exc}")
        return LogCorrupt(where=self._unreadable(start), reason=str(exc))

    def _unreadable(self, start: Position | None) -> str:
        """The first record at or after ``start`` that cannot be read (``stream[0]@offset``),
        found by reading each stream's records one at a time."""
        conn = self._reader()
        for stream in STREAMS:
            seq = start.get((stream, 0)) if start is not None else 0
            try:
                (end,) = conn.execute(
                    "SELECT MAX(seq) FROM events WHERE stream = ?", (stream,)
                ).fetchone()
            except sqlite3.Error:
                return f"{stream}[0]@{seq} of {self.path}"
            for off in range(seq, (end if end is not None else -1) + 1):
                try:
                    conn.execute(
                        "SELECT value FROM events WHERE stream = ? AND seq = ?", (stream, off)
                    ).fetchone()
                except sqlite3.Error:
                    return f"{stream}[0]@{off} of {self.path}"
        where = "" if start is None else f" after {start.to_json()}"
        return f"{self.path} (an index or table page{where})"

    def _append_locked(
        self,
        w: sqlite3.Connection,
        rows: list[tuple[str, str, str, str, int, bytes]],
        signer: Signer | None,
        actors: list[str] | None = None,
    ) -> tuple[list[Appended], list[tuple[str, bytes, int]]]:
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
            new_rows.append([stream, seq, key, etype, eid, ts, value, b""])
            out.append(
                Appended(event_id=eid, stream=stream, partition=0, offset=seq, duplicate=False)
            )
        sealed: list[tuple[str, bytes, int]] = []
        if signer is not None and new_rows:
            sealed = self._seal_locked(w, new_rows, signer, signer.principals_for(actors or ()))
        w.executemany(
            "INSERT INTO events (stream, seq, key, type, event_id, ts, value, seal) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            new_rows,
        )
        return out, sealed

    def _seal_locked(
        self,
        w: sqlite3.Connection,
        new_rows: list[list[Any]],
        signer: Signer,
        principals: tuple[tuple[str, str, tuple[str, ...]], ...] = (),
    ) -> list[tuple[str, bytes, int]]:
        """Seal each stream's new rows (in place: the seal goes on the last one) and move
        the stream's chain head; returns the new heads and their seals' offsets. The seals
        name the ``principals`` the signer vouched for among the append's actors."""
        by_stream: dict[str, list[list[Any]]] = {}
        for row in new_rows:
            by_stream.setdefault(row[0], []).append(row)
        sealed = []
        for stream, rows in by_stream.items():
            got = w.execute("SELECT head FROM chain WHERE stream = ?", (stream,)).fetchone()
            prev = got[0] if got is not None else genesis(stream, 0)
            seal, head = signer.seal(
                stream=stream, partition=0, mode=PARTITION, prev=prev,
                keys=[r[2].encode() for r in rows], values=[r[6] for r in rows],
                principals=principals,
            )  # fmt: skip
            rows[-1][7] = seal.encode()
            w.execute(
                "INSERT INTO chain (stream, head) VALUES (?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET head = excluded.head",
                (stream, head),
            )
            sealed.append((stream, head, rows[-1][1]))
        return sealed

    def _read_once(self, start: Position, max_records: int) -> list[Record]:
        conn = self._reader()
        # Find the append order (row id) of each stream's next record; scan from the lowest.
        # One snapshot for all of it: an append committing between the lookups (one apply
        # writes several streams in one transaction) would otherwise be seen for a later
        # stream but not an earlier one, whose first new record then lay below the lowest row
        # read and was skipped for good.
        with _one_snapshot(conn):
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
                "SELECT stream, seq, ts, key, value, type, event_id, writer, seal FROM events "
                "WHERE id >= ? ORDER BY id LIMIT ?",
                (min(first_ids), max_records),
            ).fetchall()
        floor = {s: start.get((s, 0)) for s in STREAMS}
        new = Record._make
        return [
            new((s, 0, o, ts, k, v, t, e, wr, se, 0))
            for s, o, ts, k, v, t, e, wr, se in rows
            if o >= floor[s]
        ]

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
            raise self._read_error(exc, start) from exc

    def end_position(self) -> Position:
        conn = self._reader()
        out = {}
        try:
            with _one_snapshot(conn):  # every stream's end at one moment
                for stream in STREAMS:
                    (mx,) = conn.execute(
                        "SELECT MAX(seq) FROM events WHERE stream = ?", (stream,)
                    ).fetchone()
                    if mx is not None:
                        out[(stream, 0)] = mx + 1
        except sqlite3.Error as exc:
            raise self._read_error(exc, None) from exc
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
