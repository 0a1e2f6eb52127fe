"""Cheap parsing of state-of-the-world xDS requests: the head is decoded, the names are not.

Role: every SotW request repeats every resource name the client wants (1,000 on each EDS ACK
of a proxy that calls 1,000 services), and an ACK almost never changes them. The ADS server
parses requests as :data:`RequestHead`, a message with the fields of ``DiscoveryRequest``
except ``resource_names``: those stay as raw bytes in the message's unknown fields, so parsing
an ACK makes no string per name. :func:`names_bytes` takes those bytes out (a copy, no
decoding) to digest them (:func:`names_digest`, xxh3-128: an unchanged subscription is
recognised in O(bytes) at memory speed) and :func:`names_of` decodes them only when they
changed. Field numbers and types are those of ``envoy.service.discovery.v3.DiscoveryRequest``,
so the wire format is the same.

Concurrency: pure functions; the message class is built once at import.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2  # noqa: F401  (registers Node in the default pool)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.rpc import status_pb2  # noqa: F401  (registers Status in the default pool)
from xxhash import xxh3_128_digest

__all__ = ["RequestHead", "names_bytes", "names_digest", "names_of"]

_FILE = "smc/xds/request_head.proto"
_NAME = "smc.xds.internal.DiscoveryRequestHead"
# (name, number, type, message type) of every DiscoveryRequest field but resource_names (3).
_FIELDS: tuple[tuple[str, int, int, str | None], ...] = (
    ("version_info", 1, descriptor_pb2.FieldDescriptorProto.TYPE_STRING, None),
    ("node", 2, descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, ".envoy.config.core.v3.Node"),
    ("type_url", 4, descriptor_pb2.FieldDescriptorProto.TYPE_STRING, None),
    ("response_nonce", 5, descriptor_pb2.FieldDescriptorProto.TYPE_STRING, None),
    ("error_detail", 6, descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, ".google.rpc.Status"),
)
_HEAD_FIELDS = tuple(f[0] for f in _FIELDS)


def _make_head() -> Any:
    pool = descriptor_pool.Default()
    try:
        found = pool.FindMessageTypeByName(_NAME)
    except KeyError:
        fd = descriptor_pb2.FileDescriptorProto(
            name=_FILE, package=_NAME.rsplit(".", 1)[0], syntax="proto3"
        )
        fd.dependency.extend(["envoy/config/core/v3/base.proto", "google/rpc/status.proto"])
        msg = fd.message_type.add(name=_NAME.rsplit(".", 1)[1])
        for name, number, kind, type_name in _FIELDS:
            field = msg.field.add(
                name=name,
                number=number,
                type=kind,  # type: ignore[arg-type]
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
            )
            if type_name is not None:
                field.type_name = type_name
        pool.Add(fd)
        found = pool.FindMessageTypeByName(_NAME)
    return message_factory.GetMessageClass(found)


#: A ``DiscoveryRequest`` without ``resource_names`` decoded (they stay unknown-field bytes).
RequestHead: Any = _make_head()


def names_bytes(head: Any) -> bytes:
    """The serialised ``resource_names`` of ``head`` (and any field this module does not know),
    in wire order. Clears the head's fields: call it after reading them."""
    for name in _HEAD_FIELDS:
        head.ClearField(name)
    data: bytes = head.SerializeToString()
    return data


def names_digest(data: bytes | memoryview) -> bytes:
    """A 128-bit digest of :func:`names_bytes` output (same names in the same order)."""
    return xxh3_128_digest(data)


def names_of(data: bytes) -> list[str]:
    """The resource names in :func:`names_bytes` output, decoded."""
    if not data:
        return []
    return list(discovery_pb2.DiscoveryRequest.FromString(data).resource_names)
