"""Proxy node ids: which registry workload (and so which identity) an Envoy speaks for.

Role: the node-id scheme of SMC's xDS server. An Envoy sidecar's ``node.id`` is
``<namespace>/<workload>``: the namespace and name of one registry workload (a Kubernetes pod
or a VM joined through the API). The proxy's identity is that workload's service account
(``<namespace>/<service-account>``). Snapshots are per node (each workload has its own
address, so its listeners differ), while everything that depends only on the identity
(outbound routes, clusters, endpoints, secrets) is built once per identity and shared between
the snapshots of its workloads (entries are interned by content).

A node id that names no workload gets no snapshot (the server keeps the stream open and
answers as soon as the workload joins). A pod and a VM with the same namespace and name
are told apart with the long form ``<kind>/<namespace>/<workload>`` (``pod/...``, ``vm/...``);
the short form then means the pod. ``grpc:<node id>`` is the same workload served to gRPC's own
xDS client (proxyless: see :mod:`smc.xds._grpc`); the ADS server derives it from the node's
user agent.

Concurrency: pure functions and immutable values; safe everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from smc.projections import Workload
from smc.xds._errors import XdsError

__all__ = ["InvalidNodeId", "NodeRef", "find_workload", "parse_node_id"]

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_KINDS = ("pod", "vm")
_GRPC = "grpc:"


class InvalidNodeId(XdsError):
    """A node id that is not ``<namespace>/<workload>`` (or ``<kind>/<namespace>/<workload>``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeRef:
    """A parsed node id: the workload it names (``kind`` None: any kind, pods first)."""

    namespace: str
    name: str
    kind: str | None = None
    #: A proxyless gRPC node (``grpc:`` prefix): gRPC resources instead of Envoy ones.
    proxyless: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_node_id(node_id: str) -> NodeRef:
    """``ns/workload`` or ``kind/ns/workload`` -> :class:`NodeRef`; raises :class:`InvalidNodeId`."""
    proxyless = node_id.startswith(_GRPC)
    parts = node_id.removeprefix(_GRPC).split("/")
    kind: str | None = None
    if len(parts) == 3:
        kind, ns, name = parts
        if kind not in _KINDS:
            raise InvalidNodeId(
                f"node id {node_id!r}: kind {kind!r} is not one of {', '.join(_KINDS)}"
            )
    elif len(parts) == 2:
        ns, name = parts
    else:
        raise InvalidNodeId(
            f"node id {node_id!r} is not <namespace>/<workload> (nor <kind>/<namespace>/<workload>)"
        )
    for what, value in (("namespace", ns), ("workload name", name)):
        if not value or len(value) > 253 or not _NAME.match(value):
            raise InvalidNodeId(f"node id {node_id!r}: {what} {value!r} is not a DNS name")
    return NodeRef(namespace=ns, name=name, kind=kind, proxyless=proxyless)


def find_workload(
    ref: NodeRef, workloads: Mapping[tuple[str, str, str], Workload] | Iterable[Workload]
) -> Workload | None:
    """The registry workload ``ref`` names (pods before VMs for the short form), or None."""
    if isinstance(workloads, Mapping):
        for kind in (ref.kind,) if ref.kind else _KINDS:
            found = workloads.get((kind, ref.namespace, ref.name))
            if found is not None:
                return found
        return None
    best: Workload | None = None
    for w in workloads:
        if w.namespace != ref.namespace or w.name != ref.name:
            continue
        if ref.kind is not None and w.kind != ref.kind:
            continue
        if best is None or w.kind < best.kind:
            best = w
    return best
