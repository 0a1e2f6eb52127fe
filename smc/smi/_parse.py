"""Validation and normalisation of one decoded manifest into the internal model.

Role: ``parse_manifest`` takes one decoded document (a mapping) and returns the model object,
applying the rules of the manifest's exact API version (field layout, which fields exist, how
weights and headers are written) and collecting every problem with its field path.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, Literal, NoReturn, cast

from smc.smi._errors import ManifestError, ManifestErrors
from smc.smi._model import (
    Backend,
    HTTPMatch,
    HTTPRouteGroup,
    IdentityRef,
    MeshConfig,
    MeshService,
    Resource,
    RouteRef,
    RuleRef,
    ServicePort,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    VirtualMachine,
    WorkloadPort,
)

__all__ = ["SUPPORTED", "parse_manifest"]

ACCESS = "access.smi-spec.io"
SPECS = "specs.smi-spec.io"
SPLIT = "split.smi-spec.io"
SMC = "smc.dev"
OSM = "policy.openservicemesh.io"

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

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HTTP_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_DURATION_PART = re.compile(r"(\d+)(h|m|s)")
_QUANTITY = re.compile(
    r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$"
)
_QUANTITY_SUFFIX: dict[str, Fraction] = {
    "": Fraction(1),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
_MAX_WEIGHT = 2**31 - 1
_PROTOCOLS = ("http", "tcp", "grpc", "udp")
_UNSUPPORTED_REGEX = (
    (re.compile(r"\(\?[=!]"), "lookahead"),
    (re.compile(r"\(\?<[=!]"), "lookbehind"),
    (re.compile(r"\(\?>"), "atomic group"),
    (re.compile(r"(?<!\\)\\[1-9]"), "backreference"),
    (re.compile(r"\(\?P="), "backreference"),
    (re.compile(r"[*+?}]\+"), "possessive quantifier"),
)


class _Abort(Exception):
    """Internal: stop reading a document after a fatal problem (already recorded)."""


class _Reader:
    """Collects the problems of one document while its fields are read."""

    def __init__(self, document: str) -> None:
        self.document = document
        self.kind: str | None = None
        self.name: str | None = None
        self.errors: list[ManifestError] = []

    def fail(self, path: str, reason: str) -> None:
        self.errors.append(
            ManifestError(
                document=self.document, path=path, reason=reason, kind=self.kind, name=self.name
            )
        )

    def fatal(self, path: str, reason: str) -> NoReturn:
        self.fail(path, reason)
        raise _Abort

    # ---- shapes -------------------------------------------------------------------------

    def mapping(
        self,
        value: object,
        path: str,
        *,
        allowed: Sequence[str],
        required: Sequence[str] = (),
    ) -> Mapping[str, object] | None:
        """The mapping, with unknown and missing fields reported (None: not a mapping at all)."""
        if not isinstance(value, Mapping):
            self.fail(path, f"must be a mapping, got {_type_name(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {_type_name(key)} {key!r}")
            elif key not in allowed:
                self.fail(
                    _join(path, key),
                    f"unknown field (allowed here: {', '.join(allowed) or 'none'})",
                )
        for key in required:
            if value.get(key) is None:
                self.fail(_join(path, key), "required field is missing")
        return cast(Mapping[str, object], value)

    def sequence(self, value: object, path: str, *, non_empty: bool = False) -> list[object] | None:
        if value is None:
            return []
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            self.fail(path, f"must be a list, got {_type_name(value)}")
            return None
        if non_empty and not value:
            self.fail(path, "must have at least one entry")
            return None
        return list(value)

    def string(self, value: object, path: str, *, max_len: int = 253) -> str | None:
        if value is None:
            return None  # a missing required field was reported by mapping()
        if not isinstance(value, str):
            self.fail(path, f"must be a string, got {_type_name(value)}")
            return None
        if not value:
            self.fail(path, "must not be empty")
            return None
        if len(value) > max_len:
            self.fail(path, f"must be at most {max_len} characters, got {len(value)}")
            return None
        return value

    def dns_label(self, value: object, path: str) -> str | None:
        s = self.string(value, path, max_len=63)
        if s is not None and not _DNS_LABEL.match(s):
            self.fail(path, f"{s!r} is not a valid DNS-1123 label (lower-case a-z, 0-9, '-')")
            return None
        return s

    def dns_subdomain(self, value: object, path: str) -> str | None:
        s = self.string(value, path, max_len=253)
        if s is not None and not _DNS_SUBDOMAIN.match(s):
            self.fail(
                path, f"{s!r} is not a valid DNS-1123 subdomain (lower-case a-z, 0-9, '-', '.')"
            )
            return None
        return s

    def integer(self, value: object, path: str, *, lo: int, hi: int, what: str) -> int | None:
        if value is None:
            return None  # a missing required field was reported by mapping()
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"{what} must be a whole number, got {_type_name(value)} {value!r}")
            return None
        if isinstance(value, float):
            if not value.is_integer():
                self.fail(path, f"{what} must be a whole number, got {value!r}")
                return None
            value = int(value)
        if not lo <= value <= hi:
            self.fail(path, f"{what} must be between {lo} and {hi}, got {value}")
            return None
        return value

    def port(self, value: object, path: str) -> int | None:
        return self.integer(value, path, lo=1, hi=65535, what="port")

    def boolean(self, value: object, path: str) -> bool | None:
        if value is None:
            return None  # a missing required field was reported by mapping()
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {_type_name(value)} {value!r}")
            return None
        return value

    def regex(self, value: object, path: str) -> str | None:
        s = self.string(value, path, max_len=4096)
        if s is None:
            return None
        try:
            re.compile(s)
        except re.error as exc:
            self.fail(path, f"invalid regular expression {s!r}: {exc}")
            return None
        for pattern, what in _UNSUPPORTED_REGEX:
            if pattern.search(s):
                self.fail(
                    path, f"regular expression {s!r} uses a {what}, which RE2 does not support"
                )
                return None
        return s

    def labels(self, value: object, path: str) -> tuple[tuple[str, str], ...] | None:
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            self.fail(path, f"must be a mapping of label name to value, got {_type_name(value)}")
            return None
        out: list[tuple[str, str]] = []
        ok = True
        for k, v in value.items():
            p = _join(path, str(k))
            if not isinstance(k, str) or not _valid_label_key(k):
                self.fail(p, f"invalid label name {k!r}")
                ok = False
                continue
            if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
                self.fail(p, f"invalid label value {v!r} (a string of at most 63 characters)")
                ok = False
                continue
            out.append((k, v))
        return tuple(sorted(out)) if ok else None


def _valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _idx(path: str, i: int) -> str:
    return f"{path}[{i}]"


# ---- entry point ------------------------------------------------------------------------


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


def _body(
    r: _Reader,
    obj: Mapping[str, object],
    *,
    top_level: bool,
    allowed: Sequence[str],
    required: Sequence[str] = (),
    spec_required: bool = True,
) -> tuple[Mapping[str, object], str]:
    """The mapping holding the resource's fields and its path prefix.

    Early SMI versions put fields at the top level of the object; later ones under ``spec``.
    """
    base = ("apiVersion", "kind", "metadata", "status")
    if top_level:
        m = r.mapping(obj, "", allowed=(*base, *allowed), required=required)
        if m is None:
            raise _Abort
        return m, ""
    top = r.mapping(obj, "", allowed=(*base, "spec"), required=("spec",) if spec_required else ())
    if top is None:
        raise _Abort
    spec = top.get("spec")
    if spec is None:
        spec = {}
    m = r.mapping(spec, "spec", allowed=allowed, required=required)
    if m is None:
        raise _Abort
    return m, "spec"


# ---- TrafficTarget ------------------------------------------------------------------------


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


# ---- specs: HTTPRouteGroup, TCPRoute, UDPRoute ------------------------------------------------


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


# ---- TrafficSplit ---------------------------------------------------------------------------


def _traffic_split(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> TrafficSplit:
    allowed: tuple[str, ...] = ("service", "backends")
    if version in ("v1alpha3", "v1alpha4"):
        allowed = (*allowed, "matches")
    body, base = _body(r, obj, top_level=False, allowed=allowed, required=("service", "backends"))
    service = r.dns_subdomain(body.get("service"), _join(base, "service"))
    bp = _join(base, "backends")
    items = r.sequence(body.get("backends"), bp, non_empty=True)
    raw: list[tuple[str, Fraction, str]] = []
    names: set[str] = set()
    for i, item in enumerate(items or ()):
        p = _idx(bp, i)
        m = r.mapping(item, p, allowed=("service", "weight"), required=("service", "weight"))
        if m is None:
            continue
        svc = r.dns_subdomain(m.get("service"), _join(p, "service"))
        weight = _weight(r, m.get("weight"), _join(p, "weight"), quantity=version == "v1alpha1")
        if svc is not None and svc in names:
            r.fail(_join(p, "service"), f"backend {svc!r} is listed more than once")
            continue
        if svc is not None:
            names.add(svc)
        if svc is None or weight is None:
            continue
        raw.append((svc, weight, p))
    backends = _scale_weights(r, raw, bp)
    if backends and sum(b.weight for b in backends) == 0:
        r.fail(bp, "the weights sum to zero: no traffic could be routed")
    matches: list[RouteRef] = []
    if body.get("matches") is not None:
        mp = _join(base, "matches")
        for i, item in enumerate(r.sequence(body.get("matches"), mp) or ()):
            p = _idx(mp, i)
            m = r.mapping(item, p, allowed=("apiGroup", "kind", "name"), required=("kind", "name"))
            if m is None:
                continue
            if m.get("kind") is None:
                continue
            if m.get("kind") != "HTTPRouteGroup":
                r.fail(
                    _join(p, "kind"),
                    f"a TrafficSplit may only match HTTPRouteGroup resources, got {m['kind']!r}",
                )
                continue
            group = m.get("apiGroup")
            if group is not None and group != SPECS:
                r.fail(_join(p, "apiGroup"), f"must be {SPECS}, got {group!r}")
                continue
            ref_name = r.dns_subdomain(m.get("name"), _join(p, "name"))
            if ref_name is None:
                continue
            ref = RouteRef(name=ref_name)
            if ref in matches:
                r.fail(p, f"HTTPRouteGroup {ref_name!r} is listed more than once")
                continue
            matches.append(ref)
    if service is None or r.errors:
        raise _Abort
    return TrafficSplit(
        namespace=namespace,
        name=name,
        service=service,
        backends=tuple(backends),
        matches=tuple(matches),
    )


def _weight(r: _Reader, value: object, path: str, *, quantity: bool) -> Fraction | None:
    if value is None:
        return None  # reported as missing by mapping()
    if quantity:
        # split v1alpha1: a Kubernetes resource.Quantity ("100", 100, "500m", "1k").
        if isinstance(value, bool):
            r.fail(path, f"weight must be a quantity, got boolean {value!r}")
            return None
        if isinstance(value, int):
            q = Fraction(value)
        elif isinstance(value, float):
            q = Fraction(str(value))
        elif isinstance(value, str):
            mq = _QUANTITY.match(value.strip())
            if mq is None:
                r.fail(path, f"weight {value!r} is not a Kubernetes quantity (e.g. 100, 500m, 1k)")
                return None
            sign, digits, suffix = mq.group(1), mq.group(2), mq.group(3) or ""
            if suffix[:1] in ("e", "E"):
                exp = int(suffix[1:])
                if abs(exp) > 30:
                    r.fail(path, f"weight {value!r} is out of range")
                    return None
                mult = Fraction(10) ** exp
            else:
                mult = _QUANTITY_SUFFIX[suffix]
            q = Fraction(digits) * mult * (-1 if sign == "-" else 1)
        else:
            r.fail(path, f"weight must be a quantity, got {_type_name(value)}")
            return None
        if q < 0:
            r.fail(path, f"weight must not be negative, got {value!r}")
            return None
        if q > _MAX_WEIGHT:
            r.fail(path, f"weight must be at most {_MAX_WEIGHT}, got {value!r}")
            return None
        return q
    w = r.integer(value, path, lo=0, hi=_MAX_WEIGHT, what="weight")
    return None if w is None else Fraction(w)


def _scale_weights(r: _Reader, raw: list[tuple[str, Fraction, str]], path: str) -> list[Backend]:
    """Whole-number weights with the same ratios (v1alpha1 quantities may be fractional)."""
    lcm = 1
    for _, w, _ in raw:
        d = w.denominator
        lcm = lcm * d // _gcd(lcm, d)
    out: list[Backend] = []
    for svc, w, p in raw:
        scaled = w * lcm
        if scaled > _MAX_WEIGHT:
            r.fail(
                _join(p, "weight"),
                "fractional weights cannot be scaled to whole numbers within range",
            )
            return []
        out.append(Backend(service=svc, weight=int(scaled)))
    if lcm != 1 and out:
        g = 0
        for b in out:
            g = _gcd(g, b.weight)
        if g > 1:
            out = [Backend(service=b.service, weight=b.weight // g) for b in out]
    return out


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# ---- SMC kinds ----------------------------------------------------------------------------


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

from smc.smi._osm_parse import OSM_PARSERS  # noqa: E402  (it reads this module's _Reader)

_PARSERS.update(OSM_PARSERS)
