"""What ``smc serve`` runs for per-proxy identities: the certificate service, the revoker,
and the CA pass that keeps only the trust bundle.

Role: :class:`IdentityHook` starts, once the projections caught up, the
:class:`~smc.identity.CertificateServer` on ``--ca-listen`` (TLS with a serving certificate
the local CA issues for the listen address and ``--xds-san`` names, or ``--xds-cert/--xds-key``
files), the :class:`~smc.identity.ProxyRevoker` (whose revocations wake the CRL refresh of the
cert source, so ``ROOTCA`` carries the new CRL to every peer) and, with agents serving the
keys, a :class:`TrustOnlyController`: the CA controller planning for no identity, so it
records the trust bundle, issues no control-plane key, and revokes the per-identity
certificates a previous version issued. :class:`AgentCertSource` is what the xDS builder
reads in that mode: the trust bundle and CRLs only (``agent_sds``: listeners take
``default`` from the agent beside each proxy).
Concurrency: one asyncio loop (serve's); blocking calls go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from smc.auth import TokenReviewer
from smc.ca import CertificateController, Issuer, KeyStore
from smc.ca._controller import Plan, plan_certificates
from smc.ca._csr import CsrSigner
from smc.events import EventLog
from smc.identity._errors import IdentityError
from smc.identity._https import CertificateServer
from smc.identity._service import ProxyCertificateService, ProxyRevoker
from smc.informers import KubeEndpoint
from smc.projections import ProjectionRunner
from smc.xds._certs import IssuerCache, KeyStoreCertSource, local_issuer_of

__all__ = ["IdentityHook", "IdentityOptions", "TrustOnlyController", "run_trust_only"]

log = logging.getLogger("smc.identity.serve")


class TrustOnlyController(CertificateController):
    """The CA controller with no identity to issue for (agents make the keys): it keeps the
    trust bundle on the log and revokes per-identity certificates left from before."""

    def plan(self, *, now: datetime | None = None, issuer_name: str | None = None) -> Plan:
        return plan_certificates(
            identities=(),
            trust_domain=self.policy.mesh.trust_domain,
            lifetime=self.lifetime,
            current=self.current_records(),
            now=now or self.clock(),
        )


async def run_trust_only(
    *,
    runner: ProjectionRunner,
    log: EventLog,
    issuer: IssuerCache,
    keystore: KeyStore,
    stop: asyncio.Event,
) -> None:
    """Run a :class:`TrustOnlyController` until ``stop``."""
    await TrustOnlyController(runner=runner, log=log, issuer=issuer, keystore=keystore).run(
        stop=stop
    )


class AgentCertSource:
    """The builder's cert source when agents serve the keys: roots and CRLs, never a key."""

    agent_sds = True

    def __init__(self, inner: KeyStoreCertSource) -> None:
        self.inner = inner

    def get(self, identity: str) -> None:
        return None

    def trust_bundle(self) -> list[str]:
        return self.inner.trust_bundle()


@dataclass(frozen=True, kw_only=True, slots=True)
class IdentityOptions:
    """``smc serve`` options of the certificate service."""

    listen: tuple[str, int]
    audience: str = "smc"
    kube: KubeEndpoint | None = None
    sans: tuple[str, ...] = ()
    cert_file: str | None = None
    key_file: str | None = None
    cert_hours: float = 720.0
    revoke_grace: float = 120.0


def _split_sans(host: str, sans: tuple[str, ...]) -> tuple[list[str], list[str]]:
    ips, dns = ["127.0.0.1"], ["localhost"]
    for name in (host, *sans):
        if name in ("0.0.0.0", "::", ""):
            continue
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if name not in dns:
                dns.append(name)
        else:
            if name not in ips:
                ips.append(name)
    return ips, dns


class IdentityHook:
    """The certificate service and revoker of ``smc serve`` (see the module docstring)."""

    def __init__(
        self,
        *,
        runner: ProjectionRunner,
        log: EventLog,
        issuers: IssuerCache,
        certs: KeyStoreCertSource,
        metrics: CollectorRegistry,
        options: IdentityOptions,
    ) -> None:
        self.runner = runner
        self.options = options
        self.issuers = issuers
        self.certs = certs
        self.reviewer = (
            TokenReviewer(options.kube, audiences=(options.audience,))
            if options.kube is not None
            else None
        )
        self.service = ProxyCertificateService(
            runner=runner,
            log=log,
            issuer=self._signer,
            reviewer=self.reviewer,
            metrics=metrics,
        )
        self.server = CertificateServer(self.service)
        self.revoker = ProxyRevoker(
            runner=runner,
            log=log,
            issuer=self._signer,
            on_revoked=lambda: certs.keystore_changed(frozenset(), False),
            grace=options.revoke_grace,
        )

    def _signer(self, trust_domain: str) -> CsrSigner | None:
        issuer: Issuer = self.issuers(trust_domain)
        return issuer if isinstance(issuer, CsrSigner) else None

    async def _material(self) -> tuple[str, str]:
        opts = self.options
        if opts.cert_file is not None and opts.key_file is not None:
            cert = await asyncio.to_thread(Path(opts.cert_file).read_text)
            key = await asyncio.to_thread(Path(opts.key_file).read_text)
            return cert, key
        from smc.injector._tls import issue_serving_certificate
        from smc.projections import PolicyProjection

        policy = next(p for p in self.runner.projections if isinstance(p, PolicyProjection))
        issuer = await asyncio.to_thread(self.issuers, policy.mesh.trust_domain)
        local = local_issuer_of(issuer)
        if local is None:
            raise IdentityError(
                f"--ca-listen: issuer {issuer.name} cannot sign the service's TLS certificate;"
                " give --xds-cert FILE --xds-key FILE"
            )
        ips, dns = _split_sans(opts.listen[0], opts.sans)
        served = await asyncio.to_thread(
            issue_serving_certificate,
            local,
            ip_addresses=ips,
            dns_names=dns,
            lifetime=timedelta(hours=opts.cert_hours),
        )
        return served.cert_pem + served.chain_pem, served.private_key_pem

    async def start(self, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        """Once caught up: serve (returns the tasks to cancel at exit)."""
        await self.runner.caught_up.wait()
        cert, key = await self._material()
        host, port = self.options.listen
        bound = await self.server.start(host=host, port=port, cert_pem=cert, key_pem=key)
        log.info("certificate service on %s:%d", host, bound)
        return [asyncio.create_task(self.revoker.run(stop=stop))]

    async def close(self) -> None:
        await self.server.stop()
        if self.reviewer is not None:
            await self.reviewer.close()
