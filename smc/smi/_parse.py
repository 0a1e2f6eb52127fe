"""Validation and normalisation of one decoded manifest into the internal model.

Role: ``parse_manifest`` takes one decoded document (a mapping) and returns the model object,
applying the rules of the manifest's exact API version (field layout, which fields exist, how
weights and headers are written) and collecting every problem with its field path.
Each kind's parser lives in its own module (``_parse_access``: TrafficTarget; ``_parse_specs``:
route groups; ``_parse_split``: TrafficSplit; ``_parse_smc``: SMC's kinds; ``_osm_*``: OSM's
kinds) over the shared field readers of ``_reader``; the readers other parsers used to import
from here (``_body``, ``_join``, ``_idx``, ``_duration``, ...) are still importable from here.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from smc.smi._errors import ManifestErrors
from smc.smi._model import Resource
from smc.smi._osm_parse import OSM_PARSERS
from smc.smi._parse_access import _traffic_target
from smc.smi._parse_smc import _duration as _duration
from smc.smi._parse_smc import _mesh_config, _mesh_service, _virtual_machine, _vm_group
from smc.smi._parse_smc import _unique_names as _unique_names
from smc.smi._parse_smc import _workload_ports as _workload_ports
from smc.smi._parse_specs import _http_route_group, _tcp_route, _udp_route
from smc.smi._parse_split import _traffic_split
from smc.smi._reader import ACCESS, OSM, SMC, SPECS, SPLIT, _Abort, _Reader, _type_name
from smc.smi._reader import _body as _body
from smc.smi._reader import _idx as _idx
from smc.smi._reader import _join as _join

__all__ = ["SUPPORTED", "parse_manifest"]

# kind -> the apiVersions that serve it, oldest first (the last one is the canonical one).
SUPPORTED: dict[str, tuple[str, ...]] = {
    "TrafficTarget": tuple(f"{ACCESS}/{v}" for v in ("v1alpha1", "v1alpha2", "v1alpha3")),
    "HTTPRouteGroup": tuple(f"{SPECS}/v1alpha{i}" for i in range(1, 5)),
    "TCPRoute": tuple(f"{SPECS}/v1alpha{i}" for i in range(1, 5)),
    "UDPRoute": (f"{SPECS}/v1alpha4",),
    "TrafficSplit": tuple(f"{SPLIT}/v1alpha{i}" for i in range(1, 5)),
    "MeshService": (f"{SMC}/v1alpha1",),
    "VirtualMachine": (f"{SMC}/v1alpha1",),
    "MeshConfig": (f"{SMC}/v1alpha1",),
    # Open Service Mesh's policy kinds (smc/smi/_osm_parse.py).
    "Egress": (f"{OSM}/v1alpha1",),
    "IngressBackend": (f"{OSM}/v1alpha1",),
    "Retry": (f"{OSM}/v1alpha1",),
    "UpstreamTrafficSetting": (f"{OSM}/v1alpha1",),
    "VirtualMachineGroup": (f"{SMC}/v1alpha1",),
}


def parse_manifest(obj: Mapping[str, object], *, document: str) -> Resource:
    """Validate one decoded manifest and return its normalised model object.

    ``document`` labels the document in errors (e.g. ``mesh.yaml#2``). Raises
    :class:`ManifestErrors` listing every problem found (field path and reason each).
    """
    r = _Reader(document)
    result: Resource | None = None
    with contextlib.suppress(_Abort):
        result = _parse(r, obj)
    if r.errors or result is None:
        if not r.errors:  # pragma: no cover - defensive: a parser returned nothing silently
            r.fail("", "document could not be read")
        raise ManifestErrors(tuple(r.errors))
    return result


def _parse(r: _Reader, obj: object) -> Resource:
    if not isinstance(obj, Mapping):
        r.fatal("", f"a manifest must be a mapping, got {_type_name(obj)}")
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        r.fatal("kind", "required field is missing or not a string")
    r.kind = kind
    meta = obj.get("metadata")
    namespace, name = _metadata(r, meta)
    if name is not None:
        r.name = f"{namespace}/{name}"
    if not isinstance(api_version, str) or not api_version:
        r.fatal("apiVersion", "required field is missing or not a string")
    versions = SUPPORTED.get(kind)
    if versions is None:
        r.fatal("kind", f"unknown kind {kind!r} (supported: {', '.join(SUPPORTED)})")
    if api_version not in versions:
        served = [k for k, vs in SUPPORTED.items() if api_version in vs]
        hint = (
            f"; {api_version} serves {', '.join(served)}"
            if served
            else f"; unknown apiVersion {api_version!r}"
        )
        r.fatal(
            "apiVersion",
            f"{kind} is not served by {api_version} (supported: {', '.join(versions)}){hint}",
        )
    version = api_version.rsplit("/", 1)[1]
    if name is None:
        raise _Abort
    parser = _PARSERS[kind]
    return parser(r, obj, version, namespace, name)


def _metadata(r: _Reader, meta: object) -> tuple[str, str | None]:
    if not isinstance(meta, Mapping):
        r.fail("metadata", f"required mapping is missing (got {_type_name(meta)})")
        return "default", None
    name = r.dns_subdomain(meta.get("name"), "metadata.name")
    ns_value = meta.get("namespace")
    namespace = "default"
    if ns_value is not None:
        ns = r.dns_label(ns_value, "metadata.namespace")
        if ns is None:
            return "default", None
        namespace = ns
    return namespace, name


_PARSERS: dict[str, Callable[[_Reader, Mapping[str, object], str, str, str], Resource]] = {
    "TrafficTarget": _traffic_target,
    "HTTPRouteGroup": _http_route_group,
    "TCPRoute": _tcp_route,
    "UDPRoute": _udp_route,
    "TrafficSplit": _traffic_split,
    "MeshService": _mesh_service,
    "VirtualMachine": _virtual_machine,
    "MeshConfig": _mesh_config,
    "VirtualMachineGroup": _vm_group,
}
_PARSERS.update(OSM_PARSERS)
