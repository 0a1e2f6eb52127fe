"""The wire format between an SMC agent and the control plane's certificate service.

Role: one HTTPS call, ``POST`` :data:`SIGN_METHOD` (HTTP/1.1 over TLS, so that the resident
agent needs only Python's ``http.client`` and ``ssl``), whose request and response bodies are
UTF-8 JSON objects (:class:`SignRequest`, :class:`SignResponse`): a CSR made beside the proxy
and one proof of who the caller is; never a private key. A refusal is an HTTP error status
with the JSON body ``{"code": ..., "error": ...}``; :data:`HTTP_STATUS` maps each code
(gRPC's status names, kept from the earlier gRPC transport) to its status. Proofs:

- ``token``: the pod's projected service-account token (audience-bound; the control plane
  checks it with a TokenReview against the kube-apiserver);
- ``join_token``: a VM's one-time join token from ``smc vm bootstrap``;
- ``certificate_pem`` + ``signature``: a renewal, proven with the proxy's current certificate
  (its leaf, PEM) and a signature by its current key over :func:`renewal_message` (the proxy
  id and the new CSR's DER), so the proof cannot be moved to another CSR or proxy.

Parsing checks every field's type and size and raises :class:`InvalidMessage` naming it.
Concurrency: pure functions and immutable values.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smc.agent._errors import AgentError, InvalidMessage

__all__ = [
    "HTTP_STATUS",
    "SIGN_METHOD",
    "SignRequest",
    "SignResponse",
    "renewal_message",
]

#: The path of the one method (``POST``).
SIGN_METHOD = "/smc.identity.v1.ProxyCertificates/Sign"
#: HTTP status of each refusal code.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
}
_MAX_FIELD = 32 * 1024
_MAX_MESSAGE = 256 * 1024


def renewal_message(*, proxy: str, csr_der: bytes) -> bytes:
    """What a renewing proxy signs with its current key."""
    return b"smc-renew-v1\x00" + proxy.encode("utf-8") + b"\x00" + csr_der


def _obj(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > _MAX_MESSAGE:
        raise InvalidMessage(f"{what}: longer than {_MAX_MESSAGE} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"{what}: not a JSON object ({exc})") from exc
    if not isinstance(obj, dict):
        raise InvalidMessage(f"{what}: not a JSON object")
    return obj


def _str(obj: dict[str, Any], name: str, what: str, *, required: bool = False) -> str:
    value = obj.get(name, "")
    if not isinstance(value, str):
        raise InvalidMessage(f"{what}.{name}: must be a string")
    if len(value) > _MAX_FIELD:
        raise InvalidMessage(f"{what}.{name}: longer than {_MAX_FIELD} characters")
    if required and not value:
        raise InvalidMessage(f"{what}.{name}: is required")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class SignRequest:
    """A CSR and exactly one proof (see the module docstring). ``repr`` hides the secrets."""

    proxy: str
    csr_pem: str
    token: str = field(default="", repr=False)
    join_token: str = field(default="", repr=False)
    certificate_pem: str = ""
    signature: str = ""  # base64 of the renewal signature

    @property
    def proof_kind(self) -> str:
        """``service-account-token``, ``join-token`` or ``certificate``."""
        if self.token:
            return "service-account-token"
        if self.join_token:
            return "join-token"
        return "certificate"

    def signature_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.signature, validate=True)
        except ValueError as exc:
            raise InvalidMessage("SignRequest.signature: not base64") from exc

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> SignRequest:
        what = "SignRequest"
        obj = _obj(data, what)
        unknown = sorted(set(obj) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise InvalidMessage(f"{what}: unknown field(s) {', '.join(unknown)}")
        req = cls(
            proxy=_str(obj, "proxy", what, required=True),
            csr_pem=_str(obj, "csr_pem", what, required=True),
            token=_str(obj, "token", what),
            join_token=_str(obj, "join_token", what),
            certificate_pem=_str(obj, "certificate_pem", what),
            signature=_str(obj, "signature", what),
        )
        given = [bool(req.token), bool(req.join_token), bool(req.certificate_pem)]
        if sum(given) != 1:
            raise InvalidMessage(
                f"{what}: give exactly one proof (token, join_token or certificate_pem)"
            )
        if req.certificate_pem and not req.signature:
            raise InvalidMessage(f"{what}.signature: is required with certificate_pem")
        return req


@dataclass(frozen=True, kw_only=True, slots=True)
class SignResponse:
    """The signed leaf and its chain, the mesh trust bundle, and when to renew."""

    serial: str
    certificate_pem: str
    chain_pem: str
    trust_bundle: tuple[str, ...]
    not_before: str  # ISO 8601
    not_after: str
    renew_after: str

    def encode(self) -> bytes:
        data = asdict(self)
        data["trust_bundle"] = list(self.trust_bundle)
        return json.dumps(data).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> SignResponse:
        what = "SignResponse"
        obj = _obj(data, what)
        bundle = obj.get("trust_bundle")
        if not isinstance(bundle, list) or not all(isinstance(x, str) for x in bundle):
            raise InvalidMessage(f"{what}.trust_bundle: must be a list of PEM strings")
        return cls(
            serial=_str(obj, "serial", what, required=True),
            certificate_pem=_str(obj, "certificate_pem", what, required=True),
            chain_pem=_str(obj, "chain_pem", what),
            trust_bundle=tuple(bundle),
            not_before=_str(obj, "not_before", what, required=True),
            not_after=_str(obj, "not_after", what, required=True),
            renew_after=_str(obj, "renew_after", what, required=True),
        )


def token_digest(token: str) -> str:
    """SHA-256 hex of a token: how a spent join token is remembered (never the token)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def first_proof(
    *, token_file: Path | None, join_token_file: Path | None, join_used: str
) -> dict[str, str]:
    """The proof of a first certificate request: the pod's service-account token read from
    ``token_file``, else the VM's join token from ``join_token_file`` unless its digest is
    ``join_used`` (spent). Raises :class:`AgentError` naming the file."""
    if token_file is not None:
        try:
            token = token_file.read_text("utf-8").strip()
        except OSError as exc:
            raise AgentError(f"cannot read the token file {token_file}: {exc}") from exc
        if not token:
            raise AgentError(f"the token file {token_file} is empty")
        return {"token": token}
    assert join_token_file is not None
    try:
        token = join_token_file.read_text("utf-8").strip()
    except OSError as exc:
        raise AgentError(f"cannot read the join token {join_token_file}: {exc}") from exc
    if join_used and token_digest(token) == join_used:
        raise AgentError(
            f"the join token in {join_token_file} was used already and the certificate "
            "is no proof any more (expired or revoked): put a new one there (`smc vm "
            "bootstrap` again)"
        )
    return {"join_token": token}
