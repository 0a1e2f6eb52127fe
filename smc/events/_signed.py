"""Per-role writers on one log: :func:`for_role` gives a component the log sealed with its
role's writer key.

Role: ``smc serve`` runs several writers in one process (the CA, the informers, the API and
VM providers), each with its own mesh-CA writer certificate, so each may append only what
its role is entitled to. :func:`with_role_signers` records the signers on the log object;
:func:`for_role` returns a thin view of the log whose appends are sealed by that role's
signer (the log itself when it has none for the role).
Concurrency: as the wrapped log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from smc.events._integrity import Signer
from smc.events._log import Appended, EventLog, Position, Record
from smc.events._types import Event

__all__ = ["SignedLog", "for_role", "with_role_signers"]

_ATTR = "_smc_role_signers"


def with_role_signers(log: EventLog, signers: Mapping[str, Signer]) -> None:
    """Remember per-role signers on ``log`` (see :func:`for_role`)."""
    setattr(log, _ATTR, dict(signers))


def for_role(log: EventLog, role: str) -> EventLog:
    """``log`` with appends sealed by ``role``'s signer, if one was recorded."""
    signer = getattr(log, _ATTR, {}).get(role)
    return log if signer is None else SignedLog(log, signer)


class SignedLog:
    """A view of a log whose appends are sealed by one signer (reads go to the log)."""

    def __init__(self, log: EventLog, signer: Signer) -> None:
        self.inner = log
        self.signer: Signer | None = signer
        self.url = log.url
        self.dedupes_on_append = log.dedupes_on_append

    def append(self, events: Sequence[Event], *, signer: Signer | None = None) -> list[Appended]:
        return self.inner.append(events, signer=signer or self.signer)

    def read(
        self, *, start: Position, max_records: int = 10_000, timeout: float = 0.0
    ) -> list[Record]:
        return self.inner.read(start=start, max_records=max_records, timeout=timeout)

    def end_position(self) -> Position:
        return self.inner.end_position()

    def position_at(self, when: datetime) -> Position:
        return self.inner.position_at(when)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
