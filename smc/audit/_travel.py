"""Time travel: the mesh as of a log position, a proxy's config then, and why access changed.

Role: :func:`state_at` rebuilds the projections up to a position (from the newest checkpoint
at or before it, when a checkpoint directory is given, else from zero), optionally through
a :class:`~smc.events.ChainVerifier` so that only verified records count.
:func:`proxy_config_at` builds the configuration a proxy was served at that point with the
same snapshot builder ``smc serve`` uses (listeners, routes, clusters, endpoints, RBAC), with
secrets as names only (no key ever leaves the log: it never held one), and the content
version of each resource type, equal to what the server sent for the same state.
:func:`access_history` replays the log and lists the events after which the answer to
"may A reach B (on this path/method/port)?" changed: granted, widened, narrowed or revoked,
with the actor on the event and the writer whose seal proved it.
Concurrency: blocking, one thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from google.protobuf.json_format import MessageToDict

from smc.events import POLICY, ChainVerifier, EventLog, Position, Writer
from smc.projections import (
    CertsProjection,
    CheckpointDir,
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
)
from smc.projections._policyview import PolicyView

__all__ = [
    "CheckpointDir",
    "access_history",
    "proxy_config_at",
    "state_at",
]

_TYPES = {
    "type.googleapis.com/envoy.config.listener.v3.Listener": "listeners",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "routes",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "clusters",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "endpoints",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": "secrets",
}


def state_at(
    log: EventLog,
    position: Position,
    *,
    verifier: ChainVerifier | None = None,
    checkpoints: CheckpointDir | None = None,
) -> ProjectionRunner:
    """A runner whose projections hold the state just before ``position``."""
    runner = ProjectionRunner(log=log, projections=all_projections(), verifier=verifier)
    cp = checkpoints.best_for(position) if checkpoints is not None else None
    if cp is not None:
        runner.restore(cp)
    runner.catch_up(until=position)
    return runner


class _RecordedCerts:
    """The certificates the log says each identity had: SDS entries by name, no key.
    ``agent_sds``: the mesh's proxies take ``default`` from their agents' files (the log holds
    per-proxy certificates only), so the builder references that file as ``smc serve`` does
    with agents."""

    def __init__(self, certs: CertsProjection, view: PolicyView, *, agent_sds: bool) -> None:
        self._certs = certs
        self._view = view
        self.agent_sds = agent_sds

    def get(self, identity: str) -> tuple[str, str, str] | None:
        if self._certs.current_cert(self._view.spiffe_id(identity)) is None:
            return None
        return ("", "", "")  # the secret is reported by name only

    def trust_bundle(self) -> list[str]:
        # with agents the roots recorded on the log (public) are what ROOTCA held; without,
        # the secrets are reported by name only as before
        if not self.agent_sds:
            return []
        return [root for _issuer, roots in sorted(self._certs.trust.items()) for root in roots]


def proxy_config_at(
    log: EventLog,
    node_id: str,
    position: Position,
    *,
    verifier: ChainVerifier | None = None,
    checkpoints: CheckpointDir | None = None,
    runner: ProjectionRunner | None = None,
    agent_keys: bool | None = None,
) -> dict[str, Any]:
    """The configuration ``node_id`` was served once the log reached ``position``.
    ``agent_keys``: whether the control plane ran with agents (``--workload-keys agent``,
    serve's default); None: agents unless the log records a per-identity certificate (the
    older ``control-plane`` mode) current at that position."""
    from smc.xds._builder import BuildPass

    r = runner or state_at(log, position, verifier=verifier, checkpoints=checkpoints)
    registry = _find(r, RegistryProjection)
    policy = _find(r, PolicyProjection)
    certs = _find(r, CertsProjection)
    view = PolicyView(registry=registry, policy=policy)
    agents = not certs.current if agent_keys is None else agent_keys
    build = BuildPass(view=view, certs=_RecordedCerts(certs, view, agent_sds=agents)).build(node_id)
    out: dict[str, Any] = {
        "node": node_id,
        "position": r.position.to_json(),
        "identity": build.identity,
        "reason": build.reason,
        "versions": {},
        "listeners": [],
        "routes": [],
        "clusters": [],
        "endpoints": [],
        "secrets": [],
    }
    snap = build.snapshot
    if snap is None:
        return out
    for type_url, key in _TYPES.items():
        if key == "secrets":
            out["secrets"] = sorted(snap.names(type_url))  # names only: never key material
            continue
        out["versions"][key] = snap.version(type_url)
        out[key] = [
            MessageToDict(m, preserving_proto_field_name=True)
            for _, m in sorted(snap.resources(type_url).items())
        ]
    return out


def _find(runner: ProjectionRunner, cls: type[Any]) -> Any:
    for p in runner.projections:
        if isinstance(p, cls):
            return p
    raise LookupError(cls.__name__)


def access_history(
    log: EventLog,
    *,
    source: str,
    destination: str,
    path: str | None = None,
    method: str | None = None,
    port: int | None = None,
    verifier: ChainVerifier | None = None,
    end: Position | None = None,
) -> list[dict[str, Any]]:
    """The policy events after which the answer for ``source -> destination`` changed."""
    from smc.api._views import policy_check

    projections = all_projections()
    registry = _find_in(projections, RegistryProjection)
    policy = _find_in(projections, PolicyProjection)
    view = PolicyView(registry=registry, policy=policy)
    by_stream: dict[str, list[Any]] = {}
    for p in projections:
        for s in p.streams:
            by_stream.setdefault(s, []).append(p)
    codec = getattr(log, "codec", None)
    if codec is None:
        from smc.events import default_codec

        codec = default_codec()

    unspecific = path is None and method is None and port is None

    def answer() -> dict[str, Any]:
        a = policy_check(
            view, source=source, destination=destination, path=path, method=method, port=port
        )
        if unspecific and not a["allowed"] and a["grants"]:
            # no request named: "may reach" means any rule lets some request through
            a["allowed"], a["decision"] = True, "allow"
            a["reason"] = "allowed by " + ", ".join(
                sorted({g["trafficTarget"] for g in a["grants"]})
            )
        return a

    def grants(a: dict[str, Any]) -> set[str]:
        """What the grants let through, one atom per (rule, port, HTTP match or port list)."""
        atoms = set()
        for g in a["grants"]:
            base = (g["trafficTarget"], g["port"])
            for m in g["http"]:
                atoms.add(json.dumps([*base, "http", m], sort_keys=True))
            for kind in ("tcpPorts", "udpPorts"):
                if g[kind] is not None:
                    atoms.update(json.dumps([*base, kind, p]) for p in g[kind] or ["any"])
            if not g["http"] and g["tcpPorts"] is None and g["udpPorts"] is None:
                atoms.add(json.dumps([*base, "all"]))
        return atoms

    before = answer()
    out: list[dict[str, Any]] = []
    target = end or log.end_position()
    pos = Position()
    while not pos.covers(target):
        recs = [
            x
            for x in log.read(start=pos, max_records=5000, timeout=0.5)
            if x.offset < target.get((x.stream, x.partition))
        ]
        if not recs:
            break
        pos = pos.advanced(recs)
        writers: list[Writer | None]
        if verifier is not None:
            released = verifier.feed(recs)
            writers = list(verifier.released_by)
        else:
            released, writers = recs, [None] * len(recs)
        for rec, writer in zip(released, writers, strict=True):
            event = codec.decode(rec.value, where=rec.where)
            for p in by_stream.get(type(event).STREAM, ()):
                p.apply(event)
            if type(event).STREAM != POLICY:
                continue
            now = answer()
            effect = _effect(before, now, grants if unspecific else None)
            if effect is not None:
                env = event.envelope
                out.append(
                    {
                        "position": rec.where,
                        "occurred_at": env.occurred_at.isoformat(),
                        "type": type(event).TYPE.rsplit(".", 1)[-1],
                        "aggregate": env.aggregate,
                        "actor": env.actor,
                        "writer": writer.identity if writer is not None else None,
                        "verified": writer is not None,
                        "effect": effect,
                        "decision": now["decision"],
                        "reason": now["reason"],
                    }
                )
            before = now
    return out


def _find_in(projections: list[Any], cls: type[Any]) -> Any:
    for p in projections:
        if isinstance(p, cls):
            return p
    raise LookupError(cls.__name__)


def _effect(
    before: dict[str, Any],
    now: dict[str, Any],
    grants: Callable[[dict[str, Any]], set[str]] | None,
) -> str | None:
    """How access moved: for one request (``grants`` None) only its decision counts."""
    if before["allowed"] != now["allowed"]:
        return "granted" if now["allowed"] else "revoked"
    if grants is None:
        return None
    b, n = grants(before), grants(now)
    if b == n and before["reason"] == now["reason"]:
        return None
    if n < b:
        return "narrowed"
    if n > b:
        return "widened"
    return "changed"
