"""Parsing of SMC's own kinds (smc.dev v1alpha1): MeshService, VirtualMachine, MeshConfig.

Role: the parsers :mod:`smc.smi._parse` dispatches to for SMC's kinds, plus the readers they share
with :mod:`smc.smi._vmgroup` (workload ports, service name lists, protocols, durations).
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Literal, cast

from smc.smi._model import (
    MeshConfig,
    MeshService,
    Resource,
    ServicePort,
    VirtualMachine,
    WorkloadPort,
)
from smc.smi._reader import _Abort, _body, _idx, _join, _Reader, _type_name

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


_DURATION_PART = re.compile(r"(\d+)(h|m|s)")


_PROTOCOLS = ("http", "tcp", "grpc", "udp")


def _mesh_service(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> MeshService:
    body, base = _body(
        r, obj, top_level=False, allowed=("ports", "backing", "selector"), required=("ports",)
    )
    ports: list[ServicePort] = []
    pp = _join(base, "ports")
    names: set[str] = set()
    numbers: set[int] = set()
    for i, item in enumerate(r.sequence(body.get("ports"), pp, non_empty=True) or ()):
        p = _idx(pp, i)
        m = r.mapping(
            item, p, allowed=("name", "port", "protocol", "targetPort"), required=("name", "port")
        )
        if m is None:
            continue
        pname = r.dns_label(m.get("name"), _join(p, "name"))
        port = r.port(m.get("port"), _join(p, "port"))
        proto = _protocol(r, m.get("protocol"), _join(p, "protocol"))
        target = port
        if m.get("targetPort") is not None:
            target = r.port(m.get("targetPort"), _join(p, "targetPort"))
        if pname is None or port is None or proto is None or target is None:
            continue
        if pname in names:
            r.fail(_join(p, "name"), f"duplicate port name {pname!r}")
            continue
        if port in numbers:
            r.fail(_join(p, "port"), f"duplicate port {port}")
            continue
        names.add(pname)
        numbers.add(port)
        ports.append(ServicePort(name=pname, port=port, protocol=proto, target_port=target))
    backing = body.get("backing") or "kubernetes"
    if backing not in ("kubernetes", "vm"):
        r.fail(_join(base, "backing"), f"must be kubernetes or vm, got {backing!r}")
    selector = r.labels(body.get("selector"), _join(base, "selector"))
    if r.errors:
        raise _Abort
    return MeshService(
        namespace=namespace,
        name=name,
        ports=tuple(ports),
        backing=cast(Literal["kubernetes", "vm"], backing),
        selector=selector or (),
    )


def _protocol(r: _Reader, value: object, path: str) -> Literal["http", "tcp", "grpc", "udp"] | None:
    if value is None:
        return "http"
    if value not in _PROTOCOLS:
        r.fail(path, f"must be one of {', '.join(_PROTOCOLS)}, got {value!r}")
        return None
    return cast(Literal["http", "tcp", "grpc", "udp"], value)


def _workload_ports(r: _Reader, value: object, pp: str) -> list[WorkloadPort]:
    """A workload's ``ports`` list (VirtualMachine, VirtualMachineGroup template)."""
    ports: list[WorkloadPort] = []
    seen: set[int] = set()
    names: set[str] = set()
    for i, item in enumerate(r.sequence(value, pp) or ()):
        p = _idx(pp, i)
        m = r.mapping(item, p, allowed=("name", "port", "protocol"), required=("name", "port"))
        if m is None:
            continue
        pname = r.dns_label(m.get("name"), _join(p, "name"))
        port = r.port(m.get("port"), _join(p, "port"))
        proto = _protocol(r, m.get("protocol"), _join(p, "protocol"))
        if pname is None or port is None or proto is None:
            continue
        if port in seen or pname in names:
            r.fail(p, f"duplicate port {pname!r}/{port}")
            continue
        seen.add(port)
        names.add(pname)
        ports.append(WorkloadPort(name=pname, port=port, protocol=proto))
    return ports


def _unique_names(
    r: _Reader, value: object, sp: str, read: Callable[[object, str], str | None]
) -> list[str]:
    """A list of service names, each read by ``read`` and listed once."""
    services: list[str] = []
    for i, item in enumerate(r.sequence(value, sp) or ()):
        s = read(item, _idx(sp, i))
        if s is None:
            continue
        if s in services:
            r.fail(_idx(sp, i), f"service {s!r} is listed more than once")
            continue
        services.append(s)
    return services


def _virtual_machine(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> VirtualMachine:
    body, base = _body(
        r,
        obj,
        top_level=False,
        allowed=("address", "ports", "serviceAccount", "services"),
        required=("address", "serviceAccount"),
    )
    labels: tuple[tuple[str, str], ...] | None = ()
    meta = obj.get("metadata")
    if isinstance(meta, Mapping):
        labels = r.labels(meta.get("labels"), "metadata.labels")
    address: str | None = None
    ap = _join(base, "address")
    raw_addr = r.string(body.get("address"), ap, max_len=64)
    if raw_addr is not None:
        try:
            address = ipaddress.ip_address(raw_addr).compressed
        except ValueError:
            r.fail(ap, f"{raw_addr!r} is not an IPv4 or IPv6 address")
    sa = r.dns_subdomain(body.get("serviceAccount"), _join(base, "serviceAccount"))
    ports = _workload_ports(r, body.get("ports"), _join(base, "ports"))
    services = _unique_names(r, body.get("services"), _join(base, "services"), r.dns_subdomain)
    if r.errors or address is None or sa is None:
        raise _Abort
    return VirtualMachine(
        namespace=namespace,
        name=name,
        address=address,
        ports=tuple(ports),
        service_account=sa,
        labels=labels or (),
        services=tuple(sorted(services)),
    )


def _mesh_config(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> MeshConfig:
    body, base = _body(
        r,
        obj,
        top_level=False,
        allowed=(
            "permissiveTrafficMode",
            "trustDomain",
            "certificateLifetime",
            "enableEgress",
            "observability",
        ),
        spec_required=False,
    )
    enable_egress = True
    if body.get("enableEgress") is not None:
        enable_egress = bool(r.boolean(body.get("enableEgress"), _join(base, "enableEgress")))
    observability = ""
    if body.get("observability") is not None:
        from smc.smi._osm_parse import observability_json

        observability = observability_json(
            r, body.get("observability"), _join(base, "observability")
        )
    permissive = False
    if body.get("permissiveTrafficMode") is not None:
        permissive = bool(
            r.boolean(body.get("permissiveTrafficMode"), _join(base, "permissiveTrafficMode"))
        )
    trust_domain = "cluster.local"
    if body.get("trustDomain") is not None:
        tp = _join(base, "trustDomain")
        td = r.string(body.get("trustDomain"), tp, max_len=255)
        if td is not None and not _TRUST_DOMAIN.match(td):
            r.fail(tp, f"{td!r} is not a valid SPIFFE trust domain (a-z, 0-9, '.', '-', '_')")
        elif td is not None:
            trust_domain = td
    lifetime = 86400
    if body.get("certificateLifetime") is not None:
        lp = _join(base, "certificateLifetime")
        seconds = _duration(r, body.get("certificateLifetime"), lp)
        if seconds is not None:
            if not 60 <= seconds <= 366 * 86400:
                r.fail(lp, f"must be between 1m and 8784h, got {seconds}s")
            else:
                lifetime = seconds
    if r.errors:
        raise _Abort
    return MeshConfig(
        namespace=namespace,
        name=name,
        permissive_traffic_mode=permissive,
        trust_domain=trust_domain,
        certificate_lifetime_seconds=lifetime,
        enable_egress=enable_egress,
        observability=observability,
    )


def _duration(r: _Reader, value: object, path: str) -> int | None:
    """A Go-style duration of whole seconds: ``24h``, ``1h30m``, ``90s``."""
    if not isinstance(value, str) or not value:
        r.fail(path, f"must be a duration string such as 24h or 90m, got {_type_name(value)}")
        return None
    pos = 0
    total = 0
    units = {"h": 3600, "m": 60, "s": 1}
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            break
        total += int(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(value) or pos == 0:
        r.fail(path, f"{value!r} is not a duration such as 24h, 1h30m or 90s")
        return None
    return total


def _vm_group(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> Resource:
    from smc.smi._vmgroup import parse_vm_group  # its own module (imports this one)

    return parse_vm_group(r, obj, version, namespace, name)
