"""The partition runs the verified Kafka catch-up splits a read into (``partition_runs``):
the same runs as grouping every message by (topic, partition), for reads of one run, of
several, and of two topics whose same partition number follows back to back. The same runs
from the positions before and after a read (``runs_by_position``, two messages read per
run), and None whenever those do not settle them (interleaved partitions, missing offsets,
a position that does not match the messages)."""

from __future__ import annotations

import random
from itertools import groupby
from typing import Any

from confluent_kafka import Message

from smc.events import Position
from smc.events._verify_fast import partition_runs, runs_by_position


def _grouped(msgs: list[Any]) -> list[tuple[str, int, int, int]]:
    out, i = [], 0
    for (t, p), g in groupby(msgs, key=lambda m: (m.topic(), m.partition())):
        j = i + len(list(g))
        out.append((t, p, i, j))
        i = j
    return out


def _msgs(pairs: list[tuple[str, int]]) -> list[Any]:
    return [Message(topic=t, partition=p, offset=k) for k, (t, p) in enumerate(pairs)]


def test_runs_match_a_grouping_by_topic_and_partition() -> None:
    rnd = random.Random(7)
    cases = [
        [],
        [("a", 0)] * 50,
        [("a", 0)] * 5 + [("b", 0)] * 3 + [("a", 0)] * 2,  # one partition number, two topics
        [("a", 1)] * 3 + [("a", 2)] * 4 + [("b", 2)] + [("a", 2)] * 2 + [("a", 1)],
    ]
    for _ in range(200):
        n = rnd.randrange(1, 60)
        cases.append([(rnd.choice("ab"), rnd.randrange(3)) for _ in range(n)])
        # long runs, as reads mostly are
        cases.append([p for p in cases[-1][:4] for _ in range(rnd.randrange(1, 30))])
    for pairs in cases:
        msgs = _msgs(pairs)
        assert partition_runs(msgs) == _grouped(msgs), pairs


def _offsets_msgs(
    pairs: list[tuple[str, int]], starts: dict[tuple[str, int], int], prefix: str = ""
) -> list[Any]:
    """Messages of ``pairs`` (topic, partition) in that order, each partition's offsets
    consecutive from ``starts``; topics carry ``prefix``."""
    nxt = dict(starts)
    out = []
    for t, p in pairs:
        off = nxt.get((t, p), 0)
        nxt[(t, p)] = off + 1
        out.append(Message(topic=prefix + t, partition=p, offset=off))
    return out


def _span(msgs: list[Any], starts: dict[tuple[str, int], int], cut: int) -> tuple[Any, Any]:
    after = dict(starts)
    for m in msgs:
        after[(m.topic()[cut:], m.partition())] = m.offset() + 1
    return Position(starts), Position(after)


def test_runs_by_position_match_partition_runs_or_defer_to_it() -> None:
    rnd = random.Random(11)
    settled = 0
    for _ in range(300):
        tps = [(t, p) for t in "ab" for p in range(3)]
        starts = {tp: rnd.randrange(0, 50) for tp in tps}
        # reads as a consumer makes them: chunks of partitions, sometimes interleaved
        pairs: list[tuple[str, int]] = []
        for _ in range(rnd.randrange(1, 5)):
            pairs += [rnd.choice(tps)] * rnd.randrange(1, 40)
        if rnd.random() < 0.3:
            rnd.shuffle(pairs)
        msgs = _offsets_msgs(pairs, starts, prefix="x.")
        start, after = _span(msgs, starts, 2)
        got = runs_by_position(msgs, start, after, 2)
        if got is not None:
            settled += 1
            assert got == partition_runs(msgs) == _grouped(msgs), pairs
        else:  # a partition came back in two pieces: only a full grouping can say
            assert len({(t, p) for t, p, _, _ in _grouped(msgs)}) < len(_grouped(msgs))
    assert settled > 100


def test_runs_by_position_refuse_what_positions_do_not_prove() -> None:
    starts = {("a", 0): 10, ("a", 1): 5}
    pairs = [("a", 0)] * 3 + [("a", 1)] * 2
    msgs = _offsets_msgs(pairs, starts)
    start, after = _span(msgs, starts, 0)
    assert runs_by_position(msgs, start, after) == [("a", 0, 0, 3), ("a", 1, 3, 5)]
    # a missing offset (a gap, e.g. a transaction marker): advances exceed the read
    gap = [*msgs[:2], Message(topic="a", partition=0, offset=13), *msgs[3:]]
    _, after_gap = _span(gap, starts, 0)
    assert runs_by_position(gap, start, after_gap) is None
    # a read that does not start where the position says
    assert runs_by_position(msgs, Position({("a", 0): 9, ("a", 1): 6}), after) is None
    # a position moved back, or advances that do not add up to the read
    assert runs_by_position(msgs, after, start) is None
    assert runs_by_position(msgs[:4], start, after) is None
    # a message of another partition inside a run, with the counts still adding up:
    # the run's last message is not its partition's last offset
    swapped = [msgs[0], msgs[3], msgs[1], msgs[2], msgs[4]]
    assert runs_by_position(swapped, start, after) is None
    # the same offsets under another topic
    other = [*(Message(topic="b", partition=0, offset=m.offset()) for m in msgs[:3]), *msgs[3:]]
    assert runs_by_position(other, start, after) is None
    assert runs_by_position([], start, start) == []
