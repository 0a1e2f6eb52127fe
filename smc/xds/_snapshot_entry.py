"""Resource entries of snapshots: one serialised, content-versioned, interned Envoy resource.

Role: :class:`ResourceEntry` (name, bytes, version, the 128-bit mix of ``(name, version)``
and the names it references), :func:`make_entry` (canonical deterministic bytes: nested ``Any``
values re-packed so equal content gives equal versions in every process; entries interned by
content), the per-type :class:`TypeResources` with its bounded change history, and reading the
EDS/RDS/SDS names a cluster or listener references. Concurrency: entries are frozen; the
intern table is guarded by a lock, so entries may be made in any thread.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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

from smc.xds._errors import InvalidResource
from smc.xds._types import CLUSTER, ENDPOINT, LISTENER, MESSAGE_CLASSES, ROUTE, SECRET

__all__ = [
    "CHANGE_HISTORY",
    "ResourceEntry",
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
