"""Parser of OSM's UpstreamTrafficSetting policy.

Role: validate and normalise ``UpstreamTrafficSetting`` manifests (host, connectionSettings,
local and global rate limits, httpRoutes, and the SMC extensions ``outlierDetection`` and
``httpRoutes[].timeout`` documented in docs/traffic-policy.md), reporting every problem with its
field path, and build the canonical ``spec_json``. Dispatched to via
:data:`smc.smi._osm_parse.OSM_PARSERS`.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast

from smc.smi._osm_common import _U32, _go_duration, _host, _spec_json, _u32, format_go_duration
from smc.smi._osm_model import (
    HTTPLocalRateLimit,
    OutlierDetection,
    RouteSetting,
    TCPLocalRateLimit,
    UpstreamTrafficSetting,
)
from smc.smi._reader import _Abort, _body, _idx, _join, _Reader

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_UNITS = ("second", "minute", "hour")


def _service_of_host(r: _Reader, host: str, path: str, namespace: str) -> str | None:
    """``name``, ``name.ns``, ``name.ns.svc`` or ``name.ns.svc.cluster.local`` -> ``ns/name``;
    any other host of three labels or more is outside the mesh (an egress host) -> ``""``; a
    host naming ``svc`` but not in the FQDN's form is an error."""
    parts = host.split(".")
    if len(parts) == 1:
        return f"{namespace}/{parts[0]}"
    if len(parts) == 2 or (
        parts[2] == "svc" and (len(parts) == 3 or parts[3:] == ["cluster", "local"])
    ):
        return f"{parts[1]}/{parts[0]}"
    if "svc" not in parts and not host.startswith("*."):
        return ""
    r.fail(path, f"{host!r} is not a mesh service host (name, name.namespace or its FQDN)")
    return None


def _unit(r: _Reader, value: object, path: str) -> str | None:
    if value not in _UNITS:
        r.fail(path, f"must be one of second, minute, hour, got {value!r}")
        return None
    return str(value)


def _status_code(r: _Reader, m: Mapping[str, object], path: str) -> int:
    """``responseStatusCode`` (400-599) of a rate limit; 429 when absent or 0."""
    status = 429
    if m.get("responseStatusCode") not in (None, 0):
        status = (
            r.integer(
                m.get("responseStatusCode"),
                _join(path, "responseStatusCode"),
                lo=400,
                hi=599,
                what="responseStatusCode",
            )
            or 429
        )
    return status


def _local_http(
    r: _Reader, value: object, path: str
) -> tuple[HTTPLocalRateLimit | None, dict[str, Any]]:
    m = r.mapping(
        value,
        path,
        allowed=("requests", "unit", "burst", "responseStatusCode", "responseHeadersToAdd"),
        required=("requests", "unit"),
    )
    if m is None:
        return None, {}
    req = r.integer(m.get("requests"), _join(path, "requests"), lo=1, hi=_U32, what="requests")
    unit = _unit(r, m.get("unit"), _join(path, "unit")) if m.get("unit") is not None else None
    burst = _u32(r, m, "burst", path) or 0
    status = _status_code(r, m, path)
    headers: list[tuple[str, str]] = []
    hp = _join(path, "responseHeadersToAdd")
    for i, item in enumerate(r.sequence(m.get("responseHeadersToAdd"), hp) or ()):
        p = _idx(hp, i)
        hm = r.mapping(item, p, allowed=("name", "value"), required=("name", "value"))
        if hm is None:
            continue
        hn = r.string(hm.get("name"), _join(p, "name"))
        hv = hm.get("value")
        if hn is not None and not _HEADER_NAME.match(hn):
            r.fail(_join(p, "name"), f"{hn!r} is not a valid HTTP header name")
            continue
        if not isinstance(hv, str):
            r.fail(_join(p, "value"), "must be a string")
            continue
        if hn is not None:
            headers.append((hn.lower(), hv))
    if req is None or unit is None:
        return None, {}
    limit = HTTPLocalRateLimit(
        requests=req,
        unit=cast(Any, unit),
        burst=burst,
        status=status,
        headers=tuple(sorted(headers)),
    )
    plain: dict[str, Any] = {"requests": req, "unit": unit, "responseStatusCode": status}
    if burst:
        plain["burst"] = burst
    if headers:
        plain["responseHeadersToAdd"] = [{"name": a, "value": b} for a, b in sorted(headers)]
    return limit, plain


def _descriptors(r: _Reader, value: object, path: str, *, http: bool) -> list[Any]:
    out: list[Any] = []
    for i, item in enumerate(r.sequence(value, path) or ()):
        p = _idx(path, i)
        m = r.mapping(item, p, allowed=("entries",), required=() if http else ("entries",))
        if m is None:
            continue
        entries: list[dict[str, Any]] = []
        ep = _join(p, "entries")
        for j, e in enumerate(r.sequence(m.get("entries"), ep) or ()):
            q = _idx(ep, j)
            if not http:
                em = r.mapping(e, q, allowed=("key", "value"), required=("key", "value"))
                if em is not None:
                    k = r.string(em.get("key"), _join(q, "key"))
                    v = r.string(em.get("value"), _join(q, "value"))
                    if k is not None and v is not None:
                        entries.append({"key": k, "value": v})
                continue
            kinds = ("genericKey", "remoteAddress", "requestHeader", "headerValueMatch")
            em = r.mapping(e, q, allowed=kinds)
            if em is None:
                continue
            given = [k for k in kinds if em.get(k) is not None]
            if len(given) != 1:
                r.fail(q, f"exactly one of {', '.join(kinds)} must be set")
                continue
            which = given[0]
            wp = _join(q, which)
            inner = em.get(which)
            if which == "genericKey":
                gm = r.mapping(inner, wp, allowed=("key", "value"), required=("value",))
                if gm is not None:
                    gv = r.string(gm.get("value"), _join(wp, "value"))
                    gk = r.string(gm.get("key"), _join(wp, "key")) if gm.get("key") else None
                    if gv is not None:
                        entries.append({"genericKey": {"key": gk or "generic_key", "value": gv}})
            elif which == "remoteAddress":
                if r.mapping(inner, wp, allowed=()) is not None:
                    entries.append({"remoteAddress": {}})
            elif which == "requestHeader":
                hm = r.mapping(inner, wp, allowed=("name", "key"), required=("name", "key"))
                if hm is not None:
                    hn = r.string(hm.get("name"), _join(wp, "name"))
                    hk = r.string(hm.get("key"), _join(wp, "key"))
                    if hn is not None and hk is not None:
                        entries.append({"requestHeader": {"name": hn.lower(), "key": hk}})
            else:
                vm = r.mapping(
                    inner,
                    wp,
                    allowed=("value", "headers", "key", "expectMatch"),
                    required=("value", "headers"),
                )
                if vm is not None:
                    hv = r.string(vm.get("value"), _join(wp, "value"))
                    hdrs = _header_matchers(r, vm.get("headers"), _join(wp, "headers"))
                    expect = True
                    if vm.get("expectMatch") is not None:
                        expect = bool(r.boolean(vm.get("expectMatch"), _join(wp, "expectMatch")))
                    hk = r.string(vm.get("key"), _join(wp, "key")) if vm.get("key") else None
                    if hv is not None and hdrs:
                        entries.append(
                            {
                                "headerValueMatch": {
                                    "value": hv,
                                    "headers": hdrs,
                                    "key": hk or "header_match",
                                    "expectMatch": expect,
                                }
                            }
                        )
        out.append({"entries": entries})
    return out


def _header_matchers(r: _Reader, value: object, path: str) -> list[dict[str, Any]]:
    kinds = ("exact", "prefix", "suffix", "regex", "contains", "present")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(r.sequence(value, path, non_empty=True) or ()):
        p = _idx(path, i)
        m = r.mapping(item, p, allowed=("name", *kinds), required=("name",))
        if m is None:
            continue
        hn = r.string(m.get("name"), _join(p, "name"))
        given = [k for k in kinds if m.get(k) not in (None, "")]
        if len(given) != 1:
            r.fail(p, f"exactly one of {', '.join(kinds)} must be set")
            continue
        k = given[0]
        if k == "present":
            v: object = r.boolean(m.get(k), _join(p, k))
        elif k == "regex":
            v = r.regex(m.get(k), _join(p, k))
        else:
            v = r.string(m.get(k), _join(p, k))
        if hn is not None and v is not None:
            out.append({"name": hn.lower(), k: v})
    return out


def _rls(r: _Reader, value: object, path: str, *, http: bool) -> dict[str, Any] | None:
    allowed = ["rateLimitService", "domain", "descriptors", "timeout", "failOpen"]
    if http:
        allowed += ["enableXRateLimitHeaders", "responseStatusCode"]
    required = (
        ("rateLimitService", "domain") if http else ("rateLimitService", "domain", "descriptors")
    )
    m = r.mapping(value, path, allowed=allowed, required=required)
    if m is None:
        return None
    sp = _join(path, "rateLimitService")
    svc = r.mapping(
        m.get("rateLimitService"), sp, allowed=("host", "port"), required=("host", "port")
    )
    host = port = None
    if svc is not None:
        host = _host(r, svc.get("host"), _join(sp, "host"))
        port = r.port(svc.get("port"), _join(sp, "port"))
    domain = r.string(m.get("domain"), _join(path, "domain"))
    descriptors = _descriptors(r, m.get("descriptors"), _join(path, "descriptors"), http=http)
    timeout = _go_duration(r, m.get("timeout"), _join(path, "timeout"))
    fail_open = True
    if m.get("failOpen") is not None:
        fail_open = bool(r.boolean(m.get("failOpen"), _join(path, "failOpen")))
    out: dict[str, Any] = {
        "rateLimitService": {"host": host, "port": port},
        "domain": domain,
        "descriptors": descriptors,
        "timeout": format_go_duration(timeout if timeout is not None else 20),
        "failOpen": fail_open,
    }
    if http:
        xh = False
        if m.get("enableXRateLimitHeaders") is not None:
            xh = bool(
                r.boolean(m.get("enableXRateLimitHeaders"), _join(path, "enableXRateLimitHeaders"))
            )
        status = _status_code(r, m, path)
        out["enableXRateLimitHeaders"] = xh
        out["responseStatusCode"] = status
    return out


def _upstream(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> UpstreamTrafficSetting:
    body, base = _body(
        r,
        obj,
        top_level=False,
        allowed=("host", "connectionSettings", "rateLimit", "httpRoutes", "outlierDetection"),
        required=("host",),
    )
    spec: dict[str, Any] = {}
    hp = _join(base, "host")
    host = _host(r, body.get("host"), hp)
    service = _service_of_host(r, host, hp, namespace) if host is not None else None
    spec["host"] = host
    fields: dict[str, Any] = {}
    cp = _join(base, "connectionSettings")
    if body.get("connectionSettings") is not None:
        cs = r.mapping(body.get("connectionSettings"), cp, allowed=("tcp", "http"))
        plain_cs: dict[str, Any] = {}
        if cs is not None and cs.get("tcp") is not None:
            tp = _join(cp, "tcp")
            tm = r.mapping(cs.get("tcp"), tp, allowed=("maxConnections", "connectTimeout"))
            if tm is not None:
                fields["max_connections"] = _u32(r, tm, "maxConnections", tp, lo=1)
                fields["connect_timeout_ms"] = _go_duration(
                    r, tm.get("connectTimeout"), _join(tp, "connectTimeout")
                )
                t_plain: dict[str, Any] = {}
                if fields["max_connections"] is not None:
                    t_plain["maxConnections"] = fields["max_connections"]
                if fields["connect_timeout_ms"] is not None:
                    t_plain["connectTimeout"] = format_go_duration(fields["connect_timeout_ms"])
                plain_cs["tcp"] = t_plain
        if cs is not None and cs.get("http") is not None:
            hcp = _join(cp, "http")
            keys = ("maxRequests", "maxRequestsPerConnection", "maxPendingRequests", "maxRetries")
            hm = r.mapping(cs.get("http"), hcp, allowed=keys)
            if hm is not None:
                h_plain: dict[str, Any] = {}
                for key, attr in zip(
                    keys,
                    (
                        "max_requests",
                        "max_requests_per_connection",
                        "max_pending_requests",
                        "max_retries",
                    ),
                    strict=True,
                ):
                    fields[attr] = _u32(r, hm, key, hcp, lo=0 if key == "maxRetries" else 1)
                    if fields[attr] is not None:
                        h_plain[key] = fields[attr]
                plain_cs["http"] = h_plain
        spec["connectionSettings"] = plain_cs
    has_global = False
    rp = _join(base, "rateLimit")
    if body.get("rateLimit") is not None:
        rl = r.mapping(body.get("rateLimit"), rp, allowed=("local", "global"))
        plain_rl: dict[str, Any] = {}
        if rl is not None and rl.get("local") is not None:
            lp = _join(rp, "local")
            lm = r.mapping(rl.get("local"), lp, allowed=("tcp", "http"))
            plain_local: dict[str, Any] = {}
            if lm is not None and lm.get("tcp") is not None:
                tp = _join(lp, "tcp")
                tm = r.mapping(
                    lm.get("tcp"),
                    tp,
                    allowed=("connections", "unit", "burst"),
                    required=("connections", "unit"),
                )
                if tm is not None:
                    conns = r.integer(
                        tm.get("connections"),
                        _join(tp, "connections"),
                        lo=1,
                        hi=_U32,
                        what="connections",
                    )
                    unit = _unit(r, tm.get("unit"), _join(tp, "unit")) if tm.get("unit") else None
                    burst = _u32(r, tm, "burst", tp) or 0
                    if conns is not None and unit is not None:
                        fields["local_tcp"] = TCPLocalRateLimit(
                            connections=conns, unit=cast(Any, unit), burst=burst
                        )
                        plain_local["tcp"] = {"connections": conns, "unit": unit}
                        if burst:
                            plain_local["tcp"]["burst"] = burst
            if lm is not None and lm.get("http") is not None:
                limit, plain = _local_http(r, lm.get("http"), _join(lp, "http"))
                if limit is not None:
                    fields["local_http"] = limit
                    plain_local["http"] = plain
            plain_rl["local"] = plain_local
        if rl is not None and rl.get("global") is not None:
            gp = _join(rp, "global")
            gm = r.mapping(rl.get("global"), gp, allowed=("tcp", "http"))
            plain_global: dict[str, Any] = {}
            if gm is not None:
                for key in ("tcp", "http"):
                    if gm.get(key) is not None:
                        g = _rls(r, gm.get(key), _join(gp, key), http=key == "http")
                        if g is not None:
                            plain_global[key] = g
                            has_global = True
            plain_rl["global"] = plain_global
        spec["rateLimit"] = plain_rl
    routes: list[RouteSetting] = []
    plain_routes: list[dict[str, Any]] = []
    rtp = _join(base, "httpRoutes")
    for i, item in enumerate(r.sequence(body.get("httpRoutes"), rtp) or ()):
        p = _idx(rtp, i)
        m = r.mapping(item, p, allowed=("path", "rateLimit", "timeout"), required=("path",))
        if m is None:
            continue
        path = r.regex(m.get("path"), _join(p, "path"))
        timeout = _go_duration(r, m.get("timeout"), _join(p, "timeout"))
        local = None
        route_global = False
        pr: dict[str, Any] = {"path": path}
        if m.get("rateLimit") is not None:
            rlp = _join(p, "rateLimit")
            rm = r.mapping(m.get("rateLimit"), rlp, allowed=("local", "global"))
            prl: dict[str, Any] = {}
            if rm is not None and rm.get("local") is not None:
                local, plain = _local_http(r, rm.get("local"), _join(rlp, "local"))
                prl["local"] = plain
            if rm is not None and rm.get("global") is not None:
                gp = _join(rlp, "global")
                gm = r.mapping(
                    rm.get("global"), gp, allowed=("descriptors",), required=("descriptors",)
                )
                if gm is not None:
                    prl["global"] = {
                        "descriptors": _descriptors(
                            r, gm.get("descriptors"), _join(gp, "descriptors"), http=True
                        )
                    }
                    route_global = True
            pr["rateLimit"] = prl
        if timeout is not None:
            pr["timeout"] = format_go_duration(timeout)
        if path is None:
            continue
        if any(x.path == path for x in routes):
            r.fail(_join(p, "path"), f"path {path!r} is listed more than once")
            continue
        routes.append(
            RouteSetting(path=path, local=local, timeout_ms=timeout, has_global=route_global)
        )
        plain_routes.append(pr)
    if plain_routes:
        spec["httpRoutes"] = plain_routes
    if body.get("outlierDetection") is not None:
        op = _join(base, "outlierDetection")
        om = r.mapping(
            body.get("outlierDetection"),
            op,
            allowed=("consecutive5xxErrors", "interval", "baseEjectionTime", "maxEjectionPercent"),
        )
        if om is not None:
            c5 = 5
            if om.get("consecutive5xxErrors") is not None:
                c5 = (
                    r.integer(
                        om.get("consecutive5xxErrors"),
                        _join(op, "consecutive5xxErrors"),
                        lo=1,
                        hi=_U32,
                        what="consecutive5xxErrors",
                    )
                    or 5
                )
            interval = _go_duration(r, om.get("interval"), _join(op, "interval")) or 10000
            eject = _go_duration(r, om.get("baseEjectionTime"), _join(op, "baseEjectionTime"))
            pct = 10
            if om.get("maxEjectionPercent") is not None:
                pct = (
                    r.integer(
                        om.get("maxEjectionPercent"),
                        _join(op, "maxEjectionPercent"),
                        lo=0,
                        hi=100,
                        what="maxEjectionPercent",
                    )
                    or 0
                )
            od = OutlierDetection(
                consecutive_5xx=c5,
                interval_ms=interval,
                base_ejection_ms=eject or 30000,
                max_ejection_percent=pct,
            )
            fields["outlier"] = od
            spec["outlierDetection"] = {
                "consecutive5xxErrors": od.consecutive_5xx,
                "interval": format_go_duration(od.interval_ms),
                "baseEjectionTime": format_go_duration(od.base_ejection_ms),
                "maxEjectionPercent": od.max_ejection_percent,
            }
    if r.errors or host is None or service is None:
        raise _Abort
    return UpstreamTrafficSetting(
        namespace=namespace,
        name=name,
        spec_json=_spec_json(spec),
        host=host,
        service=service,
        has_global=has_global or any(x.has_global for x in routes),
        routes=tuple(routes),
        **{k: v for k, v in fields.items() if v is not None},
    )
