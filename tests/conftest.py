"""Shared fixtures: real logs (SQLite file, real Kafka broker started once per session)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smc.events import EventLog, SqliteLog
from smc.events._kafka import KafkaLog
from smc.events._kafka_topics import DEFAULT_TOPICS, ensure_topics
from smc.testing.kafka import KafkaBroker, kafka_broker_fixture


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    yield from kafka_broker_fixture()


def new_kafka_log(broker: KafkaBroker) -> KafkaLog:
    """A KafkaLog on freshly created, uniquely prefixed SMC topics (test isolation)."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    defs = copy.deepcopy(DEFAULT_TOPICS)
    defs["topics"] = [
        {**t, "name": prefix + t["name"]} for t in defs["topics"] if t["name"] != "smc.checkpoints"
    ]
    ensure_topics(bootstrap=broker.bootstrap, definitions=defs, replication_factor=1)
    return KafkaLog(broker.bootstrap, topic_prefix=prefix)


@pytest.fixture
def kafka_log(kafka_broker: KafkaBroker) -> Iterator[KafkaLog]:
    log = new_kafka_log(kafka_broker)
    yield log
    log.close()


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def log_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], EventLog]]:
    """Makes logs of one backend; every log made in one test shares the same storage."""
    made: list[EventLog] = []
    if request.param == "sqlite":
        path = tmp_path / "log.db"

        def make() -> EventLog:
            log = SqliteLog(path)
            made.append(log)
            return log

    else:
        broker: KafkaBroker = request.getfixturevalue("kafka_broker")
        first = new_kafka_log(broker)
        made.append(first)
        prefix = first.prefix

        def make() -> EventLog:
            if len(made) == 1 and not getattr(make, "used", False):
                make.used = True  # type: ignore[attr-defined]
                return first
            log = KafkaLog(broker.bootstrap, topic_prefix=prefix)
            made.append(log)
            return log

    yield make
    for log in made:
        log.close()


@pytest.fixture
def any_log(log_factory: Callable[[], EventLog]) -> EventLog:
    return log_factory()
