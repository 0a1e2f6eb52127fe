"""A whole control plane plus real Envoy sidecars on 127.0.0.1, for end-to-end tests and benchmarks.

Role: :class:`ControlPlane` runs the real path of ``smc serve`` in-process: an event log (a
:class:`SqliteLog` unless another is given, e.g. a KafkaLog), a :class:`ProjectionRunner`,
:class:`LiveMeshChanges` (manifests in, events appended through the same code as the HTTP
API), the :class:`XdsController` and its ADS server (mTLS, node ids checked against client
certificates) and, by default, the certificate service SMC agents beside the proxies send
their CSRs to (keys made where each proxy runs: here the test process plays each workload's
host, :meth:`ControlPlane.start_proxy`); ADS then carries roots and CRLs only
(:func:`smc.identity.run_trust_only`). ``agents=False`` is the older control-plane key mode
over mTLS ADS: the CA (:func:`smc.ca.run_ca` with a :class:`~smc.ca.KeyStore` in
``<workdir>/keys``: identity certificates issued as workloads join, renewed, revoked,
recorded on the log) and the SDS source over that key store
(:class:`~smc.xds._certs.KeyStoreCertSource`, which adds the issuer's CRLs).
The issuer is a :class:`LocalIssuer` in ``<workdir>/ca`` unless one is given (e.g. a
:class:`~smc.ca.VaultIssuer`). ``restart()`` rebuilds everything but the log, the key directory
and the issuer from scratch on the same ADS port, like a restarted process.
:class:`Sidecar`, :func:`vm_yaml` and :func:`wait_reachable` (one Envoy with its application
and agent, its VirtualMachine manifest, a request through the mesh) are in
:mod:`smc.testing.sidecar` and imported here too.

Concurrency: everything runs on the caller's asyncio loop (grpc.aio is bound to it); Envoy admin
calls and issuer calls happen in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from smc.api import ChangeReport, LiveMeshChanges, MeshChanges
from smc.auth import TokenReviewer
from smc.ca import CsrSigner, IssuedCertificate, Issuer, KeyStore, LocalIssuer, run_ca
from smc.events import EventLog, SqliteLog
from smc.identity import (
    AgentCertSource,
    CertificateServer,
    ProxyCertificateService,
    ProxyRevoker,
    join_token_event,
    run_trust_only,
)
from smc.injector._tls import issue_serving_certificate
from smc.projections import (
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
    Workload,
    all_projections,
)
from smc.smi import load_documents
from smc.testing.envoy import AdsTLS
from smc.testing.ports import free_port
from smc.testing.sidecar import Sidecar, vm_yaml, wait_reachable  # (moved there; kept here)
from smc.testing.wait import wait_until
from smc.xds import AdsServer, IssuingCertSource, XdsController
from smc.xds._certs import IssuerCache, KeyStoreCertSource, local_issuer_of
from smc.xds._metrics_sink import MetricsSink
from smc.xds._server import ServerTLS, workload_authorizer

if TYPE_CHECKING:
    from smc.testing.podapps import PodAppSidecar

__all__ = ["ControlPlane", "Sidecar", "vm_yaml", "wait_reachable"]


class ControlPlane:
    """Log + projections + mesh API + xDS controller + ADS server, on one loop."""

    def __init__(
        self,
        *,
        workdir: Path,
        debounce: float = 0.01,
        issuer: Issuer | None = None,
        trust_interval: float = 30.0,
        crl_refresh: float = 30.0,
        ca: bool = True,
        log: EventLog | None = None,
        agents: bool | None = None,
        revoke_grace: float = 120.0,
        reviewer: TokenReviewer | None = None,
        proxy_cert_lifetime: timedelta | None = None,
        ads_host: str = "127.0.0.1",
    ) -> None:
        """``ca=False``: no CA task; certificates come from an :class:`IssuingCertSource`
        (issued in memory on first use, nothing on the log), for builder-level tests that
        need every certificate to exist as soon as a workload does. ``agents=True``: SMC
        agents beside the proxies make the keys (:mod:`smc.agent`); the control plane runs
        the certificate service on :attr:`ca_port` and serves roots and CRLs only; the default
        whenever ``ca`` is on. ``agents=False`` (with ``ca``): a test-harness mode only (``smc
        serve`` has no such mode): the CA library's per-identity certificates, their keys on
        mTLS ADS only (each Envoy presents its identity's certificate, :meth:`ads_client_tls`),
        for tests of that library. Start proxies with
        :meth:`start_proxy` (it does either). ``log``: the event
        log (e.g. a :class:`~smc.events.KafkaLog`; closed by :meth:`close`); default a fresh
        :class:`SqliteLog` in ``workdir``."""
        self.workdir = workdir
        self.ads_host = ads_host  # where the ADS server listens (a pod network's gateway)
        self.debounce = debounce
        self.trust_interval = trust_interval
        self.ca = ca
        self.agents = ca if agents is None else agents
        self.revoke_grace = revoke_grace
        self.reviewer = reviewer  # TokenReview of pods' service-account tokens (agents=True)
        self.proxy_cert_lifetime = proxy_cert_lifetime  # None: the mesh config's lifetime
        self.ca_port = free_port()
        self.identity: ProxyCertificateService | None = None
        self.ca_server: CertificateServer | None = None
        self.revoker: ProxyRevoker | None = None
        self.crl_refresh = crl_refresh
        self.log: EventLog = log if log is not None else SqliteLog(workdir / "log.db")
        self.issuer: Issuer = (
            issuer
            if issuer is not None
            else LocalIssuer(directory=workdir / "ca", trust_domain="cluster.local")
        )
        fixed = self.issuer
        self.issuers = IssuerCache(lambda _td: fixed)
        self.keys_dir = workdir / "keys"
        self.port = free_port()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.runner: ProjectionRunner
        self.controller: XdsController
        self.server: AdsServer
        self.traffic: MetricsSink
        self.live: LiveMeshChanges
        self.keystore: KeyStore
        self.certs: KeyStoreCertSource | IssuingCertSource
        self.issuing = IssuingCertSource(issuer=self.issuer, trust_domain="cluster.local")
        self.metrics = CollectorRegistry()
        self._ads_ca_pem = ""  # roots of the ADS server's certificate (mTLS ADS)
        self._ads_clients: dict[str, IssuedCertificate] = {}  # control-plane key mode
        self._ads_tls_kept: ServerTLS | None = None  # the first start's (control-plane mode)

    async def start(self) -> None:
        self._stop = asyncio.Event()
        self.metrics = CollectorRegistry()
        self.runner = ProjectionRunner(log=self.log, projections=all_projections())
        registry = next(p for p in self.runner.projections if isinstance(p, RegistryProjection))
        policy = next(p for p in self.runner.projections if isinstance(p, PolicyProjection))
        self.live = LiveMeshChanges(
            changes=MeshChanges(log=self.log, registry=registry, policy=policy),
            runner=self.runner,
        )
        self.keystore = KeyStore(directory=self.keys_dir)
        source = KeyStoreCertSource(
            keystore=self.keystore,
            issuer=self.issuers.current,
            refresh_interval=self.crl_refresh,
        )
        self.keystore.add_listener(source.keystore_changed)
        self.certs = source if self.ca else self.issuing
        self.controller = XdsController(
            runner=self.runner,
            certs=AgentCertSource(source) if self.agents else self.certs,
            registry=self.metrics,
            debounce=self.debounce,
        )
        source.add_listener(self.controller.on_certs_changed)
        # ADS over mTLS whenever there are certificates (no private key on cleartext ADS):
        # each proxy presents its agent's (or, control-plane mode, its identity's)
        # certificate, matched to its node id; ca=False (no Envoys, builder tests) is cleartext
        tls = self.ca or self.agents
        if tls:
            self.server = self.controller.make_server(
                authorize=workload_authorizer(workloads=lambda: registry.workloads)
            )
        else:
            self.server = self.controller.make_server()
        self.traffic = MetricsSink(authorize=self.server.check_peer)
        self.server.services.append(self.traffic.add_to)
        await self.server.start(
            host=self.ads_host, port=self.port, tls=await self._ads_tls() if tls else None
        )
        self._tasks = [
            asyncio.create_task(self.runner.run(stop=self._stop)),
            asyncio.create_task(self.controller.run(stop=self._stop)),
        ]
        if self.agents:
            self._tasks += [
                asyncio.create_task(
                    run_trust_only(
                        runner=self.runner,
                        log=self.log,
                        issuer=self.issuers,
                        keystore=self.keystore,
                        stop=self._stop,
                    )
                ),
                asyncio.create_task(source.run(stop=self._stop)),
            ]
            await self._start_identity(source)
        elif self.ca:
            self._tasks += [
                asyncio.create_task(
                    run_ca(
                        runner=self.runner,
                        log=self.log,
                        issuer=self.issuers,
                        keystore=self.keystore,
                        stop=self._stop,
                        trust_interval=self.trust_interval,
                        retry_initial=0.2,
                        retry_max=2.0,
                    )
                ),
                asyncio.create_task(source.run(stop=self._stop)),
            ]
        await asyncio.wait_for(self.runner.caught_up.wait(), timeout=30)
        while not self.controller.ready:
            await asyncio.sleep(0.01)

    async def _start_identity(self, source: KeyStoreCertSource) -> None:
        issuer = self.issuer

        def signer(_td: str) -> CsrSigner | None:
            return issuer if isinstance(issuer, CsrSigner) else None

        self.identity = ProxyCertificateService(
            runner=self.runner,
            log=self.log,
            issuer=signer,
            metrics=self.metrics,
            reviewer=self.reviewer,
            lifetime=self.proxy_cert_lifetime,
        )
        self.revoker = ProxyRevoker(
            runner=self.runner,
            log=self.log,
            issuer=signer,
            on_revoked=lambda: source.keystore_changed(frozenset(), False),
            grace=self.revoke_grace,
            interval=1.0,
        )
        local = local_issuer_of(self.issuer)
        assert local is not None, "agents=True needs a LocalIssuer (for the service's TLS)"
        served = await asyncio.to_thread(
            issue_serving_certificate, local, ip_addresses=["127.0.0.1"], dns_names=["localhost"]
        )
        self.ca_server = CertificateServer(self.identity)
        await self.ca_server.start(
            host="127.0.0.1",
            port=self.ca_port,
            cert_pem=served.cert_pem + served.chain_pem,
            key_pem=served.private_key_pem,
        )
        self._tasks.append(asyncio.create_task(self.revoker.run(stop=self._stop)))

    async def _ads_tls(self) -> ServerTLS:
        # the servers' own certificate: from the mesh CA when it is local, else (e.g. Vault)
        # from a LocalIssuer of the test's own in <workdir>/ads-ca. Control-plane key mode
        # keeps it across restart() (a restarted process with the same --xds-tls files: its
        # Envoys' bootstraps trust the roots of the first), and accepts the client roots of
        # every start (proxies' ADS certificates made before a CA rotation).
        bundle = list(self.issuer.trust_bundle())
        if self._ads_tls_kept is not None and not self.agents:
            kept = self._ads_tls_kept
            roots = list(dict.fromkeys([*kept.client_ca_pems, *bundle]))
            return ServerTLS.of(
                cert_pem=kept.cert_pem,
                key_pem=kept.key_pem,
                client_ca_pems=roots,
                trust_domain="cluster.local",
            )
        local = local_issuer_of(self.issuer) or LocalIssuer(
            directory=self.workdir / "ads-ca", trust_domain="cluster.local"
        )
        served = await asyncio.to_thread(
            issue_serving_certificate,
            local,
            ip_addresses=sorted({"127.0.0.1", self.ads_host}),
            dns_names=["localhost"],
        )
        self._ads_ca_pem = "".join(local.trust_bundle())
        tls = ServerTLS.of(
            cert_pem=served.cert_pem + served.chain_pem,
            key_pem=served.private_key_pem,
            client_ca_pems=bundle,
            trust_domain="cluster.local",
        )
        self._ads_tls_kept = tls
        return tls

    async def ads_client_tls(self, *, namespace: str, service_account: str) -> AdsTLS:
        """Control-plane key mode: an mTLS ADS client certificate for a proxy of
        ``namespace/service_account``, its key made here (the test process is the proxy's
        host) and signed by the mesh issuer for the identity's SPIFFE id; not the identity's
        workload certificate, which the proxy gets over that mTLS ADS."""
        identity = f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}"
        found = self._ads_clients.get(identity)
        if found is None:
            found = await asyncio.to_thread(
                self.issuer.issue, identity=identity, lifetime=timedelta(hours=6)
            )
            self._ads_clients[identity] = found
        return AdsTLS(
            cert_pem=found.cert_pem.rstrip("\n") + "\n" + found.chain_pem,
            key_pem=found.private_key_pem,
            ca_pem=self._ads_ca_pem,
            server_san=self.ads_host,
        )

    async def start_proxy(
        self, sidecar: Sidecar | PodAppSidecar, *, delta: bool, **envoy: Any
    ) -> None:
        """Start ``sidecar``'s Envoy against this control plane the way its mode wants: with
        agents, an SMC agent beside it first (its key made there, the test process playing the
        workload's host); in control-plane key mode, its identity's certificate for mTLS ADS.
        The workload must be registered (its service account is read from the registry).
        ``envoy``: more keyword arguments of ``start_envoy``."""
        ref = (sidecar.namespace, sidecar.name)

        def registered() -> Workload | None:
            workloads = self._registry().workloads.values()
            return next((w for w in workloads if (w.namespace, w.name) == ref), None)

        workload = await wait_until(registered, what=f"workload {sidecar.node_id} registered")
        sa = workload.service_account
        if self.agents:
            if not isinstance(sidecar, Sidecar) or (
                sidecar.agent is None and sidecar.agent_process is None
            ):
                await sidecar.start_agent(self, service_account=sa, kind=workload.kind)
        else:
            envoy["ads_tls"] = await self.ads_client_tls(
                namespace=sidecar.namespace, service_account=sa
            )
        sidecar.start_envoy(ads_port=self.port, delta=delta, **envoy)

    def _registry(self) -> RegistryProjection:
        return next(p for p in self.runner.projections if isinstance(p, RegistryProjection))

    def ca_bundle(self) -> str:
        """PEM of the roots agents verify the certificate service with."""
        return "".join(self.issuer.trust_bundle())

    async def join_token(
        self, *, namespace: str, name: str, service_account: str, kind: str = "vm"
    ) -> str:
        """A one-time join token for workload ``kind/namespace/name``, recorded (by digest)
        and applied."""
        token, event = join_token_event(
            proxy=f"{kind}/{namespace}/{name}",
            identity=f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}",
            ttl=timedelta(hours=1),
        )
        appended = await asyncio.to_thread(self.log.append, [event])
        while not all(
            self.runner.position.get((a.stream, a.partition)) > a.offset for a in appended
        ):
            await asyncio.sleep(0.01)
        return token

    async def stop(self) -> None:
        self._stop.set()
        if self.ca_server is not None:
            await self.ca_server.stop(grace=0)
            self.ca_server = None
        await self.server.stop(grace=0)
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(t, timeout=5)
        self._tasks = []

    async def restart(self) -> None:
        """Stop everything but the log, the key directory and the issuer; start afresh on the
        same port."""
        await self.stop()
        await self.start()

    def close(self) -> None:
        self.log.close()

    def diagnosis(self) -> str:
        """What a failing end-to-end test should print: each tracked proxy's identity,
        streams, problem and snapshot versions, the runner's position, every NACK and every
        refused stream (JSON lines)."""
        lines = [f"runner at {self.runner.position.to_json()} ({self.runner.applied} events)"]
        lines += [json.dumps(row, sort_keys=True) for row in self.controller.node_status()]
        lines += [
            f"NACK {n.node_id} {n.type_url} {n.version}: {n.message}" for n in self.server.nacks()
        ]
        lines += [f"refused {r.node_id or r.peer}: {r.message}" for r in self.server.refusals()]
        return "\n".join(lines)

    async def apply(self, text: str, *, delete: bool = False) -> list[str]:
        """Apply (or delete) manifests through the mesh API; returns the appended event ids."""
        loaded = load_documents(text, source="test")
        if loaded.errors:
            raise ValueError(f"bad test manifests: {loaded.errors}")
        request_id = str(uuid.uuid4())
        report: ChangeReport
        if delete:
            report = await self.live.delete(
                loaded.resources, actor="test", source="test", request_id=request_id
            )
        else:
            report = await self.live.apply(
                loaded.resources, actor="test", source="test", request_id=request_id
            )
        if not report.ok:
            raise ValueError(f"change refused: {report.as_dict()}")
        return [a.event_id for a in report.appended if not a.duplicate]
