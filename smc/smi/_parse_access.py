"""Parsing of access.smi-spec.io TrafficTarget (v1alpha1-3): destination, sources and rules.

Role: the parser :mod:`smc.smi._parse` dispatches to for kind ``TrafficTarget``; it reads the
layout of the exact version and records every problem on the given reader.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from smc.smi._model import (
    IdentityRef,
    RuleRef,
    TrafficTarget,
)
from smc.smi._reader import _Abort, _body, _idx, _join, _Reader


def _traffic_target(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> TrafficTarget:
    if version == "v1alpha1":
        body, base = _body(
            r,
            obj,
            top_level=True,
            allowed=("destination", "sources", "specs"),
            required=("destination", "sources", "specs"),
        )
        rules_key = "specs"
    else:
        body, base = _body(
            r,
            obj,
            top_level=False,
            allowed=("destination", "sources", "rules"),
            required=("destination", "sources", "rules"),
        )
        rules_key = "rules"
    with_port = version in ("v1alpha1", "v1alpha2")
    dest_path = _join(base, "destination")
    destination: IdentityRef | None = None
    port: int | None = None
    if body.get("destination") is not None:
        destination, port = _subject(
            r, body.get("destination"), dest_path, namespace, with_port=with_port
        )
    sources: list[IdentityRef] = []
    src_path = _join(base, "sources")
    items = r.sequence(body.get("sources"), src_path, non_empty=True)
    seen_sources: set[IdentityRef] = set()
    for i, item in enumerate(items or ()):
        p = _idx(src_path, i)
        src, _ = _subject(r, item, p, namespace, with_port=False)
        if src is not None:
            if src in seen_sources:
                r.fail(p, f"duplicate source {src.identity}")
            seen_sources.add(src)
            sources.append(src)
    rules: list[RuleRef] = []
    rules_path = _join(base, rules_key)
    items = r.sequence(body.get(rules_key), rules_path, non_empty=True)
    allowed_kinds: tuple[str, ...] = (
        ("HTTPRouteGroup", "TCPRoute", "UDPRoute")
        if version == "v1alpha3"
        else ("HTTPRouteGroup", "TCPRoute")
    )
    for i, item in enumerate(items or ()):
        rule = _rule(r, item, _idx(rules_path, i), allowed_kinds, v1alpha1=version == "v1alpha1")
        if rule is not None:
            rules.append(rule)
    if destination is None:
        raise _Abort
    return TrafficTarget(
        namespace=namespace,
        name=name,
        destination=destination,
        port=port,
        sources=tuple(sources),
        rules=tuple(rules),
    )


def _subject(
    r: _Reader, value: object, path: str, default_ns: str, *, with_port: bool
) -> tuple[IdentityRef | None, int | None]:
    allowed = ("kind", "name", "namespace", "port") if with_port else ("kind", "name", "namespace")
    m = r.mapping(value, path, allowed=allowed, required=("kind", "name"))
    if m is None:
        return None, None
    kind = m.get("kind")
    ok = True
    if kind is None:
        ok = False
    elif kind != "ServiceAccount":
        r.fail(_join(path, "kind"), f"must be ServiceAccount, got {kind!r}")
        ok = False
    sa = r.dns_subdomain(m.get("name"), _join(path, "name"))
    ns = default_ns
    if m.get("namespace") is not None:
        ns_v = r.dns_label(m.get("namespace"), _join(path, "namespace"))
        if ns_v is None:
            ok = False
        else:
            ns = ns_v
    port: int | None = None
    if with_port and m.get("port") is not None:
        raw = m.get("port")
        if isinstance(raw, str) and raw.isdigit():  # v1alpha1 manifests sometimes quote it
            raw = int(raw)
        port = r.port(raw, _join(path, "port"))
        if port is None:
            ok = False
    if sa is None or not ok:
        return None, None
    return IdentityRef(name=sa, namespace=ns), port


def _rule(
    r: _Reader, value: object, path: str, kinds: tuple[str, ...], *, v1alpha1: bool
) -> RuleRef | None:
    allowed = ("kind", "name", "matches", "namespace") if v1alpha1 else ("kind", "name", "matches")
    m = r.mapping(value, path, allowed=allowed, required=("kind", "name"))
    if m is None:
        return None
    kind = m.get("kind")
    ok = True
    if kind is None:
        ok = False
    elif kind not in kinds:
        r.fail(_join(path, "kind"), f"must be one of {', '.join(kinds)}, got {kind!r}")
        ok = False
    name = r.dns_subdomain(m.get("name"), _join(path, "name"))
    if v1alpha1 and m.get("namespace") is not None:
        r.fail(
            _join(path, "namespace"),
            "routes must be in the TrafficTarget's namespace (cross-namespace specs are not supported)",
        )
        ok = False
    matches: list[str] = []
    mp = _join(path, "matches")
    for j, item in enumerate(r.sequence(m.get("matches"), mp) or ()):
        s = r.string(item, _idx(mp, j))
        if s is None:
            ok = False
        elif s in matches:
            r.fail(_idx(mp, j), f"duplicate match name {s!r}")
            ok = False
        else:
            matches.append(s)
    if name is None or not ok:
        return None
    return RuleRef(kind=cast(Any, kind), name=name, matches=tuple(matches))
