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
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from smc.xds._errors import InconsistentSnapshot, InvalidResource
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

_HCM_URL = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_UPSTREAM_TLS_URL = "type.googleapis.com/" + tls_pb2.UpstreamTlsContext.DESCRIPTOR.full_name
_DOWNSTREAM_TLS_URL = "type.googleapis.com/" + tls_pb2.DownstreamTlsContext.DESCRIPTOR.full_name


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True, weakref_slot=True)
class ResourceEntry:
    """One serialised resource: type, name, content version, deterministic bytes, and the
    ``(type_url, name)`` pairs it references (EDS/RDS/SDS over ADS). Make with :func:`make_entry`."""

    type_url: str
    name: str
    version: str
    value: bytes
    refs: tuple[tuple[str, str], ...] = ()
    mix: int = 0  # 128-bit hash of (name, version); a type's version is the XOR of its entries'


#: How many replace() steps a type remembers, so a stream a few versions behind diffs in
#: O(changes); further back it rescans.
CHANGE_HISTORY = 16


@dataclass(frozen=True, slots=True)
class TypeChange:
    """What one :meth:`Snapshot.replace` changed in a type: ``name -> (old mix, new mix)`` (0 for
    absent) relative to ``prev_version``; ``prev`` is the change before it (bounded history)."""

    prev_version: str
    changes: Mapping[str, tuple[int, int]]
    prev: TypeChange | None
    depth: int


@dataclass(frozen=True, slots=True)
class TypeResources:
    """All resources of one type in a snapshot, with the type's content version (the XOR of the
    entries' ``mix``: order-independent, so :meth:`Snapshot.replace` updates it in O(changes)).
    ``change`` links to the previous version of this type when made by ``replace``."""

    version: str
    entries: MappingProxyType[str, ResourceEntry]
    mix: int = 0
    change: TypeChange | None = None

    @classmethod
    def of(
        cls,
        entries: dict[str, ResourceEntry],
        mix: int | None = None,
        change: TypeChange | None = None,
    ) -> TypeResources:
        if mix is None:
            mix = 0
            for e in entries.values():
                mix ^= e.mix
        return cls(
            version=_mix_version(mix), entries=MappingProxyType(entries), mix=mix, change=change
        )

    def changes_since(self, version: str) -> dict[str, tuple[int, int]] | None:
        """``name -> (mix at version, mix now)`` for names that changed since ``version``; None
        when ``version`` is not in the remembered history (the caller rescans)."""
        if version == self.version:
            return {}
        acc: dict[str, tuple[int, int]] = {}
        step = self.change
        while step is not None:
            for name, (old, new) in step.changes.items():
                seen = acc.get(name)
                acc[name] = (old, new) if seen is None else (old, seen[1])
            if step.prev_version == version:
                return acc
            step = step.prev
        return None


_intern_lock = threading.Lock()
_interned: weakref.WeakValueDictionary[tuple[str, str, str], ResourceEntry] = (
    weakref.WeakValueDictionary()
)


def make_entry(resource: Message, *, type_url: str | None = None) -> ResourceEntry:
    """Serialise ``resource`` once into an interned :class:`ResourceEntry`.

    The type URL is inferred from the message class unless given. Equal content yields the very
    same entry object while any snapshot holds it, so a builder can make shared resources once and
    compose many per-proxy snapshots with :meth:`Snapshot.from_entries` at no serialisation cost.
    Raises :class:`InvalidResource` for an unsupported type, a mismatched class or an empty name.
    """
    url = type_url or "type.googleapis.com/" + resource.DESCRIPTOR.full_name
    expected = MESSAGE_CLASSES.get(url)
    if expected is None:
        raise InvalidResource(
            f"unsupported type URL {url!r}; expected one of {sorted(MESSAGE_CLASSES)}"
        )
    if not isinstance(resource, expected):
        raise InvalidResource(
            f"{url} resource is a {type(resource).__name__}, expected {expected.DESCRIPTOR.full_name}"
        )
    name = resource_name(url, resource)
    if not name:
        raise InvalidResource(f"{url} resource has an empty name")
    value = _canonical(resource).SerializeToString(deterministic=True)
    version = _digest(value)
    key = (url, name, version)
    with _intern_lock:
        found = _interned.get(key)
    if found is not None:
        return found
    refs = tuple(_references(url, name, resource))
    made = ResourceEntry(
        type_url=url, name=name, version=version, value=value, refs=refs, mix=_mix(name, version)
    )
    with _intern_lock:
        return _interned.setdefault(key, made)


_ANY = "google.protobuf.Any"


def _canonical(resource: Message) -> Message:
    """``resource`` with every nested ``Any`` re-packed by deterministic serialisation.

    ``SerializeToString(deterministic=True)`` orders map entries (e.g. a ``Struct``'s fields)
    only in the message itself: an ``Any``'s value was serialised when it was packed, with map
    entries in the order of a hash table whose seed differs per process. Two replicas would
    then give the same resource different bytes and versions (and a proxy switching replica
    a config change). Returns ``resource`` itself when it holds no ``Any``, else a copy."""
    if not _has_any(resource.DESCRIPTOR, set()):
        return resource
    copy = type(resource)()
    copy.CopyFrom(resource)
    _repack(copy)
    return copy


_ANY_IN: dict[str, bool] = {}


def _has_any(descriptor: Any, seen: set[str]) -> bool:
    """Whether messages of ``descriptor`` can hold an ``Any`` (memoised per type)."""
    name = descriptor.full_name
    found = _ANY_IN.get(name)
    if found is not None:
        return found
    if name == _ANY:
        return True
    if name in seen:
        return False
    seen.add(name)
    result = any(
        f.message_type is not None and _has_any(f.message_type, seen) for f in descriptor.fields
    )
    _ANY_IN[name] = result
    return result


def _repack(message: Message) -> None:
    if message.DESCRIPTOR.full_name == _ANY:
        inner_name = message.type_url.rsplit("/", 1)[-1]  # type: ignore[attr-defined]
        try:
            cls = message_factory.GetMessageClass(
                descriptor_pool.Default().FindMessageTypeByName(inner_name)
            )
        except KeyError:
            return  # a type this process does not know: left as packed
        inner = cls.FromString(message.value)  # type: ignore[attr-defined]
        _repack(inner)
        message.value = inner.SerializeToString(deterministic=True)  # type: ignore[attr-defined]
        return
    for fd, value in message.ListFields():
        if fd.message_type is None or not _has_any(fd.message_type, set()):
            continue
        if fd.is_repeated:
            items = value.values() if fd.message_type.GetOptions().map_entry else value
            for item in items:
                if isinstance(item, Message):
                    _repack(item)
        else:
            _repack(value)


def resource_name(type_url: str, resource: Message) -> str:
    """The xDS name of a resource (``cluster_name`` for a ClusterLoadAssignment, else ``name``)."""
    if type_url == ENDPOINT:
        return str(resource.cluster_name)  # type: ignore[attr-defined]
    return str(resource.name)  # type: ignore[attr-defined]


def _kind(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _mix_version(mix: int) -> str:
    return format(mix, "032x")


def _mix(name: str, version: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{name}\0{version}".encode(), digest_size=16).digest(), "big"
    )


def _is_ads(source: config_source_pb2.ConfigSource) -> bool:
    # A reference only points into this snapshot when it is fetched over ADS (or left unset).
    return source.WhichOneof("config_source_specifier") in (None, "ads")


def _sds_names(common: tls_pb2.CommonTlsContext) -> Iterator[str]:
    for sds in common.tls_certificate_sds_secret_configs:
        if sds.name and _is_ads(sds.sds_config):
            yield sds.name
    if common.HasField("validation_context_sds_secret_config"):
        sds = common.validation_context_sds_secret_config
        if sds.name and _is_ads(sds.sds_config):
            yield sds.name
    if common.HasField("combined_validation_context"):
        sds = common.combined_validation_context.validation_context_sds_secret_config
        if sds.name and _is_ads(sds.sds_config):
            yield sds.name


def _unpack(any_msg: Any, cls: type[Message], where: str) -> Message:
    msg = cls()
    try:
        msg.ParseFromString(any_msg.value)
    except DecodeError as exc:
        raise InvalidResource(
            f"{where}: typed_config is not a valid {cls.DESCRIPTOR.full_name}: {exc}"
        ) from exc
    return msg


def _references(type_url: str, name: str, resource: Message) -> Iterator[tuple[str, str]]:
    """The ``(type_url, name)`` of every EDS/RDS/SDS resource ``resource`` needs over ADS."""
    if type_url == CLUSTER:
        assert isinstance(resource, cluster_pb2.Cluster)
        who = f"Cluster {name!r}"
        if (
            resource.WhichOneof("cluster_discovery_type") == "type"
            and resource.type == cluster_pb2.Cluster.EDS
        ):
            eds = resource.eds_cluster_config
            if _is_ads(eds.eds_config):
                yield ENDPOINT, eds.service_name or name
        ts = resource.transport_socket
        if ts.HasField("typed_config") and ts.typed_config.type_url == _UPSTREAM_TLS_URL:
            tls = _unpack(ts.typed_config, tls_pb2.UpstreamTlsContext, f"{who} transport_socket")
            assert isinstance(tls, tls_pb2.UpstreamTlsContext)
            for secret in _sds_names(tls.common_tls_context):
                yield SECRET, secret
    elif type_url == LISTENER:
        assert isinstance(resource, listener_pb2.Listener)
        who = f"Listener {name!r}"
        chains = list(resource.filter_chains)
        if resource.HasField("default_filter_chain"):
            chains.append(resource.default_filter_chain)
        for chain in chains:
            for flt in chain.filters:
                if flt.HasField("typed_config") and flt.typed_config.type_url == _HCM_URL:
                    hcm = _unpack(
                        flt.typed_config,
                        hcm_pb2.HttpConnectionManager,
                        f"{who} filter {flt.name!r}",
                    )
                    assert isinstance(hcm, hcm_pb2.HttpConnectionManager)
                    if hcm.WhichOneof("route_specifier") == "rds" and _is_ads(
                        hcm.rds.config_source
                    ):
                        yield ROUTE, hcm.rds.route_config_name
            ts = chain.transport_socket
            if ts.HasField("typed_config") and ts.typed_config.type_url == _DOWNSTREAM_TLS_URL:
                tls = _unpack(
                    ts.typed_config, tls_pb2.DownstreamTlsContext, f"{who} transport_socket"
                )
                assert isinstance(tls, tls_pb2.DownstreamTlsContext)
                for secret in _sds_names(tls.common_tls_context):
                    yield SECRET, secret


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
    key = (type_url, id(old_tr), tuple(removes), tuple(map(id, upserts)))
    with _memo_lock:
        hit = _derived.get(key)
        if hit is not None and hit[0] is old_tr:
            _derived.move_to_end(key)
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
        refs = self._refs
        if ref_updates:
            refs = _update_refs_shared(refs, ref_updates)
        made = Snapshot(types=MappingProxyType(types), _refs=refs)
        if self._consistent and _still_consistent(made, refs, ref_updates, gone):
            object.__setattr__(made, "_consistent", True)
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
        return other is not None and self.versions() == other.versions()

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
