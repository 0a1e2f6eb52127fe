"""HTTP routes of the control plane's own access: who am I, access grants, certificates.

Role: ``GET /v1/whoami`` (the caller's principal, as the server authenticated it);
``GET /v1/grants``, ``PUT /v1/grants/{name}`` (an ``AccessGrant`` manifest, YAML or JSON) and
``DELETE /v1/grants/{name}``: the grants :class:`smc.auth.GrantAuthorizer` decides from,
recorded on the log as resources of kind ``AccessGrant`` with the caller as actor;
``GET /v1/certs``: the workload certificates the log records (serial, identity, validity,
status; never a key), behind the ``certs`` verb. The guard has authorized each route before
its handler runs (``get``/``apply``/``delete`` on ``accessgrants``).
Concurrency: handlers on the API loop; the append runs in a worker thread and the answer
waits until the projections applied it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import yaml
from aiohttp import web

from smc.api._errors import BodyError
from smc.api._live import LiveMeshChanges
from smc.auth import (
    GRANT_API_VERSION,
    GRANT_KIND,
    PRINCIPAL,
    GrantError,
    Principal,
    parse_grant,
)
from smc.events import (
    Position,
    SmiResourceApplied,
    SmiResourceDeleted,
    deterministic_id,
    make_event,
)
from smc.projections import CertsProjection, PolicyProjection

__all__ = ["AccessRoutes"]


def _grant_error(exc: GrantError, status: int = 422) -> web.Response:
    return web.json_response(
        {"errors": [{"document": "request", "field": exc.field, "reason": exc.reason}]},
        status=status,
    )


class AccessRoutes:
    """The routes of the module docstring, bound to the live change service."""

    def __init__(
        self,
        live: LiveMeshChanges,
        policy: PolicyProjection,
        *,
        certs: CertsProjection | None = None,
    ) -> None:
        self.live = live
        self.policy = policy
        self.certs = certs

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/whoami", self.whoami),
            web.get("/v1/grants", self.list_grants),
            web.put("/v1/grants/{name}", self.put_grant),
            web.delete("/v1/grants/{name}", self.delete_grant),
            web.get("/v1/certs", self.list_certs),
        ]

    async def whoami(self, request: web.Request) -> web.Response:
        p: Principal = request[PRINCIPAL]
        body: dict[str, Any] = {
            "name": p.name,
            "groups": list(p.groups),
            "method": p.method,
            "actor": p.actor,
        }
        if p.impersonated_by is not None:
            body["impersonatedBy"] = p.impersonated_by.name
        return web.json_response(body)

    async def list_grants(self, request: web.Request) -> web.Response:
        items = [json.loads(r.manifest_json) for r in self.policy.of_kind(GRANT_KIND)]
        return web.json_response({"items": items})

    async def _append(self, event: SmiResourceApplied | SmiResourceDeleted) -> None:
        await self.live.runner.caught_up.wait()
        appended = await asyncio.to_thread(self.live.changes.log.append, [event])
        target = Position({(a.stream, a.partition): a.offset + 1 for a in appended})
        await self.live.wait_for(target)

    async def put_grant(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        raw = await request.read()
        try:
            obj = yaml.safe_load(raw.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise BodyError(field="", reason=f"not a YAML or JSON manifest: {exc}") from None
        try:
            grant = parse_grant(obj)
        except GrantError as exc:
            return _grant_error(exc)
        if grant.name != name:
            return _grant_error(
                GrantError(field="metadata.name", reason=f"must be {name!r} (the URL's name)")
            )
        p: Principal = request[PRINCIPAL]
        rid = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        event = make_event(
            SmiResourceApplied,
            source="api",
            actor=p.actor,
            event_id=deterministic_id("api", rid, "grant", name),
            kind=GRANT_KIND,
            api_version=GRANT_API_VERSION,
            namespace="",
            name=name,
            manifest_json=grant.manifest_json(),
        )
        await self._append(event)
        return web.json_response({"grant": grant.manifest(), "actor": p.actor})

    async def delete_grant(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not any(r.name == name for r in self.policy.of_kind(GRANT_KIND)):
            return web.json_response(
                {
                    "errors": [
                        {"document": None, "field": "name", "reason": f"no AccessGrant {name!r}"}
                    ]
                },
                status=404,
            )
        p: Principal = request[PRINCIPAL]
        rid = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        event = make_event(
            SmiResourceDeleted,
            source="api",
            actor=p.actor,
            event_id=deterministic_id("api", rid, "grant-delete", name),
            kind=GRANT_KIND,
            namespace="",
            name=name,
        )
        await self._append(event)
        return web.json_response({"deleted": name, "actor": p.actor})

    async def list_certs(self, request: web.Request) -> web.Response:
        rows = []
        if self.certs is not None:
            for r in self.certs.all_certs():
                rows.append(
                    {
                        "identity": r.identity,
                        "serial": r.serial,
                        "notBefore": r.not_before.isoformat(),
                        "notAfter": r.not_after.isoformat(),
                        "issuer": r.issuer,
                        "fingerprint": r.fingerprint,
                        "status": r.status,
                    }
                )
        return web.json_response({"items": rows})
