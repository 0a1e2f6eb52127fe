"""Parsers of OSM's Egress and IngressBackend policies (who may reach what).

Role: validate and normalise ``Egress`` (sources, hosts, ipAddresses, ports, matches) and
``IngressBackend`` (backends, sources, matches) manifests as OSM wrote them, reporting every
problem with its field path, and build each policy's canonical ``spec_json``. Dispatched to via
:data:`smc.smi._osm_parse.OSM_PARSERS`.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

from smc.smi._osm_common import _cidr, _distinct, _host, _matches, _service_account, _spec_json
from smc.smi._osm_model import (
    EgressPolicy,
    EgressPort,
    IngressBackendPolicy,
    IngressBackendTarget,
    IngressSource,
)
from smc.smi._reader import _Abort, _body, _idx, _join, _Reader

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
    sources = _distinct(
        r,
        body.get("sources"),
        _join(base, "sources"),
        lambda item, path: _service_account(r, item, path, namespace),
        non_empty=True,
    )
    hosts = _distinct(r, body.get("hosts"), _join(base, "hosts"), lambda v, at: _host(r, v, at))
    cidrs = _distinct(
        r, body.get("ipAddresses"), _join(base, "ipAddresses"), lambda v, at: _cidr(r, v, at)
    )
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
                sni = _distinct(
                    r, tm.get("sniHosts"), _join(tp, "sniHosts"), lambda v, at: _host(r, v, at)
                )
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
