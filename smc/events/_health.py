"""Whether the event log can be read and written right now, and quiet librdkafka logging.

Role: :class:`LogHealth` gathers what the parts of ``smc serve`` learn about the log: the
projection runner reports each read, the change service each append, and :func:`probe_log`
(run every second by serve) asks the log itself (``probe(write=...)`` on the backends). The log
is *available* when the last of each kind of report succeeded; ``/readyz`` answers 503 with the
reason while it is not. A *fatal* report (a corrupt record) makes ``/healthz`` fail for good.
:class:`StateChangeFilter` keeps librdkafka's repeated connection errors to one line per state
change of each broker (the client retries several times a second and logs every attempt).
Concurrency: reports come from worker threads and the event loop; each field is replaced whole
(a reference assignment), so readers see a consistent value without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from smc.events._errors import EventError, LogUnavailable
from smc.events._log import Position

__all__ = ["LogHealth", "StateChangeFilter", "probe_log", "watch_log"]


@dataclass(frozen=True, slots=True)
class _Report:
    ok: bool
    detail: str
    at: float


_OK = _Report(ok=True, detail="", at=0.0)


class LogHealth:
    """What is known about the log's availability (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._reports: dict[str, _Report] = {"read": _OK, "append": _OK, "probe": _OK}
        self.fatal: str | None = None
        #: The log's end position at the last successful probe (see :func:`watch_log`).
        self.end = Position()
        #: Called as ``observer(seconds, requests, error)`` after each append reported through
        #: :meth:`appended` (metrics).
        self.append_observers: list[Callable[[float, int, BaseException | None], None]] = []
        #: How many times a report kind turned from working to failing or back.
        self.transitions = 0

    def report(self, kind: str, error: BaseException | str | None) -> None:
        """Record the outcome of one ``read``, ``append`` or ``probe`` (None: success)."""
        old = self._reports[kind]
        if error is None:
            if not old.ok:
                self._reports[kind] = _Report(ok=True, detail="", at=time.time())
                self.transitions += 1
                logging.getLogger("smc.events").warning(
                    "event log %s: %s works again", self.url, kind
                )
            return
        detail = str(error)
        if old.ok:
            self.transitions += 1
            logging.getLogger("smc.events").warning(
                "event log %s: %s failed: %s", self.url, kind, detail
            )
        self._reports[kind] = _Report(
            ok=False, detail=detail, at=old.at if not old.ok else time.time()
        )

    def appended(self, seconds: float, requests: int, error: BaseException | None) -> None:
        """Report one append that took ``seconds`` for ``requests`` change requests."""
        if error is None:
            self.report("append", None)
        elif isinstance(error, LogUnavailable):
            self.report("append", error)
        else:
            self.set_fatal(str(error))
        for observe in self.append_observers:
            observe(seconds, requests, error)

    def set_fatal(self, reason: str) -> None:
        self.fatal = reason

    @property
    def available(self) -> bool:
        return self.fatal is None and all(r.ok for r in self._reports.values())

    @property
    def append_failing(self) -> bool:
        return not self._reports["append"].ok

    def problems(self) -> list[str]:
        """One line per failing kind, naming the log and the last error."""
        out = [f"{kind}: {r.detail}" for kind, r in sorted(self._reports.items()) if not r.ok]
        if self.fatal is not None:
            out.insert(0, f"fatal: {self.fatal}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "log": self.url,
            "available": self.available,
            "problems": self.problems(),
            "failing_since": {k: r.at for k, r in sorted(self._reports.items()) if not r.ok},
        }


class _Probed(Protocol):
    def probe(self, *, write: bool, timeout: float) -> None: ...


def probe_log(log: object, health: LogHealth, *, timeout: float = 2.0) -> None:
    """Ask ``log`` whether it answers (blocking; run it in a worker thread). A write probe is
    made only while appends are failing, so a healthy log is never written to by probes."""
    probe = getattr(log, "probe", None)
    if probe is None:
        return
    try:
        probe(write=health.append_failing, timeout=timeout)
    except Exception as exc:
        health.report("probe", exc)
        return
    health.report("probe", None)
    if health.append_failing:
        health.report("append", None)


async def watch_log(
    log: object,
    health: LogHealth,
    *,
    stop: asyncio.Event,
    every: float = 1.0,
) -> None:
    """Run :func:`probe_log` every ``every`` seconds until ``stop`` is set; while the log
    answers, keep its end position in ``health.end`` (metrics: lag per partition)."""
    # a log that knows its end without asking (Kafka's cached watermarks) says so: asking the
    # broker every second would queue behind, and delay, the runner's own fetches
    end_position = getattr(log, "cached_end_position", None) or getattr(log, "end_position", None)
    while not stop.is_set():
        await asyncio.to_thread(probe_log, log, health, timeout=max(every * 2, 1.0))
        if end_position is not None and health.available:
            with contextlib.suppress(EventError):
                health.end = await asyncio.to_thread(end_position)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)


_VARYING = re.compile(r"\d+ms|,?\s*\d+ identical error\(s\) suppressed|rdkafka#\w+-\d+")
_BROKER = re.compile(r"\[thrd:([^\]]*)\]")


class StateChangeFilter(logging.Filter):
    """Lets a librdkafka log line through only when it says something new about its broker
    thread: the same failure repeated by the retry loop (or by the producer and the consumer
    of one log) is dropped. ``reset(broker)`` forgets a broker's state (it came back)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        m = _BROKER.search(message)
        thread = m.group(1) if m else ""
        state = _VARYING.sub("", message)
        if self._last.get(thread) == state:
            return False
        self._last[thread] = state
        return True

    def reset(self) -> None:
        self._last.clear()
