"""The certificate service on the network: HTTPS (server-authenticated TLS), one method.

Role: :class:`CertificateServer` serves ``POST`` :data:`smc.agent.SIGN_METHOD` (JSON request
and response, see :mod:`smc.agent._protocol`) on its own port (``smc serve --ca-listen``),
over TLS only: agents verify the server with the mesh CA bundle; they prove who they are
inside the request (token, join token or current certificate), since a pod's first request
has no certificate yet. HTTP/1.1 so that the agent needs only Python's ``http.client`` and
``ssl`` (its memory budget). Errors are HTTP statuses with ``{"code", "error"}``: a refused
proof is 401 ``UNAUTHENTICATED`` (with the refusal's kind), a malformed request or CSR 400
``INVALID_ARGUMENT``, an unavailable issuer or a control plane not caught up 503
``UNAVAILABLE``; any other path 404, any other method 405; a body over 256 KiB is refused
before it is read whole. The TLS material can be rotated in place
(:meth:`CertificateServer.update_tls`; new handshakes get it).
Concurrency: one asyncio loop (aiohttp); TLS material is loaded on that loop.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from typing import Any

from aiohttp import web

from smc.agent._errors import InvalidMessage
from smc.agent._protocol import HTTP_STATUS, SIGN_METHOD, SignRequest
from smc.ca import CAError, IssuerUnavailable
from smc.identity._errors import IdentityError, ProofRefused, ServiceNotReady
from smc.identity._service import ProxyCertificateService

__all__ = ["CertificateServer"]

log = logging.getLogger("smc.identity.https")

_MAX_BODY = 256 * 1024


def _load(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """Load PEM material into ``ctx`` (``ssl`` takes files: a private 0700 directory, removed
    at once)."""
    with tempfile.TemporaryDirectory(prefix="smc-ca-tls-") as folder:
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, text in ((cert, cert_pem), (key, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        ctx.load_cert_chain(cert, key)


def _error(code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "error": message}, status=HTTP_STATUS.get(code, 500))


class CertificateServer:
    """HTTPS front of a :class:`ProxyCertificateService`."""

    def __init__(self, service: ProxyCertificateService) -> None:
        self.service = service
        self._runner: web.AppRunner | None = None
        self._ctx: ssl.SSLContext | None = None
        self._current: tuple[str, str] | None = None
        self.port: int | None = None

    async def _sign(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error("INVALID_ARGUMENT", f"SignRequest: longer than {_MAX_BODY} bytes")
        try:
            req = SignRequest.decode(raw)
            resp = await self.service.sign(req)
        except InvalidMessage as exc:
            return _error("INVALID_ARGUMENT", str(exc))
        except ProofRefused as exc:
            return _error("UNAUTHENTICATED", str(exc))
        except (ServiceNotReady, IssuerUnavailable) as exc:
            return _error("UNAVAILABLE", str(exc))
        except (CAError, ValueError) as exc:
            return _error("INVALID_ARGUMENT", str(exc))
        except IdentityError as exc:  # the apiserver could not be asked
            return _error("UNAVAILABLE", str(exc))
        return web.Response(body=resp.encode(), content_type="application/json")

    async def _other(self, request: web.Request) -> web.StreamResponse:
        if request.path == SIGN_METHOD:
            return web.json_response(
                {"code": "INVALID_ARGUMENT", "error": f"{SIGN_METHOD}: use POST"}, status=405
            )
        return _error("NOT_FOUND", f"no such method: {request.path[:200]}")

    def update_tls(self, *, cert_pem: str, key_pem: str) -> bool:
        """Serve new TLS material on new handshakes; False when it did not change."""
        if (cert_pem, key_pem) == self._current:
            return False
        if self._ctx is not None:
            _load(self._ctx, cert_pem, key_pem)
        self._current = (cert_pem, key_pem)
        return True

    async def start(self, *, host: str, port: int, cert_pem: str, key_pem: str) -> int:
        """Listen on ``host:port`` over TLS; returns the bound port."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load(ctx, cert_pem, key_pem)
        self._ctx = ctx
        self._current = (cert_pem, key_pem)
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_post(SIGN_METHOD, self._sign)
        app.router.add_route("*", "/{tail:.*}", self._other)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True)
        await site.start()
        self._runner = runner
        server: Any = site._server  # aiohttp keeps the bound socket there
        self.port = int(server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, *, grace: float | None = 1.0) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
