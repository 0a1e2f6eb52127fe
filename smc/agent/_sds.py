"""The agent's local SDS server: hands the proxy's key and certificate to its Envoy only.

Role: a gRPC ``SecretDiscoveryService`` (state of the world, ``StreamSecrets`` and
``FetchSecrets``) on a unix socket beside the proxy. It serves one secret, ``default``: the
proxy's certificate chain and the private key the agent made in this process. The socket is
created in a directory of mode 0750 and is itself mode 0660, so only the agent's user and
group (the Envoy's) can connect; nothing listens on the network. When the agent renews, every
open stream gets the new secret (new ``version_info``, new nonce); a NACK is logged and not
re-sent.
Concurrency: one asyncio loop; :meth:`SdsServer.update` must be called on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from smc.agent._errors import AgentError, InvalidMessage
from smc.agent._wire import SECRET_TYPE, decode_request, encode_secret_response

__all__ = ["SECRET_TYPE", "WORKLOAD_SECRET", "SdsServer", "WorkloadSecret"]

log = logging.getLogger("smc.agent.sds")

WORKLOAD_SECRET = "default"
_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadSecret:
    """What ``default`` carries. ``key_pem`` never leaves this process but to the socket."""

    version: str
    chain_pem: str
    key_pem: str = field(repr=False)


class SdsServer:
    """SDS on a unix socket (see the module docstring)."""

    def __init__(self, *, socket_path: str | Path) -> None:
        self.socket_path = Path(socket_path)
        self._secret: WorkloadSecret | None = None
        self._watchers: set[asyncio.Event] = set()
        self._server: grpc.aio.Server | None = None
        self._nonces = itertools.count(1)
        self.streams = 0
        self.pushes = 0
        self.nacks = 0

    # ------------------------------------------------------------------ state
    @property
    def secret(self) -> WorkloadSecret | None:
        return self._secret

    async def update(self, secret: WorkloadSecret) -> None:
        """Serve ``secret`` from now on, and push it to every open stream."""
        self._secret = secret
        for wake in list(self._watchers):
            wake.set()

    def _response(self, names: list[str]) -> bytes:
        secret = self._secret
        assert secret is not None
        return encode_secret_response(
            version=secret.version,
            nonce=str(next(self._nonces)),
            name=WORKLOAD_SECRET if not names or WORKLOAD_SECRET in names else None,
            chain_pem=secret.chain_pem,
            key_pem=secret.key_pem,
        )

    # ------------------------------------------------------------------ gRPC
    async def _stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self.streams += 1
        wake = asyncio.Event()
        self._watchers.add(wake)
        state: dict[str, Any] = {"names": None, "resend": False, "done": False}

        async def read() -> None:
            try:
                async for raw in requests:
                    try:
                        req = decode_request(raw)
                    except InvalidMessage as exc:
                        log.warning("unreadable SDS request: %s", exc)
                        continue
                    if req.type_url and req.type_url != SECRET_TYPE:
                        continue
                    if req.error is not None:
                        self.nacks += 1
                        log.warning(
                            "Envoy refused secret version %s: %s", req.version_info, req.error
                        )
                        continue
                    names = sorted(req.resource_names)
                    if names != state["names"] or not req.response_nonce:
                        state["names"] = names
                        state["resend"] = True
                        wake.set()
            finally:
                state["done"] = True
                wake.set()

        reader = asyncio.create_task(read())
        sent: str | None = None
        try:
            while True:
                await wake.wait()
                wake.clear()
                if state["done"]:
                    return
                secret = self._secret
                names = state["names"]
                if secret is None or names is None:
                    continue
                if sent == secret.version and not state["resend"]:
                    continue
                state["resend"] = False
                if names and WORKLOAD_SECRET not in names:
                    continue
                yield self._response(names)
                self.pushes += 1
                sent = secret.version
        finally:
            self._watchers.discard(wake)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _fetch(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            req = decode_request(raw)
        except InvalidMessage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self._secret is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no certificate yet")
        return self._response(sorted(req.resource_names))

    async def start(self) -> None:
        """Listen on the unix socket (replacing a stale socket file)."""
        if len(os.fsencode(self.socket_path)) > 107:
            raise AgentError(
                f"--sds-socket {self.socket_path}: longer than the 107 bytes a unix socket path "
                "may have; choose a shorter path"
            )
        parent = self.socket_path.parent
        parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o750)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server()
        handlers: dict[str, Any] = {
            "StreamSecrets": grpc.stream_stream_rpc_method_handler(self._stream),
            "FetchSecrets": grpc.unary_unary_rpc_method_handler(self._fetch),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
        old = os.umask(0o117)
        try:
            bound = server.add_insecure_port(f"unix:{self.socket_path}")
        finally:
            os.umask(old)
        if not bound:
            raise AgentError(f"cannot listen on unix socket {self.socket_path}")
        await server.start()
        os.chmod(self.socket_path, 0o660)
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
