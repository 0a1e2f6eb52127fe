"""Immutable, content-versioned snapshots of the Envoy resources served to one proxy.

Role: a :class:`Snapshot` holds, per type URL, ``name -> resource`` in serialised form with a
per-resource version (a hash of ``SerializeToString(deterministic=True)``) and a per-type version
(the XOR of a 128-bit hash of each ``(name, version)`` pair: order-free and updated in O(changes)). Equal content gives equal versions across
processes and restarts, so an unchanged resource is never re-sent and a restarted server agrees
with what Envoy already holds. Identical resources in many per-proxy snapshots share one
:class:`ResourceEntry` (interned by content), so a resource common to 1,000 proxies is stored
once. :meth:`Snapshot.check_consistency` verifies that every EDS, RDS and SDS (over ADS) name a
cluster or listener references is present.

Concurrency: snapshots are frozen and safe to share between threads and tasks; building one may
run in any thread (the intern table is guarded by a lock).

Layout: this module holds :class:`Snapshot`; :mod:`smc.xds._snapshot_entry` the entries (making,
interning, versions, references) and :mod:`smc.xds._snapshot_derive` the shared derivations and
consistency bookkeeping of :meth:`Snapshot.replace`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

from smc.xds._errors import InconsistentSnapshot, InvalidResource
from smc.xds._snapshot_derive import _collect_refs, _derive, _still_consistent, _update_refs_shared
from smc.xds._snapshot_entry import (
    CHANGE_HISTORY,
    ResourceEntry,
    TypeChange,
    TypeResources,
    _mix_version,
    make_entry,
    resource_name,
)
from smc.xds._types import CLUSTER, ENDPOINT, LISTENER, MESSAGE_CLASSES, ROUTE, SECRET

__all__ = [
    "CHANGE_HISTORY",
    "ResourceEntry",
    "Snapshot",
    "TypeChange",
    "TypeResources",
    "make_entry",
    "resource_name",
]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The resources of one proxy, per type URL, with content-derived versions. Build with
    :meth:`build` or :meth:`from_resources`; never mutate (it is frozen)."""

    types: Mapping[str, TypeResources]
    _refs: Mapping[str, Mapping[str, tuple[str, ...]]] = field(repr=False)
    #: True once known consistent (checked, or derived by :meth:`replace` from a consistent
    #: snapshot by a change that keeps it so); False/unknown otherwise.
    _consistent: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_entries(cls, entries: Iterable[ResourceEntry]) -> Snapshot:
        """Assemble from entries made by :func:`make_entry` (no serialisation happens here);
        raises :class:`InvalidResource` on two entries of one type with the same name."""
        by_type: dict[str, dict[str, ResourceEntry]] = {}
        for entry in entries:
            bucket = by_type.setdefault(entry.type_url, {})
            if entry.name in bucket:
                raise InvalidResource(f"{entry.type_url}: duplicate name {entry.name!r}")
            bucket[entry.name] = entry
        types = {t: TypeResources.of(b) for t, b in by_type.items()}
        refs = _collect_refs(e for b in by_type.values() for e in b.values() if e.refs)
        return cls(types=MappingProxyType(types), _refs=refs)

    def replace(
        self, *, upsert: Iterable[ResourceEntry] = (), remove: Iterable[tuple[str, str]] = ()
    ) -> Snapshot:
        """A new snapshot with ``upsert`` entries added or replaced and ``remove``
        ``(type_url, name)`` pairs dropped (removals first, then upserts in order). Unchanged
        types are shared with this snapshot, and versions update in O(changes), so a small
        change to many per-proxy snapshots is cheap.

        Work is shared between proxies: the same change applied to the same type content (the
        same :class:`TypeResources` object, e.g. every proxy's EDS after one endpoint change)
        gives the very same new :class:`TypeResources`, derived once (a small memo). A
        snapshot known to be consistent stays known consistent after a change that removes
        nothing still referenced and adds no dangling reference (checked in O(changes)), so
        :meth:`check_consistency` costs nothing per proxy for the common change."""
        if not remove:
            ups = upsert if isinstance(upsert, list) else list(upsert)
            if not ups:
                return self
            first = ups[0].type_url
            if len(ups) == 1 or all(e.type_url == first for e in ups):
                return self._replace_type(first, [], ups)
            upsert = ups
        per_type: dict[str, tuple[list[str], list[ResourceEntry]]] = {}
        for type_url, name in remove:
            per_type.setdefault(type_url, ([], []))[0].append(name)
        for entry in upsert:
            per_type.setdefault(entry.type_url, ([], []))[1].append(entry)
        if not per_type:
            return self
        types = dict(self.types)
        ref_updates: list[tuple[ResourceEntry, bool]] = []  # (entry, added?)
        gone: list[tuple[str, str]] = []  # (type_url, name) removed or replaced
        changed = False
        for type_url, (removes, upserts) in per_type.items():
            old_tr = self.types.get(type_url)
            derived = _derive(type_url, old_tr, removes, upserts)
            if derived is None:
                continue
            new_tr, type_refs, type_gone = derived
            types[type_url] = new_tr
            ref_updates.extend(type_refs)
            gone.extend(type_gone)
            changed = True
        if not changed:
            return self
        removed = any(removes for removes, _ in per_type.values())
        return self._changed(types, ref_updates, gone, removed=removed)

    def _replace_type(
        self, type_url: str, removes: list[str], upserts: list[ResourceEntry]
    ) -> Snapshot:
        """:meth:`replace` of a change to one type (the common case: one endpoint, one
        cluster), without grouping the change by type."""
        derived = _derive(type_url, self.types.get(type_url), removes, upserts)
        if derived is None:
            return self
        new_tr, ref_updates, gone = derived
        # (always a MappingProxyType: copy() is a C-level dict copy, dict() iterates it)
        types: dict[str, TypeResources] = self.types.copy()  # type: ignore[attr-defined]
        types[type_url] = new_tr
        return self._changed(types, ref_updates, gone, removed=bool(removes))

    def _changed(
        self,
        types: dict[str, TypeResources],
        ref_updates: list[tuple[ResourceEntry, bool]],
        gone: list[tuple[str, str]],
        *,
        removed: bool,
    ) -> Snapshot:
        """The snapshot of ``types`` (what :meth:`replace` derived), its references updated
        by ``ref_updates``; known consistent when this one is and the change keeps it so."""
        refs = self._refs
        if ref_updates:
            refs = _update_refs_shared(refs, ref_updates)
        made = _make(MappingProxyType(types), refs)
        if self._consistent and (
            # Upserts that add no reference leave a consistent snapshot consistent (what
            # they replace is still present): every endpoint change.
            (not removed and not any(added for _, added in ref_updates))
            or _still_consistent(made, refs, ref_updates, gone)
        ):
            _set_consistent(made, True)
        return made

    @classmethod
    def from_resources(cls, resources: Mapping[str, Iterable[Message]]) -> Snapshot:
        """Build from ``{type_url: resources}``; raises :class:`InvalidResource` on a resource of
        the wrong message type, without a name, or with a name already used in its type."""
        entries: list[ResourceEntry] = []
        for type_url, items in resources.items():
            if type_url not in MESSAGE_CLASSES:
                raise InvalidResource(
                    f"unsupported type URL {type_url!r}; expected one of {sorted(MESSAGE_CLASSES)}"
                )
            for index, resource in enumerate(items):
                try:
                    entries.append(make_entry(resource, type_url=type_url))
                except InvalidResource as exc:
                    raise InvalidResource(f"resource #{index}: {exc}") from None
        return cls.from_entries(entries)

    @classmethod
    def build(
        cls,
        *,
        listeners: Iterable[Message] = (),
        routes: Iterable[Message] = (),
        clusters: Iterable[Message] = (),
        endpoints: Iterable[Message] = (),
        secrets: Iterable[Message] = (),
    ) -> Snapshot:
        """Build from typed lists: Listener, RouteConfiguration, Cluster, ClusterLoadAssignment,
        Secret messages."""
        return cls.from_resources(
            {
                LISTENER: listeners,
                ROUTE: routes,
                CLUSTER: clusters,
                ENDPOINT: endpoints,
                SECRET: secrets,
            }
        )

    # ------------------------------------------------------------------ queries

    def version(self, type_url: str) -> str:
        """The content version of all resources of ``type_url`` (stable for equal content)."""
        found = self.types.get(type_url)
        return found.version if found is not None else _mix_version(0)

    def entries(self, type_url: str) -> Mapping[str, ResourceEntry]:
        """``name -> ResourceEntry`` for ``type_url`` (empty if the type is absent)."""
        found = self.types.get(type_url)
        return found.entries if found is not None else MappingProxyType({})

    def names(self, type_url: str) -> frozenset[str]:
        return frozenset(self.entries(type_url))

    def resource(self, type_url: str, name: str) -> Message | None:
        """The resource ``name`` decoded back into its message (None if absent)."""
        entry = self.entries(type_url).get(name)
        if entry is None:
            return None
        return MESSAGE_CLASSES[type_url].FromString(entry.value)

    def resources(self, type_url: str) -> dict[str, Message]:
        """All resources of ``type_url`` decoded (for config dumps and tests)."""
        cls = MESSAGE_CLASSES[type_url]
        return {n: cls.FromString(e.value) for n, e in self.entries(type_url).items()}

    def versions(self) -> dict[str, str]:
        """``type_url -> version`` for every type the snapshot holds."""
        return {t: r.version for t, r in self.types.items()}

    def same_content(self, other: Snapshot | None) -> bool:
        """Whether ``other`` holds the same types with the same versions (what
        ``versions() == other.versions()`` says, without building the two dicts: it runs for
        every proxy of every change)."""
        if other is None:
            return False
        mine, theirs = self.types, other.types
        if len(mine) != len(theirs):
            return False
        for type_url, tr in mine.items():
            found = theirs.get(type_url)
            if found is None or (found is not tr and found.version != tr.version):
                return False
        return True

    # ------------------------------------------------------------------ consistency

    def missing_references(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """``{type_url: {missing name: referrers}}`` for every referenced name not present."""
        if self._consistent:
            return {}
        missing: dict[str, dict[str, tuple[str, ...]]] = {}
        for type_url, wanted in self._refs.items():
            absent = wanted.keys() - self.entries(type_url).keys()  # C-level set difference
            if absent:
                missing[type_url] = {name: wanted[name] for name in sorted(absent)}
        if not missing:
            object.__setattr__(self, "_consistent", True)
        return missing

    def consistent(self) -> bool:
        """True when every EDS/RDS/SDS name referenced by clusters and listeners is present."""
        return not self.missing_references()

    def check_consistency(self, *, node_id: str | None = None) -> None:
        """Raise :class:`InconsistentSnapshot` naming each missing resource and its referrers."""
        missing = self.missing_references()
        if missing:
            raise InconsistentSnapshot(missing=missing, node_id=node_id)


_new = object.__new__
_set_types = Snapshot.__dict__["types"].__set__
_set_refs = Snapshot.__dict__["_refs"].__set__
_set_consistent = Snapshot.__dict__["_consistent"].__set__


def _make(
    types: Mapping[str, TypeResources], refs: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> Snapshot:
    """``Snapshot(types=types, _refs=refs)`` through the slots (the frozen dataclass's
    ``__init__`` costs twice as much, and :meth:`Snapshot.replace` runs per proxy)."""
    made: Snapshot = _new(Snapshot)
    _set_types(made, types)
    _set_refs(made, refs)
    _set_consistent(made, False)
    return made
