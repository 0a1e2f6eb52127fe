"""``smc serve``: the long-running control plane on the chosen log.

Role: starts the projection runner (from a checkpoint when one is given), reports when it has
caught up, saves checkpoints periodically, and hosts the servers that hang off the projections:
the HTTP API (with the xDS debug endpoints and ``/metrics``) and the xDS (ADS) server with its
controller, which answers Envoys only once the projections caught up. With xDS on, the CA runs
next to the runner (:func:`smc.ca.run_ca`): it issues, renews and revokes workload certificates
as the registry changes and records them on the log; keys live in a :class:`smc.ca.KeyStore`
(``--keys DIR``, so a restart with the same directory and log serves the same certificates
without re-issuing; in memory when not given). The issuer comes from the :func:`ca_options`
(``--ca local:DIR`` or ``vault:URL``); ``--ca ephemeral`` (the default) is a local CA in a
temporary directory, gone at exit. The key store is the SDS source of the xDS controller (plus
the issuer's CRLs in the trust bundle), and its changes rebuild the affected proxies.
Replicas: several ``smc serve`` on one Kafka log serve the same snapshots at the same offset
(versions are content-derived). One replica issues; the others run with ``--ca follow`` and
the issuing replica's ``--keys DIR`` (:func:`smc.ca._controller.follow_ca`): they never sign
nor append, and serve the certificates and trust bundle the log records, keys read from the
shared directory. ``GET /debug/state`` gives the runner's position and the projections'
digests, to compare replicas.
``--xds-tls`` serves ADS over mTLS once the projections caught up (the trust domain and the
mesh trust bundle come from the log): the server certificate is issued by the local CA (or
read from ``--xds-cert/--xds-key``, required for a follower or a Vault CA), client
certificates must chain to the mesh trust bundle and their SPIFFE identity must be the
service account of the node id's workload (:func:`smc.xds._server.workload_authorizer`).
Every ``--xds-tls-refresh`` seconds the material is rebuilt (files re-read, the trust bundle
re-read, a new issued certificate once a third of its ``--xds-cert-hours`` is left) and
rotated into the server when it changed: new connections get it, open streams keep theirs.
``--kube in-cluster|KUBECONFIG`` runs the Kubernetes informers beside the runner, appending
to the same log; a failure of the informers stops serve with exit status 1.
Concurrency: one asyncio loop; the log is read in worker threads; issuers are called in worker
threads; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from smc.cli._app import cli, open_log_from
from smc.cli._certs import ca_options, factory_from_ca_options, keys_option
from smc.cli._metrics import ServeMetrics, zero_ads_series
from smc.cli._serve_auth import api_auth_options, options_from
from smc.cli._vmgroups import parse_clouds
from smc.errors import SMCError
from smc.events import ChainVerifier, for_role
from smc.events._health import watch_log
from smc.projections import (
    CheckpointStore,
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
)

if TYPE_CHECKING:
    from aiohttp import web

    from smc.ca import Issuer, IssuerFactory
    from smc.cli._serve_auth import ApiAuthOptions
    from smc.identity import IdentityOptions
    from smc.informers import KubeEndpoint, KubeInformers
    from smc.xds._server import ServerTLS

__all__ = ["serve"]

log = logging.getLogger("smc.serve")


def _parse_hostport(value: str, option: str = "--http") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint=option)
    return host.strip("[]") or "127.0.0.1", int(port)


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
        agent_keys: bool = False,
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
        self.agent_keys = agent_keys
        built_from = AgentCertSource(self.certs) if agent_keys else self.certs
        self.controller = XdsController(runner=runner, certs=built_from, registry=self.metrics)
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
        from smc.ca import run_ca
        from smc.ca._controller import follow_ca
        from smc.identity import run_trust_only

        if self.issuers is None:
            click.echo(f"CA: following the log (keys from {self.keystore.directory})", err=True)
            ca = follow_ca(runner=self.runner, keystore=self.keystore, stop=stop)
        elif self.agent_keys:
            ca = run_trust_only(
                runner=self.runner,
                log=for_role(self.runner.log, "ca"),
                issuer=self.issuers,
                keystore=self.keystore,
                stop=stop,
            )
        else:
            ca = run_ca(
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
                port = await self.server.start(host=self.addr[0], port=self.addr[1], tls=server_tls)
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
        return tasks

    async def close(self) -> None:
        if self.identity is not None:
            await self.identity.close()
        await self.server.stop(grace=1.0)
        if self._tmp is not None:
            self._tmp.cleanup()


def _verifier(trust: str) -> ChainVerifier:
    from smc.audit import load_trust

    return ChainVerifier(trust=load_trust(trust))


def _state_handler(runner: ProjectionRunner) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /debug/state``: position, events applied, duplicates dropped and the digest of
    every projection (as ``smc log replay --json`` prints them), to compare replicas."""

    from aiohttp import web

    async def state(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "caught_up": runner.caught_up.is_set(),
                "position": runner.position.to_json(),
                "applied": runner.applied,
                "duplicates": runner.duplicates,
                "digests": runner.digests(),
                "skipped": runner.skipped,
            }
        )

    return state


async def _start_api(
    runner: ProjectionRunner,
    stop: asyncio.Event,
    http: tuple[str, int] | None,
    inventory: str | None,
    inventory_interval: float,
    xds: _Xds | None = None,
    clouds: dict[str, dict[str, str]] | None = None,
    group_interval: float = 5.0,
    auth: ApiAuthOptions | None = None,
    kube: KubeEndpoint | None = None,
) -> tuple[list[Callable[[], Awaitable[None]]], list[asyncio.Task[None]]]:
    """Start the HTTP API and the inventory VM provider (when asked); returns what to close."""
    from smc.api import (
        ApiContext,
        ApiError,
        LiveMeshChanges,
        MeshChanges,
        create_app,
        start_http,
    )
    from smc.informers import InventoryDirectoryProvider, ProviderBridge

    registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    changes = MeshChanges(log=for_role(runner.log, "api"), registry=registry, policy=policy)
    live = LiveMeshChanges(changes=changes, runner=runner)
    closers: list[Callable[[], Awaitable[None]]] = []
    tasks: list[asyncio.Task[None]] = []
    from smc.cli._vmgroups import start_vm_groups

    vm_groups, vm_groups_task = start_vm_groups(
        live=live, stop=stop, clouds=clouds or {}, interval=group_interval, xds=xds
    )
    tasks.append(vm_groups_task)
    if http is not None:
        from smc.cli._serve_auth import ApiAuthOptions, start_api_auth
        from smc.projections import CertsProjection
        from smc.xds._debug import mount_debug

        certs = next(p for p in runner.projections if isinstance(p, CertsProjection))
        door = start_api_auth(auth or ApiAuthOptions(), http=http, runner=runner, kube=kube)
        ctx = ApiContext(live=live, runner=runner, registry=registry, policy=policy, certs=certs)
        app = create_app(ctx, guard=door.guard)
        app.router.add_get("/debug/state", _state_handler(runner))
        serve_metrics = ServeMetrics(runner)
        app.middlewares.insert(0, serve_metrics.middleware())
        if xds is not None:
            zero_ads_series(xds.server.metrics)
        mount_debug(
            app,
            controller=xds.controller if xds is not None else None,
            server=xds.server if xds is not None else None,
            registries=[
                door.guard.registry,
                *([xds.metrics] if xds is not None else []),
                vm_groups.metrics,
                serve_metrics.registry,
            ],
        )
        from smc.console import mount_console
        from smc.console._serve import console_hub

        mount_console(
            app,
            console_hub(
                runner=runner,
                server=xds.server if xds is not None else None,
                controller=xds.controller if xds is not None else None,
                traffic=xds.traffic if xds is not None else None,
            ),
        )
        try:
            app_runner = await start_http(
                app, host=http[0], port=http[1], ssl_context=door.ssl_context
            )
        except OSError as exc:
            raise ApiError(
                f"cannot serve the HTTP API on {http[0]}:{http[1]}: {exc.strerror or exc}; "
                "choose another with --http HOST:PORT or disable it with --http off"
            ) from exc
        closers.append(app_runner.cleanup)
        closers.extend(door.closers)
        tasks.append(asyncio.create_task(door.follow_mesh_roots(runner, stop)))
        click.echo(
            f"HTTP API on https://{http[0]}:{http[1]} (OpenAPI: /openapi.json, console: "
            f"/console/); credentials for the CLI in {door.credentials_path}",
            err=True,
        )
    if inventory is not None:
        provider = InventoryDirectoryProvider(inventory, interval=inventory_interval)
        bridge = ProviderBridge(provider_name=provider.name, live=live)

        async def run_provider() -> None:
            await runner.caught_up.wait()
            await provider.run(sink=bridge, stop=stop)

        tasks.append(asyncio.create_task(run_provider()))
        click.echo(f"VM provider inventory watching {inventory}", err=True)
    return closers, tasks


async def _run_kube(
    informers: KubeInformers, stop: asyncio.Event, failed: list[BaseException]
) -> None:
    """Run the informers until ``stop``; a failure is recorded and stops serve (exit 1).
    They get their own stop event: :meth:`KubeInformers.run` sets it when it ends."""
    own = asyncio.Event()

    async def relay() -> None:
        await stop.wait()
        own.set()

    relay_task = asyncio.create_task(relay())
    try:
        await informers.run(stop=own)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("Kubernetes informers failed")
        failed.append(exc)
        stop.set()
    finally:
        relay_task.cancel()


async def _serve(
    runner: ProjectionRunner,
    store: CheckpointStore | None,
    every: float,
    http: tuple[str, int] | None = None,
    inventory: str | None = None,
    inventory_interval: float = 2.0,
    xds_addr: tuple[str, int] | None = None,
    factory: IssuerFactory | None = None,
    keys_dir: str | None = None,
    follow: bool = False,
    xds_tls: _XdsTLSOptions | None = None,
    kube: KubeEndpoint | None = None,
    identity: IdentityOptions | None = None,
    agent_keys: bool = False,
    clouds: dict[str, dict[str, str]] | None = None,
    group_interval: float = 5.0,
    auth: ApiAuthOptions | None = None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    xds = (
        _Xds(runner, factory, keys_dir, xds_addr, follow, xds_tls, identity, agent_keys)
        if xds_addr is not None
        else None
    )
    # the API listens before the runner starts: /readyz answers 503 until it has caught up
    closers, side_tasks = await _start_api(
        runner,
        stop,
        http,
        inventory,
        inventory_interval,
        xds,
        clouds,
        group_interval,
        auth,
        kube,
    )
    task = asyncio.create_task(runner.run(stop=stop))
    side_tasks.append(asyncio.create_task(watch_log(runner.log, runner.health, stop=stop)))
    kube_failed: list[BaseException] = []
    kube_task: asyncio.Task[None] | None = None
    if kube is not None:
        from smc.informers import KubeInformers, LogSink

        informers = KubeInformers(endpoint=kube, sink=LogSink(for_role(runner.log, "informer")))
        kube_task = asyncio.create_task(_run_kube(informers, stop, kube_failed))
        click.echo(f"Kubernetes informers watching {kube.host}", err=True)
    if xds is not None:
        try:
            side_tasks.extend(await xds.start(stop, task))
        except SMCError:
            stop.set()
            await asyncio.wait({task}, timeout=5.0)
            for c in closers:
                await c()
            raise
        closers.append(xds.close)

    async def announce() -> None:
        await runner.caught_up.wait()
        click.echo(
            f"caught up: {runner.applied} events, position {runner.position.to_json()}", err=True
        )

    announcer = asyncio.create_task(announce())
    last = time.monotonic()
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if store is not None and time.monotonic() - last >= every and runner.caught_up.is_set():
                store.save(runner.checkpoint())
                last = time.monotonic()
    finally:
        stop.set()
        announcer.cancel()
        if kube_task is not None:
            # the informers end their watches on stop; cancel them only if they hang
            await asyncio.wait({kube_task}, timeout=10.0)
            kube_task.cancel()
        for t in side_tasks:
            t.cancel()
        for c in closers:
            await c()
        if store is not None and runner.caught_up.is_set() and not task.cancelled():
            exc = task.exception() if task.done() else None
            if exc is None:
                store.save(runner.checkpoint())
    task.result()
    if kube_failed:
        from smc.informers import InformersError

        raise InformersError(f"Kubernetes informers failed: {kube_failed[0]}")


@cli.command("serve")
@click.option(
    "--writers",
    envvar="SMC_WRITERS",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Directory of writer credentials, one subdirectory per role (ca, api, informer, "
    "provider) as `smc writer issue --out` writes them: each component seals what it "
    "appends with its role's key (docs/log-integrity.md) (env SMC_WRITERS).",
)
@click.option(
    "--trust",
    envvar="SMC_TRUST",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="PEM roots that certify log writers: only records whose seals verify, from writers "
    "entitled to them, change state; the others are skipped and reported (env SMC_TRUST).",
)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint file to use.")
@click.option(
    "--checkpoint-history",
    type=click.Path(file_okay=False),
    default=None,
    help="Also keep every checkpoint saved in this directory: `smc proxy config --at` and "
    "`smc policy check --at` start from the newest one before the point asked for.",
)
@click.option("--checkpoint-every", default=30.0, show_default=True, help="Seconds between saves.")
@click.option(
    "--http",
    "http_addr",
    default="127.0.0.1:8470",
    show_default=True,
    help="HOST:PORT of the HTTP API; 'off' disables it.",
)
@click.option(
    "--inventory",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of VirtualMachine/MeshService manifests to watch (VM provider).",
)
@click.option("--inventory-interval", default=2.0, show_default=True, help="Seconds between scans.")
@click.option(
    "--xds",
    "xds_addr",
    default="127.0.0.1:15010",
    show_default=True,
    help="HOST:PORT of the xDS (ADS) server for Envoy sidecars; 'off' disables it.",
)
@click.option(
    "--xds-tls",
    is_flag=True,
    help="Serve ADS over mTLS: proxies present their mesh certificate (checked against their "
    "node id); the server certificate is issued by the CA for the --xds host, 127.0.0.1, "
    "localhost and every --xds-san.",
)
@click.option(
    "--xds-san",
    multiple=True,
    help="Extra DNS name or IP address of the ADS server certificate (repeatable).",
)
@click.option(
    "--xds-cert",
    type=click.Path(dir_okay=False),
    default=None,
    help="PEM certificate (chain) of the ADS server, instead of one issued by the CA "
    "(needed with --ca follow or vault:URL).",
)
@click.option(
    "--xds-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="PEM private key of --xds-cert.",
)
@click.option(
    "--xds-tls-refresh",
    type=click.FloatRange(min=0.1),
    default=300.0,
    show_default=True,
    help="Seconds between checks for new ADS TLS material: --xds-cert/--xds-key re-read, the "
    "trust bundle (CA rotation), a new issued certificate with a third of its life left. New "
    "connections get it; open streams keep theirs.",
)
@click.option(
    "--xds-cert-hours",
    type=click.FloatRange(min=0.0001),
    default=720.0,
    show_default=True,
    help="Lifetime of the ADS server certificate the CA issues; renewed with a third of it left.",
)
@click.option(
    "--xds-cert-out",
    type=click.Path(file_okay=False),
    default=None,
    help="Write the ADS certificate the CA issues (and each renewal) as DIR/tls.crt and "
    "DIR/tls.key, for followers to serve with --xds-cert/--xds-key.",
)
@click.option(
    "--kube",
    default=None,
    metavar="in-cluster|KUBECONFIG",
    help="Watch a Kubernetes cluster (namespaces labelled smc.dev/monitored=true) and append "
    "its services, pods, service accounts and SMI resources to the log: 'in-cluster' (the "
    "pod's service account) or the path of a kubeconfig with a token user.",
)
@click.option(
    "--ca-listen",
    default="auto",
    show_default=True,
    help="HOST:PORT of the certificate service SMC agents send CSRs to (gRPC over TLS; "
    "the server certificate is issued for HOST, 127.0.0.1, localhost and every --xds-san, or "
    "read from --xds-cert/--xds-key); 'auto': the --xds host, port + 2 (15012 by default) "
    "with --workload-keys agent on the issuing replica, else off; 'off' disables it.",
)
@click.option(
    "--token-audience",
    default="smc",
    show_default=True,
    help="Audience a pod's projected service-account token must be bound to (checked with "
    "a TokenReview against the --kube apiserver).",
)
@click.option(
    "--xds-plaintext",
    is_flag=True,
    help="Serve ADS in cleartext although --workload-keys agent would serve it over mTLS "
    "(the proxies' keys never travel on ADS then; refused with --workload-keys control-plane).",
)
@click.option(
    "--workload-keys",
    type=click.Choice(["agent", "control-plane"]),
    default="agent",
    show_default=True,
    help="Who makes workload keys: 'agent' (an SMC agent beside each proxy makes its key and "
    "serves it over local SDS; the control plane serves roots and CRLs only; ADS is then "
    "mTLS, as with --xds-tls, and --ca-listen is needed) or 'control-plane' (one key per "
    "identity, made here and served over SDS).",
)
@click.option(
    "--cloud",
    "clouds",
    multiple=True,
    metavar="NAME[:key=value,...]",
    help="A cloud VM provider VirtualMachineGroups may use (repeatable), e.g. "
    "aws:region=eu-west-1 or aws:endpoint_url=http://127.0.0.1:5000; credentials come from "
    "the provider's own chain (environment, profile, instance role).",
)
@click.option(
    "--vm-group-interval",
    type=click.FloatRange(min=0.05),
    default=5.0,
    show_default=True,
    help="Seconds between polls of each VirtualMachineGroup's provider.",
)
@ca_options
@keys_option
@api_auth_options
@click.pass_context
def serve(
    ctx: click.Context,
    /,
    writers: str | None,
    trust: str | None,
    checkpoint: str | None,
    checkpoint_history: str | None,
    checkpoint_every: float,
    http_addr: str,
    inventory: str | None,
    inventory_interval: float,
    xds_addr: str,
    xds_tls: bool,
    xds_san: tuple[str, ...],
    xds_cert: str | None,
    xds_key: str | None,
    xds_tls_refresh: float,
    xds_cert_hours: float,
    xds_cert_out: str | None,
    kube: str | None,
    ca_listen: str,
    token_audience: str,
    xds_plaintext: bool,
    workload_keys: str,
    clouds: tuple[str, ...],
    vm_group_interval: float,
    ca: str | None,
    vault_role: str,
    vault_mount: str,
    vault_token_file: str | None,
    vault_ca_cert: str | None,
    keys_dir: str | None,
    **auth_kwargs: Any,
) -> None:
    """Run the control plane: follow the log, keep projections current, serve xDS.

    \b
    Replicas: run several on one Kafka log (same --log); they serve identical
    snapshots at the same offset, so an Envoy may switch between them. Exactly one
    replica issues certificates (--ca local:DIR or vault:URL, --keys DIR); the others
    run with --ca follow and the same --keys DIR (a shared directory): they never
    issue nor append, and serve the certificates and trust bundle the log records,
    keys read from that directory.
    """
    http = None if http_addr == "off" else _parse_hostport(http_addr)
    xds = None if xds_addr == "off" else _parse_hostport(xds_addr, "--xds")
    factory: IssuerFactory | None = None
    follow = ca == "follow"
    if follow and not keys_dir:
        raise click.BadParameter(
            "follow needs --keys DIR: the key directory the issuing replica writes",
            param_hint="--ca",
        )
    tls_opts: _XdsTLSOptions | None = None
    agent_keys = workload_keys == "agent"
    if ca_listen == "auto":
        ca_listen = (
            f"{xds[0]}:{xds[1] + 2}"
            if agent_keys and xds is not None and not follow and 0 < xds[1] < 65534
            else "off"
        )
    if agent_keys and xds is not None and not xds_plaintext:
        xds_tls = True  # agents: ADS is mTLS unless --xds-plaintext says otherwise
    if xds_plaintext and xds_tls and not agent_keys:
        raise click.BadParameter("--xds-plaintext and --xds-tls exclude each other")
    if xds_plaintext and not agent_keys:
        raise click.BadParameter(
            "plaintext ADS never carries keys: --xds-plaintext needs --workload-keys agent",
            param_hint="--xds-plaintext",
        )
    if agent_keys and xds is not None and ca_listen == "off" and not follow:
        raise click.BadParameter(
            "with --workload-keys agent the agents need the certificate service: give "
            "--ca-listen HOST:PORT",
            param_hint="--ca-listen",
        )
    if xds_plaintext:
        xds_tls = False
    if xds is not None and not xds_tls and not agent_keys:
        click.echo(
            "warning: ADS in cleartext with keys made by the control plane: any client that "
            "names a node id gets that identity's key. Use --workload-keys agent (per-proxy keys "
            "made beside each proxy, ADS over mTLS) or --xds-tls.",
            err=True,
        )
    if xds_tls:
        if xds is None:
            raise click.BadParameter("--xds-tls needs the xDS server (not --xds off)")
        tls_opts = _tls_options(
            host=xds[0],
            sans=xds_san,
            cert_file=xds_cert,
            key_file=xds_key,
            follow=follow,
            ca=ca,
            refresh=xds_tls_refresh,
            lifetime_hours=xds_cert_hours,
            cert_out=xds_cert_out,
        )
    elif xds_cert or xds_key or xds_san or xds_cert_out:
        raise click.BadParameter(
            "--xds-cert, --xds-key, --xds-san and --xds-cert-out go with --xds-tls",
            param_hint="--xds-tls",
        )
    kube_endpoint: KubeEndpoint | None = None
    if kube:
        from smc.informers import KubeEndpoint

        try:
            kube_endpoint = (
                KubeEndpoint.in_cluster()
                if kube == "in-cluster"
                else KubeEndpoint.from_kubeconfig(kube)
            )
        except SMCError as exc:
            raise click.BadParameter(str(exc), param_hint="--kube") from exc
    if ca not in (None, "", "ephemeral", "follow"):
        try:
            factory = factory_from_ca_options(
                ca=ca,
                vault_role=vault_role,
                vault_mount=vault_mount,
                vault_token_file=vault_token_file,
                vault_ca_cert=vault_ca_cert,
            )
        except SMCError as exc:
            raise click.BadParameter(str(exc), param_hint="--ca") from exc
    identity_opts: IdentityOptions | None = None
    if ca_listen != "off":
        from smc.identity import IdentityOptions

        if xds is None:
            raise click.BadParameter("--ca-listen needs the xDS server (not --xds off)")
        if follow:
            raise click.BadParameter(
                "a replica with --ca follow cannot sign; run --ca-listen on the issuing replica",
                param_hint="--ca-listen",
            )
        identity_opts = IdentityOptions(
            listen=_parse_hostport(ca_listen, "--ca-listen"),
            audience=token_audience,
            kube=kube_endpoint,
            sans=xds_san,
            cert_file=xds_cert,
            key_file=xds_key,
        )
    log_ = open_log_from(ctx, create=True)
    if writers:
        from smc.cli._writers import use_role_writers

        use_role_writers(log_, writers)
    runner = ProjectionRunner(
        log=log_, projections=all_projections(), verifier=_verifier(trust) if trust else None
    )
    store = CheckpointStore(checkpoint, history=checkpoint_history) if checkpoint else None
    if store is not None:
        cp = store.load()
        if cp is not None:
            runner.restore(cp)
            click.echo(f"restored checkpoint at {cp.position.to_json()}", err=True)
    try:
        asyncio.run(
            _serve(
                runner,
                store,
                checkpoint_every,
                http,
                inventory,
                inventory_interval,
                xds,
                factory,
                keys_dir,
                follow,
                tls_opts,
                kube_endpoint,
                identity_opts,
                workload_keys == "agent",
                clouds=parse_clouds(clouds),
                group_interval=vm_group_interval,
                auth=options_from(auth_kwargs),
            )
        )
    except SMCError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
