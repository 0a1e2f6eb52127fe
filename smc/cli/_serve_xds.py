"""The xDS side of ``smc serve``: CA task, key store, controller, ADS server and its TLS.

Role: :class:`_Xds` runs the CA (or follows the issuing replica), the key store that is the
SDS source, the xDS controller and the ADS server; with ``--xds-tls`` it serves ADS over mTLS
and rotates the material every ``--xds-tls-refresh`` seconds (:func:`_tls_options` checks
those options). Split out of :mod:`smc.cli._serve`, which starts it.
Concurrency: one asyncio loop (serve's); issuers are called in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from smc.errors import SMCError
from smc.events import for_role
from smc.projections import (
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
)

if TYPE_CHECKING:
    from smc.ca import Issuer, IssuerFactory
    from smc.identity import IdentityOptions
    from smc.xds._server import ServerTLS

log = logging.getLogger("smc.serve")


@dataclass(frozen=True, kw_only=True, slots=True)
class _XdsTLSOptions:
    """``--xds-tls``: the server certificate's SANs, or its files (``--xds-cert/--xds-key``)."""

    ip_addresses: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    cert_file: str | None = None
    key_file: str | None = None
    #: Seconds between checks for new TLS material (files, trust bundle, certificate age).
    refresh: float = 300.0
    #: Lifetime of a server certificate the CA issues (renewed with a third of it left).
    lifetime_hours: float = 720.0
    #: Folder where the issued certificate and key are written (``tls.crt``, ``tls.key``).
    cert_out: str | None = None


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise OSError(f"{option} {path}: cannot read: {exc}") from exc


def _tls_options(
    *,
    host: str,
    sans: tuple[str, ...],
    cert_file: str | None,
    key_file: str | None,
    follow: bool,
    ca: str | None,
    refresh: float = 300.0,
    lifetime_hours: float = 720.0,
    cert_out: str | None = None,
) -> _XdsTLSOptions:
    """Check the ``--xds-tls`` options; the SANs are the ``--xds`` host (unless a wildcard),
    127.0.0.1, localhost and every ``--xds-san``."""
    if (cert_file is None) != (key_file is None):
        raise click.BadParameter("give both --xds-cert and --xds-key", param_hint="--xds-tls")
    if cert_out is not None and (cert_file is not None or follow):
        raise click.BadParameter(
            "--xds-cert-out writes the certificate the CA issues: not with --xds-cert or "
            "--ca follow",
            param_hint="--xds-cert-out",
        )
    if follow and cert_file is None:
        raise click.BadParameter(
            "a follower (--ca follow) has no issuer to sign the ADS server certificate: give "
            "--xds-cert FILE --xds-key FILE (e.g. the issuing replica's, from `smc certs`)",
            param_hint="--xds-tls",
        )
    if ca is not None and ca.startswith("vault:") and cert_file is None:
        raise click.BadParameter(
            "the ADS server certificate is signed by a local CA only; with --ca vault:URL give "
            "--xds-cert FILE --xds-key FILE",
            param_hint="--xds-tls",
        )
    names = [n for n in (host, "127.0.0.1", "localhost", *sans) if n not in ("0.0.0.0", "::")]
    ips: list[str] = []
    dns: list[str] = []
    for name in dict.fromkeys(names):
        try:
            ipaddress.ip_address(name)
            ips.append(name)
        except ValueError:
            dns.append(name)
    return _XdsTLSOptions(
        ip_addresses=tuple(ips),
        dns_names=tuple(dns),
        cert_file=cert_file,
        key_file=key_file,
        refresh=refresh,
        lifetime_hours=lifetime_hours,
        cert_out=cert_out,
    )


def _export_pair(folder: str, cert_pem: str, key_pem: str) -> None:
    """Write ``tls.crt`` and ``tls.key`` (0600) into ``folder`` when they differ, each
    replaced atomically (the key first, so a reader never pairs a new cert with an old key
    for long; readers re-check the pair)."""
    import os

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, text, mode in (("tls.key", key_pem, 0o600), ("tls.crt", cert_pem, 0o644)):
        target = path / name
        with contextlib.suppress(OSError):
            if target.read_text("ascii") == text:
                continue
        tmp = path / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(target)


def _renewal_due(cert_pem: str, *, lifetime_hours: float) -> bool:
    """Whether the first certificate of ``cert_pem`` has less than a third of the issued
    lifetime left (its not-before is backdated, so count from the end)."""
    from datetime import UTC, datetime

    from cryptography import x509

    from smc.injector._tls import renewal_due

    cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    return renewal_due(
        cert.not_valid_after_utc,
        lifetime=timedelta(hours=lifetime_hours),
        now=datetime.now(UTC),
    )


class _Xds:
    """The xDS side of ``smc serve``: CA task, key store, controller, ADS server, metrics."""

    def __init__(
        self,
        runner: ProjectionRunner,
        factory: IssuerFactory | None,
        keys_dir: str | None,
        addr: tuple[str, int],
        follow: bool = False,
        tls: _XdsTLSOptions | None = None,
        identity: IdentityOptions | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry

        from smc.ca import KeyStore, LocalIssuer
        from smc.identity import AgentCertSource, IdentityHook
        from smc.xds import XdsController
        from smc.xds._certs import IssuerCache, KeyStoreCertSource
        from smc.xds._server import workload_authorizer

        self.runner = runner
        self.follow = follow
        self.tls = tls
        #: ``--xds-reuseport``: bind ADS with SO_REUSEPORT (replicas on one host share it).
        self.reuse_port = False
        #: ``--xds-io-threads``: gRPC core's I/O threads as SCHED_BATCH (smc.xds._grpc_threads).
        self.batch_io_threads = True
        #: Set once ADS (and the certificate service, when there is one) listen: /readyz waits
        #: for it, so a replica takes proxies only when they can connect.
        self.listening = asyncio.Event()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if factory is None and not follow:
            self._tmp = tempfile.TemporaryDirectory(prefix="smc-ca-")
            directory = self._tmp.name

            def ephemeral(trust_domain: str) -> Issuer:
                return LocalIssuer(directory=directory, trust_domain=trust_domain)

            factory = ephemeral
        self.issuers = IssuerCache(factory) if factory is not None else None
        self.keystore = KeyStore(directory=keys_dir)
        self.certs = KeyStoreCertSource(
            keystore=self.keystore,
            issuer=self.issuers.current if self.issuers is not None else lambda: None,
        )
        self.keystore.add_listener(self.certs.keystore_changed)
        self.addr = addr
        self.metrics = CollectorRegistry()
        # agents make the keys: the builder serves roots and CRLs only (see smc.identity)
        self.controller = XdsController(
            runner=runner, certs=AgentCertSource(self.certs), registry=self.metrics
        )
        self.identity = (
            IdentityHook(
                runner=runner,
                log=for_role(runner.log, "ca"),
                issuers=self.issuers,
                certs=self.certs,
                metrics=self.metrics,
                options=identity,
            )
            if identity is not None and self.issuers is not None
            else None
        )
        self.certs.add_listener(self.controller.on_certs_changed)
        if tls is None:
            self.server = self.controller.make_server()
        else:
            registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
            self.server = self.controller.make_server(
                authorize=workload_authorizer(workloads=lambda: registry.workloads)
            )
        from smc.xds._metrics_sink import MetricsSink

        self.traffic = MetricsSink(authorize=self.server.check_peer)
        self.server.services.append(self.traffic.add_to)

    async def _server_tls(self, task: asyncio.Task[None]) -> ServerTLS:
        """The ADS server's TLS material, once the projections caught up (the trust domain and
        the mesh trust bundle come from the log): its certificate from ``--xds-cert/--xds-key``
        or issued by the serve CA for the ``--xds`` address and ``--xds-san`` names; client
        certificates must chain to the mesh trust bundle."""
        from smc.api import ApiError

        caught = asyncio.ensure_future(self.runner.caught_up.wait())
        await asyncio.wait({caught, task}, return_when=asyncio.FIRST_COMPLETED)
        caught.cancel()
        if not self.runner.caught_up.is_set():
            task.result()  # the runner failed: raise its error
            raise ApiError("the projections stopped before catching up; xDS not started")
        return await self._build_tls(task, current=None)

    async def _rotate_tls(self, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        """Every ``refresh`` seconds: rebuild the TLS material (re-read the files, the trust
        bundle, a new certificate once the issued one has a third of its life left) and rotate it
        into the server when it changed. A failure keeps the current material, logged."""
        from smc.api import ApiError

        assert self.tls is not None
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.tls.refresh)
            if stop.is_set():
                return
            try:
                tls = await self._build_tls(task, current=self.server.tls)
                if self.server.update_tls(tls):
                    click.echo("xDS: TLS material rotated (new connections use it)", err=True)
            except (ApiError, OSError, SMCError) as exc:
                log.warning("xDS TLS refresh failed, keeping the current material: %s", exc)

    async def _build_tls(self, task: asyncio.Task[None], *, current: ServerTLS | None) -> ServerTLS:
        from smc.api import ApiError
        from smc.injector._tls import issue_serving_certificate
        from smc.xds import XdsError
        from smc.xds._certs import local_issuer_of
        from smc.xds._server import ServerTLS

        assert self.tls is not None
        policy = next(p for p in self.runner.projections if isinstance(p, PolicyProjection))
        trust_domain = policy.mesh.trust_domain
        bundle: list[str] = []
        cert_pem = key_pem = ""
        try:
            if self.issuers is not None:
                issuer = await asyncio.to_thread(self.issuers, trust_domain)
                bundle = list(await asyncio.to_thread(issuer.trust_bundle))
                if (
                    self.tls.cert_file is None
                    and current is not None
                    and not _renewal_due(current.cert_pem, lifetime_hours=self.tls.lifetime_hours)
                ):
                    cert_pem, key_pem = current.cert_pem, current.key_pem
                elif self.tls.cert_file is None:
                    local = local_issuer_of(issuer)
                    if local is None:
                        raise ApiError(
                            f"--xds-tls: issuer {issuer.name} cannot sign the ADS server "
                            "certificate; give --xds-cert FILE --xds-key FILE"
                        )
                    served = await asyncio.to_thread(
                        issue_serving_certificate,
                        local,
                        ip_addresses=self.tls.ip_addresses,
                        dns_names=self.tls.dns_names,
                        lifetime=timedelta(hours=self.tls.lifetime_hours),
                    )
                    cert_pem, key_pem = served.cert_pem + served.chain_pem, served.private_key_pem
                if self.tls.cert_out is not None:
                    await asyncio.to_thread(_export_pair, self.tls.cert_out, cert_pem, key_pem)
            else:
                # a follower: the trust bundle the log records, written by the CA follower
                for _ in range(300):
                    bundle = self.keystore.trust_bundle()
                    if bundle or task.done():
                        break
                    await asyncio.sleep(0.1)
                if not bundle:
                    raise ApiError(
                        "--xds-tls: no mesh trust bundle recorded on the log yet (the issuing "
                        "replica records it); cannot verify client certificates"
                    )
            if self.tls.cert_file is not None and self.tls.key_file is not None:
                if current is None:  # at start: the issuing replica may not have written it yet
                    for _ in range(600):
                        if Path(self.tls.cert_file).is_file() and Path(self.tls.key_file).is_file():
                            break
                        await asyncio.sleep(0.1)
                cert_pem = _read_text(self.tls.cert_file, "--xds-cert")
                key_pem = _read_text(self.tls.key_file, "--xds-key")
            return ServerTLS.of(
                cert_pem=cert_pem,
                key_pem=key_pem,
                client_ca_pems=bundle,
                trust_domain=trust_domain,
            )
        except (XdsError, OSError) as exc:
            raise ApiError(f"--xds-tls: {exc}") from exc

    async def start(
        self, stop: asyncio.Event, runner_task: asyncio.Task[None]
    ) -> list[asyncio.Task[None]]:
        from smc.api import ApiError
        from smc.ca._controller import follow_ca
        from smc.identity import run_trust_only

        if self.issuers is None:
            click.echo(f"CA: following the log (keys from {self.keystore.directory})", err=True)
            ca = follow_ca(runner=self.runner, keystore=self.keystore, stop=stop)
        else:
            ca = run_trust_only(
                runner=self.runner,
                log=for_role(self.runner.log, "ca"),
                issuer=self.issuers,
                keystore=self.keystore,
                stop=stop,
            )
        # the CA runs first: with --xds-tls a follower waits for the trust bundle it records
        tasks = [
            asyncio.create_task(self.controller.run(stop=stop)),
            asyncio.create_task(ca),
            asyncio.create_task(self.certs.run(stop=stop)),
        ]
        try:
            server_tls = await self._server_tls(runner_task) if self.tls is not None else None
            try:
                port = await self.server.start(
                    host=self.addr[0],
                    port=self.addr[1],
                    tls=server_tls,
                    reuse_port=self.reuse_port,
                    batch_io_threads=self.batch_io_threads,
                )
            except (OSError, RuntimeError) as exc:
                raise ApiError(
                    f"cannot serve xDS on {self.addr[0]}:{self.addr[1]}: {exc}; choose another "
                    "with --xds HOST:PORT or disable it with --xds off"
                ) from exc
            if server_tls is not None:
                tasks.append(asyncio.create_task(self._rotate_tls(stop, runner_task)))
            if self.identity is not None:
                tasks.extend(await self.identity.start(stop))
                click.echo(
                    f"certificate service (CSRs of SMC agents) on "
                    f"{self.identity.options.listen[0]}:{self.identity.server.port} over TLS",
                    err=True,
                )
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        click.echo(
            f"xDS (ADS) on {self.addr[0]}:{port}{' over mTLS' if server_tls else ''} "
            "(answers once the projections are current)",
            err=True,
        )
        self.listening.set()
        return tasks

    async def close(self) -> None:
        if self.identity is not None:
            await self.identity.close()
        await self.server.stop(grace=1.0)
        if self._tmp is not None:
            self._tmp.cleanup()
