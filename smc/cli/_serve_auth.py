"""The authentication side of ``smc serve``: options, the guard, TLS and the local credential.

Role: :func:`api_auth_options` adds the options (``--auth-dir``, ``--api-cert/--api-key``,
``--admin-ca``, ``--public-metrics``, ``--api-token-audience``, ``--auth-cache-ttl``);
:func:`start_api_auth` prepares, before the API listens: the server's folder
(``<config>/servers/<host>-<port>``, see :mod:`smc.auth`), the local admin token (0600, made
on first start) and the client credential file beside it, the API's TLS material and SSL
context (client certificates from ``--admin-ca``, and from the mesh trust bundle once the
projections caught up), and the :class:`smc.auth.Guard`: tokens are the admin token or, with
``--kube``, Kubernetes tokens checked by TokenReview; authorization is SubjectAccessReview
with ``--kube``, else the AccessGrants on the log. :meth:`ApiAuth.follow_mesh_roots` keeps
adding the mesh roots the log records to the trusted client CAs.
Concurrency: runs on serve's asyncio loop; file work at start only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from smc.auth import (
    AccessReviewer,
    Authorizer,
    ClientRoots,
    CredentialError,
    Guard,
    Principal,
    TokenReviewer,
    open_door,
)
from smc.events import EventLog
from smc.projections import CertsProjection, PolicyProjection, ProjectionRunner

if TYPE_CHECKING:
    from smc.informers import KubeEndpoint

__all__ = [
    "ApiAuth",
    "ApiAuthOptions",
    "api_auth_options",
    "start_api_auth",
    "vouch_principals",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, kw_only=True, slots=True)
class ApiAuthOptions:
    auth_dir: str | None = None
    api_cert: str | None = None
    api_key: str | None = None
    admin_ca: tuple[str, ...] = ()
    public_metrics: bool = False
    token_audiences: tuple[str, ...] = ()
    cache_ttl: float = 30.0


def api_auth_options(f: F) -> F:
    """The ``smc serve`` options of the API's authentication (see the module docstring)."""
    options = [
        click.option(
            "--auth-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Folder of the API's TLS material, admin token (0600) and client credential "
            "file [default: $SMC_CONFIG_DIR or ~/.config/smc, /servers/HOST-PORT].",
        ),
        click.option(
            "--api-cert",
            type=click.Path(dir_okay=False),
            default=None,
            help="PEM serving certificate (chain) of the API instead of one from its own CA.",
        ),
        click.option("--api-key", type=click.Path(dir_okay=False), default=None),
        click.option(
            "--admin-ca",
            type=click.Path(dir_okay=False),
            multiple=True,
            help="PEM CA bundle whose client certificates may call the API (principal: the "
            "certificate's SPIFFE id or subject); mesh certificates are accepted too.",
        ),
        click.option(
            "--public-metrics",
            is_flag=True,
            help="Serve /metrics without authentication (for a scraper without credentials).",
        ),
        click.option(
            "--api-token-audience",
            multiple=True,
            help="With --kube: an audience Kubernetes tokens for the API must be minted for "
            "(repeatable; default: the apiserver's own).",
        ),
        click.option(
            "--auth-cache-ttl",
            type=click.FloatRange(min=0.0),
            default=30.0,
            show_default=True,
            help="Seconds a TokenReview/SubjectAccessReview answer is reused.",
        ),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def options_from(kwargs: dict[str, Any]) -> ApiAuthOptions:
    """Pop the options of :func:`api_auth_options` from a command's keyword arguments."""
    return ApiAuthOptions(
        auth_dir=kwargs.pop("auth_dir"),
        api_cert=kwargs.pop("api_cert"),
        api_key=kwargs.pop("api_key"),
        admin_ca=tuple(kwargs.pop("admin_ca")),
        public_metrics=kwargs.pop("public_metrics"),
        token_audiences=tuple(kwargs.pop("api_token_audience")),
        cache_ttl=kwargs.pop("auth_cache_ttl"),
    )


@dataclass(kw_only=True, slots=True)
class ApiAuth:
    guard: Guard
    ssl_context: ssl.SSLContext
    roots: ClientRoots
    credentials_path: Path
    url: str
    closers: list[Callable[[], Any]]

    async def follow_mesh_roots(
        self, runner: ProjectionRunner, stop: asyncio.Event, *, every: float = 2.0
    ) -> None:
        """Trust client certificates of the mesh CA: its roots, as the log records them."""
        certs = next(p for p in runner.projections if isinstance(p, CertsProjection))
        await runner.caught_up.wait()
        while not stop.is_set():
            pems = [pem for roots in certs.trust.values() for pem in roots]
            with contextlib.suppress(CredentialError):
                self.roots.add(pems)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)


def start_api_auth(
    options: ApiAuthOptions,
    *,
    http: tuple[str, int],
    runner: ProjectionRunner,
    kube: KubeEndpoint | None,
) -> ApiAuth:
    """Prepare the API's door before it listens (see the module docstring)."""
    host, port = http
    cas: list[str] = []
    for path in options.admin_ca:
        try:
            cas.append(Path(path).read_text("ascii"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialError(f"--admin-ca {path}: cannot read: {exc}") from exc
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    certs = next(p for p in runner.projections if isinstance(p, CertsProjection))
    closers: list[Callable[[], Any]] = []
    tokens: TokenReviewer | None = None
    authorizer: Authorizer | None = None
    if kube is not None:
        tokens = TokenReviewer(kube, audiences=options.token_audiences, ttl=options.cache_ttl)
        sar = AccessReviewer(kube, ttl=options.cache_ttl)
        authorizer = sar
        closers += [tokens.close, sar.close]
    door = open_door(
        host=host,
        port=port,
        policy=policy,
        certs=certs,
        folder=Path(options.auth_dir) if options.auth_dir else None,
        api_cert=options.api_cert,
        api_key=options.api_key,
        client_cas=cas,
        tokens=tokens,
        authorizer=authorizer,
        public_metrics=options.public_metrics,
    )
    return ApiAuth(
        guard=door.guard,
        ssl_context=door.ssl_context,
        roots=door.roots,
        credentials_path=door.credentials_path,
        url=door.url,
        closers=closers,
    )


def vouch_principals(guard: Guard, log: EventLog, *, basis: str) -> None:
    """Have the API's writer (``log``'s signer, if it seals) vouch in its seals for every
    principal the guard authorizes, with its groups and how it was authorized (``basis``:
    ``grants`` or ``kubernetes``), so readers re-check a policy record's principal."""
    signer = getattr(log, "signer", None)
    if signer is None:
        return

    def vouch(p: Principal) -> None:
        signer.vouch(p.actor, p.groups, basis=basis)

    guard.vouch = vouch
