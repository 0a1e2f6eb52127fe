"""The partition runs the verified Kafka catch-up splits a read into (``partition_runs``):
the same runs as grouping every message by (topic, partition), for reads of one run, of
several, and of two topics whose same partition number follows back to back."""

from __future__ import annotations

import random
from itertools import groupby
from typing import Any

from confluent_kafka import Message

from smc.events._verify_fast import partition_runs


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
