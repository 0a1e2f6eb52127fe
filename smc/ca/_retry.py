"""Retrying an issuer with exponential backoff and jitter: :func:`retrying`.

Role: wraps any :class:`smc.ca.Issuer`; retries only :class:`IssuerUnavailable` (Vault
down, sealed, 5xx, timeouts), never :class:`IssuerRejected` nor bad input, and gives up
after a bounded number of attempts and a bounded total time, raising an
:class:`IssuerUnavailable` that says how many attempts were made. The caller keeps
serving the certificates it already holds meanwhile and tries again at its next
renewal tick: a certificate is renewed at about 2/3 of its lifetime, so a Vault outage
shorter than the remaining third costs nothing.
Retrying ``issue`` is safe (each attempt uses a fresh key; a certificate signed but
lost in transit simply expires) and ``revoke`` is idempotent.
Concurrency: the wrapper holds no mutable state besides its random generator (guarded
by a lock); it is as thread-safe as the wrapped issuer. It blocks while sleeping: from
asyncio run it via ``asyncio.to_thread``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from smc.ca._csr import CsrSigner, SignedCertificate
from smc.ca._errors import CAStateError, InvalidRotationPolicy, IssuerUnavailable
from smc.ca._identity import SpiffeId
from smc.ca._model import IssuedCertificate, Issuer

__all__ = ["Backoff", "RetryingIssuer", "retrying"]

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class Backoff:
    """Exponential backoff: delay ``n`` is ``min(maximum, initial * multiplier**n)``
    scaled by a random factor in ``[1 - jitter, 1]``; at most ``attempts`` calls and at
    most ``deadline`` seconds overall (a sleep never overshoots the deadline)."""

    attempts: int = 5
    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 5.0
    jitter: float = 0.5
    deadline: float = 30.0

    def __post_init__(self) -> None:
        checks = (
            ("attempts", self.attempts >= 1, "must be >= 1"),
            ("initial", self.initial >= 0, "must be >= 0"),
            ("multiplier", self.multiplier >= 1, "must be >= 1"),
            ("maximum", self.maximum >= self.initial, "must be >= initial"),
            ("jitter", 0 <= self.jitter <= 1, "must lie in [0, 1]"),
            ("deadline", self.deadline > 0, "must be > 0"),
        )
        for name, ok, reason in checks:
            if not ok:
                raise InvalidRotationPolicy(
                    field=f"Backoff.{name}", value=getattr(self, name), reason=reason
                )

    def delays(self, *, rng: random.Random) -> Iterator[float]:
        """The ``attempts - 1`` sleeps between attempts (before deadline clipping)."""
        for n in range(self.attempts - 1):
            base = min(self.maximum, self.initial * self.multiplier**n)
            yield base * (1.0 - self.jitter * rng.random())


class RetryingIssuer:
    """An :class:`~smc.ca.Issuer` that retries the wrapped one; see :func:`retrying`."""

    def __init__(
        self,
        inner: Issuer,
        *,
        backoff: Backoff,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
        rng: random.Random,
        on_retry: Callable[[int, float, IssuerUnavailable], None] | None,
    ) -> None:
        self._inner = inner
        self._backoff = backoff
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._rng_lock = threading.Lock()
        self._on_retry = on_retry

    @property
    def inner(self) -> Issuer:
        """The wrapped issuer."""
        return self._inner

    @property
    def name(self) -> str:
        """The wrapped issuer's name."""
        return self._inner.name

    def _run(self, fn: Callable[[], T]) -> T:
        start = self._clock()
        with self._rng_lock:
            delays = list(self._backoff.delays(rng=self._rng))
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except IssuerUnavailable as exc:
                elapsed = self._clock() - start
                remaining = self._backoff.deadline - elapsed
                if attempt > len(delays) or remaining <= 0:
                    raise IssuerUnavailable(
                        f"gave up after {attempt} attempt(s) in {elapsed:.2f}s; last error: {exc}",
                        issuer=exc.issuer,
                        operation=exc.operation,
                    ) from exc
                delay = min(delays[attempt - 1], remaining)
                if self._on_retry is not None:
                    self._on_retry(attempt, delay, exc)
                self._sleep(delay)

    def issue(self, *, identity: str | SpiffeId, lifetime: timedelta) -> IssuedCertificate:
        """``inner.issue`` with retries."""
        return self._run(lambda: self._inner.issue(identity=identity, lifetime=lifetime))

    def sign_csr(
        self, *, csr_pem: str, identity: str | SpiffeId, lifetime: timedelta
    ) -> SignedCertificate:
        """``inner.sign_csr`` with retries (the inner issuer must be a :class:`CsrSigner`)."""
        inner = self._inner
        if not isinstance(inner, CsrSigner):
            raise CAStateError(f"issuer {inner.name} cannot sign CSRs")
        return self._run(
            lambda: inner.sign_csr(csr_pem=csr_pem, identity=identity, lifetime=lifetime)
        )

    def revoke(self, *, serial: str, not_after: datetime | None = None) -> None:
        """``inner.revoke`` with retries (``not_after`` passed on when the issuer takes it)."""
        inner: Any = self._inner
        if not_after is None:
            self._run(lambda: inner.revoke(serial=serial))
        else:
            self._run(lambda: inner.revoke(serial=serial, not_after=not_after))

    def revoked_serials(self) -> frozenset[str]:
        """``inner.revoked_serials`` with retries."""
        return self._run(self._inner.revoked_serials)

    def trust_bundle(self) -> list[str]:
        """``inner.trust_bundle`` with retries."""
        return self._run(self._inner.trust_bundle)


def retrying(
    issuer: Issuer,
    *,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    seed: int | None = None,
    on_retry: Callable[[int, float, IssuerUnavailable], None] | None = None,
) -> RetryingIssuer:
    """Wrap ``issuer`` so each call retries :class:`IssuerUnavailable` with exponential
    backoff and jitter, bounded by ``backoff.attempts`` and ``backoff.deadline``.

    ``on_retry(attempt, delay, error)`` is called before each sleep (for logs/metrics).
    While it gives up, the caller keeps serving the certificates it already holds.
    """
    return RetryingIssuer(
        issuer,
        backoff=backoff or Backoff(),
        sleep=sleep,
        clock=clock,
        rng=random.Random(seed),
        on_retry=on_retry,
    )
