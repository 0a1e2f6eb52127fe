"""The SMC agent: the proxy's key made here, a CSR to the control plane, files for Envoy.

Role: :class:`Agent` does the certificate work of one proxy. It generates an EC P-256 key on
the proxy's host, sends a CSR to the control plane's certificate service over TLS (server
verified with the mesh CA bundle) with its proof of identity, and hands the signed
certificate with the key to its Envoy through Envoy's file-based SDS: ``smc-sds/default.json``
in the proxy dir (Envoy's working directory), 0640 in a 0750 directory (the agent's user and
group, which are Envoy's), replaced atomically
(:mod:`smc.agent._files`). The key goes nowhere else. Proofs: a pod reads its projected
service-account token from ``token_file`` (re-read each time, since the kubelet rotates it); a
VM uses the one-time join token of ``join_token_file`` once. Renewals happen on the agent's
own schedule (``renew_after`` of the answer, about two thirds of the lifetime with jitter)
with a fresh key each time, proven with the current certificate (a signature by the current
key over the new CSR). A failed request is retried with exponential backoff and the same key
(kept in ``smc-sds/.pending-key.pem`` until answered); once the current certificate has
expired, or the control plane refused it as proof (revoked), a pod falls back to its token.
The files are also the agent's state: a restarted agent (a rebooted VM, whose join token was
used once; an agent container restarted on its in-memory volume) finds its certificate there
and renews with it.
For a proxyless gRPC workload (no Envoy: gRPC's ``file_watcher`` certificate provider reads
PEM files) ``cert_dir`` makes the agent also write ``cert.pem`` (certificate and chain),
``key.pem`` (mode 0600) and ``ca.pem`` (trust bundle) there, each replaced atomically on every
renewal; the key still never leaves the host.
This class uses ``cryptography`` and runs on asyncio, for tests and embedders (the demo's
harness, :mod:`smc.testing.mesh`); ``python -m smc.agent`` does the same steps with the standard
library only (:mod:`smc.agent._step`, keys through the OpenSSL Python's ``ssl`` links), so that
the process beside every proxy stays small. Both write the same files and send the same
requests (:mod:`smc.agent._client`, HTTPS).
Concurrency: one asyncio loop; signing (cryptography) is quick and done inline; file writes
are small and done inline; the HTTPS request runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.agent._client import CertificateClient
from smc.agent._errors import AgentError, InvalidMessage, SigningRefused
from smc.agent._files import (
    PENDING_KEY,
    SPENT_JOIN_TOKEN,
    STATUS_FILE,
    prepare_sds_dir,
    read_secret,
    remove_private,
    sds_dir,
    write_pem_files,
    write_private,
    write_secret,
)
from smc.agent._protocol import (
    SignRequest,
    SignResponse,
    first_proof,
    renewal_message,
    token_digest,
)

__all__ = ["Agent", "AgentConfig", "CertificateClient"]

log = logging.getLogger("smc.agent")


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    """How an agent reaches the control plane and proves who it is."""

    proxy: str  # the Envoy's node id
    ca_address: str  # HOST:PORT of the certificate service
    ca_bundle_pem: str  # CA that signed the service's certificate (the mesh root)
    #: Envoy's working directory: the agent writes ``smc-sds/default.json`` there.
    proxy_dir: Path
    server_name: str | None = None
    token_file: Path | None = None  # a pod's projected service-account token
    join_token_file: Path | None = None  # a VM's one-time join token
    retry_initial: float = 0.5
    retry_max: float = 30.0
    #: Also write cert.pem, key.pem (0600) and ca.pem here (gRPC's file_watcher provider).
    cert_dir: Path | None = None


@dataclass(slots=True)
class _Current:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert_pem: str
    serial: str
    not_after: datetime
    renew_after: datetime


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


class Agent:
    """One proxy's agent (see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        client: CertificateClient | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if (config.token_file is None) == (config.join_token_file is None) and (
            config.token_file is None
        ):
            raise AgentError(
                "the agent needs a proof: --token-file (pod) or --join-token-file (VM)"
            )
        self.config = config
        self.client = client or CertificateClient(
            address=config.ca_address,
            ca_pem=config.ca_bundle_pem,
            server_name=config.server_name,
        )
        self.secret_file = sds_dir(config.proxy_dir) / "default.json"
        self.clock = clock
        self.current: _Current | None = None
        self.trust_bundle: tuple[str, ...] = ()
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        self.first_certificate_at: float | None = None
        self.started_at = time.monotonic()
        self.ready = asyncio.Event()
        #: SHA-256 (hex) of the join token a certificate was had with ("": none yet): that
        #: token is spent; a new one written to the file is used when one is needed again.
        self._join_used = ""
        with contextlib.suppress(OSError, ValueError):
            spent = (sds_dir(config.proxy_dir) / SPENT_JOIN_TOKEN).read_text("ascii").strip()
            self._join_used = spent
        self._pending_key: ec.EllipticCurvePrivateKey | None = None
        self._cert_refused = False

    # ------------------------------------------------------------------ one request
    def _csr(self, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
        # No names: the control plane sets the proven SPIFFE id as the only SAN.
        return (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
        )

    def _first_proof(self) -> dict[str, str]:
        cfg = self.config
        return first_proof(
            token_file=cfg.token_file,
            join_token_file=cfg.join_token_file,
            join_used=self._join_used,
        )

    async def request(self) -> SignResponse:
        """Make a key and CSR, prove, and serve the answer once it checks out."""
        # A failed attempt is retried with the same key (and CSR): the control plane binds a
        # token to the first key it certified, so a lost answer can be asked for again.
        if self._pending_key is None:
            self._pending_key = self._load_pending() or self._new_pending()
        key = self._pending_key
        csr = self._csr(key)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
        current = self.current
        proof: dict[str, str]
        if current is not None and self.clock() < current.not_after and not self._cert_refused:
            message = renewal_message(
                proxy=self.config.proxy, csr_der=csr.public_bytes(serialization.Encoding.DER)
            )
            signature = current.key.sign(message, ec.ECDSA(hashes.SHA256()))
            proof = {
                "certificate_pem": current.cert_pem,
                "signature": base64.b64encode(signature).decode("ascii"),
            }
        else:
            proof = self._first_proof()
        req = SignRequest(proxy=self.config.proxy, csr_pem=csr_pem, **proof)
        try:
            resp = await self.client.sign(req)
        except SigningRefused as exc:
            if "certificate_pem" in proof and exc.code == "UNAUTHENTICATED":
                # the current certificate is no proof any more (revoked, superseded elsewhere):
                # a pod proves itself again with its token on the next attempt
                self._cert_refused = True
            raise
        self._cert_refused = False
        if "join_token" in proof:
            self._join_used = token_digest(proof["join_token"])
            write_private(
                sds_dir(self.config.proxy_dir) / SPENT_JOIN_TOKEN,
                self._join_used.encode("ascii"),
                mode=0o640,
            )
        await self._install(key, resp)
        self._pending_key = None
        remove_private(sds_dir(self.config.proxy_dir) / PENDING_KEY)
        return resp

    def _new_pending(self) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        prepare_sds_dir(self.config.proxy_dir)
        write_private(sds_dir(self.config.proxy_dir) / PENDING_KEY, _key_pem(key).encode())
        return key

    def _load_pending(self) -> ec.EllipticCurvePrivateKey | None:
        try:
            raw = (sds_dir(self.config.proxy_dir) / PENDING_KEY).read_bytes()
            key = serialization.load_pem_private_key(raw, None)
        except (OSError, ValueError):
            return None
        return key if isinstance(key, ec.EllipticCurvePrivateKey) else None

    # ------------------------------------------------------------------ state across restarts
    async def restore(self) -> bool:
        """Take up the key and certificate of ``smc-sds`` if the certificate is still valid
        and matches the key (then no first proof is needed); False otherwise."""
        folder = sds_dir(self.config.proxy_dir)
        try:
            found = read_secret(self.config.proxy_dir)
            if found is None:
                return False
            key = serialization.load_pem_private_key(found[1].encode("ascii"), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                return False
            resp = self._status_of(found[0], key, folder / STATUS_FILE)
            if datetime.fromisoformat(resp.not_after) <= self.clock():
                return False
            await self._install(key, resp, restored=True)
        except (OSError, ValueError, AgentError) as exc:
            log.info("no usable saved certificate in %s (%s)", folder, exc)
            return False
        log.info("serving the saved certificate %s until %s", resp.serial, resp.not_after)
        return True

    def _status_of(
        self, chain_pem: str, key: ec.EllipticCurvePrivateKey, status: Path
    ) -> SignResponse:
        """The kept answer of the certificate in ``chain_pem``; when the status file is not
        that certificate's (the agent stopped between the two renames), one made from the
        certificate itself, due for renewal at once."""
        leaf = x509.load_pem_x509_certificate(chain_pem.encode("ascii"))
        value = leaf.serial_number
        serial = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big").hex()
        with contextlib.suppress(OSError, ValueError):
            resp = SignResponse.decode(status.read_bytes())
            if resp.serial == serial:
                return resp
        pem = leaf.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return SignResponse(
            serial=serial,
            certificate_pem=pem,
            chain_pem=chain_pem.replace(pem, "", 1),
            trust_bundle=(),
            not_before=leaf.not_valid_before_utc.isoformat(),
            not_after=leaf.not_valid_after_utc.isoformat(),
            renew_after=self.clock().isoformat(),
        )

    async def _install(
        self, key: ec.EllipticCurvePrivateKey, resp: SignResponse, *, restored: bool = False
    ) -> None:
        try:
            leaf = x509.load_pem_x509_certificate(resp.certificate_pem.encode("ascii"))
            not_after = datetime.fromisoformat(resp.not_after)
            renew_after = datetime.fromisoformat(resp.renew_after)
        except ValueError as exc:
            raise InvalidMessage(f"SignResponse: unusable certificate or time: {exc}") from exc
        if leaf.public_key() != key.public_key():
            raise AgentError("the signed certificate does not carry this agent's key")
        chain = resp.certificate_pem
        if not chain.endswith("\n"):
            chain += "\n"
        chain += resp.chain_pem
        first = self.current is None
        self.current = _Current(
            key=key,
            cert_pem=resp.certificate_pem,
            serial=resp.serial,
            not_after=not_after,
            renew_after=renew_after,
        )
        self.trust_bundle = resp.trust_bundle
        if not restored:
            # the secret first (Envoy reloads on its rename), then the public status
            write_secret(self.config.proxy_dir, chain_pem=chain, key_pem=_key_pem(key))
            write_private(sds_dir(self.config.proxy_dir) / STATUS_FILE, resp.encode(), mode=0o640)
        if self.config.cert_dir is not None:
            write_pem_files(self.config.cert_dir, chain, _key_pem(key), resp.trust_bundle)
        if first:
            self.first_certificate_at = now = time.monotonic()
            if not restored:
                log.info(
                    "first certificate %s in %.3fs, until %s",
                    resp.serial,
                    now - self.started_at,
                    resp.not_after,
                )
        elif not first:
            self.renewals += 1
            log.info("renewed: certificate %s until %s", resp.serial, resp.not_after)
        self.ready.set()

    # ------------------------------------------------------------------ the loop
    async def run(self, *, stop: asyncio.Event) -> None:
        """Keep a valid certificate in the proxy dir until ``stop``."""
        prepare_sds_dir(self.config.proxy_dir)
        await self.restore()
        backoff = self.config.retry_initial
        try:
            while not stop.is_set():
                current = self.current
                if current is not None:
                    wait = (current.renew_after - self.clock()).total_seconds()
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=wait)
                        continue
                try:
                    await self.request()
                    backoff = self.config.retry_initial
                    self.last_error = None
                except (AgentError, OSError) as exc:
                    self.failures += 1
                    self.last_error = str(exc)
                    log.warning("certificate request failed (retry in %.1fs): %s", backoff, exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=backoff)
                    backoff = min(self.config.retry_max, backoff * 2)
        finally:
            await self.client.close()
