"""Errors of the xDS layer: invalid resources, inconsistent snapshots.

Role: the ``smc.xds`` branch of the exception tree (all derive from :class:`smc.errors.SMCError`).
Concurrency: plain immutable exceptions; safe everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

from smc.errors import SMCError

__all__ = ["InconsistentSnapshot", "InvalidResource", "XdsError"]


class XdsError(SMCError):
    """Base of every error raised deliberately by ``smc.xds``."""


class InvalidResource(XdsError):
    """A resource given to a snapshot has the wrong type, no name, or a duplicate name."""


class InconsistentSnapshot(XdsError):
    """A snapshot references resources it does not hold.

    ``missing`` maps a type URL to ``{missing name: sorted names of the resources referencing it}``.
    """

    def __init__(
        self, *, missing: Mapping[str, Mapping[str, tuple[str, ...]]], node_id: str | None = None
    ) -> None:
        self.missing = {t: dict(names) for t, names in missing.items()}
        self.node_id = node_id
        parts = []
        for type_url in sorted(self.missing):
            kind = type_url.rsplit(".", 1)[-1]
            for name, referrers in sorted(self.missing[type_url].items()):
                parts.append(f"{kind} {name!r} (referenced by {', '.join(referrers)})")
        where = f" for node {node_id!r}" if node_id is not None else ""
        super().__init__(f"inconsistent snapshot{where}: missing " + "; ".join(parts))
