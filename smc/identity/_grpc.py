"""The certificate service on the network: gRPC over TLS (server-authenticated).

Role: :class:`CertificateServer` serves :data:`smc.agent.SIGN_METHOD` (JSON request and
response, see :mod:`smc.agent._protocol`) on its own port (``smc serve --ca-listen``), over
TLS only: agents verify the server with the mesh CA bundle; they prove who they are inside
the request (token, join token or current certificate), since a pod's first request has no
certificate yet. Errors map onto gRPC codes: a refused proof is UNAUTHENTICATED (with the
refusal's kind), a malformed request or CSR INVALID_ARGUMENT, an unavailable issuer or a
control plane not caught up UNAVAILABLE. The TLS material can be rotated in place
(:meth:`CertificateServer.update_tls`; new handshakes get it).
Concurrency: one asyncio loop (grpc.aio); the TLS fetch callback runs on gRPC's threads and
only swaps a value under a lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from smc.agent._errors import InvalidMessage
from smc.agent._protocol import SIGN_METHOD, SignRequest
from smc.ca import CAError, IssuerUnavailable
from smc.identity._errors import IdentityError, ProofRefused, ServiceNotReady
from smc.identity._service import ProxyCertificateService

__all__ = ["CertificateServer"]

log = logging.getLogger("smc.identity.grpc")

_SERVICE, _, _METHOD = SIGN_METHOD.strip("/").partition("/")


class CertificateServer:
    """gRPC + TLS front of a :class:`ProxyCertificateService`."""

    def __init__(self, service: ProxyCertificateService) -> None:
        self.service = service
        self._server: grpc.aio.Server | None = None
        self._lock = threading.Lock()
        self._pending: tuple[str, str] | None = None
        self._current: tuple[str, str] | None = None
        self.port: int | None = None

    async def _sign(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            req = SignRequest.decode(raw)
            resp = await self.service.sign(req)
        except InvalidMessage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ProofRefused as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except (ServiceNotReady, IssuerUnavailable) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except (CAError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except IdentityError as exc:  # the apiserver could not be asked
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return resp.encode()

    def _config(self, cert_pem: str, key_pem: str) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(key_pem.encode("ascii"), cert_pem.encode("ascii"))]
        )

    def _fetch(self) -> Any:
        with self._lock:
            pending, self._pending = self._pending, None
        return None if pending is None else self._config(*pending)

    def update_tls(self, *, cert_pem: str, key_pem: str) -> bool:
        """Serve new TLS material on new handshakes; False when it did not change."""
        if (cert_pem, key_pem) == self._current:
            return False
        with self._lock:
            self._pending = self._current = (cert_pem, key_pem)
        return True

    async def start(self, *, host: str, port: int, cert_pem: str, key_pem: str) -> int:
        """Listen on ``host:port`` over TLS; returns the bound port."""
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            _SERVICE, {_METHOD: grpc.unary_unary_rpc_method_handler(self._sign)}
        )
        server.add_generic_rpc_handlers((handler,))
        self._current = (cert_pem, key_pem)
        creds = grpc.dynamic_ssl_server_credentials(
            self._config(cert_pem, key_pem), self._fetch, require_client_authentication=False
        )
        bound = server.add_secure_port(f"{host}:{port}", creds)
        await server.start()
        self._server = server
        self.port = int(bound)
        return self.port

    async def stop(self, *, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
