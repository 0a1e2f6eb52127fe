"""The certificate controller: the CA reacting to the projections.

Role: keeps one valid workload certificate per mesh identity and records its lifecycle
on the log. What to do is decided by :func:`plan_certificates` (:mod:`smc.ca._plan`), a
pure function of the registry identities, the mesh config (trust domain, lifetime), the
certificate projection, the fingerprints whose keys this process holds, the issuer name and
``now`` - so it is testable and every replica computes the same plan.
:class:`CertificateController` carries the plan out: it signs with the issuer (in a worker
thread), keeps the key in the :class:`~smc.ca.KeyStore` (never on the log), appends
``CertificateIssued`` / ``CertificateRenewed`` / ``CertificateRevoked`` (public facts only,
deterministic event ids, :mod:`smc.ca._ca_events`) and ``TrustBundleChanged`` when the
issuer's roots change, then waits until the runner has applied its own events before
planning again. After a restart the certificate state comes back from the log
(``CertsProjection``); a certificate still valid whose key is still held is simply served
again, one whose key is gone is renewed. The issuer comes from the command-line options
(:mod:`smc.ca._options`).

A replica that must not issue (``smc serve --ca follow``) runs :func:`follow_ca` instead
(:mod:`smc.ca._follower`). This module re-exports the names of those modules.

Failures never stop ``smc serve``: an unavailable issuer (after the retries of
:func:`smc.ca.retrying`) or log leaves the current certificates in place and the pass is
retried with exponential backoff; an identity the issuer rejects is retried on its own
backoff; a malformed ``ns/sa`` is skipped with a warning.
Concurrency: one asyncio task (:meth:`CertificateController.run` or
:meth:`CertificateFollower.run`) on the loop that runs the
:class:`~smc.projections.ProjectionRunner`; it reads projections only on that loop and calls
the blocking issuer and log (and, for the follower, the key directory) through
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from smc.ca._ca_events import SOURCE, certificate_event, revocation_event, trust_bundle_event
from smc.ca._errors import CAError, CAStateError, IssuerRejected, IssuerUnavailable
from smc.ca._follower import CertificateFollower, follow_ca, following_runner
from smc.ca._keystore import KeyStore
from smc.ca._model import IssuedCertificate, Issuer
from smc.ca._options import IssuerFactory, issuer_factory_from_options, issuer_from_options
from smc.ca._plan import (
    Action,
    IssueAction,
    Plan,
    RenewAction,
    RevokeAction,
    _current_records,
    _projection,
    active_issuer_name,
    plan_certificates,
    renewal_instant,
    served_bundle,
)
from smc.ca._retry import RetryingIssuer
from smc.ca._rotation import DEFAULT_FRACTION, DEFAULT_JITTER
from smc.ca._vault import VaultIssuer
from smc.events import (
    Appended,
    Event,
    EventLog,
)
from smc.projections import (
    CertRecord,
    CertsProjection,
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
)

__all__ = [
    "Action",
    "CertificateController",
    "CertificateFollower",
    "IssueAction",
    "IssuerFactory",
    "Plan",
    "ReconcileResult",
    "RenewAction",
    "RevokeAction",
    "active_issuer_name",
    "certificate_event",
    "follow_ca",
    "issuer_factory_from_options",
    "issuer_from_options",
    "plan_certificates",
    "renewal_instant",
    "revocation_event",
    "run_ca",
    "served_bundle",
    "trust_bundle_event",
]

log = logging.getLogger("smc.ca.controller")


# ---------------------------------------------------------------------- the controller
@dataclass(kw_only=True, slots=True)
class ReconcileResult:
    """What one pass did."""

    issued: int = 0
    renewed: int = 0
    revoked: int = 0
    failed: int = 0
    trust_changed: bool = False
    unavailable: str | None = None
    next_due: datetime | None = None
    events: list[Event] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return self.issued + self.renewed + self.revoked


def _auto_workers(issuer: Issuer) -> int:
    inner: object = issuer
    while isinstance(inner, RetryingIssuer):
        inner = inner.inner
    return 4 if isinstance(inner, VaultIssuer) else 1


class CertificateController:
    """Issues, renews and revokes workload certificates as the projections change.

    ``issuer`` is an :class:`~smc.ca.Issuer` (its trust domain must be the mesh's) or an
    :data:`IssuerFactory` called with the mesh config's trust domain (again when it
    changes). ``clock`` gives the time plans use.
    """

    def __init__(
        self,
        *,
        runner: ProjectionRunner,
        log: EventLog,
        issuer: Issuer | IssuerFactory,
        keystore: KeyStore,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        fraction: float = DEFAULT_FRACTION,
        jitter: float = DEFAULT_JITTER,
        actor: str = "ca",
        source: str = SOURCE,
        trust_interval: float = 30.0,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        apply_timeout: float = 30.0,
        batch: int = 256,
        workers: int | None = None,
    ) -> None:
        self.runner = runner
        self.log = log
        self.keystore = keystore
        self.clock = clock
        self.fraction = fraction
        self.jitter = jitter
        self.actor = actor
        self.source = source
        self.trust_interval = trust_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.apply_timeout = apply_timeout
        self.batch = batch
        #: Threads signing at once; None: 4 for a Vault issuer (network bound: ~250/s with
        #: one, ~350/s with four on loopback), 1 for a local one (CPU bound under the GIL:
        #: more threads measured no faster).
        self.workers = workers
        self.registry = _projection(runner, RegistryProjection)
        self.policy = _projection(runner, PolicyProjection)
        self.certs = _projection(runner, CertsProjection)
        if isinstance(issuer, Issuer):
            self._fixed: Issuer | None = issuer
            self._factory: IssuerFactory | None = None
        else:
            self._fixed, self._factory = None, issuer
        self._issuers: dict[str, Issuer] = {}
        self._trust_checked = float("-inf")
        self._failures: dict[str, tuple[int, datetime]] = {}  # identity -> (count, retry at)
        self._warned: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own: set[str] = set()  # ids of events we appended, not yet seen applied
        self._pruned_at = float("-inf")
        self.last_error: str | None = None
        self.passes = 0

    # -------------------------------------------------------------- inputs
    def issuer_for(self, trust_domain: str) -> Issuer:
        """The issuer that signs for ``trust_domain``."""
        if self._fixed is not None:
            return self._fixed
        issuer = self._issuers.get(trust_domain)
        if issuer is None:
            assert self._factory is not None
            issuer = self._factory(trust_domain)
            self._issuers[trust_domain] = issuer
        return issuer

    @property
    def lifetime(self) -> timedelta:
        return timedelta(seconds=max(1, int(self.policy.mesh.cert_lifetime_seconds)))

    def current_records(self) -> dict[str, CertRecord]:
        """SPIFFE URI -> current certificate, from the certificate projection."""
        return _current_records(self.certs)

    def plan(self, *, now: datetime | None = None, issuer_name: str | None = None) -> Plan:
        """:func:`plan_certificates` over the projections as they stand."""
        current = self.current_records()
        held = {r.fingerprint for r in current.values() if self.keystore.holds(r.fingerprint)}
        return plan_certificates(
            identities=self.registry.identities(),
            trust_domain=self.policy.mesh.trust_domain,
            lifetime=self.lifetime,
            current=current,
            now=now or self.clock(),
            held=held,
            issuer=issuer_name,
            fraction=self.fraction,
            jitter=self.jitter,
        )

    def _served_bundle(self, issuer_name: str) -> list[str]:
        """Roots of the active issuer plus those of every issuer with a current cert."""
        return served_bundle(
            trust=self.certs.trust, current=self.current_records(), issuer_name=issuer_name
        )

    def _sync_keystore(self) -> None:
        self.keystore.sync({i: r.fingerprint for i, r in self.current_records().items()})

    # -------------------------------------------------------------- log plumbing
    async def _append(self, events: Sequence[Event]) -> list[Appended]:
        if not events:
            return []
        self._own.update(e.event_id for e in events)
        appended = await asyncio.to_thread(self.log.append, list(events))
        await self._wait_applied(appended)
        return appended

    async def _wait_applied(self, appended: Sequence[Appended]) -> None:
        """Wait until the runner has applied what we appended (so the next plan sees it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.apply_timeout
        while not all(
            self.runner.position.get((a.stream, a.partition)) > a.offset for a in appended
        ):
            if loop.time() > deadline:
                raise CAStateError(
                    f"the projection runner did not apply the CA's events within"
                    f" {self.apply_timeout}s (is it running?)"
                )
            await asyncio.sleep(0.01)

    # -------------------------------------------------------------- one pass
    async def check_trust_bundle(self, issuer: Issuer) -> bool:
        """Append ``TrustBundleChanged`` if the issuer's roots differ from the log's."""
        roots = await asyncio.to_thread(issuer.trust_bundle)
        previous = list(self.certs.trust.get(issuer.name, ()))
        if roots == previous:
            return False
        event = trust_bundle_event(
            issuer=issuer.name, roots=roots, previous=previous, source=self.source, actor=self.actor
        )
        appended = await self._append([event])
        if appended and appended[0].duplicate:
            # the same transition was recorded before (a bundle coming back): record it anew
            salt = str(int(self.clock().timestamp() * 1000))
            event = trust_bundle_event(
                issuer=issuer.name,
                roots=roots,
                previous=previous,
                source=self.source,
                actor=self.actor,
                salt=salt,
            )
            await self._append([event])
        log.info("trust bundle of %s: %d root(s)", issuer.name, len(roots))
        return True

    def _blocked(self, identity: str, now: datetime) -> bool:
        f = self._failures.get(identity)
        return f is not None and now < f[1]

    def _failed(self, identity: str, now: datetime, exc: Exception) -> None:
        count = self._failures.get(identity, (0, now))[0] + 1
        delay = min(self.retry_max, self.retry_initial * 2 ** (count - 1))
        self._failures[identity] = (count, now + timedelta(seconds=delay))
        log.error("certificate for %s failed (%s); retrying in %.0fs", identity, exc, delay)

    def _one(
        self, issuer: Issuer, action: Action, lifetime: timedelta
    ) -> tuple[Action, IssuedCertificate | None, Exception | None]:
        """Blocking: sign or revoke one action at the issuer; errors are returned."""
        try:
            if isinstance(action, RevokeAction):
                try:
                    issuer.revoke(serial=action.serial)
                except IssuerRejected as exc:
                    # unknown to this issuer (another issuer's, or forgotten): the log
                    # still records that the mesh no longer uses it
                    log.warning("issuer refused to revoke %s: %s", action.serial, exc)
                return action, None, None
            cert = issuer.issue(identity=action.identity, lifetime=lifetime)
            self.keystore.put(cert)
            return action, cert, None
        except (CAError, OSError) as exc:
            return action, None, exc

    def _execute(
        self, issuer: Issuer, actions: Sequence[Action], lifetime: timedelta
    ) -> tuple[
        list[tuple[Action, IssuedCertificate | None]], list[tuple[Action, Exception]], str | None
    ]:
        """Blocking: run ``actions`` on ``workers`` threads (the issuer is thread-safe).
        Returns what succeeded, what failed, and the unavailability seen (if any)."""
        done: list[tuple[Action, IssuedCertificate | None]] = []
        failed: list[tuple[Action, Exception]] = []
        unavailable: str | None = None
        workers = self.workers if self.workers is not None else _auto_workers(issuer)
        if workers <= 1 or len(actions) <= 1:
            results = []
            for a in actions:
                r = self._one(issuer, a, lifetime)
                results.append(r)
                if isinstance(r[2], IssuerUnavailable):
                    break
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smc-ca") as pool:
                results = list(pool.map(lambda a: self._one(issuer, a, lifetime), actions))
        for action, cert, exc in results:
            if exc is None:
                done.append((action, cert))
            elif isinstance(exc, IssuerUnavailable):
                unavailable = unavailable or str(exc)
            else:
                failed.append((action, exc))
        return done, failed, unavailable

    async def reconcile(self, *, now: datetime | None = None) -> ReconcileResult:
        """One pass: trust bundle, plan, act, record. The runner must be following the log."""
        self.passes += 1
        when = now or self.clock()
        result = ReconcileResult()
        trust_domain = self.policy.mesh.trust_domain
        try:
            issuer = self.issuer_for(trust_domain)
        except CAError as exc:
            result.unavailable = f"cannot build the issuer for {trust_domain!r}: {exc}"
            return result
        self._sync_keystore()
        loop = asyncio.get_running_loop()
        try:
            if loop.time() - self._trust_checked >= self.trust_interval:
                result.trust_changed = await self.check_trust_bundle(issuer)
                self._trust_checked = loop.time()
        except IssuerUnavailable as exc:
            result.unavailable = str(exc)
        plan = self.plan(now=when, issuer_name=issuer.name)
        for short, why in plan.skipped:
            if short not in self._warned:
                self._warned.add(short)
                log.warning("identity %s gets no certificate: %s", short, why)
        result.next_due = plan.next_due
        actions = [a for a in plan.actions if not self._blocked(a.identity, when)]
        lifetime = self.lifetime
        for i in range(0, len(actions), self.batch):
            if result.unavailable is not None:
                break
            chunk = actions[i : i + self.batch]
            done, failed, unavailable = await asyncio.to_thread(
                self._execute, issuer, chunk, lifetime
            )
            for action, error in failed:
                result.failed += 1
                self._failed(action.identity, when, error)
            events: list[Event] = []
            for action, cert in done:
                self._failures.pop(action.identity, None)
                if isinstance(action, RevokeAction):
                    events.append(
                        revocation_event(
                            identity=action.identity,
                            serial=action.serial,
                            reason=action.reason,
                            source=self.source,
                            actor=self.actor,
                        )
                    )
                    result.revoked += 1
                    continue
                assert cert is not None
                prev = action.previous_serial if isinstance(action, RenewAction) else None
                events.append(
                    certificate_event(
                        cert, previous_serial=prev, source=self.source, actor=self.actor
                    )
                )
                if prev is None:
                    result.issued += 1
                else:
                    result.renewed += 1
                log.info(
                    "%s %s serial %s until %s (%s)",
                    "issued" if prev is None else "renewed",
                    action.identity,
                    cert.serial,
                    cert.not_after.isoformat(),
                    action.reason,
                )
            await self._append(events)
            result.events.extend(events)
            if unavailable is not None:
                result.unavailable = unavailable
        self._sync_keystore()
        self.keystore.set_trust_bundle(self._served_bundle(issuer.name))
        if result.changed or loop.time() - self._pruned_at >= self.trust_interval:
            retired = {
                r.fingerprint
                for r in self.certs.all_certs()
                if r.status in ("superseded", "revoked")
            }
            await asyncio.to_thread(self.keystore.prune, retired=retired)
            self._pruned_at = loop.time()
        if result.changed:
            result.next_due = self.plan(now=when, issuer_name=issuer.name).next_due
        return result

    # -------------------------------------------------------------- the loop
    def _on_events(self, events: list[Event]) -> None:
        wake, owner = self._wake, self._loop
        if wake is None or owner is None or not events:
            return
        own = self._own
        foreign = False
        for e in events:
            if e.event_id in own:
                own.discard(e.event_id)  # our own change: the pass that made it saw it
            else:
                foreign = True
        if not foreign:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is owner:
            wake.set()
        else:
            owner.call_soon_threadsafe(wake.set)

    def _delay(self, result: ReconcileResult, backoff: float) -> float:
        if result.unavailable is not None:
            return backoff
        now = self.clock()
        delay = self.trust_interval
        if result.next_due is not None:
            delay = min(delay, max(0.0, (result.next_due - now).total_seconds()))
        for _, retry_at in self._failures.values():
            delay = min(delay, max(0.0, (retry_at - now).total_seconds()))
        return max(0.05, delay)

    async def run(self, *, stop: asyncio.Event) -> None:
        """Wait until the runner has caught up, then reconcile on every log change, at
        each renewal instant, and every ``trust_interval`` seconds, until ``stop``."""
        self._loop = asyncio.get_running_loop()
        self._own.clear()
        self._wake = asyncio.Event()
        wake = self._wake
        try:
            async with following_runner(self.runner, self._on_events, stop=stop, wake=wake):
                backoff = self.retry_initial
                while not stop.is_set():
                    wake.clear()
                    try:
                        result = await self.reconcile()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # never take `smc serve` down
                        log.exception("certificate pass failed")
                        result = ReconcileResult(unavailable=f"{type(exc).__name__}: {exc}")
                    if result.unavailable is not None:
                        self.last_error = result.unavailable
                        log.warning(
                            "CA unavailable (%s); keeping current certificates, retrying in %.1fs",
                            result.unavailable,
                            backoff,
                        )
                        delay = backoff
                        backoff = min(self.retry_max, backoff * 2)
                        self._trust_checked = float("-inf")
                    else:
                        if self.last_error is not None:
                            log.info("CA available again")
                        self.last_error = None
                        backoff = self.retry_initial
                        delay = self._delay(result, backoff)
                    if result.unavailable is not None:
                        # during an outage, registry changes do not shorten the backoff
                        await self._sleep_or_stop(stop, delay)
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), timeout=delay)
                        await asyncio.sleep(0.02)  # gather a burst of events into one pass
        finally:
            self._wake = None

    @staticmethod
    async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)


async def run_ca(
    *,
    runner: ProjectionRunner,
    log: EventLog,
    issuer: Issuer | IssuerFactory,
    keystore: KeyStore,
    stop: asyncio.Event,
    trust_interval: float = 30.0,
    retry_initial: float = 1.0,
    retry_max: float = 60.0,
) -> None:
    """Run a :class:`CertificateController` until ``stop`` is set (for ``smc serve``).

    Start it as a task next to ``runner.run(stop=stop)`` on the same loop; it waits for
    ``runner.caught_up`` before its first pass. ``keystore`` is the SDS accessor
    (``keystore.get(identity)``, ``keystore.trust_bundle()``, ``keystore.add_listener``).
    It returns only when ``stop`` is set; issuer and log failures are logged and retried
    with backoff (``retry_initial`` doubling up to ``retry_max`` seconds).
    """
    controller = CertificateController(
        runner=runner,
        log=log,
        issuer=issuer,
        keystore=keystore,
        trust_interval=trust_interval,
        retry_initial=retry_initial,
        retry_max=retry_max,
    )
    await controller.run(stop=stop)
