"""Reading the fields of one manifest: the shared field readers every kind's parser uses.

Role: ``_Reader`` collects the problems of one document (field path and reason each) while its
fields are read as mappings, lists, strings, DNS names, integers, ports, booleans, RE2-compatible
regular expressions and labels; ``_body`` finds a kind's fields (top level or under ``spec``); the
API group names live here too. Used by :mod:`smc.smi._parse` and the per-kind parser modules.
Concurrency: a ``_Reader`` belongs to one parse call; the rest are pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NoReturn, cast

from smc.smi._errors import ManifestError

ACCESS = "access.smi-spec.io"


SPECS = "specs.smi-spec.io"


SPLIT = "split.smi-spec.io"


SMC = "smc.dev"


OSM = "policy.openservicemesh.io"


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


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
