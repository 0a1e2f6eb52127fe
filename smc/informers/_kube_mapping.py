"""Helpers that turn Kubernetes objects into mesh event fields (labels, port protocols,
authored API versions) and compare or de-duplicate emitted events.

Role: pure functions used by :class:`smc.informers._kube.KubeInformers`.
Concurrency: pure functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from smc.events import (
    Event,
)


def _fingerprint(event: Event) -> tuple[Any, ...]:
    return (
        event.TYPE,
        *(
            (f.name, repr(getattr(event, f.name)))
            for f in dataclasses.fields(event)
            if f.name != "envelope"
        ),
    )


def _labels(meta: Mapping[str, Any]) -> dict[str, str]:
    raw = meta.get("labels") or {}
    return {str(k): str(v) for k, v in raw.items()}


def _port_protocol(protocol: object, app_protocol: object, name: object) -> str:
    if str(protocol or "TCP").upper() == "UDP":
        return "udp"
    for hint in (app_protocol, name):
        h = str(hint or "").lower().rsplit("/", 1)[-1]
        for proto in ("grpc", "http", "tcp"):
            if h == proto or h.startswith(proto + "-"):
                return proto
        if h in ("h2c", "http2", "https"):
            return "http"
    return "http"


def _authored_api_version(obj: Mapping[str, Any]) -> str | None:
    """The apiVersion of the newest write to the object's main resource (``managedFields``)."""
    best: tuple[str, int] | None = None
    found: str | None = None
    for i, entry in enumerate((obj.get("metadata") or {}).get("managedFields") or []):
        if not isinstance(entry, dict) or entry.get("subresource"):
            continue
        if entry.get("operation") not in ("Update", "Apply"):
            continue
        rank = (str(entry.get("time") or ""), i)
        if best is None or rank > best:
            best = rank
            found = str(entry.get("apiVersion") or "") or None
    return found


def _dedupe_aggregates(events: list[Event]) -> list[Event]:
    """Keep the last event per aggregate (a namespace join translates each slice of a service
    into the same EndpointsChanged)."""
    last: dict[str, Event] = {}
    for e in events:
        last.pop(e.aggregate, None)
        last[e.aggregate] = e
    return list(last.values())
