"""Where the snapshot builder gets certificates: the :class:`CertSource` protocol.

Role: SDS needs, per identity, the workload certificate, its chain and its private key, and
the trust bundle (every root peers must trust: during a root rotation both the old and the
new one). :class:`CertSource` is that narrow accessor. :class:`KeyStoreCertSource` is the one
``smc serve`` uses: the :class:`smc.ca.KeyStore` the CA controller fills (certificates and the
trust bundle recorded on the log), plus the issuer's certificate revocation lists appended to
the trust bundle, one per root, so every peer's TLS validation (Envoy loads CRLs found in
``trusted_ca`` and then checks them) refuses a revoked certificate on new connections. CRLs
are added only when they cover every root of the bundle (a root without a CRL would fail every
handshake). A follower replica (no issuer) serves the CRLs the issuing replica saved in the
shared key directory (``crls.json``), so both serve the same trust bundle. :class:`IssuerCache`
memoises an issuer factory so the CA controller and the CRL source share one issuer. :class:`IssuingCertSource` is a small stand-alone source: it issues a
certificate on first use with any :class:`smc.ca.Issuer` and keeps it in memory (tests).

Concurrency: :class:`IssuingCertSource` and :class:`IssuerCache` are thread-safe (one lock).
:class:`KeyStoreCertSource` answers ``get``/``trust_bundle`` from any thread; its CRL refresh
(:meth:`KeyStoreCertSource.run`) is one asyncio task that calls the issuer in worker threads;
its key-store listener may be called from any thread. Listeners it calls run on its loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Protocol

from cryptography import x509

from smc.ca import (
    CAError,
    Issuer,
    IssuerFactory,
    KeyMaterial,
    KeyStore,
    LocalIssuer,
    RetryingIssuer,
    VaultIssuer,
)

__all__ = [
    "CertSource",
    "CertsListener",
    "IssuerCache",
    "IssuingCertSource",
    "KeyStoreCertSource",
    "issuer_crls",
    "local_issuer_of",
]

log = logging.getLogger("smc.xds.certs")

#: ``listener(identities, trust_changed)`` (SPIFFE URIs), like a key-store listener.
CertsListener = Callable[[frozenset[str], bool], None]


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


class IssuerCache:
    """Memoises ``factory(trust_domain)`` so every user of the issuer shares one instance
    (a :class:`~smc.ca.LocalIssuer` directory must be used by one instance at a time)."""

    def __init__(self, factory: IssuerFactory) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._issuers: dict[str, Issuer] = {}
        self._last: Issuer | None = None

    def __call__(self, trust_domain: str) -> Issuer:
        with self._lock:
            found = self._issuers.get(trust_domain)
            if found is None:
                found = self._issuers[trust_domain] = self._factory(trust_domain)
            self._last = found
            return found

    def current(self) -> Issuer | None:
        """The issuer built last (None before the first use)."""
        with self._lock:
            return self._last


def _unwrap(issuer: Issuer) -> object:
    inner: object = issuer
    while isinstance(inner, RetryingIssuer):
        inner = inner.inner
    return inner


def local_issuer_of(issuer: Issuer) -> LocalIssuer | None:
    """The :class:`~smc.ca.LocalIssuer` behind ``issuer`` (retry wrappers removed), or None."""
    inner = _unwrap(issuer)
    return inner if isinstance(inner, LocalIssuer) else None


def issuer_crls(issuer: Issuer) -> list[str] | None:
    """PEM CRLs of ``issuer``: one per trusted root of a :class:`~smc.ca.LocalIssuer`, the
    default issuer's of a :class:`~smc.ca.VaultIssuer`; None for an issuer without CRLs.
    Blocking (may call the issuer)."""
    inner = _unwrap(issuer)
    if isinstance(inner, LocalIssuer):
        return [inner.crl_pem(root_serial=s) for s in inner.trusted_root_serials()]
    if isinstance(inner, VaultIssuer):
        return [inner.crl_pem()]
    return None


def _revocation_state(issuer: Issuer) -> tuple[str, ...]:
    """Revoked serials, then ``|`` and the roots CRLs are made for: () when nothing is
    revoked (no CRL is needed then)."""
    inner = _unwrap(issuer)
    if isinstance(inner, LocalIssuer):
        revoked = sorted(inner.revoked_serials())
        return (*revoked, "|", *inner.trusted_root_serials()) if revoked else ()
    if isinstance(inner, VaultIssuer):
        return tuple(sorted(inner.revoked_serials()))
    return ()


def _covers(roots: Iterable[str], crls: Iterable[str]) -> bool:
    """True when every root has a CRL issued under its subject name."""
    issuers = set()
    for pem in crls:
        try:
            issuers.add(x509.load_pem_x509_crl(pem.encode("ascii")).issuer)
        except ValueError:
            return False
    for pem in roots:
        try:
            subject = x509.load_pem_x509_certificate(pem.encode("ascii")).subject
        except ValueError:
            return False
        if subject not in issuers:
            return False
    return True


class KeyStoreCertSource:
    """The SDS source of ``smc serve``: the key store's certificates, and its trust bundle
    with the issuer's CRLs appended (see the module docstring).

    Register :meth:`keystore_changed` with ``keystore.add_listener``, add the xDS controller's
    ``on_certs_changed`` with :meth:`add_listener`, and run :meth:`run` as a task. ``issuer``
    returns the issuer in use (None while not known yet). CRLs are re-read when the key store
    changes (a revocation shows there as a change of current certificates), every
    ``refresh_interval`` seconds when revocations changed, and renewed before half of their
    validity (``crl_max_age``) has passed.
    """

    def __init__(
        self,
        *,
        keystore: KeyStore,
        issuer: Callable[[], Issuer | None],
        refresh_interval: float = 30.0,
        crl_max_age: float = 6 * 3600.0,
    ) -> None:
        """CRLs are kept in ``crls.json`` in the key store's directory (when it has one), so
        a restarted control plane serves byte-identical CRLs (a CRL is signed anew each time
        it is made) and Envoys see no change. Without an issuer (``issuer`` returns None: a
        follower replica on the issuing replica's key directory) the CRLs are read from that
        file (written atomically by the issuing replica), on every key-store change and every
        ``refresh_interval`` seconds."""
        self.keystore = keystore
        directory = keystore.directory
        self._file = directory / "crls.json" if directory is not None else None
        self._issuer = issuer
        self._refresh_interval = refresh_interval
        self._crl_max_age = crl_max_age
        self._lock = threading.Lock()
        self._crls: tuple[str, ...] = ()
        self._state: tuple[str, ...] | None = None
        self._made_at = 0.0
        self._listeners: list[CertsListener] = []
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------ CertSource
    def get(self, identity: str) -> KeyMaterial | None:
        return self.keystore.get(identity)

    def trust_bundle(self) -> list[str]:
        roots = self.keystore.trust_bundle()
        with self._lock:
            crls = self._crls
        if crls and _covers(roots, crls):
            return [*roots, *crls]
        return roots

    def crls(self) -> list[str]:
        """The CRLs held now (served only while they cover every root)."""
        with self._lock:
            return list(self._crls)

    # ------------------------------------------------------------------ listeners
    def add_listener(self, listener: CertsListener) -> None:
        self._listeners.append(listener)

    def _notify(self, identities: frozenset[str], trust: bool) -> None:
        for cb in list(self._listeners):
            try:
                cb(identities, trust)
            except Exception:
                log.exception("certificate listener failed")

    def keystore_changed(self, identities: frozenset[str], trust_changed: bool) -> None:
        """Key-store listener (any thread): pass the change on, and look at the CRLs again."""
        self._notify(identities, trust_changed)
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    # ------------------------------------------------------------------ refresh
    def refresh(self) -> bool:
        """Blocking: re-read the CRLs if the issuer's revocations or roots changed (or they
        are getting old). Returns True when the served trust bundle changed."""
        issuer = self._issuer()
        if issuer is None:
            return self._follow_file()
        try:
            state = _revocation_state(issuer)
            with self._lock:
                if self._state is None:
                    self._load_file()
                fresh = time.time() - self._made_at < self._crl_max_age
                if state == self._state and fresh:
                    return False
            crls = issuer_crls(issuer) if state else []
        except (CAError, OSError, ValueError) as exc:
            self.last_error = str(exc)
            log.warning("cannot read the CRLs of %s: %s", issuer.name, exc)
            return False
        self.last_error = None
        before = self.trust_bundle()
        with self._lock:
            self._crls = tuple(crls or ())
            self._state = state
            self._made_at = time.time()
            self._save_file()
        after = self.trust_bundle()
        if crls and len(after) == len(self.keystore.trust_bundle()):
            log.warning(
                "CRLs of %s do not cover every root of the trust bundle; revocation is not"
                " checked by peers until they do",
                issuer.name,
            )
        return before != after

    def _follow_file(self) -> bool:
        """Without an issuer (a follower replica): serve the CRLs the issuing replica saved in
        the shared key directory, so both serve byte-identical trust bundles. Returns True
        when the served trust bundle changed."""
        if self._file is None:
            return False
        before = self.trust_bundle()
        with self._lock:
            self._load_file()
        return before != self.trust_bundle()

    def _load_file(self) -> None:
        if self._file is None:
            return
        try:
            data = json.loads(self._file.read_text("ascii"))
            state = tuple(str(x) for x in data["state"])
            crls = tuple(str(x) for x in data["crls"])
            made_at = float(data["made_at"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: %s", self._file, exc)
            return
        self._state, self._crls, self._made_at = state, crls, made_at

    def _save_file(self) -> None:
        if self._file is None or self._state is None:
            return
        data = {"state": list(self._state), "crls": list(self._crls), "made_at": self._made_at}
        tmp = self._file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data), "ascii")
            os.replace(tmp, self._file)
        except OSError as exc:
            log.warning("cannot save %s: %s", self._file, exc)

    async def run(self, *, stop: asyncio.Event) -> None:
        """Refresh the CRLs on key-store changes and periodically, until ``stop``."""
        self._loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        wake.set()
        try:
            while not stop.is_set():
                waiter = asyncio.ensure_future(wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait(
                    {waiter, stopper},
                    timeout=self._refresh_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                stopper.cancel()
                if stop.is_set():
                    return
                wake.clear()
                changed = await asyncio.to_thread(self.refresh)
                if changed:
                    self._notify(frozenset(), True)
        finally:
            self._wake = None
