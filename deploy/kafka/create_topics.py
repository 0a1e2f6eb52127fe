#!/usr/bin/env python3
"""Create SMC's Kafka topics on any cluster, idempotently (a thin CLI over ``ensure_topics``).

Role: operator tool. Topics that are missing are created with the partition counts and configs
of ``topics.json`` (beside this script, generated from ``smc.events._kafka_topics``); topics
that exist are verified (partitions, replication factor, configs) and every difference is
reported. Exit code 0 when the cluster matches, 1 when it does not, 2 on bad arguments.
Concurrency: one blocking run; safe to run again, or from several places at once.

    python deploy/kafka/create_topics.py --bootstrap broker:9092 --replication-factor 3
    python deploy/kafka/create_topics.py --print-defaults > deploy/kafka/topics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

try:
    from smc.events._kafka_topics import (
        DEFAULT_TOPICS,
        TopicSetupError,
        ensure_topics,
        load_definitions,
        parse_definitions,
    )
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(HERE.parents[1]))
    from smc.events._kafka_topics import (
        DEFAULT_TOPICS,
        TopicSetupError,
        ensure_topics,
        load_definitions,
        parse_definitions,
    )
from smc.events import LogError  # noqa: E402 (after the path fallback above)
from smc.events._kafka_security import read_properties  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create or verify SMC's Kafka topics.")
    parser.add_argument("--bootstrap", help="bootstrap servers, host:port[,host:port...]")
    parser.add_argument(
        "--replication-factor",
        type=int,
        default=3,
        help="replication factor of new topics and expected of existing ones (default 3)",
    )
    parser.add_argument(
        "--definitions",
        type=Path,
        default=HERE / "topics.json",
        help="topic definitions JSON (default: topics.json beside this script)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per admin request")
    parser.add_argument(
        "--command-config",
        type=Path,
        default=None,
        help="key=value client properties (librdkafka names) of an admin principal, for "
        "SASL/SSL clusters",
    )
    parser.add_argument(
        "--print-defaults",
        action="store_true",
        help="print the built-in definitions as JSON (this is how topics.json is made) and exit",
    )
    args = parser.parse_args(argv)
    if args.print_defaults:
        print(json.dumps(DEFAULT_TOPICS, indent=2))
        return 0
    if not args.bootstrap:
        parser.error("--bootstrap is required")
    if args.replication_factor < 1:
        parser.error("--replication-factor must be >= 1")
    try:
        definitions = load_definitions(args.definitions)
        names = [s.name for s in parse_definitions(definitions, source=str(args.definitions))]
        config = read_properties(str(args.command_config)) if args.command_config else {}
        created = ensure_topics(
            bootstrap=args.bootstrap,
            definitions=definitions,
            replication_factor=args.replication_factor,
            timeout=args.timeout,
            config=config,
        )
    except (TopicSetupError, LogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in names:
        state = "created" if name in created else "exists, partitions and configs verified"
        print(f"{name}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
