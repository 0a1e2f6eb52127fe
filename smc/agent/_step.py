"""One certificate step of the resident agent, with the standard library only.

Role: :func:`step` is what ``python -m smc.agent`` (:mod:`smc.agent.__main__`) runs at start
and each time the proxy's certificate is due. It takes up the certificate and key the proxy
dir holds (``smc-sds/default.json``, checked to match by OpenSSL) and, when there is none or
it is due, makes a fresh EC P-256 key and CSR (:mod:`smc.agent._openssl`: OpenSSL through the
links of Python's ``ssl`` module, no ``cryptography``), proves who the proxy is (its current
certificate: a signature by its key over :func:`~smc.agent.renewal_message`; else the pod's
projected token or the VM's one-time join token), sends the CSR over HTTPS
(:mod:`smc.agent._client`), checks that the answer carries the new key, and writes the file
Envoy reads (then the public ``certificate.json``, and ``cert_dir``'s PEM files when asked).
A key whose CSR was sent but not answered is kept in ``smc-sds/.pending-key.pem`` (0600) so a
retry asks with the same key. These are the steps of :class:`smc.agent.Agent` (which uses
``cryptography`` and asyncio, for tests and embedders); both write the same files. The key is
in this process's memory only for the step: between steps the resident agent holds no key.
:func:`step` returns public facts only: ``{"ok": true, "serial", "not_after",
"renew_after", "requested", "proof", "join_used"}`` or ``{"ok": false, "error", "code",
"join_used", "cert_refused"}`` (``join_used`` is the SHA-256 of a spent join token, as the log
records it).
Concurrency: blocking; one step at a time (the resident agent's one thread).
"""

from __future__ import annotations

import base64
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smc.agent._certinfo import cert_info, first_pem_der
from smc.agent._client import sign_over_https
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
from smc.agent._openssl import EcKey, csr_pem_of_der
from smc.agent._protocol import (
    SignRequest,
    SignResponse,
    first_proof,
    renewal_message,
    token_digest,
)

__all__ = ["StepSpec", "step"]

log = logging.getLogger("smc.agent")


@dataclass(frozen=True, kw_only=True, slots=True)
class StepSpec:
    """The resident agent's settings for a step (paths of the proofs, never a secret)."""

    proxy: str
    ca_address: str
    ca_bundle_pem: str = field(repr=False)
    proxy_dir: Path
    server_name: str | None = None
    token_file: Path | None = None
    join_token_file: Path | None = None
    cert_dir: Path | None = None

    @classmethod
    def of(cls, spec: dict[str, Any]) -> StepSpec:
        def path(name: str) -> Path | None:
            value = spec.get(name)
            return Path(value) if isinstance(value, str) and value else None

        proxy_dir = path("proxy_dir")
        if proxy_dir is None:
            raise AgentError("settings: proxy_dir is required")
        token, join = path("token_file"), path("join_token_file")
        if (token is None) == (join is None):
            raise AgentError(
                "the agent needs one proof: --token-file (pod) or --join-token-file (VM)"
            )
        try:
            return cls(
                proxy=str(spec["proxy"]),
                ca_address=str(spec["ca_address"]),
                ca_bundle_pem=str(spec["ca_bundle_pem"]),
                server_name=spec.get("server_name") or None,
                proxy_dir=proxy_dir,
                token_file=token,
                join_token_file=join,
                cert_dir=path("cert_dir"),
            )
        except KeyError as exc:
            raise AgentError(f"settings: {exc.args[0]} is required") from exc


@dataclass(slots=True)
class _Held:
    key: EcKey = field(repr=False)
    resp: SignResponse

    @property
    def not_after(self) -> datetime:
        return datetime.fromisoformat(self.resp.not_after)

    @property
    def renew_after(self) -> datetime:
        return datetime.fromisoformat(self.resp.renew_after)


def _restore(spec: StepSpec, now: datetime) -> _Held | None:
    """The certificate and key of ``smc-sds`` if the certificate is valid and carries the key."""
    folder = sds_dir(spec.proxy_dir)
    found = read_secret(spec.proxy_dir)
    if found is None:
        return None
    chain_pem, key_pem = found
    try:
        key = EcKey.from_pem(key_pem.encode("ascii"))
    except (AgentError, UnicodeEncodeError) as exc:
        log.info("no usable saved key in %s (%s)", folder, exc)
        return None
    try:
        if not key.matches_certificate(chain_pem.encode("ascii")):
            raise AgentError("the saved certificate does not carry the saved key")
        der = first_pem_der(chain_pem)
        info = cert_info(der)
        resp: SignResponse | None = None
        with contextlib.suppress(OSError, ValueError):
            kept = SignResponse.decode((folder / STATUS_FILE).read_bytes())
            if kept.serial == info.serial:
                resp = kept
        if resp is None:  # stopped between the two renames: renew at once
            leaf = base64.b64encode(der).decode("ascii")
            leaf_pem = (
                "-----BEGIN CERTIFICATE-----\n"
                + "\n".join(leaf[i : i + 64] for i in range(0, len(leaf), 64))
                + "\n-----END CERTIFICATE-----\n"
            )
            resp = SignResponse(
                serial=info.serial,
                certificate_pem=leaf_pem,
                chain_pem="",
                trust_bundle=(),
                not_before=info.not_before.isoformat(),
                not_after=info.not_after.isoformat(),
                renew_after=now.isoformat(),
            )
        if info.not_after <= now:
            raise AgentError("the saved certificate expired")
    except (AgentError, ValueError, UnicodeEncodeError) as exc:
        key.close()
        log.info("no usable saved certificate in %s (%s)", folder, exc)
        return None
    return _Held(key=key, resp=resp)


def _pending_key(spec: StepSpec) -> EcKey:
    path = sds_dir(spec.proxy_dir) / PENDING_KEY
    with contextlib.suppress(OSError, AgentError):
        return EcKey.from_pem(path.read_bytes())
    key = EcKey.generate()
    prepare_sds_dir(spec.proxy_dir)
    write_private(path, key.private_pem())
    return key


class _State:
    def __init__(self, join_used: str, cert_refused: bool) -> None:
        self.join_used = join_used
        self.cert_refused = cert_refused


def _request(spec: StepSpec, held: _Held | None, state: _State, now: datetime) -> SignResponse:
    with _pending_key(spec) as key:
        csr_der = key.csr_der()
        proof: dict[str, str]
        if held is not None and now < held.not_after and not state.cert_refused:
            signature = held.key.sign(renewal_message(proxy=spec.proxy, csr_der=csr_der))
            proof = {
                "certificate_pem": held.resp.certificate_pem,
                "signature": base64.b64encode(signature).decode("ascii"),
            }
        else:
            proof = first_proof(
                token_file=spec.token_file,
                join_token_file=spec.join_token_file,
                join_used=state.join_used,
            )
        req = SignRequest(proxy=spec.proxy, csr_pem=csr_pem_of_der(csr_der), **proof)
        try:
            resp = sign_over_https(
                req,
                address=spec.ca_address,
                ca_pem=spec.ca_bundle_pem,
                server_name=spec.server_name,
            )
        except SigningRefused as exc:
            if "certificate_pem" in proof and exc.code == "UNAUTHENTICATED":
                # the current certificate is no proof any more (revoked, superseded):
                # a pod proves itself again with its token on the next attempt
                state.cert_refused = True
            raise
        state.cert_refused = False
        folder = sds_dir(spec.proxy_dir)
        if "join_token" in proof:
            state.join_used = token_digest(proof["join_token"])
            write_private(folder / SPENT_JOIN_TOKEN, state.join_used.encode("ascii"), mode=0o640)
        try:
            datetime.fromisoformat(resp.not_after)
            datetime.fromisoformat(resp.renew_after)
            carries = key.matches_certificate(resp.certificate_pem.encode("ascii"))
        except (ValueError, AgentError) as exc:
            raise InvalidMessage(f"SignResponse: unusable certificate or time: {exc}") from exc
        if not carries:
            raise AgentError("the signed certificate does not carry this agent's key")
        chain = resp.certificate_pem
        if not chain.endswith("\n"):
            chain += "\n"
        chain += resp.chain_pem
        key_pem = key.private_pem().decode("ascii")
        # the secret first (Envoy reloads on its rename), then the public status
        write_secret(spec.proxy_dir, chain_pem=chain, key_pem=key_pem)
        write_private(folder / STATUS_FILE, resp.encode(), mode=0o640)
        if spec.cert_dir is not None:
            write_pem_files(spec.cert_dir, chain, key_pem, resp.trust_bundle)
        remove_private(folder / PENDING_KEY)
        return resp


def step(raw: dict[str, Any], *, now: datetime | None = None) -> dict[str, Any]:
    """Restore, and request a certificate when none is held or it is due; the outcome."""
    state = _State(str(raw.get("join_used") or ""), bool(raw.get("cert_refused")))
    held: _Held | None = None
    try:
        spec = StepSpec.of(raw)
        if not state.join_used:
            with contextlib.suppress(OSError, ValueError):
                spent = (sds_dir(spec.proxy_dir) / SPENT_JOIN_TOKEN).read_text("ascii").strip()
                state.join_used = spent
        now = now or datetime.now(UTC)
        held = _restore(spec, now)
        requested = False
        proof = ""
        resp = held.resp if held is not None else None
        if held is None or held.renew_after <= now:
            proof = "certificate" if held is not None and not state.cert_refused else "first"
            resp = _request(spec, held, state, now)
            requested = True
            if held is None:
                log.info("first certificate %s, until %s", resp.serial, resp.not_after)
            else:
                log.info("renewed: certificate %s until %s", resp.serial, resp.not_after)
        elif spec.cert_dir is not None:
            chain = read_secret(spec.proxy_dir)
            if chain is not None:
                write_pem_files(spec.cert_dir, chain[0], chain[1], held.resp.trust_bundle)
        assert resp is not None
        return {
            "ok": True,
            "serial": resp.serial,
            "not_after": resp.not_after,
            "renew_after": resp.renew_after,
            "requested": requested,
            "proof": proof,
            "join_used": state.join_used,
        }
    except (AgentError, OSError, ValueError) as exc:
        return {
            "ok": False,
            "error": str(exc),
            "code": exc.code if isinstance(exc, SigningRefused) else "",
            "join_used": state.join_used,
            "cert_refused": state.cert_refused,
        }
    finally:
        if held is not None:
            held.key.close()
