"""A Vault/OpenBao-backed certificate authority: :class:`VaultIssuer` (hvac).

Role: the control plane generates each workload key and a CSR, and Vault's PKI secrets
engine signs the CSR at ``<mount>/sign/<role>``: the private key never reaches Vault,
its request logs or the audit device. Revocation goes to ``<mount>/revoke``; the trust
bundle is the set of roots at the top of every issuer's chain in the mount (so a root
rotated by an operator, or by :meth:`VaultIssuer.rotate_root`, is trusted alongside
the previous one until that issuer is removed).

Failures are mapped onto two errors: :class:`IssuerUnavailable` (connection refused,
timeout, 5xx, 429, sealed or standby Vault: retry later, see :func:`smc.ca.retrying`)
and :class:`IssuerRejected` (permission denied, unknown role, identity not allowed by
the role, unknown serial: retrying the same request will not help). While Vault is
unavailable the caller keeps serving the certificates it already holds; they stay
valid until their ``not_after`` and renewal starts well before that (see
:func:`smc.ca.renew_at`). Error messages carry the operation, the URL path and Vault's
own error text, never the token.

Transport: hvac over a lean pool of keep-alive ``http.client`` connections
(:mod:`smc.ca._http`) by default: it skips the per-call overhead of ``requests``
and halves the client CPU per certificate (measured ~0.75 ms instead of ~1.4 ms). ``transport="requests"`` restores hvac's usual session (for HTTP proxies).
Concurrency: thread-safe; one pool of ``pool_size`` keep-alive connections is shared
by all threads. Calls block: from
asyncio use ``asyncio.to_thread``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

import hvac
import hvac.exceptions as hvac_exc
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smc.ca._csr import SignedCertificate, check_csr, signed_from
from smc.ca._errors import CAStateError, IssuerRejected, IssuerUnavailable
from smc.ca._http import HttpClientSession, TransportError, TransportTimeout
from smc.ca._identity import SpiffeId, issuer_identity, validate_trust_domain
from smc.ca._model import (
    IssuedCertificate,
    build_csr,
    check_lifetime,
    generate_workload_key,
    issued_from,
    key_to_pem,
    normalize_serial,
    serial_from_int,
    serial_to_colon_hex,
)

__all__ = ["VaultIssuer"]

_UNAVAILABLE = (
    hvac_exc.VaultDown,
    hvac_exc.InternalServerError,
    hvac_exc.BadGateway,
    hvac_exc.RateLimitExceeded,
    hvac_exc.VaultNotInitialized,
    hvac_exc.PreconditionFailed,
    hvac_exc.UnexpectedError,
)


class VaultIssuer:
    """Issue workload certificates from a Vault/OpenBao PKI mount.

    ``token`` is used only in the ``X-Vault-Token`` header; it is not kept in any
    attribute that ``repr`` shows nor put in an error message.
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        role: str,
        trust_domain: str,
        mount: str = "pki",
        name: str = "vault",
        timeout: float = 5.0,
        verify: bool | str = True,
        namespace: str | None = None,
        pool_size: int = 16,
        transport: Literal["http.client", "requests"] = "http.client",
        trust_env: bool = False,
        max_lifetime: timedelta = timedelta(days=365),
    ) -> None:
        self._trust_domain = validate_trust_domain(trust_domain)
        self._url = url.rstrip("/")
        self._mount = mount.strip("/")
        self._role = role
        self._name = name
        self._max_lifetime = max_lifetime
        session: Any
        if transport == "http.client":
            try:
                session = HttpClientSession(
                    base_url=self._url, verify=verify, timeout=timeout, pool_size=pool_size
                )
            except TransportError as exc:
                raise CAStateError(f"VaultIssuer url: {exc}") from exc
        elif transport == "requests":
            session = requests.Session()
            # Reading proxy settings from the environment on every request costs about
            # as much as the request itself on loopback; opt in with trust_env=True.
            session.trust_env = trust_env
            session.verify = verify  # hvac prefers the session's verify over its own
            adapter = requests.adapters.HTTPAdapter(
                pool_connections=1, pool_maxsize=pool_size, max_retries=0
            )
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        else:
            raise CAStateError(f"transport {transport!r} unknown; use 'http.client' or 'requests'")
        self._client = hvac.Client(
            url=self._url,
            token=token,
            timeout=timeout,
            verify=verify,
            namespace=namespace,
            session=session,
        )
        self._issuer_pem_cache: dict[str, list[str]] = {}
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"VaultIssuer(name={self._name!r}, url={self._url!r}, mount={self._mount!r},"
            f" role={self._role!r}, trust_domain={self._trust_domain!r})"
        )

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """Issuer name recorded with every certificate."""
        return self._name

    @property
    def trust_domain(self) -> str:
        """The only trust domain this issuer signs identities for."""
        return self._trust_domain

    @property
    def mount(self) -> str:
        """The PKI mount path."""
        return self._mount

    def close(self) -> None:
        """Close the pooled HTTP connections."""
        self._client.adapter.close()

    # ------------------------------------------------------------------ plumbing
    def _call(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """Send one request; map every failure onto IssuerUnavailable/IssuerRejected."""
        where = f"{self._url}/v1/{path}"
        try:
            return self._client.adapter.request(method, f"/v1/{path}", json=json)
        except TransportTimeout as exc:
            raise IssuerUnavailable(
                f"timed out talking to {where}", issuer=self._name, operation=operation
            ) from exc
        except TransportError as exc:
            raise IssuerUnavailable(
                f"cannot connect to {where} ({exc})", issuer=self._name, operation=operation
            ) from exc
        except requests.exceptions.Timeout as exc:
            raise IssuerUnavailable(
                f"timed out talking to {where}", issuer=self._name, operation=operation
            ) from exc
        except requests.exceptions.SSLError as exc:
            raise IssuerUnavailable(
                f"TLS handshake with {self._url} failed (SSLError: check `verify`,"
                " the CA bundle for Vault's certificate)",
                issuer=self._name,
                operation=operation,
            ) from exc
        except requests.exceptions.ConnectionError as exc:
            raise IssuerUnavailable(
                f"cannot connect to {where} (connection refused or reset)",
                issuer=self._name,
                operation=operation,
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise IssuerUnavailable(
                f"HTTP error talking to {where}: {type(exc).__name__}",
                issuer=self._name,
                operation=operation,
            ) from exc
        except hvac_exc.VaultDown as exc:
            raise IssuerUnavailable(
                f"Vault at {self._url} is sealed or in standby (HTTP 503): {_errors(exc)}",
                issuer=self._name,
                operation=operation,
            ) from exc
        except _UNAVAILABLE as exc:
            raise IssuerUnavailable(
                f"{type(exc).__name__} from {where}: {_errors(exc)}",
                issuer=self._name,
                operation=operation,
            ) from exc
        except hvac_exc.Forbidden as exc:
            raise IssuerRejected(
                f"permission denied (HTTP 403) on {method.upper()} {path}: the token lacks a"
                f" policy for it, or has expired ({_errors(exc)})",
                issuer=self._name,
                operation=operation,
            ) from exc
        except hvac_exc.InvalidPath as exc:
            if missing_ok:
                return None
            raise IssuerRejected(
                f"not found (HTTP 404) at {path}: is the PKI engine mounted at"
                f" {self._mount!r}? ({_errors(exc)})",
                issuer=self._name,
                operation=operation,
            ) from exc
        except hvac_exc.VaultError as exc:
            raise IssuerRejected(
                f"{type(exc).__name__} on {method.upper()} {path}: {_errors(exc)}",
                issuer=self._name,
                operation=operation,
            ) from exc

    @staticmethod
    def _data(resp: Any, *, what: str, issuer: str) -> dict[str, Any]:
        if not isinstance(resp, dict) or not isinstance(resp.get("data"), dict):
            raise IssuerRejected("answer has no 'data' object", issuer=issuer, operation=what)
        data: dict[str, Any] = resp["data"]
        return data

    # ------------------------------------------------------------------ Issuer
    def _identity(self, identity: str | SpiffeId) -> SpiffeId:
        return issuer_identity(identity, trust_domain=self._trust_domain)

    def _sign(
        self, csr: x509.CertificateSigningRequest, sid: SpiffeId, lifetime: timedelta
    ) -> tuple[x509.Certificate, str, str]:
        """Vault signs ``csr`` for ``sid``; returns (leaf, leaf PEM, chain PEM)."""
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
        resp = self._call(
            "issue",
            "post",
            f"{self._mount}/sign/{self._role}",
            json={
                "csr": csr_pem,
                "uri_sans": sid.uri,
                "ttl": f"{int(lifetime.total_seconds())}s",
                "format": "pem",
                "exclude_cn_from_sans": True,
            },
        )
        data = self._data(resp, what="issue", issuer=self._name)
        try:
            cert_pem = str(data["certificate"])
            cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
        except (KeyError, ValueError) as exc:
            raise IssuerRejected(
                f"answer of {self._mount}/sign/{self._role} holds no valid certificate",
                issuer=self._name,
                operation="issue",
            ) from exc
        if cert.public_key() != csr.public_key():
            raise IssuerRejected(
                "signed certificate does not carry the CSR's public key",
                issuer=self._name,
                operation="issue",
            )
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [sid.uri]:
            raise IssuerRejected(
                f"signed certificate's URI SANs {uris} are not exactly [{sid.uri!r}];"
                f" check role {self._role!r}",
                issuer=self._name,
                operation="issue",
            )
        chain = data.get("ca_chain") or [data.get("issuing_ca", "")]
        chain_pem = "".join(p if p.endswith("\n") else p + "\n" for p in chain if p)
        return cert, cert_pem if cert_pem.endswith("\n") else cert_pem + "\n", chain_pem

    def issue(self, *, identity: str | SpiffeId, lifetime: timedelta) -> IssuedCertificate:
        """Generate an EC P-256 key and a CSR here; have Vault sign the CSR."""
        check_lifetime(lifetime, maximum=self._max_lifetime)
        sid = self._identity(identity)
        key = generate_workload_key()
        cert, cert_pem, chain_pem = self._sign(build_csr(key=key, identity=sid), sid, lifetime)
        return issued_from(
            cert,
            identity=sid.uri,
            issuer=self._name,
            cert_pem=cert_pem,
            chain_pem=chain_pem,
            private_key_pem=key_to_pem(key),
        )

    def sign_csr(
        self, *, csr_pem: str, identity: str | SpiffeId, lifetime: timedelta
    ) -> SignedCertificate:
        """Have Vault sign a proxy's CSR (``pki/sign``) for ``identity``, proven by the caller:
        the key stays with the proxy; Vault sets the URI SAN, the role bounds the rest."""
        check_lifetime(lifetime, maximum=self._max_lifetime)
        sid = self._identity(identity)
        csr = check_csr(csr_pem, identity=sid)
        cert, _, chain_pem = self._sign(csr, sid, lifetime)
        return signed_from(cert, identity=sid.uri, issuer=self._name, chain_pem=chain_pem)

    def revoke(self, *, serial: str, not_after: datetime | None = None) -> None:
        """Revoke at ``<mount>/revoke`` (idempotent in Vault; unknown serial: rejected).
        ``not_after`` is not needed: Vault's own tidy drops expired entries from its CRL."""
        colon = serial_to_colon_hex(serial)
        self._call("revoke", "post", f"{self._mount}/revoke", json={"serial_number": colon})

    def revoked_serials(self) -> frozenset[str]:
        """Canonical serials listed at ``<mount>/certs/revoked``."""
        resp = self._call(
            "revoked_serials", "list", f"{self._mount}/certs/revoked", missing_ok=True
        )
        if resp is None:
            return frozenset()
        keys = self._data(resp, what="revoked_serials", issuer=self._name).get("keys") or []
        return frozenset(normalize_serial(str(k)) for k in keys)

    def crl_pem(self) -> str:
        """The default issuer's CRL (PEM) as Vault publishes it (``<mount>/cert/crl``)."""
        resp = self._call("crl", "get", f"{self._mount}/cert/crl")
        data = self._data(resp, what="crl", issuer=self._name)
        pem = data.get("certificate")
        if not isinstance(pem, str) or "X509 CRL" not in pem:
            raise IssuerRejected("answer holds no PEM CRL", issuer=self._name, operation="crl")
        return pem

    def _issuers(self) -> dict[str, dict[str, Any]]:
        resp = self._call("trust_bundle", "list", f"{self._mount}/issuers", missing_ok=True)
        if resp is None:
            return {}
        data = self._data(resp, what="trust_bundle", issuer=self._name)
        info = data.get("key_info") or {}
        return {str(k): dict(info.get(k) or {}) for k in data.get("keys") or []}

    def _issuer_chain(self, issuer_id: str) -> list[str]:
        with self._cache_lock:
            cached = self._issuer_pem_cache.get(issuer_id)
        if cached is not None:
            return cached
        resp = self._call("trust_bundle", "get", f"{self._mount}/issuer/{issuer_id}")
        data = self._data(resp, what="trust_bundle", issuer=self._name)
        chain = [str(p) for p in (data.get("ca_chain") or [data.get("certificate", "")]) if p]
        with self._cache_lock:
            self._issuer_pem_cache[issuer_id] = chain
        return chain

    def trust_bundle(self) -> list[str]:
        """PEM roots: the top (self-signed) certificate of every issuer's chain in the
        mount, deduplicated, default issuer first."""
        issuers = self._issuers()
        order = sorted(issuers, key=lambda i: not issuers[i].get("is_default", False))
        roots: list[str] = []
        seen: set[bytes] = set()
        for issuer_id in order:
            chain = self._issuer_chain(issuer_id)
            if not chain:
                continue
            top = chain[-1]
            cert = x509.load_pem_x509_certificate(top.encode("ascii"))
            der = cert.public_bytes(serialization.Encoding.DER)
            if der in seen:
                continue
            seen.add(der)
            roots.append(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))
        return roots

    # ------------------------------------------------------------------ rotation
    def rotate_root(self, *, common_name: str | None = None, ttl: str = "87600h") -> str:
        """Create a new self-signed root in the mount (``root/rotate/internal``, EC P-256)
        and make it the default issuer; the previous roots stay in the trust bundle until
        :meth:`retire_root`. Needs a token allowed to manage the mount. Returns the new
        root's serial."""
        cn = common_name or f"SMC root CA {self._trust_domain}"
        resp = self._call(
            "rotate_root",
            "post",
            f"{self._mount}/root/rotate/internal",
            json={"common_name": cn, "key_type": "ec", "key_bits": 256, "ttl": ttl},
        )
        data = self._data(resp, what="rotate_root", issuer=self._name)
        issuer_id = str(data["issuer_id"])
        self._call(
            "rotate_root", "post", f"{self._mount}/root/replace", json={"default": issuer_id}
        )
        cert = x509.load_pem_x509_certificate(str(data["certificate"]).encode("ascii"))
        return serial_from_int(cert.serial_number)

    def retire_root(self, serial: str) -> None:
        """Delete the issuer whose certificate has ``serial`` from the mount, so it leaves
        the trust bundle. Refuses the default issuer (:class:`CAStateError`)."""
        canon = normalize_serial(serial)
        for issuer_id, info in self._issuers().items():
            if normalize_serial(str(info.get("serial_number", "0"))) != canon:
                continue
            if info.get("is_default"):
                raise CAStateError(f"root {canon} is the default issuer; rotate_root() first")
            self._call("retire_root", "delete", f"{self._mount}/issuer/{issuer_id}")
            with self._cache_lock:
                self._issuer_pem_cache.pop(issuer_id, None)
            return
        raise CAStateError(f"no issuer with serial {canon} in mount {self._mount!r}")


def _errors(exc: hvac_exc.VaultError) -> str:
    errs = getattr(exc, "errors", None)
    if isinstance(errs, list) and errs:
        return "; ".join(str(e) for e in errs)
    return str(getattr(exc, "message", None) or "no detail")
