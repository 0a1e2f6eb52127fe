"""Debug status of the ADS server: open streams, refusals and NACKs.

Role: :class:`ServerStatus`, a mixin of :class:`~smc.xds.AdsServer` answering ``/debug/proxies``
and friends from the server's per-stream state. Concurrency: the server's event loop only.
"""

from __future__ import annotations

from collections import deque

from smc.xds._server_records import NackRecord, ProxyStatus, RefusalRecord, TypeStatus
from smc.xds._server_stream import _Stream

__all__ = ["ServerStatus"]


class ServerStatus:
    """What the server reports for debugging (mixed into :class:`~smc.xds.AdsServer`)."""

    _streams: dict[int, _Stream]
    _refusals: deque[RefusalRecord]
    _nacks: dict[tuple[str, str], NackRecord]

    def proxies(self) -> list[ProxyStatus]:
        """One entry per open stream (a node may have several), sorted by node id."""
        out = []
        for s in self._streams.values():
            types = {
                t: TypeStatus(
                    type_url=t,
                    wildcard=ts.wildcard,
                    names=tuple(sorted(ts.names)),
                    sent_version=ts.sent_version,
                    acked_version=ts.acked_version,
                    last_nonce=ts.nonce,
                    pending=ts.pending,
                    last_nack=ts.last_nack,
                )
                for t, ts in s.types.items()
            }
            out.append(
                ProxyStatus(
                    node_id=s.node_id,
                    stream_id=s.id,
                    kind=s.kind,
                    peer=s.peer,
                    connected_at=s.connected_at,
                    types=types,
                )
            )
        out.sort(key=lambda p: (p.node_id, p.stream_id))
        return out

    def refusals(self, *, node_id: str | None = None) -> list[RefusalRecord]:
        """The last streams refused (identity check, unplaceable node id; at most 256), newest
        first."""
        found = [r for r in self._refusals if node_id is None or r.node_id == node_id]
        found.reverse()
        return found

    def nacks(self, *, node_id: str | None = None) -> list[NackRecord]:
        """The last NACK per (node, type), kept after the stream closes; newest first."""
        found = [r for (n, _), r in self._nacks.items() if node_id is None or n == node_id]
        found.sort(key=lambda r: r.at, reverse=True)
        return found
