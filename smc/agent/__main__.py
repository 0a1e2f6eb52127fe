"""``python -m smc.agent``: run an SMC agent beside one Envoy (see :mod:`smc.agent`).

Role: parses the command line (argparse: the agent stays light), runs :class:`Agent` until
SIGINT/SIGTERM, and prints one line per certificate. ``--ready-file`` is written (0644, no
secret: the serial and validity) once the first certificate is served. Exit status 1 with a
one-line error on bad options.
Concurrency: one asyncio loop on the main thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from smc.agent._agent import Agent, AgentConfig
from smc.agent._errors import AgentError

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smc agent",
        description="Run beside an Envoy: make its key here, get it certified by the control "
        "plane, serve it to Envoy over a local SDS unix socket, renew it.",
    )
    p.add_argument("--node-id", required=True, help="The Envoy's node id (<ns>/<pod>, vm/...).")
    p.add_argument("--ca-address", required=True, help="HOST:PORT of the certificate service.")
    p.add_argument("--ca-bundle", required=True, help="PEM file of the CA that signed the service.")
    p.add_argument("--server-name", default=None, help="TLS name to check on the service.")
    p.add_argument("--sds-socket", required=True, help="Unix socket path to serve SDS on.")
    proof = p.add_mutually_exclusive_group(required=True)
    proof.add_argument("--token-file", help="Projected service-account token (pods).")
    proof.add_argument("--join-token-file", help="One-time join token (VMs).")
    p.add_argument("--ready-file", default=None, help="Written once the first cert is served.")
    p.add_argument(
        "--state-dir",
        default=None,
        help="Keep the key (0600) and certificate in this directory (0700) across restarts.",
    )
    p.add_argument(
        "--cert-dir",
        default=None,
        help="Also write cert.pem, key.pem (0600) and ca.pem here, renewed in place "
        "(for a proxyless gRPC workload's file_watcher certificate provider).",
    )
    p.add_argument("--log-level", default="INFO")
    return p


async def _run(agent: Agent, ready_file: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(agent.run(stop=stop))

    async def announce() -> None:
        await agent.ready.wait()
        cur = agent.current
        assert cur is not None and agent.first_certificate_at is not None
        took = agent.first_certificate_at - agent.started_at
        print(f"agent: serving certificate {cur.serial} (first in {took:.3f}s)", flush=True)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "serial": cur.serial,
                        "not_after": cur.not_after.isoformat(),
                        "first_certificate_seconds": took,
                    }
                )
            )
            tmp.replace(ready_file)

    announcer = asyncio.create_task(announce())
    try:
        await task
    finally:
        announcer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        if args.ca_bundle.startswith("env:"):
            ca_pem = os.environ.get(args.ca_bundle[4:], "")
            if "-----BEGIN CERTIFICATE-----" not in ca_pem:
                raise AgentError(f"--ca-bundle {args.ca_bundle}: no PEM certificate there")
        else:
            ca_pem = Path(args.ca_bundle).read_text("ascii")
        config = AgentConfig(
            proxy=args.node_id,
            ca_address=args.ca_address,
            ca_bundle_pem=ca_pem,
            server_name=args.server_name,
            sds_socket=Path(args.sds_socket),
            token_file=Path(args.token_file) if args.token_file else None,
            join_token_file=Path(args.join_token_file) if args.join_token_file else None,
            state_dir=Path(args.state_dir) if args.state_dir else None,
            cert_dir=Path(args.cert_dir) if args.cert_dir else None,
        )
        agent = Agent(config)
    except (OSError, AgentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    asyncio.run(_run(agent, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
