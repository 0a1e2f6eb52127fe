"""The control plane's proxy certificate service: signs agents' CSRs for proven identities.

Role: :class:`ProxyCertificateService` answers :class:`~smc.agent.SignRequest` s. It first
establishes who the caller is, from exactly one proof:

- a pod's projected service-account token, checked by a TokenReview (audience-bound; the
  apiserver also checks expiry and that the bound pod and service account still exist). The
  token must be bound to a pod, and the proxy id must name that pod (``<ns>/<pod>``). A token
  is bound to the first key it got a certificate for: presented again with another key (a
  replay) it is refused until it expires (its digest and the key's are kept in memory, never
  the token); the same CSR again (the agent retrying after a lost answer) is signed again;
- a VM's one-time join token (``smc vm bootstrap``; also what the demo's pods, which run
  outside Kubernetes, use): its SHA-256 must be on the log (``JoinTokenIssued``), unexpired,
  unused, for this proxy, whose workload is still registered with the token's identity;
  or a VirtualMachineGroup's join token, once per instance of that group
  (:mod:`smc.identity._groupjoin`);
- a renewal: the proxy's current certificate (active on the log for this proxy, chaining to
  the trust bundle, unexpired, unrevoked) and a signature by its key over the new CSR.

Then the issuer (local CA or Vault ``pki/sign``) signs the CSR for that identity only
(:func:`smc.ca.check_csr`), and ``ProxyCertificateIssued`` (proxy id, serial, identity,
validity, issuer, fingerprint, proof kind: never a key nor a token) is appended, in group
commits, and applied by the projection runner before the answer is sent (so a join token is
seen as used, and the new certificate as current, by the very next request). Refusals raise :class:`ProofRefused` and are counted per
kind (``smc_identity_refusals_total``).

:class:`ProxyRevoker` revokes a proxy's certificate when its pod or VM leaves the registry
(at once on ``WorkloadLeft``; a sweep also revokes, after ``grace`` seconds, current
certificates of proxies that never joined it), appends ``ProxyCertificateRevoked`` and calls
``on_revoked`` (``smc serve`` wakes its CRL refresh: the CRL in ``ROOTCA`` then makes every
peer refuse the certificate).

Proxy ids on the log are canonical: ``pod/<ns>/<name>`` or ``vm/<ns>/<name>``.
Concurrency: one asyncio loop (the projection runner's); issuers and the log are called in
worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from prometheus_client import CollectorRegistry, Counter

from smc.agent._protocol import SignRequest, SignResponse, renewal_message
from smc.auth import TokenReviewer, token_digest
from smc.ca import (
    CAError,
    CertificateVerificationError,
    InvalidIdentity,
    SpiffeId,
    renew_at,
    verify_certificate,
)
from smc.ca._csr import CsrSigner, SignedCertificate
from smc.ca._model import serial_from_int
from smc.events import (
    Event,
    EventLog,
    ProxyCertificateIssued,
    ProxyCertificateRevoked,
    WorkloadLeft,
    deterministic_id,
    make_event,
)
from smc.identity._errors import ProofRefused, ServiceNotReady
from smc.identity._groupjoin import GROUP_PROOF, GROUP_TOKEN_PREFIX, check_group_join
from smc.identity._podtoken import check_reviewer, review_pod_token
from smc.projections import CertsProjection, PolicyProjection, ProjectionRunner, RegistryProjection
from smc.projections._certs import JoinToken
from smc.xds._identity import InvalidNodeId, parse_node_id

__all__ = ["ProxyCertificateService", "ProxyRevoker", "canonical_proxy"]

log = logging.getLogger("smc.identity")

SOURCE = "smc-ca"
IssuerGetter = Callable[[str], CsrSigner | None]


def canonical_proxy(node_id: str, *, kind: str) -> str:
    """``kind/<ns>/<name>`` for a node id (``<ns>/<name>`` or ``<kind>/<ns>/<name>``);
    raises :class:`ProofRefused` when the node id is malformed or names another kind."""
    try:
        ref = parse_node_id(node_id)
    except InvalidNodeId as exc:
        raise ProofRefused(kind="proxy-invalid", reason=str(exc)) from exc
    if ref.kind is not None and ref.kind != kind:
        raise ProofRefused(
            kind="proxy-mismatch", reason=f"node id {node_id!r} is not a {kind} proxy id"
        )
    return f"{kind}/{ref.namespace}/{ref.name}"


P = TypeVar("P")


def _projection(runner: ProjectionRunner, cls: type[P]) -> P:
    return next(p for p in runner.projections if isinstance(p, cls))


@dataclass(frozen=True, kw_only=True, slots=True)
class _Proven:
    proxy: str  # canonical
    identity: str  # ns/sa
    proof: str  # what the event records
    previous_serial: str = ""


class _GroupAppender:
    """Appends events in batches; callers wait until their event is durable and applied by
    the runner (so the next request sees it: a used join token, a current certificate)."""

    def __init__(self, log_: EventLog, runner: ProjectionRunner, *, timeout: float = 30.0) -> None:
        self.log = log_
        self.runner = runner
        self.timeout = timeout
        self._queue: list[tuple[Event, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def append(self, event: Event) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((event, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                appended = await asyncio.to_thread(self.log.append, [e for e, _ in batch])
                deadline = time.monotonic() + self.timeout
                while not all(
                    self.runner.position.get((a.stream, a.partition)) > a.offset for a in appended
                ):
                    if time.monotonic() > deadline:
                        raise ServiceNotReady("the projection runner did not apply the events")
                    await asyncio.sleep(0.002)
            except Exception as exc:  # every waiter of the batch learns of it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)


class ProxyCertificateService:
    """Proof, then a signature (see the module docstring)."""

    def __init__(
        self,
        *,
        runner: ProjectionRunner,
        log: EventLog,
        issuer: IssuerGetter,
        reviewer: TokenReviewer | None = None,
        metrics: CollectorRegistry | None = None,
        lifetime: timedelta | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.runner = runner
        self.log = log
        self.issuer = issuer
        if reviewer is not None:
            check_reviewer(reviewer)
        self.reviewer = reviewer
        self.lifetime = lifetime
        self.clock = clock
        self.registry = _projection(runner, RegistryProjection)
        self.policy = _projection(runner, PolicyProjection)
        self.certs = _projection(runner, CertsProjection)
        self._appender = _GroupAppender(log, runner)
        # token digest -> (forget after, SHA-256 of the public key it was first used for)
        self._used_tokens: dict[str, tuple[float, str]] = {}
        self._consuming: set[str] = set()  # join tokens being used right now
        self.refused: dict[str, int] = {}
        self.signed = 0
        reg = metrics if metrics is not None else CollectorRegistry()
        self._refusals = Counter(
            "smc_identity_refusals",
            "Certificate requests refused, by kind of failed proof.",
            ["kind"],
            registry=reg,
        )
        self._signed = Counter(
            "smc_identity_signed",
            "Proxy certificates signed, by kind of proof.",
            ["proof"],
            registry=reg,
        )

    # ------------------------------------------------------------------ helpers
    def _refuse(self, kind: str, reason: str) -> ProofRefused:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        self._refusals.labels(kind=kind).inc()
        log.warning("certificate request refused (%s): %s", kind, reason)
        return ProofRefused(kind=kind, reason=reason)

    def _spiffe(self, identity: str) -> SpiffeId:
        ns, _, sa = identity.partition("/")
        try:
            return SpiffeId.of(
                trust_domain=self.policy.mesh.trust_domain, namespace=ns, service_account=sa
            )
        except InvalidIdentity as exc:
            raise self._refuse("identity-invalid", str(exc)) from exc

    def _lifetime(self) -> timedelta:
        if self.lifetime is not None:
            return self.lifetime
        return timedelta(seconds=self.policy.mesh.cert_lifetime_seconds)

    # ------------------------------------------------------------------ proofs
    async def _prove_token(self, req: SignRequest, key_id: str) -> _Proven:
        if self.reviewer is None:
            raise self._refuse(
                "token-unsupported",
                "this control plane has no Kubernetes apiserver to check tokens (--kube)",
            )
        digest = token_digest(req.token)
        now = time.time()
        self._used_tokens = {d: u for d, u in self._used_tokens.items() if u[0] > now}
        used = self._used_tokens.get(digest)
        if used is not None and used[1] != key_id:
            raise self._refuse(
                "token-replayed",
                "this token already got a certificate for another key; renew with the certificate",
            )
        try:
            who = await review_pod_token(self.reviewer, req.token)
        except ProofRefused as exc:
            raise self._refuse(exc.kind, exc.reason) from exc
        if not who.pod_name:
            raise self._refuse("not-pod-bound", "the token is not bound to a pod")
        proxy = canonical_proxy(req.proxy, kind="pod")
        if proxy != f"pod/{who.namespace}/{who.pod_name}":
            raise self._refuse(
                "proxy-mismatch",
                f"node id {req.proxy!r} is not the token's pod {who.namespace}/{who.pod_name}",
            )
        used = self._used_tokens.get(digest)
        if used is not None and used[1] != key_id:  # a concurrent request with it won
            raise self._refuse("token-replayed", "this token already got a certificate")
        self._used_tokens[digest] = (who.expires_at or (now + 3600.0), key_id)
        return _Proven(
            proxy=proxy,
            identity=f"{who.namespace}/{who.service_account}",
            proof="service-account-token",
        )

    def _prove_join_token(self, req: SignRequest) -> _Proven:
        digest = token_digest(req.join_token)
        token = self.certs.join_token(digest)
        if token is None:
            raise self._refuse("join-token-unknown", "no such join token")
        if token.proxy.startswith(GROUP_TOKEN_PREFIX):  # a VirtualMachineGroup's token
            return self._prove_group_join(req, token)
        if token.used_by or digest in self._consuming:
            raise self._refuse("join-token-replayed", "this join token was already used")
        if self.clock() >= token.expires_at:
            raise self._refuse("join-token-expired", f"expired at {token.expires_at.isoformat()}")
        kind = token.proxy.split("/", 1)[0]
        proxy = canonical_proxy(req.proxy, kind=kind)
        if proxy != token.proxy:
            raise self._refuse(
                "proxy-mismatch", f"node id {req.proxy!r} is not the token's {token.proxy}"
            )
        _, ns, name = proxy.split("/")
        workload = self.registry.workloads.get((kind, ns, name))
        if workload is None:
            raise self._refuse("workload-gone", f"{kind} {ns}/{name} is not registered")
        identity = f"{ns}/{workload.service_account}"
        if self._spiffe(identity).uri != token.identity:
            raise self._refuse(
                "identity-changed", f"the VM now runs as {identity}, not as the token's identity"
            )
        return _Proven(proxy=proxy, identity=identity, proof=f"join-token:{digest}")

    def _prove_group_join(self, req: SignRequest, token: JoinToken) -> _Proven:
        """See :mod:`smc.identity._groupjoin` (one use per instance of the token's group)."""
        proxy = canonical_proxy(req.proxy, kind="vm")
        if f"{token.token_sha256}|{proxy}" in self._consuming:
            raise self._refuse("join-token-replayed", "this instance is using the token now")
        try:
            identity, proof = check_group_join(
                token=token,
                proxy=proxy,
                registry=self.registry,
                certs=self.certs,
                now=self.clock(),
                spiffe_of=lambda ident: self._spiffe(ident).uri,
            )
        except ProofRefused as exc:
            raise self._refuse(exc.kind, exc.reason) from None
        return _Proven(proxy=proxy, identity=identity, proof=proof)

    def _prove_certificate(self, req: SignRequest, csr: x509.CertificateSigningRequest) -> _Proven:
        bundle = list(self.certs.trust.get(self._issuer_name(), ())) or [
            r for roots in self.certs.trust.values() for r in roots
        ]
        try:
            sid = verify_certificate(
                cert_pem=req.certificate_pem,
                trust_bundle=bundle,
                trust_domain=self.policy.mesh.trust_domain,
            )
            leaf = x509.load_pem_x509_certificate(req.certificate_pem.encode("ascii"))
        except (CertificateVerificationError, ValueError) as exc:
            raise self._refuse("certificate-invalid", str(exc)) from exc
        serial = serial_from_int(leaf.serial_number)
        rec = self.certs.proxy_serial(serial)
        if rec is None:
            raise self._refuse("certificate-unknown", f"serial {serial} is no proxy certificate")
        if rec.status != "active":
            raise self._refuse("certificate-revoked", f"serial {serial} is {rec.status}")
        kind = rec.proxy.split("/", 1)[0]
        proxy = canonical_proxy(req.proxy, kind=kind)
        if proxy != rec.proxy or rec.identity != sid.uri:
            raise self._refuse(
                "proxy-mismatch", f"certificate {serial} belongs to {rec.proxy}, not {req.proxy!r}"
            )
        message = renewal_message(
            proxy=req.proxy, csr_der=csr.public_bytes(serialization.Encoding.DER)
        )
        key = leaf.public_key()
        try:
            signature = req.signature_bytes()
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            else:
                raise InvalidSignature
        except (InvalidSignature, ValueError) as exc:
            raise self._refuse(
                "certificate-signature", "the renewal is not signed by the certificate's key"
            ) from exc
        return _Proven(
            proxy=rec.proxy,
            identity=f"{sid.namespace}/{sid.service_account}",
            proof=f"certificate:{serial}",
            previous_serial=serial,
        )

    def _issuer_name(self) -> str:
        signer = self.issuer(self.policy.mesh.trust_domain)
        return signer.name if signer is not None else ""

    # ------------------------------------------------------------------ signing
    async def sign(self, req: SignRequest) -> SignResponse:
        """Prove, sign, record, answer. Raises :class:`ProofRefused` (counted),
        :class:`smc.ca.CAError` (a CSR that cannot be signed: ``InvalidCSR``; the issuer
        unavailable: ``IssuerUnavailable``) or :class:`ServiceNotReady`."""
        if not self.runner.caught_up.is_set():
            raise ServiceNotReady("the control plane has not caught up with its log yet")
        signer = self.issuer(self.policy.mesh.trust_domain)
        if signer is None:
            raise ServiceNotReady("no issuer can sign CSRs on this replica")
        try:
            csr = x509.load_pem_x509_csr(req.csr_pem.encode("ascii", "replace"))
        except ValueError as exc:
            raise self._refuse("csr-invalid", f"csr_pem is not a PEM CSR: {exc}") from exc
        if req.token:
            key_id = hashlib.sha256(
                csr.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ).hexdigest()
            proven = await self._prove_token(req, key_id)
        elif req.join_token:
            proven = self._prove_join_token(req)
        else:
            proven = self._prove_certificate(req, csr)
        sid = self._spiffe(proven.identity)
        consuming = proven.proof if proven.proof.startswith("join-token:") else ""
        if proven.proof.startswith(GROUP_PROOF + ":"):  # one use per instance of the group
            consuming = f"{proven.proof}|{proven.proxy}"
        if consuming:
            self._consuming.add(consuming.partition(":")[2])
        try:
            try:
                signed: SignedCertificate = await asyncio.to_thread(
                    signer.sign_csr, csr_pem=req.csr_pem, identity=sid, lifetime=self._lifetime()
                )
            except CAError as exc:
                if type(exc).__name__ == "InvalidCSR":
                    self._refusals.labels(kind="csr-invalid").inc()
                    self.refused["csr-invalid"] = self.refused.get("csr-invalid", 0) + 1
                raise
            event = make_event(
                ProxyCertificateIssued,
                source=SOURCE,
                actor="ca",
                event_id=deterministic_id("ca", "proxy", proven.proxy, signed.serial),
                proxy=proven.proxy,
                serial=signed.serial,
                previous_serial=proven.previous_serial,
                identity=signed.identity,
                not_before=signed.not_before,
                not_after=signed.not_after,
                issuer=signed.issuer,
                fingerprint=signed.fingerprint,
                proof=proven.proof,
            )
            await self._appender.append(event)
        finally:
            if consuming:
                self._consuming.discard(consuming.partition(":")[2])
        self.signed += 1
        self._signed.labels(proof=proven.proof.partition(":")[0]).inc()
        log.info(
            "signed %s for proxy %s serial %s until %s (%s)",
            signed.identity,
            proven.proxy,
            signed.serial,
            signed.not_after.isoformat(),
            proven.proof.partition(":")[0],
        )
        start = max(signed.not_before, signed.not_after - self._lifetime())
        due = renew_at(
            not_before=start, not_after=signed.not_after, seed=f"{proven.proxy}|{signed.serial}"
        )
        bundle = self.certs.trust.get(signed.issuer) or tuple(
            await asyncio.to_thread(lambda: list(_trust_bundle(signer)))
        )
        return SignResponse(
            serial=signed.serial,
            certificate_pem=signed.cert_pem,
            chain_pem=signed.chain_pem,
            trust_bundle=tuple(bundle),
            not_before=signed.not_before.isoformat(),
            not_after=signed.not_after.isoformat(),
            renew_after=due.isoformat(),
        )


def _trust_bundle(signer: object) -> Iterable[str]:
    bundle = getattr(signer, "trust_bundle", None)
    return bundle() if callable(bundle) else ()


class ProxyRevoker:
    """Revokes the certificates of proxies whose pod or VM left (see the module docstring)."""

    def __init__(
        self,
        *,
        runner: ProjectionRunner,
        log: EventLog,
        issuer: Callable[[str], object | None],
        on_revoked: Callable[[], None] = lambda: None,
        grace: float = 120.0,
        interval: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.runner = runner
        self.log = log
        self.issuer = issuer
        self.on_revoked = on_revoked
        self.grace = timedelta(seconds=grace)
        self.interval = interval
        self.clock = clock
        self.registry = _projection(runner, RegistryProjection)
        self.policy = _projection(runner, PolicyProjection)
        self.certs = _projection(runner, CertsProjection)
        self.revoked = 0
        self._left: set[str] = set()
        self._wake: asyncio.Event | None = None

    def _on_events(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, WorkloadLeft):
                self._left.add(f"{e.kind}/{e.namespace}/{e.name}")
        if self._left and self._wake is not None:
            self._wake.set()

    def due(self) -> list[tuple[str, str, str, str]]:
        """(proxy, serial, identity, reason) of current certificates to revoke now."""
        now = self.clock()
        out = []
        left, self._left = self._left, set()
        for proxy, serial in sorted(self.certs.proxy_current.items()):
            kind, _, rest = proxy.partition("/")
            ns, _, name = rest.partition("/")
            if (kind, ns, name) in self.registry.workloads:
                continue
            rec = self.certs.proxy_certs[proxy][serial]
            if rec.status != "active":
                continue
            if proxy in left or now - rec.not_before >= self.grace:
                out.append((proxy, serial, rec.identity, f"{kind}-left"))
        return out

    async def revoke_due(self) -> int:
        todo = self.due()
        if not todo:
            return 0
        signer = self.issuer(self.policy.mesh.trust_domain)
        events: list[Event] = []
        for proxy, serial, identity, reason in todo:
            if signer is not None:
                revoke = getattr(signer, "revoke", None)
                if callable(revoke):
                    until = self.certs.proxy_certs[proxy][serial].not_after
                    try:
                        await asyncio.to_thread(revoke, serial=serial, not_after=until)
                    except CAError as exc:
                        log.warning("cannot revoke %s of %s yet: %s", serial, proxy, exc)
                        self._left.add(proxy)
                        continue
            events.append(
                make_event(
                    ProxyCertificateRevoked,
                    source=SOURCE,
                    actor="ca",
                    event_id=deterministic_id("ca", "proxy-revoke", proxy, serial),
                    proxy=proxy,
                    serial=serial,
                    identity=identity,
                    reason=reason,
                )
            )
            log.info("revoked %s of proxy %s (%s)", serial, proxy, reason)
        if events:
            await asyncio.to_thread(self.log.append, events)
            self.revoked += len(events)
            self.on_revoked()
        return len(events)

    async def run(self, *, stop: asyncio.Event) -> None:
        """Revoke on every ``WorkloadLeft`` and every ``interval`` seconds, until ``stop``."""
        self._wake = wake = asyncio.Event()
        self.runner.listeners.append(self._on_events)
        try:
            await self.runner.caught_up.wait()
            while not stop.is_set():
                wake.clear()
                try:
                    await self.revoke_due()
                except Exception:  # never take `smc serve` down
                    log.exception("revoking certificates of departed proxies failed")
                waiter = asyncio.ensure_future(wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait(
                    {waiter, stopper}, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                stopper.cancel()
        finally:
            with contextlib.suppress(ValueError):
                self.runner.listeners.remove(self._on_events)
            self._wake = None
