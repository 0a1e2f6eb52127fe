"""The real-Kafka harness and SMC's topic layout, against a real single-node KRaft broker.

Role: proves that ``smc.testing.kafka.KafkaBroker`` starts Apache Kafka from Maven Central
jars, that ``ensure_topics`` creates and verifies SMC's topics, and that acknowledged records
survive a clean restart and a SIGKILL. Concurrency: one broker per module, tests run serially.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported at run time
    AdminClient,
    ConfigResource,
    ResourceType,
)

from smc.events._kafka_topics import (
    DEFAULT_TOPICS,
    TopicSetupError,
    ensure_topics,
    load_definitions,
    parse_definitions,
)
from smc.testing.kafka import (
    KAFKA_VERSION,
    KafkaBroker,
    KafkaHarnessError,
    ensure_kafka_libs,
    kafka_broker_fixture,
)

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    yield from kafka_broker_fixture()


def _fresh_topic(broker: KafkaBroker, *, partitions: int = 3) -> str:
    name = f"test.{uuid.uuid4().hex[:12]}"
    created = ensure_topics(
        bootstrap=broker.bootstrap,
        definitions={"topics": [{"name": name, "partitions": partitions, "config": {}}]},
    )
    assert created == [name]
    return name


def _produce(bootstrap: str, topic: str, count: int, *, tag: str) -> list[tuple[int, int, bytes]]:
    """Produce ``count`` keyed records; return (partition, offset, value) of every ack."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
    )
    acked: list[tuple[int, int, bytes]] = []
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            acked.append((msg.partition(), msg.offset(), msg.value()))

    for i in range(count):
        producer.produce(
            topic,
            key=f"agg-{i % 7}".encode(),
            value=f"{tag}-{i:06d}".encode(),
            on_delivery=on_delivery,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert errors == []
    return acked


def _consume_all(bootstrap: str, topic: str, expected: int, *, timeout: float = 30.0) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise AssertionError(f"consume error: {err}")
                got.append(msg)
        return got
    finally:
        consumer.close()


def test_broker_is_up_on_loopback(broker: KafkaBroker) -> None:
    assert broker.is_running()
    host, port = broker.bootstrap.split(":")
    assert host == "127.0.0.1" and int(port) == broker.port
    assert broker.last_startup_seconds is not None and broker.last_startup_seconds < 60
    md = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10)
    assert [b.id for b in md.brokers.values()] == [1]
    # the broker logs to its file, not to our stdout
    assert "Kafka Server started" in broker.log_path.read_text(encoding="utf-8")


def test_smc_topics_have_defined_partitions_and_configs(broker: KafkaBroker) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    md = admin.list_topics(timeout=10)
    expected_partitions = {"smc.registry": 6, "smc.policy": 3, "smc.certs": 3, "smc.checkpoints": 1}
    for name, n in expected_partitions.items():
        assert len(md.topics[name].partitions) == n, name
    resources = [ConfigResource(ResourceType.TOPIC, n) for n in expected_partitions]
    configs = {r.name: f.result() for r, f in admin.describe_configs(resources).items()}
    for name in ("smc.registry", "smc.policy", "smc.certs"):
        cfg = configs[name]
        assert cfg["retention.ms"].value == "-1"
        assert cfg["retention.bytes"].value == "-1"
        assert cfg["cleanup.policy"].value == "delete"
        assert cfg["min.insync.replicas"].value == "1"  # capped at the replication factor
    assert configs["smc.checkpoints"]["cleanup.policy"].value == "compact"


def test_ensure_topics_is_idempotent(broker: KafkaBroker) -> None:
    assert ensure_topics(bootstrap=broker.bootstrap) == []
    assert broker.create_topics(definitions_path=REPO / "deploy" / "kafka" / "topics.json") == []


def test_ensure_topics_reports_every_difference(broker: KafkaBroker) -> None:
    drifted = json.loads(json.dumps(DEFAULT_TOPICS))
    drifted["topics"][0]["partitions"] = 5
    drifted["topics"][1]["config"]["retention.ms"] = "1000"
    with pytest.raises(TopicSetupError) as info:
        ensure_topics(bootstrap=broker.bootstrap, definitions=drifted)
    text = str(info.value)
    assert "smc.registry: has 6 partitions, defined 5" in text
    assert "smc.policy: config retention.ms='-1', defined '1000'" in text
    with pytest.raises(TopicSetupError, match="replication factor \\[1\\], expected 3"):
        ensure_topics(bootstrap=broker.bootstrap, replication_factor=3)


def test_create_topics_cli(broker: KafkaBroker) -> None:
    script = REPO / "deploy" / "kafka" / "create_topics.py"
    ok = subprocess.run(
        [sys.executable, str(script), "--bootstrap", broker.bootstrap, "--replication-factor", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "smc.registry: exists, partitions and configs verified" in ok.stdout
    bad = subprocess.run(
        [sys.executable, str(script), "--bootstrap", broker.bootstrap, "--replication-factor", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "expected 2" in bad.stderr


def test_topics_json_is_generated_from_defaults() -> None:
    on_disk = load_definitions(REPO / "deploy" / "kafka" / "topics.json")
    assert on_disk == DEFAULT_TOPICS


@pytest.mark.parametrize(
    ("definitions", "fragment"),
    [
        ({}, "definitions.topics: must be a non-empty list"),
        ({"topics": [{"name": "a b", "partitions": 1}]}, "definitions.topics[0].name"),
        ({"topics": [{"name": "x", "partitions": 0}]}, "definitions.topics[0].partitions"),
        ({"topics": [{"name": "x", "partitions": 1, "config": {"a": 1}}]}, "config['a']"),
        (
            {"topics": [{"name": "x", "partitions": 1}, {"name": "x", "partitions": 1}]},
            "definitions.topics[1].name: topic 'x' is defined twice",
        ),
        ({"topics": [{"name": "x", "partitions": 1, "replicas": 3}]}, "unknown field(s)"),
    ],
)
def test_bad_definitions_name_the_field(definitions: Any, fragment: str) -> None:
    with pytest.raises(TopicSetupError) as info:
        parse_definitions(definitions)
    assert fragment in str(info.value)


def test_bad_definitions_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "topics.json"
    p.write_text('{"topics": [', encoding="utf-8")
    with pytest.raises(TopicSetupError, match=r"topics\.json: line 1 column"):
        load_definitions(p)


def test_idempotent_produce_and_read_committed_consume(broker: KafkaBroker) -> None:
    topic = _fresh_topic(broker)
    acked = _produce(broker.bootstrap, topic, 500, tag="rt")
    assert len(acked) == 500
    got = _consume_all(broker.bootstrap, topic, 500)
    assert sorted(m.value() for m in got) == sorted(v for _, _, v in acked)
    # per key, records come back in the order they were produced
    by_key: dict[bytes, list[bytes]] = {}
    for m in got:
        by_key.setdefault(m.key(), []).append(m.value())
    for values in by_key.values():
        assert values == sorted(values)


def test_restart_keeps_data(broker: KafkaBroker) -> None:
    topic = _fresh_topic(broker)
    before = broker.bootstrap
    acked = _produce(broker.bootstrap, topic, 300, tag="restart")
    broker.restart()
    assert broker.bootstrap == before and broker.is_running()
    got = _consume_all(broker.bootstrap, topic, 300)
    assert sorted(m.value() for m in got) == sorted(v for _, _, v in acked)


def test_kill9_then_restart_keeps_acknowledged_records(broker: KafkaBroker) -> None:
    topic = _fresh_topic(broker, partitions=2)
    acked = _produce(broker.bootstrap, topic, 400, tag="crash")
    pid = broker.pid
    broker.kill9()
    assert not broker.is_running()
    with pytest.raises(KafkaHarnessError, match="not running"):
        broker.kill9()
    broker.restart()
    assert broker.pid != pid
    got = _consume_all(broker.bootstrap, topic, 400)
    assert {(m.partition(), m.offset(), m.value()) for m in got} == set(acked)
    # and the broker takes new writes after the crash
    assert len(_produce(broker.bootstrap, topic, 10, tag="after")) == 10


def test_bad_config_is_a_clear_error() -> None:
    bad = KafkaBroker(extra_properties={"node.id": "not-a-number"})
    with pytest.raises(KafkaHarnessError, match="format failed") as info:
        bad.start()
    assert "Invalid value not-a-number" in str(info.value)
    assert not bad.is_running()
    assert not bad.workdir.exists()  # the temporary folder is cleaned up


def test_broker_crash_at_startup_shows_the_log_tail() -> None:
    bad = KafkaBroker(extra_properties={"authorizer.class.name": "no.such.Authorizer"})
    with pytest.raises(KafkaHarnessError, match="exited with code") as info:
        bad.start()
    assert "ClassNotFoundException: no.such.Authorizer" in str(info.value)
    assert not bad.is_running()


def test_broker_is_stopped_when_the_interpreter_exits() -> None:
    code = (
        "from smc.testing.kafka import KafkaBroker\n"
        "b = KafkaBroker().start()\n"
        "print(b.pid, b.workdir, flush=True)\n"
        # no stop(): the atexit hook must end the broker and remove its folder
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    pid_text, workdir = out.stdout.split()
    pid = int(pid_text)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    assert not Path(workdir).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running either
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[1].split()[0] != "Z"


def test_jar_cache_is_filled_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libs = tmp_path / "libs"
    monkeypatch.setenv("SMC_KAFKA_CACHE", str(libs))
    assert ensure_kafka_libs() == libs
    jars = sorted(p.name for p in libs.glob("*.jar"))
    assert f"kafka_2.13-{KAFKA_VERSION}.jar" in jars
    assert "log4j-slf4j2-impl-2.26.1.jar" in jars
    assert [j for j in jars if j.startswith("slf4j-api-")] == ["slf4j-api-2.0.17.jar"]
    stamp = (libs / ".smc-complete").stat().st_mtime_ns
    monkeypatch.setenv("PATH", "")  # a second call must not need mvn at all
    assert ensure_kafka_libs() == libs
    assert (libs / ".smc-complete").stat().st_mtime_ns == stamp
