"""Applications that misbehave on purpose, behind real sidecars, for traffic-policy tests.

Role: :class:`MisbehavingApp` is an aiohttp server on ``127.0.0.1`` whose routes fail, stall
or relay on request: ``/flaky`` answers 503 with probability ``fail_ratio`` (a real coin, not a
pattern a retry could learn), ``/slow?ms=N`` answers after N ms, ``/relay?to=URL&host=H``
calls ``URL`` with ``Host: H`` copying the trace headers (a service calling the next one
through its own sidecar), and while :attr:`failing` is set every request answers 500 (an
endpoint gone bad, for outlier detection). Every answer names the app. :class:`AppSidecar` is a
:class:`~smc.testing.mesh.Sidecar` whose application is one of these; :class:`TcpEcho` and
:func:`tls_server_context` are the external destinations of egress tests.
Concurrency: everything runs on the caller's asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smc.testing.mesh import Sidecar
from smc.testing.ports import free_port

__all__ = ["TRACE_HEADERS", "AppSidecar", "MisbehavingApp", "TcpEcho", "tls_server_context"]

#: Headers a service copies from its request to the calls it makes (Zipkin B3, W3C, Envoy).
TRACE_HEADERS = (
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "traceparent",
    "tracestate",
    "x-ot-span-context",
)


class MisbehavingApp:
    """An HTTP application on ``127.0.0.1:port`` that fails, stalls or relays on request."""

    def __init__(
        self, *, name: str, port: int, fail_ratio: float = 0.5, host: str = "127.0.0.1"
    ) -> None:
        self.name = name
        self.port = port
        self.host = host
        self.fail_ratio = fail_ratio
        #: While set, every request answers 500.
        self.failing = False
        self.requests = 0
        self._rng = random.Random()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _body(self, request: web.Request, **extra: object) -> dict[str, object]:
        return {
            "app": self.name,
            "path": request.path,
            "method": request.method,
            "xfcc": request.headers.get("x-forwarded-client-cert", ""),
            "trace": {h: request.headers[h] for h in TRACE_HEADERS if h in request.headers},
            **extra,
        }

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.failing:
            return web.json_response(self._body(request, failed=True), status=500)
        if request.path.startswith("/flaky") and self._rng.random() < self.fail_ratio:
            return web.json_response(self._body(request, failed=True), status=503)
        if request.path.startswith("/slow"):
            await asyncio.sleep(int(request.query.get("ms", "1000")) / 1000)
        if request.path.startswith("/relay"):
            return await self._relay(request)
        return web.json_response(self._body(request))

    async def _relay(self, request: web.Request) -> web.Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=10),
            )
        headers = {h: request.headers[h] for h in TRACE_HEADERS if h in request.headers}
        headers["Host"] = request.query["host"]
        async with self._session.get(request.query["to"], headers=headers) as resp:
            upstream = await resp.json(content_type=None)
            return web.json_response(self._body(request, upstream=upstream), status=resp.status)


class AppSidecar(Sidecar):
    """A sidecar whose application is a :class:`MisbehavingApp` (``.app``)."""

    def __init__(
        self, *, namespace: str, name: str, address: str, workdir: Path, fail_ratio: float = 0.5
    ) -> None:
        super().__init__(namespace=namespace, name=name, address=address, workdir=workdir)
        self.app = MisbehavingApp(name=self.app_name, port=self.app_port, fail_ratio=fail_ratio)

    async def start_app(self) -> None:
        await self.app.start()

    async def stop(self) -> None:
        await super().stop()
        await self.app.stop()


class TcpEcho:
    """A TCP server on ``host`` that echoes each line back, prefixed with ``echo:``."""

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            line = await reader.readline()
            writer.write(b"echo:" + line)
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def tls_server_context(directory: Path, host: str) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for ``host`` (a fresh self-signed CA signs it) and the CA file."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / f"{host}.crt"
    key_file = directory / f"{host}.key"
    ca_file = directory / "egress-ca.crt"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx, ca_file
