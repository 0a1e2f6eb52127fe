"""Where the snapshot builder gets certificates: the :class:`CertSource` protocol.

Role: SDS needs, per identity, the workload certificate, its chain and its private key, and
the trust bundle (every root peers must trust: during a root rotation both the old and the
new one). :class:`CertSource` is that narrow accessor; :class:`smc.ca.KeyStore` (filled by the
CA controller) satisfies it. :class:`IssuingCertSource` is a small stand-alone one: it issues a
certificate on first use with any :class:`smc.ca.Issuer` (e.g. :class:`smc.ca.LocalIssuer`) and
keeps it in memory, for ``smc serve --ca local:DIR`` until the CA controller is wired, and
for tests.

Concurrency: :class:`IssuingCertSource` is thread-safe (one lock); ``get`` may block while an
issuer signs (milliseconds for the local CA).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from smc.ca import Issuer

__all__ = ["CertSource", "IssuingCertSource"]


class CertSource(Protocol):
    """What SDS reads: certificates by identity and the trust bundle."""

    def get(self, identity: str) -> tuple[str, str, str] | None:
        """``(cert_pem, chain_pem, key_pem)`` of identity ``ns/sa``, or None if none yet."""
        ...

    def trust_bundle(self) -> list[str]:
        """PEM roots a peer's certificate must chain to."""
        ...


class IssuingCertSource:
    """Issues one certificate per identity on first ``get`` and keeps it (in memory).

    Give ``issuer``, or ``issuer_factory`` (called once, on first use: lets ``smc serve`` wait
    for the mesh's trust domain). Identities are
    ``ns/sa``; the SPIFFE id uses the issuer's ``trust_domain``.
    """

    def __init__(
        self,
        *,
        issuer: Issuer | None = None,
        issuer_factory: Callable[[], Issuer] | None = None,
        trust_domain: str | Callable[[], str],
        lifetime: timedelta = timedelta(hours=24),
    ) -> None:
        if (issuer is None) == (issuer_factory is None):
            raise ValueError("give exactly one of issuer and issuer_factory")
        self._factory = issuer_factory
        self._issuer: Issuer | None = issuer
        self._trust_domain = trust_domain
        self._lifetime = lifetime
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, str, str]] = {}

    def _get_issuer(self) -> Issuer:
        if self._issuer is None:
            assert self._factory is not None
            self._issuer = self._factory()
        return self._issuer

    def _domain(self) -> str:
        td = self._trust_domain
        return td() if callable(td) else td

    def get(self, identity: str) -> tuple[str, str, str] | None:
        ns, sep, sa = identity.partition("/")
        if not sep or not ns or not sa:
            return None
        with self._lock:
            found = self._held.get(identity)
            if found is not None:
                return found
            issued = self._get_issuer().issue(
                identity=f"spiffe://{self._domain()}/ns/{ns}/sa/{sa}", lifetime=self._lifetime
            )
            found = (issued.cert_pem, issued.chain_pem, issued.private_key_pem)
            self._held[identity] = found
            return found

    def trust_bundle(self) -> list[str]:
        with self._lock:
            return list(self._get_issuer().trust_bundle())

    def forget(self, identity: str) -> None:
        """Drop the held certificate of ``identity`` (the next ``get`` issues a new one)."""
        with self._lock:
            self._held.pop(identity, None)
