"""Validation and normalisation of OSM's policy kinds (``policy.openservicemesh.io/v1alpha1``).

Role: the parsers :mod:`smc.smi._parse` dispatches to for Egress, IngressBackend, Retry and
UpstreamTrafficSetting. OSM manifests are accepted as OSM wrote them (same fields, same
defaults); every problem is reported with its field path, like every other kind. Each parser
also builds the normalised spec (durations as Go durations, CIDRs compressed, lists sorted
where order carries no meaning) kept as ``spec_json``.
SMC extensions, documented in docs/traffic-policy.md: ``UpstreamTrafficSetting.spec.
outlierDetection`` and ``spec.httpRoutes[].timeout``.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any, Literal, cast

from smc.smi._model import IdentityRef
from smc.smi._osm_model import (
    EgressPolicy,
    EgressPort,
    HTTPLocalRateLimit,
    IngressBackendPolicy,
    IngressBackendTarget,
    IngressSource,
    ObjectRef,
    OutlierDetection,
    RetryPolicy,
    RouteSetting,
    TCPLocalRateLimit,
    UpstreamTrafficSetting,
)
from smc.smi._parse import _Abort, _body, _idx, _join, _Reader

__all__ = ["OSM_PARSERS", "format_go_duration"]

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
_RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_UNITS = ("second", "minute", "hour")


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


# ---- Egress -------------------------------------------------------------------------------


def _egress(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> EgressPolicy:
    body, base = _body(
        r,
        obj,
        top_level=False,
        allowed=("sources", "hosts", "ipAddresses", "ports", "matches"),
        required=("sources", "ports"),
    )
    sources: list[IdentityRef] = []
    sp = _join(base, "sources")
    for i, item in enumerate(r.sequence(body.get("sources"), sp, non_empty=True) or ()):
        ref = _service_account(r, item, _idx(sp, i), namespace)
        if ref is not None and ref not in sources:
            sources.append(ref)
    hosts: list[str] = []
    hp = _join(base, "hosts")
    for i, item in enumerate(r.sequence(body.get("hosts"), hp) or ()):
        h = _host(r, item, _idx(hp, i))
        if h is not None and h not in hosts:
            hosts.append(h)
    cidrs: list[str] = []
    ip = _join(base, "ipAddresses")
    for i, item in enumerate(r.sequence(body.get("ipAddresses"), ip) or ()):
        c = _cidr(r, item, _idx(ip, i))
        if c is not None and c not in cidrs:
            cidrs.append(c)
    ports: list[EgressPort] = []
    pp = _join(base, "ports")
    for i, item in enumerate(r.sequence(body.get("ports"), pp, non_empty=True) or ()):
        p = _idx(pp, i)
        m = r.mapping(item, p, allowed=("number", "protocol"), required=("number", "protocol"))
        if m is None:
            continue
        number = r.port(m.get("number"), _join(p, "number"))
        proto = m.get("protocol")
        if proto is not None and proto not in ("http", "https", "tcp"):
            r.fail(_join(p, "protocol"), f"must be one of http, https, tcp, got {proto!r}")
            continue
        if number is None or proto is None:
            continue
        ep = EgressPort(number=number, protocol=proto)
        if any(x.number == number for x in ports):
            r.fail(_join(p, "number"), f"port {number} is listed more than once")
            continue
        ports.append(ep)
    refs, plain = _matches(
        r, body.get("matches"), _join(base, "matches"), ("HTTPRouteGroup", "UpstreamTrafficSetting")
    )
    if not hosts and not cidrs and not refs:
        r.fail(base, "one of hosts, ipAddresses or matches must be given")
    for port in ports:
        if port.protocol in ("http", "https") and not hosts and not refs:
            r.fail(pp, f"port {port.number} is {port.protocol}: hosts must be given")
        if port.protocol == "tcp" and not cidrs:
            r.fail(pp, f"port {port.number} is tcp: ipAddresses must be given")
    if r.errors:
        raise _Abort
    sources.sort(key=lambda s: (s.namespace, s.name))
    ports.sort(key=lambda x: x.number)
    spec: dict[str, Any] = {
        "sources": [
            {"kind": "ServiceAccount", "name": s.name, "namespace": s.namespace} for s in sources
        ],
        "ports": [{"number": x.number, "protocol": x.protocol} for x in ports],
    }
    if hosts:
        spec["hosts"] = sorted(hosts)
    if cidrs:
        spec["ipAddresses"] = sorted(cidrs)
    if plain:
        spec["matches"] = plain
    return EgressPolicy(
        namespace=namespace,
        name=name,
        spec_json=_spec_json(spec),
        sources=tuple(sources),
        hosts=tuple(sorted(hosts)),
        ip_addresses=tuple(sorted(cidrs)),
        ports=tuple(ports),
        matches=tuple(refs),
    )


# ---- IngressBackend -----------------------------------------------------------------------


def _ingress_backend(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> IngressBackendPolicy:
    body, base = _body(
        r,
        obj,
        top_level=False,
        allowed=("backends", "sources", "matches"),
        required=("backends", "sources"),
    )
    backends: list[IngressBackendTarget] = []
    plain_backends: list[dict[str, Any]] = []
    bp = _join(base, "backends")
    for i, item in enumerate(r.sequence(body.get("backends"), bp, non_empty=True) or ()):
        p = _idx(bp, i)
        m = r.mapping(item, p, allowed=("name", "port", "tls"), required=("name", "port"))
        if m is None:
            continue
        bname = r.dns_label(m.get("name"), _join(p, "name"))
        pm = r.mapping(
            m.get("port"),
            _join(p, "port"),
            allowed=("number", "protocol"),
            required=("number", "protocol"),
        )
        number = proto = None
        if pm is not None:
            number = r.port(pm.get("number"), _join(p, "port.number"))
            proto = pm.get("protocol")
            if proto is not None and proto not in ("http", "https"):
                r.fail(_join(p, "port.protocol"), f"must be http or https, got {proto!r}")
                proto = None
        skip = False
        sni: list[str] = []
        tls_plain: dict[str, Any] | None = None
        if m.get("tls") is not None:
            tp = _join(p, "tls")
            tm = r.mapping(m.get("tls"), tp, allowed=("skipClientCertValidation", "sniHosts"))
            if tm is not None:
                if tm.get("skipClientCertValidation") is not None:
                    skip = bool(
                        r.boolean(
                            tm.get("skipClientCertValidation"),
                            _join(tp, "skipClientCertValidation"),
                        )
                    )
                sp = _join(tp, "sniHosts")
                for j, h in enumerate(r.sequence(tm.get("sniHosts"), sp) or ()):
                    hv = _host(r, h, _idx(sp, j))
                    if hv is not None and hv not in sni:
                        sni.append(hv)
                tls_plain = {"skipClientCertValidation": skip}
                if sni:
                    tls_plain["sniHosts"] = sorted(sni)
        if bname is None or number is None or proto is None:
            continue
        if tls_plain is not None and proto != "https":
            r.fail(_join(p, "tls"), "only applies to a backend whose port protocol is https")
            continue
        backends.append(
            IngressBackendTarget(
                name=bname,
                port=number,
                protocol=cast(Literal["http", "https"], proto),
                skip_client_cert_validation=skip,
                sni_hosts=tuple(sorted(sni)),
            )
        )
        entry: dict[str, Any] = {"name": bname, "port": {"number": number, "protocol": proto}}
        if tls_plain is not None:
            entry["tls"] = tls_plain
        plain_backends.append(entry)
    sources: list[IngressSource] = []
    plain_sources: list[dict[str, str]] = []
    sp = _join(base, "sources")
    for i, item in enumerate(r.sequence(body.get("sources"), sp, non_empty=True) or ()):
        p = _idx(sp, i)
        m = r.mapping(item, p, allowed=("kind", "name", "namespace"), required=("kind", "name"))
        if m is None:
            continue
        kind = m.get("kind")
        if kind not in ("Service", "AuthenticatedPrincipal", "IPRange"):
            r.fail(
                _join(p, "kind"),
                f"must be one of Service, AuthenticatedPrincipal, IPRange, got {kind!r}",
            )
            continue
        src_ns = ""
        if kind == "IPRange":
            sname = _cidr(r, m.get("name"), _join(p, "name"))
        elif kind == "AuthenticatedPrincipal":
            sname = r.string(m.get("name"), _join(p, "name"))
        else:
            sname = r.dns_label(m.get("name"), _join(p, "name"))
            if m.get("namespace") is None:
                r.fail(_join(p, "namespace"), "required for a Service source")
                continue
            src_ns = r.dns_label(m.get("namespace"), _join(p, "namespace")) or ""
        if sname is None:
            continue
        src = IngressSource(
            kind=kind,
            name=sname,
            namespace=src_ns,
        )
        if src in sources:
            continue
        sources.append(src)
        plain = {"kind": str(kind), "name": sname}
        if src_ns:
            plain["namespace"] = src_ns
        plain_sources.append(plain)
    refs, plain_matches = _matches(
        r, body.get("matches"), _join(base, "matches"), ("UpstreamTrafficSetting",)
    )
    https = [b for b in backends if b.protocol == "https" and not b.skip_client_cert_validation]
    if https and not any(s.kind == "AuthenticatedPrincipal" for s in sources):
        r.fail(
            sp,
            f"backend {https[0].name!r} is https with client certificate validation: an"
            " AuthenticatedPrincipal source must be given",
        )
    if r.errors:
        raise _Abort
    spec: dict[str, Any] = {
        "backends": sorted(plain_backends, key=lambda b: (b["name"], b["port"]["number"])),
        "sources": sorted(plain_sources, key=lambda s: (s["kind"], s["name"])),
    }
    if plain_matches:
        spec["matches"] = plain_matches
    return IngressBackendPolicy(
        namespace=namespace,
        name=name,
        spec_json=_spec_json(spec),
        backends=tuple(sorted(backends, key=lambda b: (b.name, b.port))),
        sources=tuple(sorted(sources, key=lambda s: (s.kind, s.name))),
        matches=tuple(refs),
    )


# ---- Retry --------------------------------------------------------------------------------


def _retry(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> RetryPolicy:
    body, base = _body(
        r,
        obj,
        top_level=False,
        allowed=("source", "destinations", "retryPolicy"),
        required=("source", "destinations", "retryPolicy"),
    )
    source = None
    if body.get("source") is not None:
        source = _service_account(r, body.get("source"), _join(base, "source"), namespace)
    dests: list[str] = []
    dp = _join(base, "destinations")
    for i, item in enumerate(r.sequence(body.get("destinations"), dp, non_empty=True) or ()):
        p = _idx(dp, i)
        m = r.mapping(item, p, allowed=("kind", "name", "namespace"), required=("kind", "name"))
        if m is None:
            continue
        if m.get("kind") != "Service":
            r.fail(_join(p, "kind"), f"must be Service, got {m.get('kind')!r}")
            continue
        dname = r.dns_label(m.get("name"), _join(p, "name"))
        dns = namespace
        if m.get("namespace") is not None:
            dns = r.dns_label(m.get("namespace"), _join(p, "namespace")) or namespace
        if dname is not None and f"{dns}/{dname}" not in dests:
            dests.append(f"{dns}/{dname}")
    rp = _join(base, "retryPolicy")
    policy = r.mapping(
        body.get("retryPolicy") or {},
        rp,
        allowed=("retryOn", "perTryTimeout", "numRetries", "retryBackoffBaseInterval"),
        required=("retryOn",),
    )
    retry_on = ""
    per_try = num = backoff = None
    if policy is not None:
        raw = r.string(policy.get("retryOn"), _join(rp, "retryOn"))
        if raw is not None:
            parts = [x.strip() for x in raw.split(",") if x.strip()]
            bad = [x for x in parts if x not in _RETRY_ON]
            if bad or not parts:
                r.fail(
                    _join(rp, "retryOn"),
                    f"unknown retry condition {bad[0] if bad else raw!r} (one or more,"
                    f" comma separated, of: {', '.join(sorted(_RETRY_ON))})",
                )
            retry_on = ",".join(dict.fromkeys(parts))
        per_try = _go_duration(r, policy.get("perTryTimeout"), _join(rp, "perTryTimeout"))
        if policy.get("numRetries") is not None:
            num = r.integer(
                policy.get("numRetries"), _join(rp, "numRetries"), lo=0, hi=1000, what="numRetries"
            )
        backoff = _go_duration(
            r, policy.get("retryBackoffBaseInterval"), _join(rp, "retryBackoffBaseInterval")
        )
    if r.errors or source is None:
        raise _Abort
    dests.sort()
    plain: dict[str, Any] = {"retryOn": retry_on}
    if per_try is not None:
        plain["perTryTimeout"] = format_go_duration(per_try)
    if num is not None:
        plain["numRetries"] = num
    if backoff is not None:
        plain["retryBackoffBaseInterval"] = format_go_duration(backoff)
    spec = {
        "source": {"kind": "ServiceAccount", "name": source.name, "namespace": source.namespace},
        "destinations": [
            {"kind": "Service", "name": d.split("/", 1)[1], "namespace": d.split("/", 1)[0]}
            for d in dests
        ],
        "retryPolicy": plain,
    }
    return RetryPolicy(
        namespace=namespace,
        name=name,
        spec_json=_spec_json(spec),
        source=source,
        destinations=tuple(dests),
        retry_on=retry_on,
        per_try_timeout_ms=per_try,
        num_retries=num,
        backoff_base_ms=backoff,
    )


# ---- UpstreamTrafficSetting ---------------------------------------------------------------


def _service_of_host(r: _Reader, host: str, path: str, namespace: str) -> str | None:
    """``name``, ``name.ns``, ``name.ns.svc`` or ``name.ns.svc.cluster.local`` -> ``ns/name``."""
    parts = host.split(".")
    if len(parts) == 1:
        return f"{namespace}/{parts[0]}"
    if len(parts) == 2 or (
        parts[2] == "svc" and (len(parts) == 3 or parts[3:] == ["cluster", "local"])
    ):
        return f"{parts[1]}/{parts[0]}"
    r.fail(path, f"{host!r} is not a mesh service host (name, name.namespace or its FQDN)")
    return None


def _unit(r: _Reader, value: object, path: str) -> str | None:
    if value not in _UNITS:
        r.fail(path, f"must be one of second, minute, hour, got {value!r}")
        return None
    return str(value)


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


OSM_PARSERS: dict[str, Any] = {
    "Egress": _egress,
    "IngressBackend": _ingress_backend,
    "Retry": _retry,
    "UpstreamTrafficSetting": _upstream,
}


# ---- MeshConfig.spec.observability --------------------------------------------------------

#: Where access logs go unless MeshConfig says otherwise.
DEFAULT_ACCESS_LOG_PATH = "/dev/stdout"


def observability_json(r: _Reader, value: object, path: str) -> str:
    """Validate ``MeshConfig.spec.observability`` and return its canonical JSON (defaults
    filled in): ``accessLog`` {enabled, format json|text, path, textFormat} and ``tracing``
    {enabled, provider zipkin|opentelemetry, address, port, endpoint, sampling percent}."""
    m = r.mapping(value, path, allowed=("accessLog", "tracing"))
    if m is None:
        return ""
    out: dict[str, Any] = {}
    ap = _join(path, "accessLog")
    if m.get("accessLog") is not None:
        am = r.mapping(m.get("accessLog"), ap, allowed=("enabled", "format", "path", "textFormat"))
        if am is not None:
            enabled = True
            if am.get("enabled") is not None:
                enabled = bool(r.boolean(am.get("enabled"), _join(ap, "enabled")))
            fmt = am.get("format") or "json"
            if fmt not in ("json", "text"):
                r.fail(_join(ap, "format"), f"must be json or text, got {fmt!r}")
            dest = DEFAULT_ACCESS_LOG_PATH
            if am.get("path") is not None:
                dest = r.string(am.get("path"), _join(ap, "path"), max_len=1024) or dest
                if not dest.startswith("/"):
                    r.fail(_join(ap, "path"), f"must be an absolute file path, got {dest!r}")
            access: dict[str, Any] = {"enabled": enabled, "format": fmt, "path": dest}
            if am.get("textFormat") is not None:
                text = r.string(am.get("textFormat"), _join(ap, "textFormat"), max_len=4096)
                if text is not None and fmt != "text":
                    r.fail(_join(ap, "textFormat"), "only applies when format is text")
                elif text is not None:
                    access["textFormat"] = text if text.endswith("\n") else text + "\n"
            out["accessLog"] = access
    tp = _join(path, "tracing")
    if m.get("tracing") is not None:
        tm = r.mapping(
            m.get("tracing"),
            tp,
            allowed=("enabled", "provider", "address", "port", "endpoint", "sampling"),
            required=("address", "port"),
        )
        if tm is not None:
            enabled = True
            if tm.get("enabled") is not None:
                enabled = bool(r.boolean(tm.get("enabled"), _join(tp, "enabled")))
            provider = tm.get("provider") or "zipkin"
            if provider not in ("zipkin", "opentelemetry"):
                r.fail(_join(tp, "provider"), f"must be zipkin or opentelemetry, got {provider!r}")
            address = tm.get("address")
            addr: str | None = None
            if isinstance(address, str):
                try:
                    addr = ipaddress.ip_address(address).compressed
                except ValueError:
                    addr = _host(r, address, _join(tp, "address"))
            elif address is not None:
                r.fail(_join(tp, "address"), "must be a host name or IP address")
            port = r.port(tm.get("port"), _join(tp, "port"))
            endpoint = "/api/v2/spans"
            if tm.get("endpoint") is not None:
                endpoint = r.string(tm.get("endpoint"), _join(tp, "endpoint")) or endpoint
                if not endpoint.startswith("/"):
                    r.fail(_join(tp, "endpoint"), f"must start with '/', got {endpoint!r}")
            sampling = 100.0
            raw = tm.get("sampling")
            if raw is not None:
                if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 100:
                    r.fail(_join(tp, "sampling"), f"must be a percentage 0-100, got {raw!r}")
                else:
                    sampling = float(raw)
            out["tracing"] = {
                "enabled": enabled,
                "provider": provider,
                "address": addr,
                "port": port,
                "endpoint": endpoint,
                "sampling": sampling,
            }
    return _spec_json(out) if out else ""
