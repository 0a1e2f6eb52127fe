"""A lean HTTP transport for hvac: a ``requests.Session`` look-alike on ``http.client``.

Role: hvac's adapter calls ``session.request(method=..., url=..., headers=...,
allow_redirects=..., cert=..., verify=..., timeout=..., proxies=..., json=...)`` and
reads ``ok``, ``status_code``, ``headers``, ``text`` and ``json()`` from the answer.
Measured on loopback against OpenBao, ``requests`` costs about twice the client CPU
per signature (environment proxy look-ups, hooks, cookie jars, setting merges:
~1.4 ms vs ~0.75 ms per ``issue``, key and CSR generation included); this transport
keeps a pool of keep-alive ``http.client`` connections and nothing else.
Redirects are not followed and proxies are not supported: use
``VaultIssuer(transport="requests")`` for those.
Concurrency: thread-safe; a connection is used by one thread at a time (taken from and
returned to a lock-protected pool).
"""

from __future__ import annotations

import http.client
import json as jsonlib
import ssl
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

__all__ = ["HttpClientSession", "TransportError", "TransportTimeout"]


class TransportError(Exception):
    """Connection refused/reset or another transport failure (carries no secrets)."""


class TransportTimeout(TransportError):
    """Connect or read timeout."""


class _Response:
    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status: int, headers: http.client.HTTPMessage, content: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = content

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class HttpClientSession:
    """Just enough of ``requests.Session`` for ``hvac.adapters.JSONAdapter``."""

    def __init__(
        self,
        *,
        base_url: str,
        verify: bool | str = True,
        cert: tuple[str, str] | None = None,
        timeout: float = 5.0,
        pool_size: int = 16,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TransportError(
                f"unsupported Vault URL {base_url!r}: expected http(s)://host:port"
            )
        self.verify = verify
        self.cert = cert
        self.proxies: dict[str, str] = {}
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._timeout = timeout
        self._pool_size = pool_size
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        if self._scheme == "https":
            if verify is False:
                ctx = ssl._create_unverified_context()
            elif isinstance(verify, str):
                ctx = ssl.create_default_context(cafile=verify)
            else:
                ctx = ssl.create_default_context()
            if cert is not None:
                ctx.load_cert_chain(cert[0], cert[1])
            self._context = ctx

    def _new(self, timeout: float) -> http.client.HTTPConnection:
        if self._context is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _take(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                conn = self._idle.pop()
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                return conn, True
        return self._new(timeout), False

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def request(
        self,
        *,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
        proxies: Mapping[str, str] | None = None,
        data: Any = None,
        **_ignored: Any,
    ) -> _Response:
        if proxies:
            raise TransportError("proxies are not supported by this transport")
        parts = urlsplit(url)
        target = parts.path or "/"
        query = parts.query
        if params:
            query = f"{query}&{urlencode(params)}" if query else urlencode(params)
        if query:
            target = f"{target}?{query}"
        hdrs = dict(headers or {})
        body: bytes | None = None
        if json is not None:
            body = jsonlib.dumps(json).encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        elif data is not None:
            body = data if isinstance(data, bytes) else str(data).encode("utf-8")
        limit = self._timeout if timeout is None else timeout
        for attempt in (0, 1):
            conn, reused = self._take(limit)
            try:
                conn.request(method.upper(), target, body=body, headers=hdrs)
                resp = conn.getresponse()
                content = resp.read()
            except TimeoutError as exc:
                conn.close()
                raise TransportTimeout("timed out") from exc
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                # a keep-alive connection the server closed meanwhile: retry once on a
                # fresh one (Vault's sign/revoke are safe to repeat)
                if reused and attempt == 0:
                    continue
                if isinstance(exc, ConnectionRefusedError):
                    raise TransportError("connection refused") from exc
                if isinstance(exc, ssl.SSLError):
                    raise TransportError(
                        f"TLS handshake failed ({type(exc).__name__}: check `verify`,"
                        " the CA bundle for Vault's certificate)"
                    ) from exc
                raise TransportError(type(exc).__name__) from exc
            if resp.will_close:
                conn.close()
            else:
                self._give(conn)
            return _Response(resp.status, resp.headers, content)
        raise TransportError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
