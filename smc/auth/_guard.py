"""The door of the HTTP API: authenticate every request, authorize it, count refusals.

Role: :class:`Authenticator` proves who is calling: a bearer token (the local admin token,
else a Kubernetes token through :class:`~smc.auth.TokenReviewer` when one is configured) or
a client certificate verified by the TLS handshake (then refused here when the certificate
events on the log record it as revoked). :class:`Guard` is the aiohttp middleware: every
route but ``/healthz``, ``/readyz`` (and ``/metrics`` when ``public_metrics``) needs an
authenticated principal (401 with ``WWW-Authenticate`` otherwise, for unknown routes too);
``X-SMC-Actor``/``Impersonate-User`` switch to another name only with the ``impersonate``
grant (the principal then records both names); each route's :class:`~smc.auth.Access` is
authorized by the authorizer (grants on the log, or SubjectAccessReview), members of
``smc:admins`` always pass. A refusal answers 403 naming principal, verb and resource, is
logged and counted in ``smc_api_auth_refusals_total{reason}``. Handlers that decide per
document (apply/delete) call :meth:`Guard.authorize` and the middleware turns
:class:`Forbidden` into the same 403. Credentials are never logged.
Concurrency: coroutines on the API's asyncio loop.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from smc.auth._errors import Forbidden, ReviewUnavailable, Unauthenticated
from smc.auth._kube import TokenReviewer
from smc.auth._local import TOKEN_PREFIX, LocalCredential
from smc.auth._principal import Access, Principal
from smc.auth._tls import principal_of_certificate, serial_of_certificate

__all__ = [
    "GUARD",
    "PRINCIPAL",
    "PUBLIC_PATHS",
    "Authenticator",
    "Authorizer",
    "Guard",
    "route_access",
]

log = logging.getLogger("smc.auth")

#: Routes anyone may call (liveness and readiness probes; the console's static shell, which
#: holds no mesh data: its data routes need a credential like every other).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/console", "/console/"})
PUBLIC_PREFIXES = ("/console/static/",)
#: ``request[PRINCIPAL]``: the authenticated (possibly impersonated) principal.
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("smc.principal", Principal)
#: ``app[GUARD]``: the :class:`Guard` of the application.
GUARD: web.AppKey[Guard] = web.AppKey("smc.guard")
_ACTOR = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,252}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Authorizer(Protocol):
    async def allowed(self, principal: Principal, access: Access) -> tuple[bool, str]: ...


def _error(status: int, reason: str, **extra: Any) -> web.Response:
    body = {"errors": [{"document": None, "field": "", "reason": reason, **extra}]}
    headers = {"WWW-Authenticate": 'Bearer realm="smc"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


class Authenticator:
    """Bearer tokens and client certificates (see the module docstring)."""

    def __init__(
        self,
        *,
        local: LocalCredential,
        tokens: TokenReviewer | None = None,
        revoked: Callable[[str, str], bool] | None = None,
    ) -> None:
        """``revoked(principal name, serial)``: whether the log records that certificate
        as revoked."""
        self.local = local
        self.tokens = tokens
        self.revoked = revoked

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("the Authorization header must be 'Bearer TOKEN'")
            found = self.local.verify(token)
            if found is not None:
                return found
            if self.tokens is None or token.startswith(TOKEN_PREFIX):
                raise Unauthenticated("the bearer token is not valid")
            return await self.tokens.review(token)
        der = self._peer_certificate(request)
        if der is not None:
            principal, cert = principal_of_certificate(der)
            serial = serial_of_certificate(cert)
            if self.revoked is not None and self.revoked(principal.name, serial):
                raise Unauthenticated(f"the client certificate (serial {serial}) is revoked")
            return principal
        raise Unauthenticated(
            "authentication required: present a bearer token or a client certificate"
        )

    @staticmethod
    def _peer_certificate(request: web.Request) -> bytes | None:
        transport = request.transport
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
            return None
        return obj.getpeercert(binary_form=True) or None


def route_access(request: web.Request) -> Access | None:
    """The access a route needs. None only for ``/v1/apply`` and ``/v1/delete`` (the handler
    authorizes each document), ``/v1/whoami`` and ``/openapi.json`` (authentication is
    enough). Every other route, including ones this table does not know yet, needs a verb
    from its method (GET: get, POST/PUT/PATCH: apply, DELETE: delete) on the resource its
    path names (``/v1/RESOURCE/...``): deny unless granted."""
    path, method = request.path, request.method
    if path in ("/v1/apply", "/v1/delete") and method == "POST":
        return None
    if path in ("/v1/whoami", "/openapi.json"):
        return None
    if path == "/v1/certs":
        return Access(verb="certs", resource="certificates")
    if path == "/v1/console/proxy":
        return Access(verb="debug", resource="proxies")
    if path.startswith("/debug/"):
        return Access(verb="debug", resource=path.split("/")[2] or "debug")
    if path == "/metrics":
        return Access(verb="debug", resource="metrics")
    verb = {"GET": "get", "HEAD": "get", "DELETE": "delete"}.get(method, "apply")
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["v1"]:
        parts = parts[1:]
    resource = {"policy": "policies", "meshconfig": "meshconfigs", "grants": "accessgrants"}.get(
        parts[0] if parts else "", parts[0] if parts else "root"
    )
    name = parts[1] if resource == "accessgrants" and len(parts) > 1 else ""
    return Access(verb=verb, resource=resource, name=name)


class Guard:
    """The authentication and authorization middleware (see the module docstring)."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        authorizer: Authorizer,
        public_metrics: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.authorizer = authorizer
        #: Told of every principal it authorized (the API writer vouches for it in the seals
        #: of what it appends on its behalf: ``docs/log-integrity.md``).
        self.vouch: Callable[[Principal], None] | None = None
        self.public = PUBLIC_PATHS | ({"/metrics"} if public_metrics else set())
        self.registry = registry or CollectorRegistry()
        self.refusals = Counter(
            "smc_api_auth_refusals",
            "API requests refused: unauthenticated (401), forbidden (403), unavailable "
            "(the apiserver did not answer a review)",
            ["reason"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "smc_api_auth_seconds",
            "Time spent authenticating a request and authorizing each of its accesses",
            ["step"],
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5, 2.5),
            registry=self.registry,
        )
        self.allowed_total = Counter(
            "smc_api_authenticated_requests",
            "API requests from an authenticated principal, by how it was proven",
            ["method"],
            registry=self.registry,
        )

    def install(self, app: web.Application) -> None:
        """Put the guard in front of every other middleware of ``app``."""
        app[GUARD] = self
        app.middlewares.insert(0, self.middleware)

    async def authorize(self, principal: Principal, access: Access) -> None:
        """Raise :class:`Forbidden` unless ``principal`` may do ``access``."""
        if principal.is_admin and principal.impersonated_by is None:
            if self.vouch is not None:
                self.vouch(principal)
            return
        t0 = time.perf_counter()
        ok, reason = await self.authorizer.allowed(principal, access)
        self.seconds.labels("authorize").observe(time.perf_counter() - t0)
        if not ok:
            log.info("denied %s: %s (%s)", principal.actor, access.describe(), reason)
            raise Forbidden(
                principal=principal.actor,
                verb=access.verb,
                resource=access.resource + (f"/{access.name}" if access.name else ""),
                namespace=access.namespace,
            )
        if self.vouch is not None:
            self.vouch(principal)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in self.public or request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        t0 = time.perf_counter()
        try:
            principal = await self.authenticator.authenticate(request)
            self.seconds.labels("authenticate").observe(time.perf_counter() - t0)
        except Unauthenticated as exc:
            return self._refuse(request, 401, "unauthenticated", str(exc))
        except ReviewUnavailable as exc:
            log.warning("TokenReview failed: %s", exc)
            return self._refuse(
                request, 503, "unavailable", "cannot verify the token now (apiserver); retry"
            )
        try:
            target = request.headers.get("Impersonate-User") or request.headers.get("X-SMC-Actor")
            if target is not None and target != principal.name:
                if not _ACTOR.match(target):
                    return web.json_response(
                        {
                            "errors": [
                                {
                                    "document": "request",
                                    "field": "X-SMC-Actor",
                                    "reason": "must be 1-253 printable ASCII characters",
                                }
                            ]
                        },
                        status=400,
                    )
                await self.authorize(
                    principal, Access(verb="impersonate", resource="users", name=target)
                )
                principal = principal.impersonate(target)
            access = route_access(request)
            if access is not None:
                await self.authorize(principal, access)
            request[PRINCIPAL] = principal
            self.allowed_total.labels(principal.method).inc()
            return await handler(request)
        except Forbidden as exc:
            return self._refuse(
                request,
                403,
                "forbidden",
                str(exc),
                principal=exc.principal,
                verb=exc.verb,
                resource=exc.resource,
                namespace=exc.namespace,
            )
        except ReviewUnavailable as exc:
            log.warning("SubjectAccessReview failed: %s", exc)
            return self._refuse(
                request, 503, "unavailable", "cannot check authorization now (apiserver); retry"
            )

    def _refuse(
        self, request: web.Request, status: int, reason: str, text: str, **extra: Any
    ) -> web.Response:
        self.refusals.labels(reason).inc()
        peer = request.remote or "?"
        log.warning("refused %s %s from %s: %s", request.method, request.path, peer, text)
        return _error(status, text, **extra)
