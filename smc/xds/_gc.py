"""Garbage-collector settings for a process serving many ADS streams.

Role: :func:`tune_gc` raises the threshold of CPython's youngest generation (700 container
objects by default). A change pushed to N streams keeps a few container objects per stream alive
until that stream's write and ACK complete (gRPC's batch operations, futures, coroutine frames):
with 1,000 streams that is well over 700 objects at once, so the collector ran about 16 young
and 1-2 middle collections per change, each walking every live young object and promoting them
toward the old generation, whose growth then triggers full collections that walk the whole heap
(every proxy's snapshot): measured at 1,000 streams, 30-80 ms of a change's ~190 ms of server
CPU, and single full collections of 0.2-0.4 s. With a threshold of 50,000 those short-lived
objects are freed by reference counting before a collection is due; reference cycles are still
collected, only later (at most ~50,000 young objects' worth of memory).

The objects a change keeps alive grow with the streams it reaches, so a server with more
streams needs a higher threshold for the same effect: :func:`tune_gc_for_streams` raises it to
:data:`YOUNG_PER_STREAM` per open stream (50,000 at 1,000 streams, 500,000 at 10,000, where the
fixed 50,000 let collections take 0.06-0.5 s of each change's ~0.9-1.3 s; docs/ads-scale.md).
Thresholds are only ever raised, never lowered when streams go.

Concurrency: process-wide setting; call from any thread (it is idempotent, and never lowers a
threshold an operator set higher).
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_PER_STREAM", "YOUNG_THRESHOLD", "tune_gc", "tune_gc_for_streams"]

#: Young-generation threshold for a serving process (container allocations minus deallocations).
YOUNG_THRESHOLD = 50_000
#: Young-generation threshold per open stream (see :func:`tune_gc_for_streams`).
YOUNG_PER_STREAM = 50


def tune_gc(young: int = YOUNG_THRESHOLD) -> tuple[int, int, int]:
    """Raise the young-generation threshold to at least ``young``; returns the thresholds now
    in force. Generations 1 and 2 keep their settings (1 and 2 stay relative to generation 0)."""
    g0, g1, g2 = gc.get_threshold()
    if g0 != 0 and g0 < young:  # 0: the collector was disabled on purpose; leave it so
        gc.set_threshold(young, g1, g2)
    return gc.get_threshold()


def tune_gc_for_streams(streams: int) -> tuple[int, int, int]:
    """:func:`tune_gc` for a server with ``streams`` open streams: at least
    :data:`YOUNG_PER_STREAM` young objects per stream (and never below
    :data:`YOUNG_THRESHOLD`)."""
    return tune_gc(max(YOUNG_THRESHOLD, YOUNG_PER_STREAM * streams))
