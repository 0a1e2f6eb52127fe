#!/usr/bin/env python3
"""Set the ACLs that make SMC's Kafka log a guarded door (a thin CLI over ``apply_acls``).

Role: operator tool, run as a Kafka admin principal on a cluster whose brokers run the
``StandardAuthorizer`` (``authorizer.class.name=org.apache.kafka.metadata.authorizer.
StandardAuthorizer``, ``allow.everyone.if.no.acl.found=false``) with SASL/SCRAM or mTLS
listeners. ``--writer`` principals (SMC's replicas, the operators' CLI) may produce
(idempotently) to and read the ``smc.*`` topics; ``--reader`` principals (integrators) may only
read them; nobody else may do either. Safe to run again (ACLs are sets).
Exit code 0 when set, 1 when the cluster refused, 2 on bad arguments.

    python deploy/kafka/set_acls.py --bootstrap broker:9092 --command-config admin.properties \\
        --writer User:smc --reader User:analytics
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from smc.events import LogError
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from smc.events import LogError
from smc.events._kafka_security import apply_acls, read_properties


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True, help="HOST:PORT[,HOST:PORT]")
    ap.add_argument(
        "--command-config",
        required=True,
        help="key=value client properties of an admin principal (librdkafka names)",
    )
    ap.add_argument("--writer", action="append", default=[], help="User:NAME (repeatable)")
    ap.add_argument("--reader", action="append", default=[], help="User:NAME (repeatable)")
    ap.add_argument("--prefix", default="smc.", help="topic prefix [smc.]")
    args = ap.parse_args(argv)
    for who in (*args.writer, *args.reader):
        if not who.startswith("User:") or len(who) == 5:
            ap.error(f"{who!r}: a principal is User:NAME")
    if not args.writer and not args.reader:
        ap.error("give at least one --writer or --reader")
    try:
        n = apply_acls(
            bootstrap=args.bootstrap,
            config=read_properties(args.command_config),
            writers=args.writer,
            readers=args.reader,
            prefix=args.prefix,
        )
    except LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{n} ACLs set on {args.bootstrap}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
