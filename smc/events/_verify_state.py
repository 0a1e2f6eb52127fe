"""Saving and restoring a :class:`smc.events.ChainVerifier`'s state with a checkpoint.

Role: :class:`_VerifierState`, the part of ``ChainVerifier`` (mixed into it) that turns heads,
known writers, held records, kept seals, owners and grants into JSON-able data
(:meth:`state`), refuses a saved state whose chain heads the log does not prove
(:meth:`check_state`: each head must be the one its named seal signed) and loads one back
(:meth:`restore`). Split from :mod:`smc.events._verify`.
Concurrency: not thread-safe, like the verifier it is part of.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from smc.events._grantcheck import GrantSpec
from smc.events._integrity import IntegrityError, Seal
from smc.events._log import EventLog, Position, Record
from smc.events._writers import Writer, WriterTrust, ms_to_datetime

_RESYNC = b""  # a head we cannot know (after a batch whose content was altered)
_SEALS_SAVED = 256


class _VerifierState:
    """Checkpoint state of the verifier (mixed into ``ChainVerifier``)."""

    trust: WriterTrust
    heads: dict[tuple[str, int], bytes]
    wheads: dict[tuple[str, int, bytes], bytes]
    head_at: dict[tuple[str, int, bytes], int]
    pending: dict[tuple[str, int, bytes], list[Record]]
    opened: dict[tuple[str, int], list[Record]]
    writers: dict[bytes, Writer]
    _certs: dict[bytes, tuple[bytes, ...]]
    _carry: dict[tuple[str, int], list[Any]]
    verified: int
    rejected: int
    links_unchecked: int
    sealed_v3: set[tuple[str, int, bytes]]
    seals: dict[tuple[str, int], dict[int, bytes]]
    seal_floor: dict[tuple[str, int], int]
    owners: dict[str, str]
    _owned: set[bytes]
    grants: dict[tuple[str, int], dict[str, GrantSpec | None]]
    _flush_carry: Callable[[], None]  # the verifier's: fast-path batches cut by a read

    def state(self) -> dict[str, Any]:
        """Heads, known writers and held records, as JSON-able data (for checkpoints)."""
        self._flush_carry()
        enc = base64.b64encode

        def rec(r: Record) -> list[Any]:
            return [r.stream, r.partition, r.offset, r.timestamp_ms, r.key,
                    enc(r.value).decode(), enc(r.writer).decode(), enc(r.seal).decode()]  # fmt: skip

        at = self.head_at
        return {
            "heads": {
                f"{s}:{p}": f"{h.hex()}@{at[(s, p, b'')]}"
                for (s, p), h in sorted(self.heads.items())
            },
            "wheads": {
                f"{s}:{p}:{sid.hex()}": f"{h.hex()}@{at[(s, p, sid)]}"
                for (s, p, sid), h in sorted(self.wheads.items())
            },
            "pending": [rec(r) for batch in self.pending.values() for r in batch],
            "opened": [[*rec(r), r.batch] for batch in self.opened.values() for r in batch],
            "seals": {
                f"{s}:{p}": {str(o): h.hex() for o, h in list(kept.items())[-_SEALS_SAVED:]}
                for (s, p), kept in sorted(self.seals.items())
            },
            "owners": self.owners,
            "grants": {
                f"{s}:{p}": {
                    n: None if g is None else [g.subjects, g.verbs, g.resources, g.namespaces]
                    for n, g in sorted(grants.items())
                }
                for (s, p), grants in sorted(self.grants.items())
            },
            "links_unchecked": self.links_unchecked,
            "sealed_v3": sorted(f"{s}:{p}:{k.hex()}" for s, p, k in self.sealed_v3),
            "certs": {k.hex(): [enc(c).decode() for c in v] for k, v in self._certs.items()},
            "verified": self.verified,
            "rejected": self.rejected,
        }

    def check_state(self, log: EventLog, position: Position, data: dict[str, Any]) -> None:
        """Refuse a saved state (a checkpoint's) whose chain heads this log does not prove.

        Each head names the seal that produced it: that record must be on the log before
        ``position``, and its writer's signature must cover exactly that head (so an edited
        head, or a checkpoint of another or rewritten log, fails). In partition-chain mode no
        other seal may lie between it and ``position`` (a checkpoint claiming a later position
        than its state). Raises :class:`IntegrityError`."""
        heads = _heads_of(data)
        certs = {bytes.fromhex(k): tuple(base64.b64decode(c) for c in v)
                 for k, v in data.get("certs", {}).items()}  # fmt: skip
        for (s, p, sid), (head, at) in heads.items():
            where = f"{s}[{p}]@{at}"
            if at >= position.get((s, p)):
                raise IntegrityError(f"head at {where} lies past the checkpoint's position")
            rec = _record_at(log, s, p, at)
            if rec is None or not rec.seal:
                raise IntegrityError(f"no seal at {where} on {log.url}")
            seal = Seal.decode(rec.seal)
            chain = seal.certs or certs.get(seal.key_id)
            if not chain:
                raise IntegrityError(f"writer of the seal at {where} unknown")
            writer = self.trust.writer(chain, at=ms_to_datetime(seal.signed_at_ms))
            if head == _RESYNC or not seal.verify(writer.public_key, seal.signed_bytes(s, p, head)):
                raise IntegrityError(f"chain head for {where} is not the one sealed there")
            if not sid:
                start = Position({**dict(log.end_position().items()), (s, p): at + 1})
                limit = position.get((s, p))
                while start.get((s, p)) < limit:
                    recs = [
                        r for r in log.read(start=start, max_records=5000, timeout=0.5)
                        if (r.stream, r.partition) == (s, p) and r.offset < limit
                    ]  # fmt: skip
                    if not recs:
                        break
                    if any(r.seal for r in recs):
                        raise IntegrityError(
                            f"{s}[{p}] has seals after {where} the checkpoint does not cover"
                        )
                    start = start.advanced(recs)

    def restore(self, data: dict[str, Any]) -> None:
        dec = base64.b64decode
        self._carry = {}
        self.heads, self.wheads, self.head_at = {}, {}, {}
        for (s, p, sid), (h, at) in _heads_of(data).items():
            if sid:
                self.wheads[(s, p, sid)] = h
            else:
                self.heads[(s, p)] = h
            self.head_at[(s, p, sid)] = at
        self.pending = {}
        for s, p, o, ts, key, v, w, seal in data["pending"]:
            r = Record(s, p, o, ts, key, dec(v), "", "", dec(w), dec(seal))
            self.pending.setdefault((s, p, r.writer), []).append(r)
        self.opened = {}
        for s, p, o, ts, key, v, w, seal, n in data.get("opened", []):
            r = Record(s, p, o, ts, key, dec(v), "", "", dec(w), dec(seal), n)
            self.opened.setdefault((s, p), []).append(r)
        self._certs = {bytes.fromhex(k): tuple(dec(c) for c in v) for k, v in data["certs"].items()}
        self.writers = {}
        self.seals, self.seal_floor = {}, {}
        for k, kept in data.get("seals", {}).items():
            st, _, p = k.rpartition(":")
            heads = {int(o): bytes.fromhex(h) for o, h in kept.items()}
            self.seals[(st, int(p))] = heads
            # links to seals before the ones saved cannot be checked after a restore
            self.seal_floor[(st, int(p))] = min(heads) if heads else 0
        self.owners = dict(data.get("owners", {}))
        self._owned = set()
        self.grants = {}
        for k, grants in data.get("grants", {}).items():
            st, _, p = k.rpartition(":")
            self.grants[(st, int(p))] = {
                n: None if g is None else GrantSpec(*(tuple(v) for v in g))
                for n, g in grants.items()
            }
        self.links_unchecked = int(data.get("links_unchecked", 0))
        self.sealed_v3 = set()
        for item in data.get("sealed_v3", []):
            rest, _, kid = item.rpartition(":")
            st, _, p = rest.rpartition(":")
            self.sealed_v3.add((st, int(p), bytes.fromhex(kid)))
        self.verified = int(data["verified"])
        self.rejected = int(data["rejected"])


def _heads_of(data: dict[str, Any]) -> dict[tuple[str, int, bytes], tuple[bytes, int]]:
    out: dict[tuple[str, int, bytes], tuple[bytes, int]] = {}
    try:
        for k, v in data["heads"].items():
            s, _, p = k.rpartition(":")
            h, _, at = v.partition("@")
            out[(s, int(p), b"")] = (bytes.fromhex(h), int(at))
        for k, v in data["wheads"].items():
            rest, _, sid = k.rpartition(":")
            s, _, p = rest.rpartition(":")
            h, _, at = v.partition("@")
            out[(s, int(p), bytes.fromhex(sid))] = (bytes.fromhex(h), int(at))
    except (KeyError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"chain heads are malformed: {exc!r}") from exc
    return out


def _record_at(log: EventLog, stream: str, part: int, offset: int) -> Record | None:
    end = log.end_position()
    if offset >= end.get((stream, part)):
        return None
    start = Position({**dict(end.items()), (stream, part): offset})
    for _ in range(20):
        for r in log.read(start=start, max_records=50, timeout=0.5):
            if (r.stream, r.partition, r.offset) == (stream, part, offset):
                return r
    return None
