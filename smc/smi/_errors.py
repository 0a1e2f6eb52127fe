"""Exceptions of the SMI package.

Role: every deliberate failure of :mod:`smc.smi` (a manifest that cannot be read, a field that
breaks the spec, a reference that does not resolve) is one of these, each naming the document,
the field path and the reason so a user can fix the input without reading code.
Concurrency: plain immutable exception objects; safe to share between threads and tasks.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["ManifestError", "ManifestErrors", "SmiError"]


class SmiError(SMCError):
    """Base class of every error raised by :mod:`smc.smi`."""


class ManifestError(SmiError):
    """One problem in one document.

    ``document`` names where the document came from (source and index, e.g. ``mesh.yaml#2``),
    ``kind``/``name`` identify the resource when they could be read (``name`` is ``ns/name``),
    ``path`` is the field path (``spec.backends[1].weight``; empty for the whole document) and
    ``reason`` says what is wrong.
    """

    document: str
    path: str
    reason: str
    kind: str | None
    name: str | None

    def __init__(
        self,
        *,
        document: str,
        path: str,
        reason: str,
        kind: str | None = None,
        name: str | None = None,
    ) -> None:
        self.document = document
        self.path = path
        self.reason = reason
        self.kind = kind
        self.name = name
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.document
        if self.kind is not None or self.name is not None:
            ident = "/".join(p for p in (self.kind, self.name) if p)
            where = f"{where} ({ident})"
        field = f" field {self.path}:" if self.path else ""
        return f"{where}:{field} {self.reason}"

    def __reduce__(self) -> tuple[object, ...]:  # keep pickling/copying working with kw-only init
        return (
            _rebuild_manifest_error,
            (self.document, self.path, self.reason, self.kind, self.name),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ManifestError):
            return NotImplemented
        return (self.document, self.path, self.reason, self.kind, self.name) == (
            other.document,
            other.path,
            other.reason,
            other.kind,
            other.name,
        )

    def __hash__(self) -> int:
        return hash((self.document, self.path, self.reason, self.kind, self.name))

    def as_dict(self) -> dict[str, str | None]:
        """A JSON-friendly form (for the HTTP API and ``smc apply`` output)."""
        return {
            "document": self.document,
            "kind": self.kind,
            "name": self.name,
            "path": self.path,
            "reason": self.reason,
            "message": str(self),
        }


def _rebuild_manifest_error(
    document: str, path: str, reason: str, kind: str | None, name: str | None
) -> ManifestError:
    return ManifestError(document=document, path=path, reason=reason, kind=kind, name=name)


class ManifestErrors(SmiError):
    """Every problem found in one document; raised by :func:`smc.smi.parse_manifest`."""

    errors: tuple[ManifestError, ...]

    def __init__(self, errors: tuple[ManifestError, ...]) -> None:
        if not errors:
            raise ValueError("ManifestErrors needs at least one error")
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))
