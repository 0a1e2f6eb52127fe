"""One certificate step of the SMC agent, in a short-lived process (``python -m smc.agent._oneshot``).

Role: the resident agent (:mod:`smc.agent.__main__`, standard library only) starts this
module whenever the proxy's certificate is due, at start and then at each ``renew_after``. It
reads its settings as one JSON object on stdin (:func:`spec_of`; the proof's paths, never a
key nor a token), takes up the certificate and key the proxy dir holds
(:meth:`Agent.restore`), and, when there is none or it is due, makes a fresh key and CSR
and gets them signed (:meth:`Agent.request`), which writes ``smc-sds/default.json`` for
Envoy. It prints one JSON object on stdout: ``{"ok": true, "serial", "not_after",
"renew_after", "requested", "proof", "join_used"}`` or ``{"ok": false, "error", "code",
"join_used", "cert_refused"}`` (public facts only: ``join_used`` is the SHA-256 of a spent
join token, as the log records it), then exits, so grpcio and cryptography leave memory
with it. Logs go to stderr (the resident agent's).
Concurrency: one asyncio loop, one request, then the process ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smc.agent._agent import Agent, AgentConfig
from smc.agent._errors import AgentError, SigningRefused

__all__ = ["config_of", "main", "step"]


def config_of(spec: dict[str, Any]) -> AgentConfig:
    """The :class:`AgentConfig` of the resident agent's settings (raises AgentError)."""

    def path(name: str) -> Path | None:
        value = spec.get(name)
        return Path(value) if isinstance(value, str) and value else None

    try:
        proxy_dir = path("proxy_dir")
        if proxy_dir is None:
            raise AgentError("settings: proxy_dir is required")
        return AgentConfig(
            proxy=str(spec["proxy"]),
            ca_address=str(spec["ca_address"]),
            ca_bundle_pem=str(spec["ca_bundle_pem"]),
            server_name=spec.get("server_name") or None,
            proxy_dir=proxy_dir,
            token_file=path("token_file"),
            join_token_file=path("join_token_file"),
            cert_dir=path("cert_dir"),
        )
    except KeyError as exc:
        raise AgentError(f"settings: {exc.args[0]} is required") from exc


async def step(spec: dict[str, Any]) -> dict[str, Any]:
    """Restore, and request a certificate when none is held or it is due; the outcome."""
    agent = Agent(config_of(spec))
    agent._join_used = str(spec.get("join_used") or agent._join_used)
    agent._cert_refused = bool(spec.get("cert_refused"))
    try:
        await agent.restore()
        current = agent.current
        requested = False
        proof = ""
        if current is None or current.renew_after <= agent.clock():
            proof = "certificate" if current is not None and not agent._cert_refused else "first"
            await agent.request()
            requested = True
        current = agent.current
        assert current is not None
        return {
            "ok": True,
            "serial": current.serial,
            "not_after": current.not_after.isoformat(),
            "renew_after": current.renew_after.isoformat(),
            "requested": requested,
            "proof": proof,
            "join_used": agent._join_used,
        }
    except (AgentError, OSError) as exc:
        return {
            "ok": False,
            "error": str(exc),
            "code": exc.code if isinstance(exc, SigningRefused) else "",
            "join_used": agent._join_used,
            "cert_refused": agent._cert_refused,
        }
    finally:
        await agent.client.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = json.loads(sys.stdin.buffer.read() or b"{}")
        if not isinstance(spec, dict):
            raise AgentError("settings: not a JSON object")
        logging.getLogger().setLevel(str(spec.get("log_level", "INFO")).upper())
        out = asyncio.run(step(spec))
    except (AgentError, ValueError) as exc:
        out = {"ok": False, "error": str(exc), "code": "settings"}
    out["at"] = datetime.now(UTC).isoformat()
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
