"""The HTTP API of ``smc serve`` (aiohttp): apply/delete manifests, read projections.

Role: a thin JSON layer over :class:`~smc.api.LiveMeshChanges` (writes) and the projections
(reads). Endpoints are described in :mod:`smc.api._openapi` (``GET /openapi.json``). Every error
is JSON ``{"errors": [{"document", "field", "reason", ...}]}``: 400 for an unreadable body or bad
query, 413 for a body over the cap, 422 when some documents were refused (the valid ones are
applied), 503 before the projections have caught up or when the event log cannot be reached (nothing
was recorded; retry), 504 if appended events were not applied in
time. No input can crash the server: unexpected exceptions become a 500 JSON answer.
Every route but the probes sits behind a :class:`smc.auth.Guard` (401 without a credential,
403 without the grant); the actor recorded on events is the authenticated principal, and each
document of an apply or delete is authorized (verb x kind x namespace) before anything is
appended.
Concurrency: handlers run on the asyncio loop that runs the projection runner, so reads see
whole events; manifest decoding and the append run in worker threads; writes are serialised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from smc.api._access import AccessRoutes
from smc.api._changes import ChangeReport
from smc.api._errors import BodyError, ChangeNotApplied
from smc.api._live import LiveMeshChanges
from smc.api._openapi import openapi_document
from smc.api._views import (
    meshconfig_view,
    policies_view,
    policy_check,
    services_view,
    vmgroups_view,
    workloads_view,
)
from smc.auth import GUARD as GUARD_KEY
from smc.auth import PRINCIPAL, AuthError, Guard, Principal, resource_of_kind
from smc.auth import Access as AuthAccess
from smc.events import LogCorrupt, LogFull, LogUnavailable
from smc.projections import (
    CertsProjection,
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
)
from smc.projections._policyview import PolicyView
from smc.smi import LoadResult, ManifestError, Resource, load_documents

__all__ = ["MAX_BODY_BYTES", "ApiContext", "HttpApi", "create_app", "start_http"]

log = logging.getLogger("smc.api")

MAX_BODY_BYTES = 4 * 1024 * 1024
#: Bodies up to this size are decoded on the loop (a worker thread costs more than the parse).
_INLINE_BODY = 8 * 1024
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
_IDENTITY = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _errors(status: int, *errors: dict[str, Any]) -> web.Response:
    return web.json_response({"errors": list(errors)}, status=status)


def _err(reason: str, *, field: str = "", document: str | None = None) -> dict[str, Any]:
    return {"document": document, "field": field, "reason": reason}


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AuthError:
        raise  # the guard (the outer middleware) answers 401/403
    except web.HTTPRequestEntityTooLarge:
        return _errors(413, _err(f"request body is larger than {MAX_BODY_BYTES} bytes"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _errors(exc.status, _err(exc.reason))
    except BodyError as exc:
        return _errors(400, _err(exc.reason, field=exc.field, document="request"))
    except ChangeNotApplied as exc:
        return _errors(504, _err(str(exc)))
    except LogFull as exc:
        log.warning("log full serving %s %s: %s", request.method, request.path, exc)
        return _errors(507, _err(f"the event log's disk is full, nothing was recorded: {exc}"))
    except LogCorrupt as exc:
        log.error("log corrupt serving %s %s: %s", request.method, request.path, exc)
        return _errors(500, _err(f"nothing was recorded: {exc}"))
    except LogUnavailable as exc:
        log.warning("log unavailable serving %s %s: %s", request.method, request.path, exc)
        return _errors(
            503,
            _err(f"the event log is unavailable, nothing was recorded; retry later ({exc})"),
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _errors(500, _err("internal error (logged by the server)"))


class ApiContext:
    """What the handlers need: the live change service, the runner and the projections."""

    def __init__(
        self,
        *,
        live: LiveMeshChanges,
        runner: ProjectionRunner,
        registry: RegistryProjection,
        policy: PolicyProjection,
        certs: CertsProjection | None = None,
        serving: asyncio.Event | None = None,
    ) -> None:
        self.certs = certs
        #: Set once the doors proxies use (ADS, the agents' certificate service) listen;
        #: ``None``: this server has none, readiness is the log's alone.
        self.serving = serving
        self.live = live
        self.runner = runner
        self.registry = registry
        self.policy = policy
        self.view = PolicyView(registry=registry, policy=policy)


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value in ("true", "1", "yes", ""):
        return True
    if value in ("false", "0", "no"):
        return False
    raise web.HTTPBadRequest(reason=f"query parameter {name} must be true or false")


def _decode_body(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Body bytes -> (source label, [(source, text)]) chunks to load."""
    if not raw.strip():
        raise BodyError(field="", reason="empty body: send YAML or JSON manifests")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(field="", reason=f"not UTF-8 (byte {exc.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            obj = None  # not JSON (or too deep): YAML loading reports it per document
        if isinstance(obj, dict) and "documents" in obj and "kind" not in obj:
            docs = obj["documents"]
            if not isinstance(docs, list):
                raise BodyError(field="documents", reason="must be a list of manifests")
            if len(obj) != 1:
                extra = sorted(k for k in obj if k != "documents")
                raise BodyError(
                    field=extra[0], reason="unknown field (only 'documents' is allowed)"
                )
            return "documents", [
                (f"documents[{i}]", d if isinstance(d, str) else json.dumps(d))
                for i, d in enumerate(docs)
            ]
    return "request", [("request", text)]


def _load(chunks: list[tuple[str, str]]) -> LoadResult:
    resources: list[Resource] = []
    errors: list[ManifestError] = []
    for source, text in chunks:
        res = load_documents(text, source=source)
        resources.extend(res.resources)
        errors.extend(res.errors)
    return LoadResult(resources=tuple(resources), errors=tuple(errors))


class HttpApi:
    """Route handlers bound to one :class:`ApiContext`."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/apply", self.apply),
            web.post("/v1/delete", self.delete),
            web.get("/v1/services", self.services),
            web.get("/v1/workloads", self.workloads),
            web.get("/v1/vmgroups", self.vmgroups),
            web.get("/v1/policies", self.policies),
            web.get("/v1/meshconfig", self.meshconfig),
            web.get("/v1/policy/check", self.check),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/openapi.json", self.openapi),
        ]

    # -- writes -----------------------------------------------------------------------------
    async def _change(self, request: web.Request, verb: str) -> web.Response:
        principal: Principal = request[PRINCIPAL]
        actor = principal.actor
        request_id = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        if not _REQUEST_ID.match(request_id):
            raise BodyError(
                field="X-Request-Id", reason="must be 1-200 printable ASCII characters, no spaces"
            )
        dry_run = _flag(request, "dryRun")
        ignore = _flag(request, "ignoreNotFound") if verb == "delete" else False
        if not self.ctx.runner.caught_up.is_set():
            return _errors(503, _err("projections are still catching up with the log; retry"))
        raw = await request.read()
        _, chunks = _decode_body(raw)
        if len(raw) <= _INLINE_BODY:
            loaded = _load(chunks)  # a few documents: cheaper than a thread hop
        else:
            loaded = await asyncio.to_thread(_load, chunks)
        guard = request.app[GUARD_KEY]
        for r in loaded.resources:  # every document authorized before anything is appended
            await guard.authorize(
                principal,
                AuthAccess(verb=verb, resource=resource_of_kind(r.KIND), namespace=r.namespace),
            )
        live = self.ctx.live
        report: ChangeReport
        if verb == "apply":
            report = await live.apply(
                loaded.resources,
                actor=actor,
                source="api",
                request_id=request_id,
                load_errors=loaded.errors,
                dry_run=dry_run,
            )
        else:
            report = await live.delete(
                loaded.resources,
                actor=actor,
                source="api",
                request_id=request_id,
                load_errors=loaded.errors,
                ignore_not_found=ignore,
                dry_run=dry_run,
            )
        body = report.as_dict()
        body.update({"requestId": request_id, "actor": actor, "dryRun": dry_run})
        if not report.results:
            body["errors"] = [_err("no documents in the body", document="request")]
            return web.json_response(body, status=400)
        return web.json_response(
            body, status=200 if report.ok else 422, headers={"X-Request-Id": request_id}
        )

    async def apply(self, request: web.Request) -> web.Response:
        return await self._change(request, "apply")

    async def delete(self, request: web.Request) -> web.Response:
        return await self._change(request, "delete")

    # -- reads ------------------------------------------------------------------------------
    async def services(self, request: web.Request) -> web.Response:
        return web.json_response({"items": services_view(self.ctx.registry)})

    async def workloads(self, request: web.Request) -> web.Response:
        return web.json_response({"items": workloads_view(self.ctx.registry)})

    async def vmgroups(self, request: web.Request) -> web.Response:
        return web.json_response({"items": vmgroups_view(self.ctx.registry, self.ctx.policy)})

    async def policies(self, request: web.Request) -> web.Response:
        kind = request.query.get("kind")
        return web.json_response({"items": policies_view(self.ctx.policy, kind=kind)})

    async def meshconfig(self, request: web.Request) -> web.Response:
        return web.json_response(meshconfig_view(self.ctx.policy))

    async def check(self, request: web.Request) -> web.Response:
        q = request.query
        problems = []
        for name in ("from", "to"):
            v = q.get(name)
            if not v:
                problems.append(_err("required (an identity namespace/serviceaccount)", field=name))
            elif not _IDENTITY.match(v):
                problems.append(_err(f"{v!r} is not namespace/serviceaccount", field=name))
        port: int | None = None
        if q.get("port"):
            try:
                port = int(q["port"])
                if not 1 <= port <= 65535:
                    raise ValueError
            except ValueError:
                problems.append(_err(f"{q['port']!r} is not a port (1-65535)", field="port"))
        if problems:
            return _errors(400, *problems)
        return web.json_response(
            policy_check(
                self.ctx.view,
                source=q["from"],
                destination=q["to"],
                path=q.get("path") or None,
                method=q.get("method") or None,
                port=port,
            )
        )

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: fails for good once the log was found corrupt (restarting helps only
        after an operator repaired it; the record is named)."""
        fatal = self.ctx.runner.health.fatal
        if fatal is not None:
            return web.json_response({"status": "failed", "reason": fatal}, status=500)
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 503 while catching up, while the log cannot be read or written, or
        while the proxies' doors (ADS, certificate service) do not listen yet."""
        r = self.ctx.runner
        health = r.health
        caught = r.caught_up.is_set()
        listening = self.ctx.serving is None or self.ctx.serving.is_set()
        ready = caught and health.available and listening
        if ready:
            status = "ready"
        elif not caught:
            status = "catching up"
        elif not health.available:
            status = "log unavailable"
        else:
            status = "starting xDS"
        return web.json_response(
            {
                "status": status,
                "position": r.position.to_json(),
                "applied": r.applied,
                "log": health.as_dict(),
            },
            status=200 if ready else 503,
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(server_url=f"{request.scheme}://{request.host}"))


def create_app(
    ctx: ApiContext, *, guard: Guard, max_body_bytes: int = MAX_BODY_BYTES
) -> web.Application:
    """The aiohttp application of the API (request bodies capped at ``max_body_bytes``),
    behind ``guard``: every route but the probes needs an authenticated, authorized caller."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors])
    guard.install(app)
    app.add_routes(HttpApi(ctx).routes())
    app.add_routes(AccessRoutes(ctx.live, ctx.policy, certs=ctx.certs).routes())
    return app


async def start_http(
    app: web.Application, *, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (HTTPS with ``ssl_context``) on the running loop; call
    ``cleanup()`` on the result."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner
