"""The agent's side of the certificate service: one HTTPS request, standard library only.

Role: :func:`sign_over_https` sends a :class:`~smc.agent.SignRequest` to the control plane's
certificate service (``POST`` :data:`~smc.agent.SIGN_METHOD` on ``--ca-address``) over TLS,
verifying the service's certificate against the mesh CA bundle (and its name: the host of
the address, or ``server_name``), and returns the :class:`~smc.agent.SignResponse`; a refusal
raises :class:`~smc.agent.SigningRefused` carrying the service's code (``UNAUTHENTICATED``,
``INVALID_ARGUMENT``, ``UNAVAILABLE``; ``UNAVAILABLE`` too when the service cannot be
reached). Only ``http.client`` and ``ssl``: the resident agent imports this module.
:class:`CertificateClient` is the asyncio face of the same call (a worker thread) for the
in-process :class:`~smc.agent.Agent`, tests and benchmarks.
Concurrency: :func:`sign_over_https` blocks its thread for one request (a new connection
each time: renewals are hours apart); :class:`CertificateClient` may be used from one loop.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from typing import Any

from smc.agent._errors import InvalidMessage, SigningRefused
from smc.agent._protocol import SIGN_METHOD, SignRequest, SignResponse

__all__ = ["CertificateClient", "sign_over_https", "split_address"]

_MAX_ANSWER = 512 * 1024


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` or ``[V6]:PORT`` (ValueError naming the address)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--ca-address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class _Connection(http.client.HTTPSConnection):
    """An HTTPS connection that checks ``server_name`` instead of the host it dials."""

    def __init__(
        self, host: str, port: int, *, context: ssl.SSLContext, server_name: str, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)


def tls_context(ca_pem: str) -> ssl.SSLContext:
    """A TLS 1.2+ client context that trusts only ``ca_pem`` and checks the server's name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca_pem)
    return ctx


def sign_over_https(
    request: SignRequest,
    *,
    address: str,
    ca_pem: str,
    server_name: str | None = None,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> SignResponse:
    """Send ``request`` to the service at ``address``; its answer (see the module docstring)."""
    host, port = split_address(address)
    try:
        ctx = context or tls_context(ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise SigningRefused(f"the CA bundle is unusable: {exc}", code="INVALID_ARGUMENT") from exc
    conn = _Connection(host, port, context=ctx, server_name=server_name or host, timeout=timeout)
    try:
        conn.request(
            "POST",
            SIGN_METHOD,
            body=request.encode(),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        body = resp.read(_MAX_ANSWER + 1)
        status = resp.status
    except (OSError, http.client.HTTPException) as exc:
        raise SigningRefused(
            f"certificate service: UNAVAILABLE: {address}: {exc}", code="UNAVAILABLE"
        ) from exc
    finally:
        conn.close()
    if len(body) > _MAX_ANSWER:
        raise InvalidMessage(f"SignResponse: longer than {_MAX_ANSWER} bytes")
    if status == 200:
        return SignResponse.decode(body)
    code, detail = "UNAVAILABLE" if status >= 500 else "UNKNOWN", f"HTTP {status}"
    try:
        err = json.loads(body)
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            detail = str(err.get("error") or detail)
    except ValueError:
        pass
    raise SigningRefused(f"certificate service: {code}: {detail}", code=code)


class CertificateClient:
    """:func:`sign_over_https` from asyncio, in this client's own worker threads (not the
    loop's default executor, which a control plane on the same loop signs in)."""

    def __init__(
        self,
        *,
        address: str,
        ca_pem: str,
        server_name: str | None = None,
        timeout: float = 10.0,
        max_concurrency: int = 32,
    ) -> None:
        self.address = address
        self.ca_pem = ca_pem
        self.server_name = server_name
        self.timeout = timeout
        self._context = tls_context(ca_pem)
        self._max = max_concurrency
        self._executor: Any = None

    async def sign(self, request: SignRequest) -> SignResponse:
        import asyncio
        import functools
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._max, thread_name_prefix="smc-ca-client")
        call = functools.partial(
            sign_over_https,
            request,
            address=self.address,
            ca_pem=self.ca_pem,
            server_name=self.server_name,
            timeout=self.timeout,
            context=self._context,
        )
        result: SignResponse = await asyncio.get_running_loop().run_in_executor(
            self._executor, call
        )
        return result

    async def close(self) -> None:
        """Stop the worker threads (no connection is kept between requests)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
