"""What a pod's projected service-account token proves, as the certificate service needs it.

Role: the certificate service checks tokens with :class:`smc.auth.TokenReviewer` (the one
TokenReview client of SMC, with its cache), made for the audience of the agents' projected
tokens (``TokenReviewer(endpoint, audiences=("smc",))``; a reviewer without an audience is
refused, as it would take tokens minted for the apiserver itself). :func:`review_pod_token`
asks it and turns its answer into a :class:`PodToken` (namespace, service account
and, for a pod-bound token, the pod's name and uid), or a :class:`ProofRefused` of a stable
kind: ``token-expired``, ``token-audience``, ``pod-deleted`` (the apiserver says the token
was invalidated: its pod is gone), ``service-account-deleted``, ``token-invalid``. An
apiserver that does not answer is an :class:`IdentityError` (refused, never let through).
Concurrency: a coroutine on the service's event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from smc.auth import ReviewUnavailable, TokenReviewer, Unauthenticated
from smc.identity._errors import IdentityError, ProofRefused

__all__ = ["PodToken", "check_reviewer", "refusal_kind", "review_pod_token"]

_SA_PREFIX = "system:serviceaccount:"
_POD_NAME = "authentication.kubernetes.io/pod-name"
_POD_UID = "authentication.kubernetes.io/pod-uid"


@dataclass(frozen=True, kw_only=True, slots=True)
class PodToken:
    """Who a verified token names."""

    namespace: str
    service_account: str
    pod_name: str = ""
    pod_uid: str = ""
    expires_at: float | None = None


def refusal_kind(error: str) -> str:
    """The kind of a refused token, from the apiserver's (or the verifier's) reason."""
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


def check_reviewer(reviewer: TokenReviewer) -> None:
    """Refuse a reviewer that names no audience (see the module docstring)."""
    if not reviewer.audiences:
        raise IdentityError(
            "the certificate service's TokenReviewer must name the agents' token audience"
        )


async def review_pod_token(reviewer: TokenReviewer, token: str) -> PodToken:
    """The service account (and pod) ``token`` proves for the reviewer's audiences."""
    check_reviewer(reviewer)
    try:
        who = await reviewer.review(token)
    except Unauthenticated as exc:
        raise ProofRefused(kind=refusal_kind(str(exc)), reason=str(exc)) from None
    except ReviewUnavailable as exc:
        raise IdentityError(f"TokenReview failed: {exc}") from exc
    name = who.name
    if not name.startswith(_SA_PREFIX) or name.count(":") != 3:
        raise ProofRefused(kind="token-invalid", reason=f"{name!r} is not a service account")
    ns, sa = name[len(_SA_PREFIX) :].split(":")
    return PodToken(
        namespace=ns,
        service_account=sa,
        pod_name=who.extra_value(_POD_NAME),
        pod_uid=who.extra_value(_POD_UID),
        expires_at=who.expires_at,
    )
