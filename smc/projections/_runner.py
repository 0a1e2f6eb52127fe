"""The projection runner: rebuilds projections from the log (from zero or a checkpoint) and tails it.

Role: the only code that feeds events to projections. It decodes each record, drops events
whose id it has already applied (logs that cannot refuse duplicates on append, i.e. Kafka), and
applies the event to every projection of its stream. A record that cannot be decoded or applied
stops the runner with an error naming its offset; nothing after it is applied (so nothing is
skipped or lost), and the state holds every event before it, whole. Checkpoints are data: the
position, each projection's state and the de-duplication set, written together atomically.
Concurrency: ``catch_up``/``step`` are synchronous and run on the caller's thread; ``run`` is a
coroutine that reads the log in a worker thread and applies events on the event-loop thread, so
readers on that loop always see whole events.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from smc.events import (
    EVENT_TYPES,
    ChainVerifier,
    Codec,
    Event,
    EventError,
    EventLog,
    IntegrityError,
    LogError,
    LogHealth,
    LogUnavailable,
    Position,
    Record,
    default_codec,
)
from smc.projections._base import Projection
from smc.projections._errors import CheckpointError, ProjectionError
from smc.projections._runner_checkpoint import Checkpoint, CheckpointStore
from smc.projections._runner_scan import (
    _PENDING_MAX,
    _CompactScan,
    _id_hash,
    _keep_done,
    _skip_done,
    _survivors,
)

__all__ = ["Checkpoint", "CheckpointStore", "ProjectionRunner"]


log = logging.getLogger("smc.projections")


class ProjectionRunner(_CompactScan):
    """Feeds log records to projections, from zero or a checkpoint, then follows the tail."""

    def __init__(
        self,
        *,
        log: EventLog,
        projections: Sequence[Projection],
        codec: Codec | None = None,
        batch: int = 5000,
        verifier: ChainVerifier | None = None,
    ) -> None:
        self.log = log
        #: With a verifier, only records of verified, entitled batches change state
        #: (``docs/log-integrity.md``); the others are skipped and reported by it.
        self.verifier = verifier
        self.projections = list(projections)
        self.codec = codec or default_codec()
        self.batch = batch
        self.position = Position()
        self.applied = 0
        self.duplicates = 0
        #: Records a compacted catch-up did not need to decode (superseded by a later one).
        self.superseded = 0
        self._dedupe = not log.dedupes_on_append
        # Ids applied, as a dict (values unused) rather than a set: a dict holding only ints is
        # not tracked by the cyclic garbage collector, a set is, and every full collection
        # would walk its millions of entries during a rebuild.
        self._seen: dict[int, None] = {}
        self._by_stream: dict[str, list[Projection]] = {}
        for p in self.projections:
            for s in p.streams:
                self._by_stream.setdefault(s, []).append(p)
        self.caught_up = asyncio.Event()
        #: What the runner (and the change service, and serve's probe) learn about the log.
        self.health = LogHealth(getattr(log, "url", ""))
        self.listeners: list[Callable[[list[Event]], None]] = []

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            position=self.position,
            states={p.name: p.checkpoint() for p in self.projections},
            digests={p.name: p.digest() for p in self.projections},
            seen=frozenset(self._seen),
            applied=self.applied,
            integrity=self.verifier.state() if self.verifier is not None else None,
        )

    def restore(self, cp: Checkpoint) -> None:
        names = {p.name for p in self.projections}
        if set(cp.states) != names:
            raise CheckpointError(
                f"checkpoint holds projections {sorted(cp.states)}, runner has {sorted(names)}"
            )
        for p in self.projections:
            p.restore(cp.states[p.name])
            if p.digest() != cp.digests[p.name]:
                raise CheckpointError(f"checkpoint of {p.name} does not match its digest")
        if self.verifier is not None:
            if cp.integrity is None:
                raise CheckpointError("checkpoint carries no chain heads; the runner verifies")
            try:
                self.verifier.check_state(self.log, cp.position, cp.integrity)
            except IntegrityError as exc:
                raise CheckpointError(f"checkpoint refused: {exc}") from exc
            self.verifier.restore(cp.integrity)
        self.position = cp.position
        self._seen = dict.fromkeys(cp.seen)
        self.applied = cp.applied

    def digests(self) -> dict[str, str]:
        return {p.name: p.digest() for p in self.projections}

    # -- applying ---------------------------------------------------------------------------
    def apply_records(self, records: Sequence[Record]) -> list[Event]:
        """Decode and apply records in order; returns the events applied (duplicates dropped).

        On an undecodable or unappliable record, raises; the position then points at that
        record and every record before it is applied whole.
        """
        if self.verifier is not None:
            # Verified records are released when their batch's seal is read; the position
            # still moves past every record read (held ones live in the verifier's state).
            released = self._apply_released(self.verifier.feed(records))
            if records:
                self.position = self.position.advanced(records)
            return released
        decode = self.codec.decode
        seen = self._seen
        dedupe = self._dedupe
        done: list[Event] = []
        k = 0
        try:
            for rec in records:
                event = decode(rec.value, where=rec.where)
                if dedupe:
                    h = _id_hash(event.envelope.event_id)
                    if h in seen:
                        self.duplicates += 1
                        k += 1
                        continue
                self._apply_event(event, rec.where)
                if dedupe:
                    seen[h] = None
                done.append(event)
                self.applied += 1
                k += 1
        finally:
            if k:
                self.position = self.position.advanced(records[:k])
        return done

    def _apply_released(self, records: Sequence[Record]) -> list[Event]:
        decode = self.codec.decode
        seen = self._seen
        done: list[Event] = []
        for rec in records:
            event = decode(rec.value, where=rec.where)
            if self._dedupe:
                h = _id_hash(event.envelope.event_id)
                if h in seen:
                    self.duplicates += 1
                    continue
                seen[h] = None
            self._apply_event(event, rec.where)
            done.append(event)
            self.applied += 1
        return done

    @property
    def skipped(self) -> int:
        """Records never applied because verification refused them."""
        return self.verifier.rejected if self.verifier is not None else 0

    def _replacing(self) -> frozenset[str]:
        """Types that supersede their aggregate's earlier events for every projection."""
        out = set()
        for name, cls in EVENT_TYPES.items():
            subs = self._by_stream.get(cls.STREAM, [])
            if all(name in getattr(p, "replacing_types", frozenset()) for p in subs):
                out.add(name)
        return frozenset(out)

    def catch_up(
        self,
        *,
        until: Position | None = None,
        progress: Callable[[int], None] | None = None,
        stall_timeout: float = 30.0,
        compact: bool = True,
    ) -> int:
        """Apply everything before ``until`` and the log's end now; returns events processed.

        With ``compact`` (the default), records superseded by a later state-replacing event
        of the same aggregate (see ``Projection.replacing_types``) are checked (header,
        schema fingerprint, duplicate id) but not decoded nor applied: the resulting state is
        the same as applying every event (the test suite checks the digests are equal), at a
        fraction of the cost. ``compact=False`` decodes and applies every record. A compacted
        catch-up pauses the cyclic garbage collector until it returns (restored on errors).
        Offsets are contiguous per partition on every backend, so this ends exactly at the
        target; if the log stops answering for ``stall_timeout`` seconds first, raises
        :class:`~smc.events.LogUnavailable`.
        """
        log_end = end = self.log.end_position()
        if until is not None:
            end = Position({tp: min(off, until.get(tp)) for tp, off in end.items()})
        target = end
        start = self.applied
        last_progress = time.monotonic()
        replacing = self._replacing() if compact else frozenset()
        kinds = self._header_kinds(replacing)
        pending: dict[object, Any] = {}
        registered = 0  # records put in ``pending`` since the last flush
        appended = 0  # of which appended to a list (the others replaced one)
        scanned = self.position
        verifier = self.verifier
        # Verification needs each record's seal: the plain read path carries it.
        scan_messages = (
            getattr(self.log, "scan_messages", None) if compact and verifier is None else None
        )
        scan = getattr(self.log, "scan", None) if verifier is None else None
        read_sealed = getattr(self.log, "read_sealed", None) if verifier is not None else None
        # Kafka, verified and compacted: the verifier takes the consumed messages themselves
        verified_messages = (
            getattr(self.log, "scan_messages", None) if compact and verifier is not None else None
        )
        cut = len(getattr(self.log, "prefix", ""))
        # A compacted scan makes only acyclic objects (messages, bytes, ints) by the million;
        # the cyclic collector would walk the pending records and projection state over and
        # over for nothing, so it is paused until the survivors are applied.
        paused = compact and gc.isenabled()
        if paused:
            gc.disable()
        try:
            while not scanned.covers(target):
                if verified_messages is not None:
                    assert verifier is not None
                    msgs, after = verified_messages(
                        start=scanned, max_records=self.batch, timeout=0.5, end=target
                    )
                    if not msgs:
                        if time.monotonic() - last_progress > stall_timeout:
                            raise LogUnavailable(
                                f"log {self.log.url} stalled at {scanned} before reaching {target}"
                            )
                        continue
                    last_progress = time.monotonic()
                    fast, held = verifier.feed_messages(msgs, cut=cut, span=(scanned, after))
                    if not fast:
                        added = tails = 0
                    elif self._dedupe and self._scan_parts(
                        fast, verifier.fast_parts, pending, kinds, at=verifier.fast_at
                    ):
                        added, tails = len(fast), 0
                        self.applied += added
                    else:
                        added, tails = self._scan_messages(fast, pending, kinds)
                    if held:
                        more, more_tails = self._scan(held, pending, kinds, records=True)
                        added, tails = added + more, tails + more_tails
                    registered += added
                    appended += tails
                    scanned = after
                    if len(pending) + appended > _PENDING_MAX:
                        appended = len(_survivors(pending)) - len(pending)
                    if len(pending) + appended > _PENDING_MAX:
                        self._flush(pending, registered, cut=cut)
                        pending.clear()
                        registered = appended = 0
                        self.position = scanned
                    msgs = fast = held = []
                    if progress is not None:
                        progress(self.applied - start)
                    continue
                if scan_messages is not None:
                    raw, after = scan_messages(
                        start=scanned, max_records=self.batch, timeout=0.5, end=target
                    )
                elif compact and scan is not None:
                    raw, after = scan(
                        start=_skip_done(scanned, target, log_end),
                        max_records=self.batch,
                        timeout=0.5,
                        end=target,
                    )
                    after = _keep_done(after, scanned, target)
                else:
                    recs: list[Record]
                    if read_sealed is not None:
                        recs, after = read_sealed(
                            start=scanned, max_records=self.batch, timeout=0.5, end=target
                        )
                    else:
                        recs = self.log.read(
                            start=_skip_done(scanned, target, log_end),
                            max_records=self.batch,
                            timeout=0.5,
                        )
                        recs = [r for r in recs if r.offset < target.get((r.stream, r.partition))]
                        after = scanned.advanced(recs)
                    if compact and verifier is not None:
                        raw = verifier.feed(recs)  # Records: see _scan(records=True)
                        if recs and not raw:  # progress, nothing (yet) to apply
                            scanned = after
                            last_progress = time.monotonic()
                            continue
                    else:
                        raw = [(r.stream, r.partition, r.offset, r.key, r.value) for r in recs]
                if not raw:
                    if time.monotonic() - last_progress > stall_timeout:
                        raise LogUnavailable(
                            f"log {self.log.url} stalled at {scanned} before reaching {target}"
                        )
                    continue
                last_progress = time.monotonic()
                if not compact:
                    self.position = scanned
                    self.step_records(recs)
                    scanned = self.position
                else:
                    if scan_messages is not None:
                        added, tails = self._scan_messages(raw, pending, kinds)
                    elif (
                        verifier is not None
                        and self._dedupe
                        and self._scan_batch(raw, pending, kinds, records=True)
                    ):
                        added, tails = len(raw), 0
                        self.applied += added
                    else:
                        added, tails = self._scan(raw, pending, kinds, records=verifier is not None)
                    registered += added
                    appended += tails
                    scanned = after
                    if len(pending) + appended > _PENDING_MAX:  # a bound: count them
                        appended = len(_survivors(pending)) - len(pending)
                    if len(pending) + appended > _PENDING_MAX:
                        self._flush(pending, registered, messages=scan_messages is not None)
                        pending.clear()
                        registered = appended = 0
                        self.position = scanned
                # Let the batch go before the next read, which then reuses its (warm) memory.
                raw = recs = []
                if progress is not None:
                    progress(self.applied - start)
            self._flush(
                pending,
                registered,
                messages=scan_messages is not None,
                cut=cut if verified_messages is not None else None,
            )
        finally:
            if paused:
                gc.enable()
        self.position = scanned
        return self.applied - start

    def step_records(self, recs: Sequence[Record]) -> list[Event]:
        """Apply records (see :meth:`apply_records`) and tell the listeners."""
        events = self.apply_records(recs)
        for cb in self.listeners:
            cb(events)
        return events

    async def run(
        self,
        *,
        stop: asyncio.Event,
        retry_max: float = 5.0,
    ) -> None:
        """Catch up, set :attr:`caught_up`, then follow the log until ``stop`` is set.

        An unreachable log is retried with exponential backoff (capped at ``retry_max``
        seconds); decode and apply errors propagate (the caller exits non-zero).
        """
        attempt = 0
        target: Position | None = None
        while not stop.is_set():
            try:
                if target is None:
                    target = await asyncio.to_thread(self.log.end_position)
                recs = await asyncio.to_thread(
                    self.log.read, start=self.position, max_records=self.batch, timeout=0.2
                )
                attempt = 0
                self.health.report("read", None)
            except LogUnavailable as exc:
                self.health.report("read", exc)
                delay = min(retry_max, 0.1 * 2**attempt) * (0.5 + random.random() / 2)
                attempt += 1
                # one warning when it starts failing; LogHealth logs when it works again
                (log.warning if attempt == 1 else log.debug)(
                    "log unavailable (%s); retrying in %.2fs", exc, delay
                )
                await asyncio.sleep(delay)
                continue
            except LogError as exc:  # corrupt storage: never retried
                self.health.set_fatal(str(exc))
                raise
            try:
                for i in range(0, len(recs), 1000):
                    self.step_records(recs[i : i + 1000])
                    await asyncio.sleep(0)
            except (EventError, ProjectionError) as exc:
                self.health.set_fatal(str(exc))
                raise
            if not self.caught_up.is_set() and self.position.covers(target):
                log.info("projections caught up at %s (%d events)", self.position, self.applied)
                self.caught_up.set()
