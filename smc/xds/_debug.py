"""Debug and metrics HTTP endpoints of the xDS server (aiohttp routes).

Role: mounted on the API application of ``smc serve`` by :func:`mount_debug`:

- ``GET /debug/proxies``: one row per open ADS stream (node id, stream kind, peer, acked and
  sent version per type, pending, last NACK), the NACKs kept after streams closed, and the
  nodes the controller builds for (with the reason a node has no snapshot), and the streams
  refused (identity mismatch, a node id SMC cannot place) with their reason.
- ``GET /debug/config_dump?node=ID``: the node's current snapshot as JSON (protobuf JSON
  mapping); private keys are replaced by ``"[redacted]"``.
- ``GET /debug/events/{event_id}``: the causal chain of one event (which snapshot versions
  carried it, when each proxy ACKed them).
- ``GET /metrics``: Prometheus text of the given registries.

Concurrency: handlers run on the loop that runs the controller and the server; they only read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from smc.xds._controller import XdsController
from smc.xds._server import AdsServer, NackRecord
from smc.xds._types import PUSH_ORDER, SECRET, short_name

__all__ = ["debug_routes", "mount_debug", "proxies_view"]

REDACTED = "[redacted]"


def _nack(r: NackRecord | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "node_id": r.node_id,
        "type": short_name(r.type_url),
        "version": r.version,
        "nonce": r.nonce,
        "message": r.message,
        "code": r.code,
        "at": r.at,
    }


def proxies_view(server: AdsServer | None, controller: XdsController | None) -> dict[str, Any]:
    """The JSON body of ``/debug/proxies``."""
    streams = []
    if server is not None:
        for p in server.proxies():
            types = {}
            for t in PUSH_ORDER:
                ts = p.types.get(t)
                if ts is None:
                    continue
                types[short_name(t)] = {
                    "acked_version": ts.acked_version,
                    "sent_version": ts.sent_version,
                    "pending": ts.pending,
                    "wildcard": ts.wildcard,
                    "names": len(ts.names),
                    "last_nack": _nack(ts.last_nack),
                }
            streams.append(
                {
                    "node_id": p.node_id,
                    "stream_id": p.stream_id,
                    "kind": p.kind,
                    "peer": p.peer,
                    "connected_at": p.connected_at,
                    "types": types,
                }
            )
    return {
        "ready": bool(server is not None and server.ready),
        "proxies": streams,
        "nacks": [_nack(r) for r in server.nacks()] if server is not None else [],
        "refused": [
            {
                "node_id": r.node_id,
                "peer": r.peer,
                "peer_identity": r.peer_identity,
                "reason": r.reason,
                "message": r.message,
                "at": r.at,
            }
            for r in server.refusals()
        ]
        if server is not None
        else [],
        "nodes": controller.node_status() if controller is not None else [],
    }


def _redact(data: Any) -> Any:
    if isinstance(data, dict):
        return {
            k: (REDACTED if k in ("privateKey", "private_key") else _redact(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_redact(v) for v in data]
    return data


def config_dump(controller: XdsController, node_id: str) -> dict[str, Any] | None:
    """The JSON config dump of ``node_id``'s snapshot (secrets redacted), or None."""
    snapshot = controller.cache.get(node_id)
    if snapshot is None:
        return None
    resources: dict[str, Any] = {}
    for t in PUSH_ORDER:
        items = []
        for name, msg in sorted(snapshot.resources(t).items()):
            body = json_format.MessageToDict(msg)
            if t == SECRET:
                body = _redact(body)
            items.append(
                {"name": name, "version": snapshot.entries(t)[name].version, "resource": body}
            )
        resources[short_name(t)] = items
    return {
        "node_id": node_id,
        "versions": {short_name(t): v for t, v in snapshot.versions().items()},
        "resources": resources,
    }


def debug_routes(
    *,
    controller: XdsController | None,
    server: AdsServer | None,
    registries: Iterable[CollectorRegistry] = (),
) -> list[web.RouteDef]:
    """The debug and metrics routes (see the module docstring)."""
    regs = list(registries)

    async def proxies(request: web.Request) -> web.Response:
        return web.json_response(proxies_view(server, controller))

    async def dump(request: web.Request) -> web.Response:
        node = request.query.get("node", "")
        if not node:
            return web.json_response(
                {"errors": [{"document": None, "field": "node", "reason": "required (a node id)"}]},
                status=400,
            )
        if controller is None:
            return web.json_response(
                {"errors": [{"document": None, "field": "", "reason": "xDS is disabled"}]},
                status=404,
            )
        body = config_dump(controller, node)
        if body is None:
            reason = next(
                (n["problem"] for n in controller.node_status() if n["node_id"] == node), None
            )
            return web.json_response(
                {
                    "errors": [
                        {
                            "document": None,
                            "field": "node",
                            "reason": f"no snapshot for node {node!r}"
                            + (f": {reason}" if reason else " (never connected)"),
                        }
                    ]
                },
                status=404,
            )
        return web.json_response(body)

    async def event(request: web.Request) -> web.Response:
        event_id = request.match_info["event_id"]
        trace = controller.trace(event_id) if controller is not None else None
        if trace is None:
            return web.json_response(
                {
                    "errors": [
                        {
                            "document": None,
                            "field": "event_id",
                            "reason": f"event {event_id!r} was not folded into a snapshot since "
                            "this server started (or is too old)",
                        }
                    ]
                },
                status=404,
            )
        return web.json_response(trace)

    async def metrics(request: web.Request) -> web.Response:
        body = b"".join(generate_latest(r) for r in regs)
        resp = web.Response(body=body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    return [
        web.get("/debug/proxies", proxies),
        web.get("/debug/config_dump", dump),
        web.get("/debug/events/{event_id}", event),
        web.get("/metrics", metrics),
    ]


def mount_debug(
    app: web.Application,
    *,
    controller: XdsController | None,
    server: AdsServer | None,
    registries: Iterable[CollectorRegistry] = (),
) -> None:
    """Add the debug routes to ``app`` (before it starts)."""
    app.add_routes(debug_routes(controller=controller, server=server, registries=registries))
