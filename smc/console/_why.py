""" "Why": the changes on the log that decided whether one identity may reach another.

Role: :func:`deciding_changes` walks the timeline up to a point and keeps, in order, the changes
that granted, changed or revoked access from a source identity to a destination identity:
TrafficTargets naming both (applied, edited so they stop naming them, deleted), the route groups
those targets used, and mesh-config changes of permissive mode. Each comes with its actor, time
and position, so a reader can open it on the timeline.
Concurrency: reads the log (worker thread); takes the timeline's rows as they are when called.
"""

from __future__ import annotations

import json
from typing import Any

from smc.console._timeline import Timeline

__all__ = ["deciding_changes"]

_ROUTE_KINDS = ("HTTPRouteGroup", "TCPRoute", "UDPRoute")


def _pair_rules(manifest: dict[str, Any], source: str, destination: str) -> list[str] | None:
    """The rule references of a TrafficTarget if it lets ``source`` reach ``destination``."""
    meta = manifest.get("metadata") or {}
    spec = manifest.get("spec") or {}
    ns = meta.get("namespace") or "default"
    dest = spec.get("destination") or {}
    if f"{dest.get('namespace') or ns}/{dest.get('name')}" != destination:
        return None
    for src in spec.get("sources") or []:
        if f"{src.get('namespace') or ns}/{src.get('name')}" == source:
            return sorted(f"{r.get('kind')}/{ns}/{r.get('name')}" for r in spec.get("rules") or [])
    return None


def deciding_changes(
    timeline: Timeline, *, source: str, destination: str, upto: int
) -> list[dict[str, Any]]:
    """The changes (oldest first) up to timeline entry ``upto`` that decided access from
    ``source`` to ``destination`` (identities ``ns/sa``); see the module docstring."""
    dest_ns = destination.split("/", 1)[0]
    rows = timeline.rows[: upto + 1]
    naming: dict[str, list[str]] = {}  # TrafficTarget aggregate -> its rules while it names them
    permissive: bool | None = None
    out: list[dict[str, Any]] = []
    for seq, row in enumerate(rows):
        effect = None
        if row.kind == "TrafficTarget" and row.namespace == dest_ns:
            ev = timeline.read_event(row)
            manifest_json = getattr(ev, "manifest_json", None)
            rules = (
                _pair_rules(json.loads(manifest_json), source, destination)
                if isinstance(manifest_json, str)
                else None
            )
            before = naming.get(row.aggregate)
            if rules is not None:
                naming[row.aggregate] = rules
                if before is None:
                    effect = "grants"
                elif before != rules:
                    effect = "changes the rules of"
                else:
                    effect = "re-applies"
            elif before is not None:
                del naming[row.aggregate]
                effect = "revokes"
        elif row.kind in _ROUTE_KINDS and row.namespace == dest_ns:
            if any(row.aggregate in rules for rules in naming.values()):
                effect = "changes the matches of"
        elif row.kind == "MeshConfig":
            ev = timeline.read_event(row)
            now = bool(getattr(ev, "permissive", False))
            if now != bool(permissive):
                effect = (
                    "allows everything (permissive mode) for" if now else "ends permissive mode for"
                )
            permissive = now
        if effect is not None:
            out.append({**row.to_json(seq), "effect": effect})
    listed = {e["seq"] for e in out}
    for rules in naming.values():  # the route groups whose matches the grants use now
        for ref in rules:
            seqs = [i for i in timeline.seqs_of(ref) if i <= upto]
            if seqs and seqs[-1] not in listed:
                listed.add(seqs[-1])
                out.append({**rows[seqs[-1]].to_json(seqs[-1]), "effect": "defines the matches of"})
    return sorted(out, key=lambda e: int(e["seq"]))
