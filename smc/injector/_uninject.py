"""Uninjection: the JSONPatch that takes SMC's sidecar out of an injected pod again.

Role: :func:`uninject` is :func:`~smc.injector.mutate` in reverse, for tooling that hands a pod
back to plain Kubernetes (a manifest exported from a cluster, a namespace leaving the mesh): it
removes the proxy and init containers, the volumes, annotations and the interception label the
injector added, and puts back the probes it rewrote (``smc.dev/original-probes``). A pod that
was never injected gives ``[]``.
Concurrency: a pure function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smc.injector._mutate import (
    AGENT_CONTAINER,
    ANNOTATION_BOOTSTRAP_SECRET,
    ANNOTATION_NODE_ID,
    ANNOTATION_STATUS,
    BOOTSTRAP_VOLUME,
    INIT_CONTAINER,
    LABEL_INTERCEPTION,
    PROXY_CONTAINER,
    PROXY_VOLUME,
    TOKEN_VOLUME,
)
from smc.injector._probes import ANNOTATION_ORIGINAL_PROBES, restore_probe_ops

__all__ = ["uninject"]

_ADDED_ANNOTATIONS = (
    ANNOTATION_STATUS,
    ANNOTATION_NODE_ID,
    ANNOTATION_BOOTSTRAP_SECRET,
    ANNOTATION_ORIGINAL_PROBES,
)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _removals(items: Any, path: str, names: tuple[str, ...]) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        return []
    found = [i for i, c in enumerate(items) if isinstance(c, Mapping) and c.get("name") in names]
    if found and len(found) == len(items):
        return [{"op": "remove", "path": path}]
    return [{"op": "remove", "path": f"{path}/{i}"} for i in sorted(found, reverse=True)]


def uninject(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The RFC 6902 operations that undo the injection of ``pod`` (see module docstring)."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if ANNOTATION_STATUS not in annotations and not any(
        isinstance(c, Mapping) and c.get("name") == PROXY_CONTAINER for c in containers
    ):
        return []
    ops = restore_probe_ops(pod)
    ops += _removals(containers, "/spec/containers", (PROXY_CONTAINER, AGENT_CONTAINER))
    ops += _removals(
        spec.get("initContainers"), "/spec/initContainers", (INIT_CONTAINER, AGENT_CONTAINER)
    )
    ops += _removals(
        spec.get("volumes"), "/spec/volumes", (PROXY_VOLUME, BOOTSTRAP_VOLUME, TOKEN_VOLUME)
    )
    added = [k for k in _ADDED_ANNOTATIONS if k in annotations]
    if added and len(added) == len(annotations):
        ops.append({"op": "remove", "path": "/metadata/annotations"})
    else:
        ops += [{"op": "remove", "path": f"/metadata/annotations/{_escape(k)}"} for k in added]
    labels = meta.get("labels") or {}
    if LABEL_INTERCEPTION in labels:
        if len(labels) == 1:
            ops.append({"op": "remove", "path": "/metadata/labels"})
        else:
            ops.append({"op": "remove", "path": f"/metadata/labels/{_escape(LABEL_INTERCEPTION)}"})
    return ops
