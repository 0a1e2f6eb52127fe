"""Reading manifest files: multi-document YAML or JSON text into model objects.

Role: ``load_documents`` splits text into documents the way kubectl does (``---`` lines), decodes
each one with a safe loader under hard limits (document size, nesting depth, node count with
aliases expanded, recursive aliases, duplicate keys), then validates it with ``parse_manifest``.
Every document stands alone: a broken one yields errors, the others still come through.
Concurrency: pure functions over the given text; safe everywhere (no I/O, no globals mutated).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from smc.smi._errors import ManifestError, ManifestErrors
from smc.smi._model import Resource
from smc.smi._parse import parse_manifest

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_NODES",
    "LoadResult",
    "load_documents",
]

MAX_DOCUMENT_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 100

# libyaml when present: its parser is iterative, so a depth pre-scan on events is safe.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_SEPARATOR = re.compile(r"^---(?=[ \t\r]|$)", re.MULTILINE)
_END = re.compile(r"^\.\.\.[ \t\r]*$", re.MULTILINE)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadResult:
    """The outcome of reading one source: valid resources (in order) and every error."""

    resources: tuple[Resource, ...]
    errors: tuple[ManifestError, ...]

    @property
    def ok(self) -> bool:
        """True when no document had a problem."""
        return not self.errors


class _DocumentRejected(Exception):
    def __init__(self, reason: str, path: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


def load_documents(
    text: str,
    *,
    source: str,
    max_document_bytes: int = MAX_DOCUMENT_BYTES,
    max_nodes: int = MAX_NODES,
    max_depth: int = MAX_DEPTH,
) -> LoadResult:
    """Decode and validate every document of ``text`` (YAML stream or JSON).

    ``source`` names the input in errors (a file name, ``-`` for stdin, ``request``); document
    labels are ``source#N`` with N counted from 1. Empty documents are skipped. A JSON array or
    a ``kind: List`` document contributes one resource per item (``source#N.items[i]``).
    """
    resources: list[Resource] = []
    errors: list[ManifestError] = []
    for label, obj in _documents(text, source, errors, max_document_bytes, max_nodes, max_depth):
        if obj is None:
            continue
        for item_label, item in _expand_list(label, obj, errors):
            try:
                resources.append(parse_manifest(item, document=item_label))
            except ManifestErrors as exc:
                errors.extend(exc.errors)
    return LoadResult(resources=tuple(resources), errors=tuple(errors))


def _expand_list(
    label: str, obj: object, errors: list[ManifestError]
) -> Iterator[tuple[str, Mapping[str, object]]]:
    items: object
    if isinstance(obj, list):
        items, prefix = obj, f"{label}"
    elif isinstance(obj, Mapping) and obj.get("kind") == "List" and "items" in obj:
        items, prefix = obj["items"], f"{label}.items"
        if not isinstance(items, list):
            errors.append(
                ManifestError(document=label, path="items", reason="must be a list", kind="List")
            )
            return
    else:
        if not isinstance(obj, Mapping):
            errors.append(
                ManifestError(
                    document=label,
                    path="",
                    reason=f"a manifest must be a mapping, got {type(obj).__name__}",
                )
            )
            return
        yield label, obj
        return
    for i, item in enumerate(items):
        item_label = f"{prefix}[{i}]"
        if not isinstance(item, Mapping):
            errors.append(
                ManifestError(
                    document=item_label,
                    path="",
                    reason=f"a manifest must be a mapping, got {type(item).__name__}",
                )
            )
            continue
        yield item_label, item


def _documents(
    text: str,
    source: str,
    errors: list[ManifestError],
    max_bytes: int,
    max_nodes: int,
    max_depth: int,
) -> Iterator[tuple[str, object]]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        label = f"{source}#1"
        try:
            yield label, _decode_json(text, max_bytes, max_nodes, max_depth)
            return
        except _DocumentRejected as exc:
            if exc.path != "json":
                errors.append(ManifestError(document=label, path=exc.path, reason=exc.reason))
                return
            # Not valid JSON: fall through to YAML (flow-style YAML also starts with { or [).
    for n, chunk in enumerate(_split(text), start=1):
        label = f"{source}#{n}"
        try:
            yield label, _decode_yaml(chunk, max_bytes, max_nodes, max_depth)
        except _DocumentRejected as exc:
            errors.append(ManifestError(document=label, path=exc.path, reason=exc.reason))


def _split(text: str) -> list[str]:
    """Split a YAML stream at ``---`` lines (kept with their document) and ``...`` lines."""
    text = _END.sub("", text)
    starts = [m.start() for m in _SEPARATOR.finditer(text)]
    bounds = [0, *starts, len(text)]
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    if chunks and not chunks[0].strip("\n\r\t ") and len(chunks) > 1:
        chunks = chunks[1:]  # text before the first '---' is only whitespace/empty
    elif chunks and _only_comments(chunks[0]) and len(chunks) > 1:
        chunks = chunks[1:]
    return chunks


def _only_comments(chunk: str) -> bool:
    return all(
        not line.strip() or line.lstrip().startswith(("#", "%")) for line in chunk.splitlines()
    )


def _decode_json(text: str, max_bytes: int, max_nodes: int, max_depth: int) -> object:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise _DocumentRejected(f"document is {size} bytes, larger than the limit of {max_bytes}")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _DocumentRejected(f"document is nested deeper than {max_depth} levels") from None
    except ValueError:
        raise _DocumentRejected("not JSON", path="json") from None
    _check_tree(obj, max_nodes, max_depth)
    return obj


def _check_tree(obj: object, max_nodes: int, max_depth: int) -> None:
    stack: list[tuple[object, int]] = [(obj, 1)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise _DocumentRejected(f"document has more than {max_nodes} nodes")
        if depth > max_depth:
            raise _DocumentRejected(f"document is nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            count += len(value)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _decode_yaml(chunk: str, max_bytes: int, max_nodes: int, max_depth: int) -> object:
    size = len(chunk.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise _DocumentRejected(f"document is {size} bytes, larger than the limit of {max_bytes}")
    if _bounded(chunk, max_nodes, max_depth):
        return _compose(chunk, max_nodes, max_depth, plain=True)
    # Pass 1: events only (no recursion anywhere) to bound nesting and raw node count, so that
    # composing the node graph in pass 2 cannot exhaust the C stack.
    loader: Any = _Loader(chunk)
    try:
        depth = 0
        nodes = 0
        while True:
            event = loader.get_event()
            if event is None:
                break
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                depth += 1
                nodes += 1
                if depth > max_depth:
                    raise _DocumentRejected(f"document is nested deeper than {max_depth} levels")
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
                nodes += 1
            if nodes > max_nodes:
                raise _DocumentRejected(f"document has more than {max_nodes} nodes")
    except yaml.YAMLError as exc:
        raise _DocumentRejected(f"invalid YAML: {_yaml_reason(exc)}") from None
    finally:
        loader.dispose()
    return _compose(chunk, max_nodes, max_depth)


def _bounded(chunk: str, max_nodes: int, max_depth: int) -> bool:
    """True when the text alone proves pass 1 would pass: no anchors or aliases (so nothing
    expands), at most one node per two characters, and no more nesting than the characters
    that can open a level (a line, ``[``, ``{``, ``-``, ``:``, ``?``) allow. Small documents,
    the common case of a large apply, then skip the event scan."""
    if "&" in chunk or "*" in chunk or 2 * len(chunk) + 2 > max_nodes:
        return False
    opens = sum(chunk.count(c) for c in "\n[{-:?") + 1
    return opens <= max_depth


def _compose(chunk: str, max_nodes: int, max_depth: int, *, plain: bool = False) -> object:
    # Pass 2: compose, check the expanded size (aliases counted every time they are used),
    # recursion and duplicate keys, then construct plain Python values. ``plain``: the text
    # was proven bounded and alias-free (:func:`_bounded`), so only duplicate keys can be
    # wrong and one pass (:func:`_plain`) checks and builds; anything unusual in it (a merge
    # key, a non-scalar key, another tag, an error) takes the general path below instead.
    loader: Any = _Loader(chunk)
    try:
        try:
            node = loader.get_single_node()
        except yaml.composer.ComposerError as exc:
            if "expected a single document" in str(exc):
                raise _DocumentRejected(
                    "more than one document in one chunk (separate documents with '---')"
                ) from None
            raise
        if node is None:
            return None
        if plain:
            try:
                return _plain(loader, node)
            except _DocumentRejected:
                raise
            except Exception:  # the general path gives the canonical answer
                _fresh(loader)
        _check_nodes(node, max_nodes)
        try:
            return loader.construct_document(node)
        except (ValueError, TypeError, OverflowError) as exc:
            # a tagged or timestamp-like scalar PyYAML cannot convert ("!!int x",
            # "2001-13-45"): a rejected document, not a crash
            raise _DocumentRejected(f"invalid YAML: {_bad_scalar(loader, node, exc)}") from None
    except yaml.YAMLError as exc:
        raise _DocumentRejected(f"invalid YAML: {_yaml_reason(exc)}") from None
    except RecursionError:
        raise _DocumentRejected(f"document is nested deeper than {max_depth} levels") from None
    finally:
        loader.dispose()


_STR, _MAP, _SEQ = (f"tag:yaml.org,2002:{t}" for t in ("str", "map", "seq"))


class _General(Exception):
    """Not for :func:`_plain`: decode with the general path."""


def _plain(loader: Any, node: yaml.Node) -> object:
    """The value of an alias-free node graph, rejecting duplicate keys exactly as
    :func:`_check_nodes` does (same test on key tag and text, same first one in the same
    order), built directly: strings, mappings and sequences without PyYAML's generic
    constructor, other scalars by it."""
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _STR:
            return node.value
        try:
            return loader.construct_object(node, deep=True)
        except (ValueError, TypeError, OverflowError):
            raise _General from None  # the general path names it
    if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
        return [_plain(loader, child) for child in node.value]
    if not (isinstance(node, yaml.MappingNode) and node.tag == _MAP):
        raise _General
    out: dict[Any, Any] = {}
    seen: set[tuple[str, str]] = set()
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode) or k.value == "<<":
            raise _General  # merge keys and complex keys: PyYAML's own rules
        ident = (k.tag, k.value)
        if ident in seen:
            line = k.start_mark.line + 1 if k.start_mark is not None else "?"
            raise _DocumentRejected(f"duplicate key {k.value!r} (line {line} of the document)")
        seen.add(ident)
        out[_plain(loader, k)] = _plain(loader, v)
    return out


def _fresh(loader: Any) -> None:
    """Forget a construction that raised half-way (PyYAML would take its nodes for
    recursive ones)."""
    loader.constructed_objects = {}
    loader.recursive_objects = {}
    loader.state_generators = []
    loader.deep_construct = False


def _bad_scalar(loader: Any, root: yaml.Node, exc: Exception) -> str:
    """Where the first scalar PyYAML cannot convert is (in construction order) and why."""
    stack: list[yaml.Node] = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR:
                continue
            _fresh(loader)
            try:
                loader.construct_object(node, deep=True)
            except (ValueError, TypeError, OverflowError, yaml.YAMLError) as bad:
                mark = node.start_mark
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                return f"{node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]}: {bad}{where}"
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            stack.extend(reversed([n for pair in node.value for n in pair]))
    return str(exc)


def _check_nodes(root: yaml.Node, max_nodes: int) -> None:
    """Expanded size with memoisation (linear in the graph), cycles and duplicate keys."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        done = sizes.get(key)
        if done is not None:
            return done
        if key in active:
            raise _DocumentRejected("recursive alias: a node contains itself")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > max_nodes:
                    break
        elif isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    ident = (k.tag, k.value)
                    if ident in seen and k.value != "<<":
                        line = k.start_mark.line + 1 if k.start_mark is not None else "?"
                        raise _DocumentRejected(
                            f"duplicate key {k.value!r} (line {line} of the document)"
                        )
                    seen.add(ident)
                total += size(k) + size(v)
                if total > max_nodes:
                    break
        active.discard(key)
        if total > max_nodes:
            raise _DocumentRejected(
                f"document expands to more than {max_nodes} nodes (alias expansion included)"
            )
        sizes[key] = total
        return total

    size(root)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem or exc.context}{where}"
    return str(exc)
