"""One API door: everything a server needs to authenticate its callers, in one call.

Role: :func:`open_door` prepares, before an HTTP API listens on ``host:port``: its folder
(``<config>/servers/<host>-<port>`` unless given), the local admin token (0600, made on first
start), the API's TLS material and SSL context (client certificates from the given CA
bundles; the mesh trust bundle can be added later through :attr:`Door.roots`), the client
credential file the CLI finds without flags (0600), and the :class:`~smc.auth.Guard` with the
given token reviewer and authorizer (AccessGrants in the policy projection by default).
``smc serve`` and the in-process API of ``smc demo`` both open their door here.
Concurrency: file work only; call it before the server starts.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from smc.auth._files import server_dir
from smc.auth._grants import GrantAuthorizer
from smc.auth._guard import Authenticator, Authorizer, Guard
from smc.auth._kube import TokenReviewer
from smc.auth._local import ClientCredentials, LocalCredential
from smc.auth._tls import ApiTLS, ClientRoots, server_context
from smc.projections import CertsProjection, PolicyProjection

__all__ = ["Door", "open_door"]


@dataclass(kw_only=True, slots=True)
class Door:
    guard: Guard
    ssl_context: ssl.SSLContext
    roots: ClientRoots
    credentials: ClientCredentials
    credentials_path: Path
    #: The admin token's file (0600), for a person to paste into the console.
    token_path: Path
    url: str


def open_door(
    *,
    host: str,
    port: int,
    policy: PolicyProjection,
    certs: CertsProjection | None = None,
    folder: Path | None = None,
    api_cert: str | None = None,
    api_key: str | None = None,
    client_cas: Sequence[str] = (),
    tokens: TokenReviewer | None = None,
    authorizer: Authorizer | None = None,
    public_metrics: bool = False,
) -> Door:
    """Prepare the door of an API on ``host:port`` (see the module docstring)."""
    own = folder or server_dir(host, port)
    local = LocalCredential(own)
    token = local.ensure()
    material = ApiTLS(own, hosts=(host,), cert_file=api_cert, key_file=api_key).ensure()
    ctx, roots = server_context(material, client_cas=client_cas)
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"https://{f'[{client_host}]' if ':' in client_host else client_host}:{port}"
    creds = ClientCredentials(server=url, ca_pem=material.ca_pem, token=token)
    path = ClientCredentials.local_path(url)
    creds.save(path)
    if folder is not None and folder != path.parent:
        creds.save(folder / "credentials.json")

    def revoked(identity: str, serial: str) -> bool:
        """Whether the certificate events record ``serial`` of ``identity`` as revoked: an
        identity's certificate, or a proxy's (its pod or VM left, or the operator revoked it)."""
        assert certs is not None
        rec = certs.certs.get(identity, {}).get(serial)
        if rec is not None and rec.status == "revoked":
            return True
        mine = certs.proxy_serial(serial)
        return mine is not None and mine.identity == identity and mine.status == "revoked"

    guard = Guard(
        authenticator=Authenticator(
            local=local,
            tokens=tokens,
            revoked=revoked if certs is not None else None,
        ),
        authorizer=authorizer or GrantAuthorizer(policy),
        public_metrics=public_metrics,
    )
    return Door(
        guard=guard,
        ssl_context=ctx,
        roots=roots,
        credentials=creds,
        credentials_path=path,
        token_path=local.path,
        url=url,
    )
