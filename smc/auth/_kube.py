"""Kubernetes as the authority: TokenReview (who is this?) and SubjectAccessReview (may they?).

Role: :class:`TokenReviewer` verifies bearer tokens (service-account and user tokens) with
``POST /apis/authentication.k8s.io/v1/tokenreviews``, optionally for given audiences (a token
minted for another audience is refused by the apiserver). :class:`AccessReviewer` asks
``POST /apis/authorization.k8s.io/v1/subjectaccessreviews`` whether a principal may do an
:class:`~smc.auth.Access` on SMC's own API group (``smc.dev``), so the cluster's RBAC governs
the mesh. Both cache answers: a positive token review until the token's own ``exp`` claim or
``ttl`` seconds, whichever is first (a deleted service account's token stops working within
``ttl``), a negative one for ``negative_ttl``; concurrent identical questions share one
apiserver call. Cache keys are SHA-256 digests of the token (:func:`token_digest`), never
the token itself. The principal of a token review carries the answer's ``user.extra`` fields
(a pod-bound token names its pod there) and the token's expiry. An
apiserver that does not answer raises :class:`ReviewUnavailable` (refused, never allowed).
``calls``/``hits`` count apiserver calls and cache hits (the benchmark reports them).
Concurrency: coroutines on one asyncio loop; the aiohttp session is made on first use.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from smc.auth._errors import ReviewUnavailable, Unauthenticated
from smc.auth._principal import AUTHENTICATED_GROUP, Access, Principal

if TYPE_CHECKING:
    import aiohttp

    from smc.informers import KubeEndpoint

__all__ = [
    "API_GROUP",
    "AccessReviewer",
    "TTLCache",
    "TokenReviewer",
    "token_digest",
    "token_expiry",
]

log = logging.getLogger("smc.auth")

#: The API group SubjectAccessReviews name for SMC's resources.
API_GROUP = "smc.dev"

V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires: float


class TTLCache(Generic[V]):
    """A bounded cache whose entries expire at their own time, with single-flight loading."""

    def __init__(self, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[tuple[V, float]]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        e = self._data.get(key)
        if e is None:
            return None
        if e.expires <= self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return e.value

    def put(self, key: str, value: V, ttl: float) -> None:
        if ttl <= 0:
            return
        self._data[key] = _Entry(value, self.clock() + ttl)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def load(self, key: str, loader: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        """The cached value, or ``loader()`` (value, ttl) once for all concurrent callers."""
        hit = self.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        pending = self._inflight.get(key)
        if pending is not None:
            self.hits += 1
            return (await asyncio.shield(pending))[0]
        self.misses += 1
        fut: asyncio.Future[tuple[V, float]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value, ttl = await loader()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result((value, ttl))
        self.put(key, value, ttl)
        return value


def token_digest(token: str) -> str:
    """SHA-256 of a token, hex: how tokens are named in caches, records and logs."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified: only to bound the cache), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        pad = "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + pad))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except (ValueError, TypeError):
        return None


class _KubeClient:
    def __init__(self, endpoint: KubeEndpoint, *, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.endpoint.ssl_context()),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Authorization": f"Bearer {self.endpoint.token}"},
            )
        self.calls += 1
        try:
            async with self._session.post(self.endpoint.host + path, json=body) as resp:
                text = await resp.text()
                if resp.status != 201 and resp.status != 200:
                    raise ReviewUnavailable(
                        f"apiserver answered {resp.status} to {path}: {text[:300]}"
                    )
                data = json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ReviewUnavailable(f"apiserver {self.endpoint.host}{path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ReviewUnavailable(f"apiserver {path}: the answer is not an object")
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class TokenReviewer:
    """Verify bearer tokens with the apiserver's TokenReview (see the module docstring).

    ``audiences``: the audiences a token must be valid for (empty: the apiserver's own, i.e.
    its service-account issuer's default audience). ``review`` returns the principal named by
    the apiserver (``system:serviceaccount:NS:SA`` for a service account) with its groups,
    or raises :class:`Unauthenticated` (a refused token) or :class:`ReviewUnavailable`.
    """

    def __init__(
        self,
        endpoint: KubeEndpoint,
        *,
        audiences: Sequence[str] = (),
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.audiences = tuple(audiences)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.wall = wall
        self._client = _KubeClient(endpoint, timeout=timeout)
        self.cache: TTLCache[Principal | str] = TTLCache(clock=clock)

    @property
    def calls(self) -> int:
        """TokenReviews sent to the apiserver."""
        return self._client.calls

    async def review(self, token: str, *, audiences: Sequence[str] | None = None) -> Principal:
        auds = self.audiences if audiences is None else tuple(audiences)
        key = token_digest(token) + "|" + ",".join(auds)

        async def load() -> tuple[Principal | str, float]:
            spec: dict[str, Any] = {"token": token}
            if auds:
                spec["audiences"] = list(auds)
            body = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": spec,
            }
            data = await self._client.post("/apis/authentication.k8s.io/v1/tokenreviews", body)
            status = data.get("status") or {}
            if not status.get("authenticated"):
                reason = str(status.get("error") or "token not authenticated")
                return f"the apiserver refused the token: {reason}", self.negative_ttl
            if auds and not set(auds) & set(status.get("audiences") or ()):
                return "the token is not valid for this audience", self.negative_ttl
            user = status.get("user") or {}
            name = user.get("username")
            if not isinstance(name, str) or not name:
                return "the apiserver named no user for the token", self.negative_ttl
            groups = tuple(str(g) for g in user.get("groups") or () if isinstance(g, str))
            raw_extra = user.get("extra")
            extra = tuple(
                sorted(
                    (str(k), tuple(str(v) for v in vs))
                    for k, vs in (raw_extra.items() if isinstance(raw_extra, dict) else ())
                    if isinstance(vs, list)
                )
            )
            exp = token_expiry(token)
            principal = Principal(
                name=name,
                method="tokenreview",
                groups=(*groups, AUTHENTICATED_GROUP),
                uid=str(user.get("uid") or ""),
                extra=extra,
                expires_at=exp,
            )
            ttl = self.ttl
            if exp is not None:
                ttl = min(ttl, exp - self.wall())
            return principal, ttl

        answer = await self.cache.load(key, load)
        if isinstance(answer, str):
            raise Unauthenticated(answer)
        return answer

    async def close(self) -> None:
        await self._client.close()


class AccessReviewer:
    """Authorize with SubjectAccessReview on the ``smc.dev`` API group (cached)."""

    def __init__(
        self,
        endpoint: KubeEndpoint,
        *,
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._client = _KubeClient(endpoint, timeout=timeout)
        self.cache: TTLCache[tuple[bool, str]] = TTLCache(clock=clock)

    @property
    def calls(self) -> int:
        """SubjectAccessReviews sent to the apiserver."""
        return self._client.calls

    async def allowed(self, principal: Principal, access: Access) -> tuple[bool, str]:
        """(allowed, the apiserver's reason)."""
        groups = sorted(g for g in principal.groups if g != AUTHENTICATED_GROUP)
        key = json.dumps(
            [
                principal.name,
                principal.uid,
                groups,
                access.verb,
                access.resource,
                access.namespace,
                access.name,
            ]
        )

        async def load() -> tuple[tuple[bool, str], float]:
            attrs: dict[str, Any] = {
                "group": API_GROUP,
                "resource": access.resource,
                "verb": access.verb,
            }
            if access.namespace:
                attrs["namespace"] = access.namespace
            if access.name:
                attrs["name"] = access.name
            spec: dict[str, Any] = {
                "user": principal.name,
                "groups": groups,
                "resourceAttributes": attrs,
            }
            if principal.uid:
                spec["uid"] = principal.uid
            body = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": spec,
            }
            data = await self._client.post(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews", body
            )
            status = data.get("status") or {}
            ok = bool(status.get("allowed")) and not status.get("denied")
            reason = str(status.get("reason") or "")
            return (ok, reason), self.ttl if ok else self.negative_ttl

        return await self.cache.load(key, load)

    async def close(self) -> None:
        await self._client.close()
