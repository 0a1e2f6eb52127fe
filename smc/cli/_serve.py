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
a ``--keys DIR`` of their own (:func:`smc.ca._controller.follow_ca`): they never sign
nor append, and serve the trust bundle the log records. Workload keys are made by SMC agents
beside the proxies only: ``--workload-keys control-plane`` (the control plane making one key per
identity) was removed and is refused with an error naming the option and docs/identity.md;
``--workload-keys agent`` is accepted as a no-op. ``GET /debug/state`` gives the runner's position and the projections'
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
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from smc.cli._app import cli, open_log_from
from smc.cli._certs import ca_options, factory_from_ca_options, keys_option
from smc.cli._serve_api import _start_api, _verifier
from smc.cli._serve_auth import api_auth_options, options_from
from smc.cli._serve_xds import _tls_options, _Xds, _XdsTLSOptions
from smc.cli._vmgroups import parse_clouds
from smc.errors import SMCError
from smc.events import for_role
from smc.events._health import watch_log
from smc.projections import (
    CheckpointStore,
    ProjectionRunner,
    all_projections,
)

if TYPE_CHECKING:
    from smc.ca import IssuerFactory
    from smc.cli._serve_auth import ApiAuthOptions
    from smc.identity import IdentityOptions
    from smc.informers import KubeEndpoint, KubeInformers

__all__ = ["serve"]

log = logging.getLogger("smc.serve")


def _parse_hostport(value: str, option: str = "--http") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint=option)
    return host.strip("[]") or "127.0.0.1", int(port)


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
    clouds: dict[str, dict[str, str]] | None = None,
    group_interval: float = 5.0,
    auth: ApiAuthOptions | None = None,
    xds_reuseport: bool = False,
    xds_io_threads: str = "batch",
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    xds = (
        _Xds(runner, factory, keys_dir, xds_addr, follow, xds_tls, identity)
        if xds_addr is not None
        else None
    )
    if xds is not None:
        xds.reuse_port = xds_reuseport
        xds.batch_io_threads = xds_io_threads == "batch"
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
    help="HOST:PORT of the certificate service SMC agents send CSRs to (HTTPS; "
    "the server certificate is issued for HOST, 127.0.0.1, localhost and every --xds-san, or "
    "read from --xds-cert/--xds-key); 'auto': the --xds host, port + 2 (15012 by default) "
    "on the issuing replica, else off; 'off' disables it.",
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
    help="Serve ADS in cleartext (tests and isolated networks): no key travels on ADS, "
    "only roots and CRLs.",
)
@click.option(
    "--xds-reuseport",
    is_flag=True,
    help="Bind the ADS port with SO_REUSEPORT: several replicas of the log on this host (run by "
    "the same user) share the --xds port and the kernel spreads the proxies' connections over "
    "them, so pushes use every core. Each replica needs its own --http port and --ca-listen "
    "(or off); see docs/ads-scale.md.",
)
@click.option(
    "--xds-io-threads",
    type=click.Choice(["batch", "default"]),
    default="batch",
    show_default=True,
    help="Scheduling of gRPC core's I/O threads on Linux: batch (SCHED_BATCH: they do not "
    "preempt the event loop on every message, so ACKs are read in batches and a change costs "
    "less CPU per proxy) or default (the normal policy); see docs/ads-scale.md.",
)
@click.option(
    "--workload-keys",
    type=click.Choice(["agent", "control-plane"]),
    default="agent",
    show_default=True,
    help="Who makes workload keys: always 'agent' (an SMC agent beside each proxy makes its key "
    "and hands it to its Envoy in a local file; the control plane signs CSRs and serves roots and "
    "CRLs only; ADS is mTLS and --ca-listen is needed). Kept so that existing scripts may say "
    "it; 'control-plane' (one key per identity made here) was removed and is refused: see "
    "docs/identity.md.",
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
    xds_reuseport: bool,
    xds_io_threads: str,
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
    replica issues certificates (--ca local:DIR or vault:URL) and serves the agents'
    certificate service; the others run with --ca follow and the issuer's ADS
    certificate (--xds-cert/--xds-key): they never issue nor append, and serve the
    trust bundle the log records.

    \b
    Workload keys: an SMC agent beside each proxy makes its key and sends a CSR;
    the control plane never makes, holds or sends one (see docs/identity.md).
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
    if workload_keys != "agent":
        raise click.BadParameter(
            "'control-plane' was removed: the control plane never makes, holds or sends a "
            "workload key; every proxy's key is made beside it by an SMC agent (omit the option "
            "or give --workload-keys agent; see docs/identity.md)",
            param_hint="--workload-keys",
        )
    if ca_listen == "auto":
        ca_listen = (
            f"{xds[0]}:{xds[1] + 2}"
            if xds is not None and not follow and 0 < xds[1] < 65534
            else "off"
        )
    if xds is not None and not xds_plaintext:
        xds_tls = True  # agents: ADS is mTLS unless --xds-plaintext says otherwise
    if xds is not None and ca_listen == "off" and not follow:
        raise click.BadParameter(
            "the agents need the certificate service: give --ca-listen HOST:PORT",
            param_hint="--ca-listen",
        )
    if xds_plaintext:
        xds_tls = False
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
                clouds=parse_clouds(clouds),
                group_interval=vm_group_interval,
                auth=options_from(auth_kwargs),
                xds_reuseport=xds_reuseport,
                xds_io_threads=xds_io_threads,
            )
        )
    except SMCError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
