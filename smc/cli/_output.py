"""kubectl-style output for every printing command: ``-o table|json|yaml|name``.

Role: :func:`output_option` is the one ``-o/--output`` option (``text`` is kept as an alias of
``table``, and ``--json`` as ``-o json`` where a command had it, for scripts written before);
:func:`facts_table` is the ``table`` form of a single object; :func:`emit` prints data as JSON or YAML (the same
structure), names (one ``kind/namespace/name`` per line, as ``kubectl -o name``) or, for
``table``, calls the command's own table printer. :func:`kind_alias` resolves the kinds and short
names ``smc get`` accepts; :func:`select` filters items by namespace, name and a label selector
(``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``, comma-separated).
Concurrency: pure functions; one command per process.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click
import yaml

__all__ = [
    "KIND_ALIASES",
    "OUTPUTS",
    "emit",
    "facts_table",
    "item_labels",
    "kind_alias",
    "output_option",
    "parse_selector",
    "select",
]

OUTPUTS = ("table", "json", "yaml", "name")

#: Canonical ``smc get`` kind -> the names it also answers to (kubectl-style short names).
KIND_ALIASES: dict[str, tuple[str, ...]] = {
    "services": ("svc", "service", "meshservice", "meshservices", "ms"),
    "workloads": ("wl", "workload", "pods", "pod", "po"),
    "virtualmachines": ("vm", "vms", "virtualmachine"),
    "policies": ("policy", "pol"),
    "traffictargets": ("tt", "traffictarget"),
    "httproutegroups": ("hrg", "httproutegroup"),
    "tcproutes": ("tcproute",),
    "udproutes": ("udproute",),
    "splits": ("ts", "trafficsplit", "trafficsplits", "split"),
    "meshconfig": ("mc", "meshconfigs"),
    "vmgroups": ("vmg", "vmgroup", "virtualmachinegroup", "virtualmachinegroups"),
    "egresses": ("egress",),
    "ingressbackends": ("ingressbackend",),
    "retries": ("retry",),
    "upstreamtrafficsettings": ("upstreamtrafficsetting", "uts"),
}


def kind_alias(name: str, known: Iterable[str]) -> str:
    """The canonical kind for ``name`` (case-insensitive), or raise click.BadParameter."""
    n = name.lower()
    known = list(known)
    if n in known:
        return n
    for kind, aliases in KIND_ALIASES.items():
        if n in aliases and kind in known:
            return kind
    raise click.BadParameter(
        f"unknown kind {name!r}; one of: {', '.join(known)} "
        f"(short names: {', '.join(a[0] for k, a in KIND_ALIASES.items() if k in known)})",
        param_hint="KIND",
    )


def output_option(*, default: str = "table", json_alias: bool = False) -> Callable[[Any], Any]:
    """``-o/--output table|json|yaml|name`` (``text`` accepted as ``table``). With
    ``json_alias`` the command also keeps its older ``--json`` flag, folded into ``output``
    (the function then receives ``output="json"``), so one helper serves every command."""

    def convert(ctx: click.Context, param: click.Parameter, value: str) -> str:
        return "table" if value == "text" else value

    option = click.option(
        "-o",
        "--output",
        type=click.Choice([*OUTPUTS, "text"]),
        default=default,
        show_default=True,
        callback=convert,
        help="Output format: table, json, yaml or name (kind/namespace/name per line).",
    )
    if not json_alias:
        return option

    def decorate(f: Callable[..., Any]) -> Any:
        @functools.wraps(f)
        def command(*args: Any, as_json: bool, output: str, **kwargs: Any) -> Any:
            return f(*args, output="json" if as_json else output, **kwargs)

        flag = click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
        return option(flag(command))

    return decorate


def facts_table(data: Mapping[str, Any]) -> Callable[[], None]:
    """A ``table`` printer for one object: ``key: value`` lines, lists one item per line."""

    def show() -> None:
        width = max((len(k) for k in data), default=0)
        for key, value in data.items():
            if isinstance(value, list | tuple):
                click.echo(f"{key}:")
                for item in value:
                    click.echo(f"  {item}")
            else:
                click.echo(f"{key + ':':{width + 1}} {value}")

    return show


def emit(
    data: Any,
    output: str,
    *,
    table: Callable[[], None],
    names: Callable[[], Iterable[str]] | None = None,
) -> None:
    """Print ``data`` in ``output`` format (see the module docstring)."""
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    elif output == "yaml":
        # the JSON data model (mappings of any kind, e.g. the OrderedDicts of protobuf's
        # json_format, become plain ones), so YAML carries exactly what -o json does
        plain = json.loads(json.dumps(data))
        click.echo(yaml.safe_dump(plain, sort_keys=True, default_flow_style=False).rstrip("\n"))
    elif output == "name":
        if names is None:
            raise click.UsageError("-o name is not supported by this command")
        for n in names():
            click.echo(n)
    else:
        table()


_TERM = re.compile(
    r"\s*(!?)([A-Za-z0-9_.\-/]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9_.\-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$"
)


_Term = tuple[str, str, frozenset[str]]  # (op, key, values): op in = != in notin exists !


def parse_selector(text: str) -> list[_Term]:
    """A label selector as terms that must all hold; raises click.BadParameter."""
    parts: list[str] = []
    depth, cur = 0, ""
    for ch in text:  # split on commas outside parentheses
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out: list[_Term] = []
    for part in parts:
        m = _TERM.match(part)
        if not part.strip() or m is None:
            raise click.BadParameter(
                f"{part.strip()!r} is not a label selector term", param_hint="-l"
            )
        neg, key, op, value, setop, values = m.groups()
        if neg and (op or setop):
            raise click.BadParameter(f"{part.strip()!r}: '!' takes a key only", param_hint="-l")
        if op:
            out.append(("!=" if op == "!=" else "=", key, frozenset({value})))
        elif setop:
            out.append((setop, key, frozenset(v.strip() for v in values.split(",") if v.strip())))
        else:
            out.append(("!" if neg else "exists", key, frozenset()))
    return out


def _holds(term: _Term, labels: Mapping[str, str]) -> bool:
    op, key, values = term
    if op == "exists":
        return key in labels
    if op == "!":
        return key not in labels
    if op in ("=", "in"):
        return labels.get(key) in values
    return labels.get(key) not in values  # != and notin


def item_labels(item: Mapping[str, Any]) -> Mapping[str, str]:
    """The labels of a ``smc get`` item: its own, else its manifest's metadata labels."""
    labels = item.get("labels")
    if isinstance(labels, Mapping):
        return {str(k): str(v) for k, v in labels.items()}
    manifest = item.get("manifest")
    if isinstance(manifest, Mapping):
        meta = manifest.get("metadata")
        if isinstance(meta, Mapping) and isinstance(meta.get("labels"), Mapping):
            return {str(k): str(v) for k, v in meta["labels"].items()}
    return {}


def select(
    items: list[dict[str, Any]],
    *,
    namespace: str | None,
    name: str | None,
    selector: str | None,
) -> list[dict[str, Any]]:
    """The items in ``namespace`` (all with None), named ``name``, matching ``selector``."""
    terms = parse_selector(selector) if selector else []
    return [
        i
        for i in items
        if (namespace is None or i.get("namespace") == namespace)
        and (name is None or i.get("name") == name)
        and all(_holds(t, item_labels(i)) for t in terms)
    ]
