"""Where workload private keys live: :class:`KeyStore` (never the event log).

Role: holds, per certificate fingerprint, the leaf PEM, its chain and its private key, in
memory and, optionally, in a directory so a restarted control plane can keep serving the
certificates recorded on the log. It also knows which certificate is *current* for each
identity (the controller binds it once the log says so) and the trust bundle, and is the
accessor SDS reads: :meth:`KeyStore.get` returns ``(cert_pem, chain_pem, key_pem)`` for
an identity, :meth:`KeyStore.trust_bundle` the PEM roots peers must trust.

On-disk layout of ``directory`` (created with mode 0700)::

    <fingerprint>.key   PKCS#8 PEM private key, mode 0600 (a looser file is refused)
    <fingerprint>.crt   the leaf PEM followed by its chain PEM

A file pair whose leaf does not hash to its name, or whose key does not match the leaf,
is ignored with a warning (never served).
Concurrency: thread-safe (one lock around the maps). Files are created once (names are
fingerprints, ``O_EXCL``), ``.crt`` before ``.key``; fsync on request. Listeners are
called after the lock is released, on the thread that made the change. Several processes
may share one directory (the CLI writes the key of a certificate it rotates; ``smc
serve`` picks it up on its next pass).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.ca._errors import CAStateError, KeyFilePermissionError
from smc.ca._identity import parse_spiffe_id
from smc.ca._model import IssuedCertificate

__all__ = ["KeyMaterial", "KeyStore", "KeyStoreListener"]

log = logging.getLogger("smc.ca.keystore")

#: ``listener(identities, trust_changed)``: the identities whose served certificate changed
#: (SPIFFE URIs) and whether the trust bundle changed.
KeyStoreListener = Callable[[frozenset[str], bool], None]


class KeyMaterial(NamedTuple):
    """What SDS serves for one identity: ``(cert_pem, chain_pem, key_pem)``.

    ``repr`` hides the key; never log or persist this value.
    """

    cert_pem: str
    chain_pem: str
    key_pem: str

    def __repr__(self) -> str:
        return (
            f"KeyMaterial(cert_pem=<{len(self.cert_pem)} chars>, chain_pem=<...>, key_pem=<hidden>)"
        )


@dataclass(frozen=True, slots=True)
class _Entry:
    identity: str
    fingerprint: str
    material: KeyMaterial = field(repr=False)


def _fingerprint(cert_pem: str) -> tuple[str, x509.Certificate]:
    cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    return cert.fingerprint(hashes.SHA256()).hex(), cert


def _identity_of(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ValueError(f"leaf carries {len(uris)} URI SANs, expected 1")
    return str(uris[0])


def _write_file(path: Path, data: bytes, mode: int, *, durable: bool) -> None:
    """Create ``path`` (never replaced: names are content fingerprints) with ``mode``.

    No temporary file and rename: on ext4 the rename costs ~1.5 ms, the write ~0.02 ms.
    A file left partial by a crash fails the checks in ``_load`` and is never served.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return  # same fingerprint, same content
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _short_id(identity: str) -> str | None:
    """``ns/sa`` of a SPIFFE URI, or None when it is not a workload identity."""
    try:
        sid = parse_spiffe_id(identity)
    except ValueError:
        return None
    return f"{sid.namespace}/{sid.service_account}"


class KeyStore:
    """Workload certificates with their keys, by fingerprint; the current one per identity.

    ``directory=None`` keeps everything in memory only (a restart then re-issues).
    """

    def __init__(self, *, directory: Path | str | None = None) -> None:
        self._dir = Path(directory) if directory is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._current: dict[str, str] = {}  # SPIFFE URI -> fingerprint
        self._short: dict[str, str] = {}  # ns/sa -> SPIFFE URI
        self._trust: tuple[str, ...] = ()
        self._listeners: list[KeyStoreListener] = []
        self.version = 0
        if self._dir is not None:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = stat.S_IMODE(os.stat(self._dir).st_mode)
            if mode & 0o077:
                raise KeyFilePermissionError(str(self._dir), mode=mode)

    def __repr__(self) -> str:
        return f"KeyStore(directory={self._dir!s}, held={len(self._entries)}, current={len(self._current)})"

    @property
    def directory(self) -> Path | None:
        """The key directory, if keys are persisted."""
        return self._dir

    # ------------------------------------------------------------------ listeners
    def add_listener(self, listener: KeyStoreListener) -> None:
        """Call ``listener(identities, trust_changed)`` after every change SDS must push."""
        with self._lock:
            self._listeners.append(listener)

    def _notify(self, identities: frozenset[str], trust: bool) -> None:
        if not identities and not trust:
            return
        with self._lock:
            self.version += 1
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(identities, trust)
            except Exception:
                log.exception("key store listener failed")

    # ------------------------------------------------------------------ storing
    def put(self, cert: IssuedCertificate, *, durable: bool = False) -> None:
        """Hold ``cert`` and its key (and write them to the directory). Not served until
        :meth:`sync` makes it the identity's current certificate.

        Files are not fsync'ed unless ``durable``: a key lost or torn in a crash only
        means the restarted controller renews that certificate (files are checked on
        load), and it makes a put ~50x cheaper. The ``.crt`` is written before the
        ``.key``, so a key file never exists without its certificate."""
        material = KeyMaterial(cert.cert_pem, cert.chain_pem, cert.private_key_pem)
        entry = _Entry(identity=cert.identity, fingerprint=cert.fingerprint, material=material)
        if self._dir is not None:
            base = self._dir / cert.fingerprint
            crt = cert.cert_pem.rstrip("\n") + "\n"
            if cert.chain_pem.strip():
                crt += cert.chain_pem.rstrip("\n") + "\n"
            _write_file(base.with_suffix(".crt"), crt.encode("ascii"), 0o644, durable=durable)
            _write_file(
                base.with_suffix(".key"),
                cert.private_key_pem.encode("ascii"),
                0o600,
                durable=durable,
            )
        with self._lock:
            self._entries[cert.fingerprint] = entry

    def _load(self, fingerprint: str) -> _Entry | None:
        """Read ``<fingerprint>.key``/``.crt`` from the directory, checking them."""
        if self._dir is None or not all(c in "0123456789abcdef" for c in fingerprint):
            return None
        key_path = self._dir / f"{fingerprint}.key"
        crt_path = self._dir / f"{fingerprint}.crt"
        try:
            mode = stat.S_IMODE(os.stat(key_path).st_mode)
            if mode & 0o077:
                log.warning(
                    "ignoring %s: mode %04o, keys must be 0600 (run `chmod 600 %s`)",
                    key_path,
                    mode,
                    key_path,
                )
                return None
            key_pem = key_path.read_text("ascii")
            crt = crt_path.read_text("ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("ignoring key pair %s: %s", fingerprint, exc)
            return None
        try:
            certs = x509.load_pem_x509_certificates(crt.encode("ascii"))
            leaf = certs[0]
            if leaf.fingerprint(hashes.SHA256()).hex() != fingerprint:
                raise ValueError("leaf does not hash to the file name")
            key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey) or (
                key.public_key().public_numbers() != leaf.public_key().public_numbers()  # type: ignore[union-attr]
            ):
                raise ValueError("key does not match the certificate")
            identity = _identity_of(leaf)
        except (ValueError, TypeError, IndexError, x509.ExtensionNotFound) as exc:
            log.warning("ignoring key pair %s in %s: %s", fingerprint, self._dir, exc)
            return None
        pem = serialization.Encoding.PEM
        material = KeyMaterial(
            leaf.public_bytes(pem).decode("ascii"),
            "".join(c.public_bytes(pem).decode("ascii") for c in certs[1:]),
            key_pem,
        )
        entry = _Entry(identity=identity, fingerprint=fingerprint, material=material)
        with self._lock:
            self._entries[fingerprint] = entry
        return entry

    def _entry(self, fingerprint: str) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(fingerprint)
        return entry if entry is not None else self._load(fingerprint)

    def holds(self, fingerprint: str) -> bool:
        """True when the key of the certificate with this fingerprint is available
        (in memory, or readable and consistent on disk)."""
        return self._entry(fingerprint) is not None

    # ------------------------------------------------------------------ current certs
    def sync(self, current: Mapping[str, str]) -> frozenset[str]:
        """Make ``current`` (SPIFFE URI -> fingerprint, as the log says) what is served.

        Identities whose key is not held are not served; they are returned so the caller
        can issue a fresh certificate. Listeners hear about every identity whose served
        certificate changed.
        """
        missing: set[str] = set()
        wanted: dict[str, str] = {}
        for identity, fp in current.items():
            entry = self._entry(fp)
            if entry is None or entry.identity != identity:
                missing.add(identity)
            else:
                wanted[identity] = fp
        with self._lock:
            old = self._current
            changed = frozenset(i for i in set(old) | set(wanted) if old.get(i) != wanted.get(i))
            self._current = wanted
            short: dict[str, str] = {}
            for identity in wanted:
                s = _short_id(identity)
                if s is not None:
                    short[s] = identity
            self._short = short
        self._notify(changed, False)
        return frozenset(missing)

    def set_trust_bundle(self, roots: Iterable[str]) -> None:
        """The PEM roots served as SDS ``validation_context``."""
        bundle = tuple(roots)
        with self._lock:
            changed = bundle != self._trust
            self._trust = bundle
        self._notify(frozenset(), changed)

    def get(self, identity: str) -> KeyMaterial | None:
        """``(cert_pem, chain_pem, key_pem)`` of the identity's current certificate, or
        None. ``identity`` is a SPIFFE URI or ``namespace/service-account``."""
        with self._lock:
            uri = identity if identity.startswith("spiffe://") else self._short.get(identity)
            fp = self._current.get(uri) if uri is not None else None
            entry = self._entries.get(fp) if fp is not None else None
        return entry.material if entry is not None else None

    def current(self) -> dict[str, str]:
        """SPIFFE URI -> fingerprint of every certificate being served."""
        with self._lock:
            return dict(self._current)

    def trust_bundle(self) -> list[str]:
        """PEM roots a peer's certificate must chain to (SDS ``validation_context``)."""
        with self._lock:
            return list(self._trust)

    # ------------------------------------------------------------------ clean-up
    def held(self) -> frozenset[str]:
        """Fingerprints held in memory or in the directory."""
        with self._lock:
            fps = set(self._entries)
        if self._dir is not None:
            fps.update(p.stem for p in self._dir.glob("*.key"))
        return frozenset(fps)

    def discard(self, fingerprint: str) -> None:
        """Forget a certificate and delete its files (not if it is being served)."""
        with self._lock:
            if fingerprint in self._current.values():
                raise CAStateError(f"certificate {fingerprint} is being served; cannot discard")
            self._entries.pop(fingerprint, None)
        if self._dir is not None:
            for suffix in (".key", ".crt"):
                with contextlib.suppress(FileNotFoundError):
                    (self._dir / f"{fingerprint}{suffix}").unlink()

    def prune(self, *, retired: Iterable[str], grace: float = 3600.0) -> int:
        """Discard the keys of ``retired`` certificates (superseded or revoked on the log)
        and of files unknown to the log for more than ``grace`` seconds (a certificate
        issued but never recorded). Served certificates are kept. Returns how many."""
        retired_set = set(retired)
        with self._lock:
            serving = set(self._current.values())
        now = time.time()
        n = 0
        for fp in self.held() - serving:
            stale = fp in retired_set
            if not stale and self._dir is not None:
                path = self._dir / f"{fp}.key"
                try:
                    stale = now - path.stat().st_mtime > grace
                except FileNotFoundError:
                    stale = False
            if stale:
                self.discard(fp)
                n += 1
        return n
