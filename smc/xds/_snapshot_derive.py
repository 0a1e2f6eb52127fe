"""Shared derivations behind :meth:`~smc.xds.Snapshot.replace` and its consistency bookkeeping.

Role: deriving a type's new :class:`~smc.xds.TypeResources` from the old one plus removes and
upserts, memoised (a bounded LRU keyed by the old state and the change) so that proxies given
the same change share one derivation; the reference index of a snapshot (who references which
EDS/RDS/SDS name), updated incrementally and shared the same way; and the check that a snapshot
derived from a consistent one stays consistent without a full rescan. Concurrency: pure
functions over frozen values; the memo tables are guarded by a lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from smc.xds._snapshot_entry import (
    CHANGE_HISTORY,
    ResourceEntry,
    TypeChange,
    TypeResources,
    _kind,
    _mix_version,
)

if TYPE_CHECKING:
    from smc.xds._snapshot import Snapshot

__all__: list[str] = []


def _collect_refs(
    entries: Iterable[ResourceEntry],
) -> Mapping[str, Mapping[str, tuple[str, ...]]]:
    """``{type_url: {referenced name: sorted referrers}}`` over ``entries``."""
    refs: dict[str, dict[str, set[str]]] = {}
    for entry in entries:
        who = f"{_kind(entry.type_url)} {entry.name!r}"
        for ref_type, ref_name in entry.refs:
            refs.setdefault(ref_type, {}).setdefault(ref_name, set()).add(who)
    return MappingProxyType(
        {
            t: MappingProxyType({n: tuple(sorted(who)) for n, who in names.items()})
            for t, names in refs.items()
        }
    )


def _update_refs(
    refs: Mapping[str, Mapping[str, tuple[str, ...]]],
    updates: list[tuple[ResourceEntry, bool]],
) -> Mapping[str, Mapping[str, tuple[str, ...]]]:
    """``refs`` with each entry's references dropped (False) or added (True), in order."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for entry, added in updates:
        who = f"{_kind(entry.type_url)} {entry.name!r}"
        for ref_type, ref_name in entry.refs:
            bucket = out.get(ref_type)
            if bucket is None:
                bucket = out[ref_type] = dict(refs.get(ref_type, {}))
            current = set(bucket.get(ref_name, ()))
            if added:
                current.add(who)
            else:
                current.discard(who)
            if current:
                bucket[ref_name] = tuple(sorted(current))
            else:
                bucket.pop(ref_name, None)
    merged = dict(refs)
    merged.update({t: MappingProxyType(b) for t, b in out.items()})
    return MappingProxyType(merged)


_Derived = tuple[TypeResources, list[tuple[ResourceEntry, bool]], list[tuple[str, str]]]


#: Shared derivations: (type, id(old TypeResources), removed names, ids of upserted entries) ->
#: (old, upserts, result). The old object and the entries are held, so their ids stay valid.
_DERIVED_MAX = 64


_derived: OrderedDict[tuple[Any, ...], tuple[Any, tuple[ResourceEntry, ...], _Derived | None]] = (
    OrderedDict()
)


_refs_memo: OrderedDict[tuple[Any, ...], tuple[Any, Any, Any]] = OrderedDict()


_memo_lock = threading.Lock()


def _derive(
    type_url: str,
    old_tr: TypeResources | None,
    removes: list[str],
    upserts: list[ResourceEntry],
) -> _Derived | None:
    """The new content of one type after removing ``removes`` then upserting ``upserts``:
    ``(TypeResources, reference updates, (type, name) removed or replaced)``, or None when
    nothing changed. Memoised on the identity of ``old_tr`` and of the entries, so proxies
    sharing a type's content share the result."""
    if not removes and len(upserts) == 1:
        key: tuple[Any, ...] = (type_url, id(old_tr), id(upserts[0]))
    else:
        key = (type_url, id(old_tr), tuple(removes), tuple(map(id, upserts)))
    # The hit path takes no lock (dict reads are atomic; an entry evicted meanwhile is fine).
    hit = _derived.get(key)
    if hit is not None and hit[0] is old_tr:
        try:  # noqa: SIM105  (contextlib.suppress costs more than the lookup)
            _derived.move_to_end(key)
        except KeyError:
            pass
        return hit[2]
    made = _derive_now(type_url, old_tr, removes, upserts)
    with _memo_lock:
        _derived[key] = (old_tr, tuple(upserts), made)
        if len(_derived) > _DERIVED_MAX:
            _derived.popitem(last=False)
    return made


def _derive_now(
    type_url: str,
    old_tr: TypeResources | None,
    removes: list[str],
    upserts: list[ResourceEntry],
) -> _Derived | None:
    entries = old_tr.entries.copy() if old_tr is not None else {}
    mix = old_tr.mix if old_tr is not None else 0
    diff: dict[str, tuple[int, int]] = {}
    refs: list[tuple[ResourceEntry, bool]] = []
    gone: list[tuple[str, str]] = []

    def note(name: str, old_mix: int, new_mix: int) -> None:
        seen = diff.get(name)
        diff[name] = (old_mix if seen is None else seen[0], new_mix)

    for name in removes:
        was = entries.pop(name, None)
        if was is not None:
            mix ^= was.mix
            note(name, was.mix, 0)
            gone.append((type_url, name))
            if was.refs:
                refs.append((was, False))
    for entry in upserts:
        old_entry = entries.get(entry.name)
        if old_entry is entry:
            continue
        if old_entry is not None:
            mix ^= old_entry.mix
            gone.append((type_url, entry.name))
            if old_entry.refs:
                refs.append((old_entry, False))
        entries[entry.name] = entry
        mix ^= entry.mix
        note(entry.name, old_entry.mix if old_entry else 0, entry.mix)
        if entry.refs:
            refs.append((entry, True))
    diff = {n: d for n, d in diff.items() if d[0] != d[1]}
    if not diff:
        return None
    prev = old_tr.change if old_tr is not None else None
    depth = prev.depth + 1 if prev is not None else 1
    if depth > CHANGE_HISTORY:
        prev, depth = None, 1
    step = TypeChange(
        prev_version=old_tr.version if old_tr is not None else _mix_version(0),
        changes=MappingProxyType(diff),
        prev=prev,
        depth=depth,
    )
    return TypeResources.of(entries, mix, step), refs, gone


def _update_refs_shared(
    refs: Mapping[str, Mapping[str, tuple[str, ...]]],
    updates: list[tuple[ResourceEntry, bool]],
) -> Mapping[str, Mapping[str, tuple[str, ...]]]:
    """:func:`_update_refs`, memoised on the identity of ``refs`` and of the updates."""
    key = (id(refs), tuple((id(e), added) for e, added in updates))
    with _memo_lock:
        hit = _refs_memo.get(key)
        if hit is not None and hit[0] is refs:
            _refs_memo.move_to_end(key)
            return hit[2]  # type: ignore[no-any-return]
    made = _update_refs(refs, updates)
    with _memo_lock:
        _refs_memo[key] = (refs, tuple(updates), made)
        if len(_refs_memo) > _DERIVED_MAX:
            _refs_memo.popitem(last=False)
    return made


def _still_consistent(
    made: Snapshot,
    refs: Mapping[str, Mapping[str, tuple[str, ...]]],
    ref_updates: list[tuple[ResourceEntry, bool]],
    gone: list[tuple[str, str]],
) -> bool:
    """Whether ``made``, derived from a consistent snapshot, is consistent: no name removed
    (or replaced away) is still referenced while absent, and every reference added exists."""
    for type_url, name in gone:
        if name in refs.get(type_url, _EMPTY) and name not in made.entries(type_url):
            return False
    for entry, added in ref_updates:
        if added:
            for ref_type, ref_name in entry.refs:
                if ref_name not in made.entries(ref_type):
                    return False
    return True


_EMPTY: Mapping[str, Any] = MappingProxyType({})
