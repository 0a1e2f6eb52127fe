"""The single-machine credential: an admin token created on first start, and the client file.

Role: :class:`LocalCredential` owns ``admin.token`` in a server's folder (created 0600 on
first start from 32 random bytes, reused afterwards, as a kubeconfig or Vault's dev token is);
it verifies presented tokens in constant time and names their holder ``local:admin`` (group
``smc:admins``, allowed everything: the bootstrap of every other grant). The token is never
logged. :class:`ClientCredentials` is what a client needs to call a server: its URL, the CA
that signs the server's certificate, and a bearer token or a client certificate;
:meth:`ClientCredentials.for_server` finds the local file of a server by its address, so the
CLI needs no flags on the machine that runs ``smc serve``.
Concurrency: file reads/writes only; a :class:`LocalCredential` is read-only after ``ensure``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from smc.auth._errors import CredentialError
from smc.auth._files import server_dir, write_private
from smc.auth._principal import ADMINS_GROUP, AUTHENTICATED_GROUP, Principal

__all__ = ["ADMIN_NAME", "TOKEN_PREFIX", "ClientCredentials", "LocalCredential"]

ADMIN_NAME = "local:admin"
#: Local tokens start with this, so they are never sent to the apiserver for review.
TOKEN_PREFIX = "smc-local-"


class LocalCredential:
    """The admin token of one server (``<folder>/admin.token``, 0600)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "admin.token"
        self._digest: bytes | None = None

    def ensure(self) -> str:
        """Read the token, creating it (0600) on first start; returns it."""
        try:
            token = self.path.read_text("ascii").strip()
        except FileNotFoundError:
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            write_private(self.path, token + "\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialError(f"{self.path}: cannot read the admin token: {exc}") from exc
        if not token.startswith(TOKEN_PREFIX) or len(token) < len(TOKEN_PREFIX) + 32:
            raise CredentialError(f"{self.path}: not an SMC admin token (delete it to make one)")
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise CredentialError(
                f"{self.path}: mode {mode:o} lets other users read the admin token; "
                f"chmod 600 {self.path}"
            )
        self._digest = hashlib.sha256(token.encode()).digest()
        return token

    def verify(self, token: str) -> Principal | None:
        """``local:admin`` if ``token`` is the admin token (constant-time), else None."""
        if self._digest is None:
            return None
        presented = hashlib.sha256(token.encode()).digest()
        if not hmac.compare_digest(presented, self._digest):
            return None
        return Principal(
            name=ADMIN_NAME, method="local-token", groups=(ADMINS_GROUP, AUTHENTICATED_GROUP)
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientCredentials:
    """How to call one server: URL, the CA of its serving certificate, and a credential."""

    server: str
    ca_pem: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the server against ``ca_pem`` (the system roots without it); presents the
        client certificate when one is given."""
        ctx = (
            ssl.create_default_context(cadata=self.ca_pem)
            if self.ca_pem
            else (ssl.create_default_context())
        )
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise CredentialError(f"client certificate {self.cert_file}: {exc}") from exc
        return ctx

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def save(self, path: Path) -> None:
        """Write as JSON, 0600 (it holds a token)."""
        body = {"server": self.server, "ca": self.ca_pem, "token": self.token}
        write_private(path, json.dumps(body, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ClientCredentials:
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise CredentialError(f"{path}: cannot read credentials: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("server"), str):
            raise CredentialError(f"{path}: field 'server' is missing or not a string")
        for key in ("ca", "token"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise CredentialError(f"{path}: field {key!r} must be a string")
        return cls(server=data["server"], ca_pem=data.get("ca"), token=data.get("token"))

    @staticmethod
    def local_path(server: str) -> Path:
        """The credential file ``smc serve`` writes for the server at URL ``server``."""
        parts = urlsplit(server)
        if parts.scheme != "https" or not parts.hostname:
            raise CredentialError(f"server {server!r}: expected https://HOST:PORT")
        return server_dir(parts.hostname, parts.port or 443) / "credentials.json"

    @classmethod
    def for_server(
        cls,
        server: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> ClientCredentials:
        """Credentials for ``server``: explicit ones (a token or token file, ``$SMC_TOKEN``, a
        client certificate) win; otherwise the local file ``smc serve`` wrote for that address
        (also looked up under 0.0.0.0 for a server bound to every interface)."""
        token = token or os.environ.get("SMC_TOKEN") or None
        if token_file:
            try:
                token = Path(token_file).read_text("ascii").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise CredentialError(f"--token-file {token_file}: {exc}") from exc
        ca_pem: str | None = None
        if ca_file:
            try:
                ca_pem = Path(ca_file).read_text("ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise CredentialError(f"--cacert {ca_file}: {exc}") from exc
        local: ClientCredentials | None = None
        path = cls.local_path(server)
        parts = urlsplit(server)
        for candidate in (path, server_dir("0.0.0.0", parts.port or 443) / path.name):
            if candidate.is_file():
                local = cls.load(candidate)
                break
        if token is None and cert_file is None and local is not None:
            token = local.token
        if ca_pem is None and local is not None:
            ca_pem = local.ca_pem
        if token is None and cert_file is None:
            raise CredentialError(
                f"no credential for {server}: give --token-file FILE (or $SMC_TOKEN) or "
                f"--cert/--key, or run this on the server's machine ({path} is missing)"
            )
        return cls(
            server=server.rstrip("/"),
            ca_pem=ca_pem,
            token=token,
            cert_file=cert_file,
            key_file=key_file,
        )
