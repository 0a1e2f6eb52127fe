"""Parsing of specs.smi-spec.io routes: HTTPRouteGroup, TCPRoute and UDPRoute (v1alpha1-4).

Role: the parsers :mod:`smc.smi._parse` dispatches to for the route kinds (HTTP matches with path
regexes, methods and headers; L4 port lists), recording every problem on the given reader.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from smc.smi._model import (
    HTTPMatch,
    HTTPRouteGroup,
    TCPRoute,
    UDPRoute,
)
from smc.smi._reader import _Abort, _body, _idx, _join, _Reader, _type_name

_HTTP_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _http_route_group(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> HTTPRouteGroup:
    top = version in ("v1alpha1", "v1alpha2")
    body, base = _body(r, obj, top_level=top, allowed=("matches",), required=("matches",))
    mp = _join(base, "matches")
    items = r.sequence(body.get("matches"), mp, non_empty=True)
    matches: list[HTTPMatch] = []
    names: set[str] = set()
    for i, item in enumerate(items or ()):
        p = _idx(mp, i)
        raw_name = item.get("name") if isinstance(item, Mapping) else None
        if isinstance(raw_name, str) and raw_name in names:
            r.fail(_join(p, "name"), f"duplicate match name {raw_name!r}")
            continue
        if isinstance(raw_name, str):
            names.add(raw_name)
        m = _http_match(r, item, p, version)
        if m is not None:
            matches.append(m)
    return HTTPRouteGroup(namespace=namespace, name=name, matches=tuple(matches))


def _http_match(r: _Reader, value: object, path: str, version: str) -> HTTPMatch | None:
    if version == "v1alpha1":
        m = r.mapping(
            value,
            path,
            allowed=("name", "pathRegex", "methods"),
            required=("name", "pathRegex", "methods"),
        )
    else:
        m = r.mapping(
            value, path, allowed=("name", "pathRegex", "methods", "headers"), required=("name",)
        )
    if m is None:
        return None
    before = len(r.errors)
    name = r.string(m.get("name"), _join(path, "name"))
    path_regex: str | None = None
    if m.get("pathRegex") is not None:
        path_regex = r.regex(m.get("pathRegex"), _join(path, "pathRegex"))
    methods = _methods(r, m.get("methods"), _join(path, "methods"))
    headers: tuple[tuple[str, str], ...] = ()
    if m.get("headers") is not None:
        headers = _headers(r, m.get("headers"), _join(path, "headers"), version) or ()
    if name is None or len(r.errors) != before:
        return None
    return HTTPMatch(name=name, path_regex=path_regex, methods=methods, headers=headers)


def _methods(r: _Reader, value: object, path: str) -> tuple[str, ...]:
    if value is None:
        return ("*",)
    items = r.sequence(value, path)
    out: list[str] = []
    for i, item in enumerate(items or ()):
        p = _idx(path, i)
        s = r.string(item, p, max_len=64)
        if s is None:
            continue
        if s != "*" and not _HTTP_TOKEN.match(s):
            r.fail(p, f"{s!r} is not an HTTP method")
            continue
        up = s.upper()
        if up not in out:
            out.append(up)
    if not out or "*" in out:
        return ("*",)
    return tuple(sorted(out))


def _headers(
    r: _Reader, value: object, path: str, version: str
) -> tuple[tuple[str, str], ...] | None:
    pairs: list[tuple[str, object, str]] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            pairs.append((k, v, _join(path, str(k))))
    elif isinstance(value, list):
        # The CRDs (SMI's and OSM's) type headers as a list of mappings of header name to
        # regex (OSM's bookstore writes one header per item); every entry of every item counts.
        for i, item in enumerate(value):
            p = _idx(path, i)
            if not isinstance(item, Mapping) or not item:
                r.fail(p, "must be a mapping of header name to regex, e.g. {client-app: bookbuyer}")
                continue
            for k, v in item.items():
                pairs.append((k, v, _join(p, str(k))))
    else:
        r.fail(
            path,
            "must be a mapping of header name to regex, or a list of such mappings, "
            f"got {_type_name(value)}",
        )
        return None
    out: dict[str, str] = {}
    ok = True
    for k, v, p in pairs:
        if not isinstance(k, str) or not _HTTP_TOKEN.match(k):
            r.fail(p, f"{k!r} is not a valid HTTP header name")
            ok = False
            continue
        rx = r.regex(v, p)
        if rx is None:
            ok = False
            continue
        key = k.lower()
        if key in out:
            r.fail(p, f"header {key!r} given more than once")
            ok = False
            continue
        out[key] = rx
    return tuple(sorted(out.items())) if ok else None


def _l4_route(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str, udp: bool
) -> TCPRoute | UDPRoute:
    match_name: str | None = None
    ports: tuple[int, ...] = ()
    if version in ("v1alpha1", "v1alpha2"):
        # No fields at all: the object is just a name.
        _body(r, obj, top_level=True, allowed=())
    elif version == "v1alpha3":
        _body(r, obj, top_level=False, allowed=(), spec_required=False)
    else:
        body, base = _body(r, obj, top_level=False, allowed=("matches",), spec_required=False)
        if body.get("matches") is not None:
            mp = _join(base, "matches")
            m = r.mapping(body.get("matches"), mp, allowed=("name", "ports"))
            if m is not None:
                if m.get("name") is not None:
                    match_name = r.string(m.get("name"), _join(mp, "name"))
                pp = _join(mp, "ports")
                seen: list[int] = []
                for i, item in enumerate(r.sequence(m.get("ports"), pp) or ()):
                    port = r.port(item, _idx(pp, i))
                    if port is None:
                        continue
                    if port in seen:
                        r.fail(_idx(pp, i), f"duplicate port {port}")
                        continue
                    seen.append(port)
                ports = tuple(sorted(seen))
    if r.errors:
        raise _Abort
    cls = UDPRoute if udp else TCPRoute
    return cls(namespace=namespace, name=name, match_name=match_name, ports=ports)


def _tcp_route(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> TCPRoute | UDPRoute:
    return _l4_route(r, obj, version, namespace, name, udp=False)


def _udp_route(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> TCPRoute | UDPRoute:
    return _l4_route(r, obj, version, namespace, name, udp=True)
