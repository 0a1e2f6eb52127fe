"""Shared helpers of the OSM policy parsers (``policy.openservicemesh.io/v1alpha1``).

Role: the pieces the per-kind parsers (:mod:`smc.smi._osm_access`, :mod:`smc.smi._osm_retry`,
:mod:`smc.smi._osm_upstream`) and :mod:`smc.smi._osm_observability` share: Go durations,
uint32 fields, CIDRs, host names, ``matches`` references, ServiceAccount references and the
canonical ``spec_json`` encoding. Every problem is reported on the reader with its field path.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from smc.smi._model import IdentityRef
from smc.smi._osm_model import ObjectRef
from smc.smi._reader import _idx, _join, _Reader

_T = TypeVar("_T")

__all__ = ["format_go_duration"]

_U32 = 2**32 - 1
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_MS = {
    "ns": 1e-6,
    "us": 1e-3,
    "µs": 1e-3,
    "ms": 1.0,
    "s": 1000.0,
    "m": 60000.0,
    "h": 3600000.0,
}
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def format_go_duration(ms: int) -> str:
    """Whole milliseconds as a Go duration (``1500`` -> ``1.5s``, ``250`` -> ``250ms``)."""
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    if ms < 1000:
        return f"{ms}ms"
    return f"{ms / 1000:g}s"


def _go_duration(r: _Reader, value: object, path: str, *, lo_ms: int = 1) -> int | None:
    """A Go duration (``100ms``, ``1.5s``, ``1m30s``) as whole milliseconds, at least ``lo_ms``."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        r.fail(path, f"must be a duration such as 250ms, 5s or 1m, got {value!r}")
        return None
    pos = 0
    total = 0.0
    for m in _GO_DURATION.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos != len(value) or pos == 0:
        r.fail(path, f"{value!r} is not a duration such as 250ms, 5s or 1m30s")
        return None
    ms = round(total)
    if ms < lo_ms or ms > 366 * 86400 * 1000:
        r.fail(path, f"must be between {format_go_duration(lo_ms)} and 8784h, got {value!r}")
        return None
    return ms


def _u32(r: _Reader, m: Mapping[str, object], key: str, base: str, *, lo: int = 0) -> int | None:
    if m.get(key) is None:
        return None
    return r.integer(m.get(key), _join(base, key), lo=lo, hi=_U32, what=key)


def _spec_json(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _distinct(
    r: _Reader,
    value: object,
    path: str,
    read: Callable[[object, str], _T | None],
    *,
    non_empty: bool = False,
) -> list[_T]:
    """The items of the list at ``path``, each read by ``read(item, item_path)``; items that
    fail to read (``None``, reported by ``read``) and repeats are left out, first seen first."""
    out: list[_T] = []
    for i, item in enumerate(r.sequence(value, path, non_empty=non_empty) or ()):
        got = read(item, _idx(path, i))
        if got is not None and got not in out:
            out.append(got)
    return out


def _cidr(r: _Reader, value: object, path: str) -> str | None:
    s = r.string(value, path, max_len=64)
    if s is None:
        return None
    try:
        return ipaddress.ip_network(s, strict=False).compressed
    except ValueError:
        r.fail(path, f"{s!r} is not an IP address range in CIDR notation (e.g. 10.0.0.0/8)")
        return None


def _host(r: _Reader, value: object, path: str) -> str | None:
    s = r.string(value, path, max_len=253)
    if s is None:
        return None
    s = s.lower()
    if not _HOST.match(s):
        r.fail(path, f"{s!r} is not a host name (DNS name, optionally starting with '*.')")
        return None
    return s


def _matches(
    r: _Reader, value: object, path: str, kinds: tuple[str, ...]
) -> tuple[list[ObjectRef], list[dict[str, str]]]:
    refs: list[ObjectRef] = []
    plain: list[dict[str, str]] = []
    for i, item in enumerate(r.sequence(value, path) or ()):
        p = _idx(path, i)
        m = r.mapping(item, p, allowed=("apiGroup", "kind", "name"), required=("kind", "name"))
        if m is None:
            continue
        kind = r.string(m.get("kind"), _join(p, "kind"))
        name = r.dns_subdomain(m.get("name"), _join(p, "name"))
        group = ""
        if m.get("apiGroup") is not None:
            group = r.string(m.get("apiGroup"), _join(p, "apiGroup")) or ""
        if kind is not None and kind not in kinds:
            r.fail(_join(p, "kind"), f"must be one of {', '.join(kinds)}, got {kind!r}")
            continue
        if kind is None or name is None:
            continue
        refs.append(ObjectRef(api_group=group, kind=kind, name=name))
        entry = {"kind": kind, "name": name}
        if group:
            entry["apiGroup"] = group
        plain.append(entry)
    return refs, plain


def _service_account(r: _Reader, value: object, path: str, namespace: str) -> IdentityRef | None:
    m = r.mapping(value, path, allowed=("kind", "name", "namespace"), required=("kind", "name"))
    if m is None:
        return None
    kind = m.get("kind")
    if kind is not None and kind != "ServiceAccount":
        r.fail(_join(path, "kind"), f"must be ServiceAccount, got {kind!r}")
        return None
    name = r.dns_subdomain(m.get("name"), _join(path, "name"))
    ns = namespace
    if m.get("namespace") is not None:
        ns = r.dns_label(m.get("namespace"), _join(path, "namespace")) or namespace
    if name is None:
        return None
    return IdentityRef(name=name, namespace=ns)
