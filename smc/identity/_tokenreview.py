"""Service-account token verification with the kube-apiserver's TokenReview API.

Role: :class:`TokenReviewer` asks ``POST /apis/authentication.k8s.io/v1/tokenreviews`` whether
a projected service-account token is valid for an audience, and returns who it names
(:class:`TokenIdentity`: namespace, service account, and for a pod-bound token the pod's
name and uid). Answers are cached by the token's SHA-256 (never the token) until the
token's own expiry or ``cache_ttl``, whichever is first; refusals are cached for
``negative_ttl``. The apiserver checks the signature, expiry, audience and that the bound
pod and service account still exist; this class adds the audience check of the answer and
maps refusals onto stable kinds (``token-expired``, ``token-audience``,
``service-account-deleted``, ``pod-deleted``, ``token-invalid``).
Concurrency: ``review`` is a coroutine; the cache is only touched on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from smc.identity._errors import IdentityError, ProofRefused
from smc.informers import KubeEndpoint

__all__ = ["TokenIdentity", "TokenReviewer", "token_digest", "token_expiry"]

_SA_PREFIX = "system:serviceaccount:"
_POD_NAME = "authentication.kubernetes.io/pod-name"
_POD_UID = "authentication.kubernetes.io/pod-uid"


def token_digest(token: str) -> str:
    """SHA-256 of a token, hex: how tokens are named in caches and logs."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, unverified (only to bound a cache entry), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenIdentity:
    """Who a verified token names."""

    namespace: str
    service_account: str
    pod_name: str = ""
    pod_uid: str = ""
    expires_at: float | None = None


def _kind(error: str) -> str:
    text = error.lower()
    if "expired" in text:
        return "token-expired"
    if "audience" in text:
        return "token-audience"
    if "invalidated" in text or "pod" in text:  # the pod it is bound to is gone
        return "pod-deleted"
    if "serviceaccount" in text or "service account" in text:
        return "service-account-deleted"
    if "not found" in text or "deleted" in text:
        return "service-account-deleted"
    return "token-invalid"


class TokenReviewer:
    """TokenReview client with a cache (see the module docstring)."""

    def __init__(
        self,
        *,
        endpoint: KubeEndpoint,
        audience: str,
        cache_ttl: float = 60.0,
        negative_ttl: float = 5.0,
        max_entries: int = 10_000,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not audience:
            raise IdentityError("TokenReviewer: the audience must not be empty")
        self.endpoint = endpoint
        self.audience = audience
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.timeout = timeout
        self.clock = clock
        self.reviews = 0  # calls made to the apiserver
        self._cache: OrderedDict[str, tuple[float, TokenIdentity | ProofRefused]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def review(self, token: str) -> TokenIdentity:
        """The identity ``token`` proves for :attr:`audience`; raises :class:`ProofRefused`."""
        key = token_digest(token)
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            if isinstance(hit[1], ProofRefused):
                raise hit[1]
            return hit[1]
        exp = token_expiry(token)
        try:
            ident: TokenIdentity | ProofRefused = await self._ask(token, exp)
        except ProofRefused as exc:
            ident = exc
        if isinstance(ident, ProofRefused):
            until = now + self.negative_ttl
        else:
            until = now + self.cache_ttl if exp is None else min(now + self.cache_ttl, exp)
        self._cache[key] = (until, ident)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        if isinstance(ident, ProofRefused):
            raise ident
        return ident

    async def _ask(self, token: str, exp: float | None) -> TokenIdentity:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(ssl=self.endpoint.ssl_context()),
            )
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        url = self.endpoint.host.rstrip("/") + "/apis/authentication.k8s.io/v1/tokenreviews"
        self.reviews += 1
        try:
            async with self._session.post(
                url, json=body, headers={"Authorization": f"Bearer {self.endpoint.token}"}
            ) as resp:
                text = await resp.text()
                if resp.status != 201 and resp.status != 200:
                    raise IdentityError(f"TokenReview at {url}: HTTP {resp.status}: {text[:200]}")
                answer: dict[str, Any] = json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise IdentityError(f"TokenReview at {url} failed: {exc}") from exc
        status = answer.get("status") or {}
        if not status.get("authenticated"):
            error = str(status.get("error") or "token not authenticated")
            raise ProofRefused(kind=_kind(error), reason=error)
        audiences = status.get("audiences") or []
        if self.audience not in audiences:
            raise ProofRefused(
                kind="token-audience",
                reason=f"token is not for audience {self.audience!r} (it is for {audiences})",
            )
        user = status.get("user") or {}
        name = str(user.get("username", ""))
        if not name.startswith(_SA_PREFIX) or name.count(":") != 3:
            raise ProofRefused(kind="token-invalid", reason=f"{name!r} is not a service account")
        ns, sa = name[len(_SA_PREFIX) :].split(":")
        extra = user.get("extra") or {}

        def one(key: str) -> str:
            values = extra.get(key) or []
            return str(values[0]) if values else ""

        return TokenIdentity(
            namespace=ns,
            service_account=sa,
            pod_name=one(_POD_NAME),
            pod_uid=one(_POD_UID),
            expires_at=exp,
        )
