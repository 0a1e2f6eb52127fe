"""One-time join tokens for VMs: made by ``smc vm bootstrap``, used once by the VM's agent.

Role: :func:`join_token_event` makes a random token (256 bits, URL-safe) and the
``JoinTokenIssued`` event recording only its SHA-256, the proxy id (``vm/<ns>/<name>``) and
identity it may get a first certificate for, and its expiry. The token itself goes only into
the VM's bootstrap bundle (a 0600 file); the certificate service accepts it once (the
``ProxyCertificateIssued`` that used it names its digest).
Concurrency: pure (the randomness comes from ``secrets``).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from smc.auth import token_digest
from smc.events import JoinTokenIssued, deterministic_id, make_event

__all__ = ["join_token_event"]


def join_token_event(
    *,
    proxy: str,
    identity: str,
    ttl: timedelta,
    actor: str = "ca",
    now: datetime | None = None,
    source: str = "smc-vm-bootstrap",
    id_kind: str = "join-token",
) -> tuple[str, JoinTokenIssued]:
    """``(token, event)``: append the event, hand the token to the VM only. The event is the
    CA's (actor ``ca``, like every ``smc.certs`` event); ``source`` names the tool; the event
    id derives from ``id_kind`` and the token's digest."""
    token = secrets.token_urlsafe(32)
    digest = token_digest(token)
    when = now or datetime.now(UTC)
    event = make_event(
        JoinTokenIssued,
        source=source,
        actor=actor,
        event_id=deterministic_id(id_kind, digest),
        token_sha256=digest,
        proxy=proxy,
        identity=identity,
        expires_at=when + ttl,
    )
    return token, event
