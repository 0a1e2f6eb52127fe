"""Kafka topic layout of SMC and an idempotent way to create it on any cluster.

Role: :data:`DEFAULT_TOPICS` is the single source of the topic definitions (names, partition
counts, configs); ``deploy/kafka/topics.json`` is generated from it and a test keeps the two
equal. :func:`ensure_topics` creates missing topics with confluent-kafka's AdminClient and
verifies the partition count, replication factor and configs of topics that already exist.
Concurrency: blocking calls on the caller's thread (run it in a worker thread from asyncio);
no shared state, safe to call from several threads or processes at once (a topic created by
someone else meanwhile is verified like any existing topic).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smc.events._errors import EventError

__all__ = [
    "DEFAULT_TOPICS",
    "TopicSetupError",
    "TopicSpec",
    "ensure_topics",
    "load_definitions",
    "parse_definitions",
]

#: Topic definitions. ``replication_factor`` is not part of them: it is chosen per cluster.
#: ``min.insync.replicas`` is the value for a cluster of 3+ brokers and is capped at the
#: replication factor when topics are created (a single-node cluster gets 1).
DEFAULT_TOPICS: dict[str, Any] = {
    "topics": [
        {
            "name": "smc.registry",
            "partitions": 6,
            "config": {
                "cleanup.policy": "delete",
                "retention.ms": "-1",
                "retention.bytes": "-1",
                "min.insync.replicas": "2",
                "unclean.leader.election.enable": "false",
            },
        },
        {
            "name": "smc.policy",
            "partitions": 3,
            "config": {
                "cleanup.policy": "delete",
                "retention.ms": "-1",
                "retention.bytes": "-1",
                "min.insync.replicas": "2",
                "unclean.leader.election.enable": "false",
            },
        },
        {
            "name": "smc.certs",
            "partitions": 3,
            "config": {
                "cleanup.policy": "delete",
                "retention.ms": "-1",
                "retention.bytes": "-1",
                "min.insync.replicas": "2",
                "unclean.leader.election.enable": "false",
            },
        },
        {
            "name": "smc.checkpoints",
            "partitions": 1,
            "config": {
                "cleanup.policy": "compact",
                "min.insync.replicas": "2",
                "unclean.leader.election.enable": "false",
                "max.message.bytes": "16777216",
                "min.compaction.lag.ms": "0",
            },
        },
    ]
}

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class TopicSetupError(EventError):
    """Topic definitions are invalid, or the cluster's topics cannot be made to match them."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TopicSpec:
    """One validated topic definition."""

    name: str
    partitions: int
    config: Mapping[str, str]

    def effective_config(self, *, replication_factor: int) -> dict[str, str]:
        """The configs to set on a cluster with this replication factor."""
        config = dict(self.config)
        if "min.insync.replicas" in config:
            config["min.insync.replicas"] = str(
                min(int(config["min.insync.replicas"]), replication_factor)
            )
        return config


def parse_definitions(
    definitions: Mapping[str, Any], *, source: str = "definitions"
) -> list[TopicSpec]:
    """Validate topic definitions (the shape of :data:`DEFAULT_TOPICS`) into specs.

    Raises :class:`TopicSetupError` naming the offending field, e.g.
    ``definitions.topics[1].partitions``.
    """
    if not isinstance(definitions, Mapping):
        raise TopicSetupError(f"{source}: must be an object, got {type(definitions).__name__}")
    topics = definitions.get("topics")
    if not isinstance(topics, Sequence) or isinstance(topics, str | bytes) or not topics:
        raise TopicSetupError(f"{source}.topics: must be a non-empty list of topic objects")
    specs: list[TopicSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(topics):
        where = f"{source}.topics[{i}]"
        if not isinstance(raw, Mapping):
            raise TopicSetupError(f"{where}: must be an object, got {type(raw).__name__}")
        unknown = set(raw) - {"name", "partitions", "config"}
        if unknown:
            raise TopicSetupError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = raw.get("name")
        if not isinstance(name, str) or not _TOPIC_NAME.match(name) or name in {".", ".."}:
            raise TopicSetupError(
                f"{where}.name: must be 1-249 characters of [A-Za-z0-9._-], got {name!r}"
            )
        if name in seen:
            raise TopicSetupError(f"{where}.name: topic {name!r} is defined twice")
        seen.add(name)
        partitions = raw.get("partitions")
        if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
            raise TopicSetupError(
                f"{where}.partitions: must be a positive integer, got {partitions!r}"
            )
        config = raw.get("config", {})
        if not isinstance(config, Mapping):
            raise TopicSetupError(f"{where}.config: must be an object of string values")
        for key, value in config.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TopicSetupError(
                    f"{where}.config[{key!r}]: keys and values must be strings, got {value!r}"
                )
        mir = config.get("min.insync.replicas")
        if mir is not None and (not mir.isdigit() or int(mir) < 1):
            raise TopicSetupError(
                f"{where}.config['min.insync.replicas']: must be a positive integer, got {mir!r}"
            )
        specs.append(TopicSpec(name=name, partitions=partitions, config=dict(config)))
    return specs


def load_definitions(path: str | Path) -> dict[str, Any]:
    """Read topic definitions from a JSON file; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopicSetupError(f"{p}: cannot read topic definitions: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TopicSetupError(
            f"{p}: line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}"
        ) from exc
    if not isinstance(data, dict):
        raise TopicSetupError(f"{p}: must hold a JSON object with a 'topics' list")
    parse_definitions(data, source=str(p))
    return data


def ensure_topics(
    *,
    bootstrap: str,
    definitions: Mapping[str, Any] | None = None,
    replication_factor: int = 1,
    timeout: float = 30.0,
    config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the topics that are missing and verify those that exist (``config``: client
    security settings, e.g. an admin's SASL credentials).

    Returns the names of the topics created by this call (an empty list when all existed).
    Existing topics must have the defined partition count, the given replication factor and
    the defined configs (``min.insync.replicas`` capped at the replication factor); otherwise
    :class:`TopicSetupError` lists every difference. Safe to run again and again.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported at run time
        AdminClient,
        ConfigResource,
        NewTopic,
        ResourceType,
    )

    if replication_factor < 1:
        raise TopicSetupError(f"replication_factor: must be >= 1, got {replication_factor}")
    specs = parse_definitions(DEFAULT_TOPICS if definitions is None else definitions)
    admin = AdminClient(
        {
            "bootstrap.servers": bootstrap,
            "socket.timeout.ms": int(timeout * 1000),
            "log_level": 5,  # keep warnings and errors; drop informational chatter
            **dict(config or {}),
        }
    )
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise TopicSetupError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc

    missing = [s for s in specs if s.name not in metadata.topics]
    created: list[str] = []
    if missing:
        new_topics = [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=replication_factor,
                config=s.effective_config(replication_factor=replication_factor),
            )
            for s in missing
        ]
        futures = admin.create_topics(
            new_topics, operation_timeout=timeout, request_timeout=timeout
        )
        failures: list[str] = []
        for name, fut in futures.items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                err = exc.args[0]
                if getattr(err, "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
                    continue  # created concurrently by someone else: verified below
                failures.append(f"{name}: {err}")
        if failures:
            raise TopicSetupError(
                f"cannot create topics on {bootstrap}: " + "; ".join(sorted(failures))
            )
        # Metadata of new topics reaches every broker a little later: wait for it (bounded).
        import time

        deadline = time.monotonic() + timeout
        while True:
            metadata = admin.list_topics(timeout=timeout)
            ready = all(
                s.name in metadata.topics
                and metadata.topics[s.name].error is None
                and len(metadata.topics[s.name].partitions) == s.partitions
                for s in missing
            )
            if ready or time.monotonic() > deadline:
                break
            time.sleep(0.1)

    problems: list[str] = []
    to_verify = specs  # created topics too: catches a cluster that altered or refused a config
    for spec in to_verify:
        topic = metadata.topics.get(spec.name)
        if topic is None:
            problems.append(f"{spec.name}: not found after creation")
            continue
        if len(topic.partitions) != spec.partitions:
            problems.append(
                f"{spec.name}: has {len(topic.partitions)} partitions, defined {spec.partitions}"
            )
        rfs = {len(p.replicas) for p in topic.partitions.values()}
        if rfs and rfs != {replication_factor}:
            problems.append(
                f"{spec.name}: replication factor {sorted(rfs)}, expected {replication_factor}"
            )
    if to_verify:
        resources = [ConfigResource(ResourceType.TOPIC, s.name) for s in to_verify]
        results = admin.describe_configs(resources, request_timeout=timeout)
        by_name = {s.name: s for s in to_verify}
        for resource, fut in results.items():
            spec = by_name[resource.name]
            try:
                entries = fut.result()
            except KafkaException as exc:
                problems.append(f"{spec.name}: cannot describe configs: {exc.args[0]}")
                continue
            wanted = spec.effective_config(replication_factor=replication_factor)
            for key, value in sorted(wanted.items()):
                entry = entries.get(key)
                actual = None if entry is None else entry.value
                if actual != value:
                    problems.append(f"{spec.name}: config {key}={actual!r}, defined {value!r}")
    if problems:
        raise TopicSetupError(
            f"topics on {bootstrap} differ from their definitions: " + "; ".join(problems)
        )
    return created
