"""Named LDS/CDS subscriptions (gRPC's xDS client): telling the client what does not exist.

Role: Envoy subscribes to listeners and clusters as a wildcard, gRPC by name (the target it
dials, the clusters its routes name). A name the snapshot does not hold must still get an
answer, or gRPC waits for its 15 s does-not-exist timer. The ADS server therefore counts the
missing names in the content key of such a subscription (:func:`by_name_key`: a new missing
name is a new content) and appends one ``resource_errors`` entry per missing name to the
response (:func:`with_missing`; xDS error propagation, xRFC TP3, which gRPC honours, gRFC A88)
with status NOT_FOUND.
Concurrency: pure functions; called on the ADS server's loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from smc.xds._snapshot import TypeResources

__all__ = ["by_name_key", "missing_names", "with_missing"]

_NOT_FOUND = 5  # google.rpc.Code.NOT_FOUND


def _missing_mix(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(b"missing\0" + name.encode(), digest_size=16).digest())


def missing_names(names: Iterable[str], tr: TypeResources | None) -> list[str]:
    entries = tr.entries if tr is not None else {}
    return sorted(n for n in names if n not in entries)


def by_name_key(names: Iterable[str], tr: TypeResources | None) -> int:
    """Content key of a by-name subscription: the present entries and the missing names."""
    entries = tr.entries if tr is not None else {}
    key = 0
    for name in names:
        entry = entries.get(name)
        key ^= entry.mix if entry is not None else _missing_mix(name)
    return key


def with_missing(
    body: tuple[bytes, int, int], names: Iterable[str], tr: TypeResources | None
) -> tuple[bytes, int, int]:
    """``body`` (a serialised response without nonce) plus a NOT_FOUND resource error for
    every requested name ``tr`` does not hold (fields of a message concatenate)."""
    missing = missing_names(names, tr)
    if not missing:
        return body
    extra = discovery_pb2.DiscoveryResponse(
        resource_errors=[
            discovery_pb2.ResourceError(
                resource_name=discovery_pb2.ResourceName(name=n),
                error_detail=status_pb2.Status(
                    code=_NOT_FOUND,
                    message=f"{n} does not exist for this node in SMC (no such service, or "
                    "the node's identity may not call it)",
                ),
            )
            for n in missing
        ]
    ).SerializeToString()
    data, count, size = body
    return data + extra, count, size
