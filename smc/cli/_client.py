"""The CLI's client path: commands talk to a running server's HTTPS API, with a credential.

Role: when a server is configured (``smc --server URL`` or ``$SMC_SERVER``), ``smc apply``,
``smc delete`` and ``smc get`` send their request to it instead of writing to the log, so
the server authenticates the caller, authorizes every document and records the caller as the
actor. :class:`ApiClient` carries the credential: ``--token-file``/``$SMC_TOKEN``, a client
certificate (``--cert``/``--key``), or, with neither, the local credential file ``smc serve``
wrote for that address (:meth:`smc.auth.ClientCredentials.for_server`); the server is verified
against ``--cacert`` or that file's CA. ``--as NAME`` becomes impersonation (the server
requires the ``impersonate`` grant and records both names). :func:`operator_actor` is the
actor of a direct log write: ``unix:<login of the process uid>`` (the log's own permissions
guard that door), ``unix:USER as NAME`` with ``--as``.
Concurrency: one blocking request at a time (urllib).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from smc.auth import ClientCredentials
from smc.errors import SMCError

__all__ = ["ApiClient", "ClientError", "client_from", "gather_files", "operator_actor"]

_SUFFIXES = (".yaml", ".yml", ".json")


class ClientError(SMCError):
    """The server could not be reached, or refused the request as a whole (401/403/5xx)."""


def operator_actor(as_name: str | None = None) -> str:
    """The principal of a direct log write (see the module docstring)."""
    import pwd

    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    me = f"unix:{user}"
    return f"{me} as {as_name}" if as_name and as_name != me else me


class ApiClient:
    """Requests to one server's API with one credential."""

    def __init__(self, creds: ClientCredentials, *, timeout: float = 60.0) -> None:
        self.creds = creds
        self.timeout = timeout
        self._ctx = creds.ssl_context()

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, parsed JSON body); 4xx/5xx are returned, unreachable raises ClientError."""
        url = self.creds.server + path
        req = urllib.request.Request(
            url, data=body, method=method, headers={**self.creds.headers(), **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ctx) as resp:
                raw, status = resp.read(), int(resp.status)
        except urllib.error.HTTPError as err:
            raw, status = err.read(), int(err.code)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"{url}: cannot reach the server: {reason}") from exc
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def checked(self, path: str, **kwargs: Any) -> Any:
        """The body of a 2xx answer; otherwise ClientError with the server's reason."""
        status, body = self.request(path, **kwargs)
        if 200 <= status < 300:
            return body
        raise ClientError(f"{self.creds.server}{path}: HTTP {status}: {reason_of(body)}")


def reason_of(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
        return "; ".join(str(e.get("reason", e)) for e in body["errors"] if isinstance(e, dict))
    return str(body)[:300]


def client_from(ctx: click.Context) -> ApiClient | None:
    """The client of the configured server (root options), or None for the direct path."""
    obj = ctx.find_root().obj or {}
    server = obj.get("server")
    if not server:
        return None
    creds = ClientCredentials.for_server(
        server,
        token_file=obj.get("token_file"),
        ca_file=obj.get("cacert"),
        cert_file=obj.get("cert"),
        key_file=obj.get("key"),
    )
    return ApiClient(creds)


def gather_files(paths: tuple[str, ...]) -> list[tuple[str, bytes | None, str | None]]:
    """(label, bytes, problem) per file to send: files, directories (recursive, ``*.yaml``,
    ``*.yml``, ``*.json``) and ``-`` (stdin)."""
    import sys

    out: list[tuple[str, bytes | None, str | None]] = []
    for given in paths:
        if given == "-":
            out.append(("-", sys.stdin.buffer.read(), None))
            continue
        p = Path(given)
        files = (
            sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES)
            if p.is_dir()
            else [p]
        )
        if p.is_dir() and not files:
            out.append((given, None, "directory holds no *.yaml, *.yml or *.json file"))
        for f in files:
            try:
                out.append((str(f), f.read_bytes(), None))
            except OSError as exc:
                out.append((str(f), None, f"cannot read: {exc.strerror}"))
    return out


def change_via_api(
    client: ApiClient,
    *,
    verb: str,
    files: tuple[str, ...],
    actor: str | None,
    request_id: str | None,
    dry_run: bool,
    output: str,
    ignore_not_found: bool = False,
) -> bool:
    """``apply``/``delete`` through the API, one request per file; prints like the direct
    path; returns whether every document succeeded."""
    import uuid

    ok = True
    reports = []
    rid = request_id or str(uuid.uuid4())
    query = []
    if dry_run:
        query.append("dryRun=true")
    if ignore_not_found:
        query.append("ignoreNotFound=true")
    path = f"/v1/{verb}" + ("?" + "&".join(query) if query else "")
    for i, (label, data, problem) in enumerate(gather_files(files)):
        if data is None:
            click.echo(f"error: {label}: {problem}", err=True)
            ok = False
            continue
        headers = {"X-Request-Id": rid if i == 0 else f"{rid}.{i}"}
        if actor:
            headers["X-SMC-Actor"] = actor
        status, body = client.request(path, method="POST", body=data, headers=headers)
        if status in (401, 403, 503) or not isinstance(body, dict) or "results" not in body:
            raise ClientError(
                f"{client.creds.server}{path} ({label}): HTTP {status}: {reason_of(body)}"
            )
        reports.append(body)
        ok = ok and status == 200
        if output == "json":
            continue
        suffix = " (dry run)" if dry_run else ""
        for r in body["results"]:
            if r.get("errors"):
                for e in r["errors"]:
                    click.echo(f"error: {e.get('message') or e.get('reason')}", err=True)
            else:
                click.echo(f"{r['document']} {r['status']}{suffix}")
    if output == "json":
        click.echo(
            json.dumps(reports[0] if len(reports) == 1 else reports, indent=2, sort_keys=True)
        )
    return ok
