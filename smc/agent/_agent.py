"""The SMC agent: the proxy's key made here, a CSR to the control plane, SDS to Envoy.

Role: :class:`Agent` runs beside one Envoy. It generates an EC P-256 key in this process (the
key is never written to disk nor sent anywhere but to its Envoy over the local SDS socket),
sends a CSR to the control plane's certificate service over TLS (server verified with the
mesh CA bundle) with its proof of identity, and serves the signed certificate with the key
through :class:`~smc.agent.SdsServer`. Proofs: a pod reads its projected service-account
token from ``token_file`` (re-read each time, since the kubelet rotates it); a VM uses the
one-time join token of ``join_token_file`` once. Renewals happen on the agent's own schedule
(``renew_after`` of the answer, about two thirds of the lifetime with jitter) with a fresh key
each time, proven with the current certificate (a signature by the current key over the new
CSR). A failed request is retried with exponential backoff; once the current certificate has
expired, or the control plane refused it as proof (revoked), a pod falls back to its token.
With ``state_dir`` the key (0600) and certificate are also kept on the host, in a 0700
directory, so a restarted agent (a rebooted VM, whose join token was used once) serves them at
once and renews with the certificate; nothing leaves the host either way.
For a proxyless gRPC workload (no Envoy: gRPC's ``file_watcher`` certificate provider reads
PEM files) ``cert_dir`` makes the agent also write ``cert.pem`` (certificate and chain),
``key.pem`` (mode 0600) and ``ca.pem`` (trust bundle) there, each replaced atomically on every
renewal; the key still never leaves the host.
Concurrency: one asyncio loop; signing (cryptography) is quick and done inline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.agent._errors import AgentError, InvalidMessage, SigningRefused
from smc.agent._protocol import SIGN_METHOD, SignRequest, SignResponse, renewal_message
from smc.agent._sds import SdsServer, WorkloadSecret

__all__ = ["Agent", "AgentConfig", "CertificateClient"]

log = logging.getLogger("smc.agent")


class CertificateClient:
    """gRPC client of the control plane's certificate service (TLS, server verified)."""

    def __init__(
        self, *, address: str, ca_pem: str, server_name: str | None = None, timeout: float = 10.0
    ) -> None:
        self.address = address
        self._options: list[tuple[str, str]] = []
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._creds = grpc.ssl_channel_credentials(root_certificates=ca_pem.encode("ascii"))
        self._channel: grpc.aio.Channel | None = None  # made on the loop that uses it
        self.timeout = timeout

    async def sign(self, request: SignRequest) -> SignResponse:
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(
                self.address, self._creds, options=self._options
            )
        call = self._channel.unary_unary(SIGN_METHOD)
        try:
            raw = await call(request.encode(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise SigningRefused(
                f"certificate service: {exc.code().name}: {exc.details()}", code=exc.code().name
            ) from exc
        return SignResponse.decode(bytes(raw))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    """How an agent reaches the control plane and proves who it is."""

    proxy: str  # the Envoy's node id
    ca_address: str  # HOST:PORT of the certificate service
    ca_bundle_pem: str  # CA that signed the service's certificate (the mesh root)
    sds_socket: Path
    server_name: str | None = None
    token_file: Path | None = None  # a pod's projected service-account token
    join_token_file: Path | None = None  # a VM's one-time join token
    retry_initial: float = 0.5
    retry_max: float = 30.0
    #: Where the agent keeps its key (0600) and certificate across its own restarts (a VM
    #: reboot, an agent container restart on an in-memory volume); None: memory only.
    state_dir: Path | None = None
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


def _write_pem_files(
    folder: Path, chain_pem: str, key_pem: str, trust_bundle: tuple[str, ...]
) -> None:
    """cert.pem, key.pem (0600) and ca.pem in ``folder``, each replaced atomically; the key
    first, so a reader never pairs a new certificate with an old key for long."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    roots = "".join(r if r.endswith("\n") else r + "\n" for r in trust_bundle)
    for name, text, mode in (
        ("key.pem", key_pem, 0o600),
        ("cert.pem", chain_pem, 0o644),
        ("ca.pem", roots, 0o644),
    ):
        tmp = folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, folder / name)


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
        self.sds = SdsServer(socket_path=config.sds_socket)
        self.clock = clock
        self.current: _Current | None = None
        self.trust_bundle: tuple[str, ...] = ()
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        self.first_certificate_at: float | None = None
        self.started_at = time.monotonic()
        self.ready = asyncio.Event()
        self._join_used = False
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
        if cfg.token_file is not None:
            try:
                token = cfg.token_file.read_text("utf-8").strip()
            except OSError as exc:
                raise AgentError(f"cannot read the token file {cfg.token_file}: {exc}") from exc
            if not token:
                raise AgentError(f"the token file {cfg.token_file} is empty")
            return {"token": token}
        assert cfg.join_token_file is not None
        if self._join_used:
            raise AgentError(
                "the join token was used already and the certificate expired: run "
                "`smc vm bootstrap` again for a new one"
            )
        try:
            token = cfg.join_token_file.read_text("utf-8").strip()
        except OSError as exc:
            raise AgentError(f"cannot read the join token {cfg.join_token_file}: {exc}") from exc
        return {"join_token": token}

    async def request(self) -> SignResponse:
        """Make a key and CSR, prove, and serve the answer once it checks out."""
        # A failed attempt is retried with the same key (and CSR): the control plane binds a
        # token to the first key it certified, so a lost answer can be asked for again.
        if self._pending_key is None:
            self._pending_key = ec.generate_private_key(ec.SECP256R1())
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
            self._join_used = True
        await self._install(key, resp)
        self._pending_key = None
        return resp

    # ------------------------------------------------------------------ state across restarts
    def _save(self, key: ec.EllipticCurvePrivateKey, resp: SignResponse) -> None:
        folder = self.config.state_dir
        if folder is None:
            return
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        for name, data, mode in (
            ("key.pem", _key_pem(key).encode("ascii"), 0o600),
            ("certificate.json", resp.encode(), 0o600),
        ):
            tmp = folder / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.fchmod(fd, mode)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, folder / name)

    async def restore(self) -> bool:
        """Serve the key and certificate kept in ``state_dir`` if the certificate is still
        valid and matches the key (then no first proof is needed); False otherwise."""
        folder = self.config.state_dir
        if folder is None:
            return False
        try:
            key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
            resp = SignResponse.decode((folder / "certificate.json").read_bytes())
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                return False
            if datetime.fromisoformat(resp.not_after) <= self.clock():
                return False
            await self._install(key, resp, restored=True)
        except (OSError, ValueError, AgentError) as exc:
            log.info("no usable saved certificate in %s (%s)", folder, exc)
            return False
        log.info("serving the saved certificate %s until %s", resp.serial, resp.not_after)
        return True

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
            self._save(key, resp)
        await self.sds.update(
            WorkloadSecret(version=resp.serial, chain_pem=chain, key_pem=_key_pem(key))
        )
        if self.config.cert_dir is not None:
            _write_pem_files(self.config.cert_dir, chain, _key_pem(key), resp.trust_bundle)
        if first:
            self.first_certificate_at = time.monotonic()
            log.info(
                "first certificate %s in %.3fs, until %s",
                resp.serial,
                self.first_certificate_at - self.started_at,
                resp.not_after,
            )
        else:
            self.renewals += 1
            log.info("renewed: certificate %s until %s", resp.serial, resp.not_after)
        self.ready.set()

    # ------------------------------------------------------------------ the loop
    async def run(self, *, stop: asyncio.Event) -> None:
        """Serve SDS and keep a valid certificate until ``stop``."""
        await self.sds.start()
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
            await self.sds.stop()
            await self.client.close()
