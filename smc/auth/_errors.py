"""Errors of the control plane's authentication and authorization.

Role: one exception tree for :mod:`smc.auth`. :class:`Unauthenticated` becomes HTTP 401,
:class:`Forbidden` HTTP 403; :class:`CredentialError` is a local credential or TLS file that
cannot be made or read; :class:`ReviewUnavailable` is an apiserver that did not answer a
TokenReview or SubjectAccessReview (the request is refused, never let through).
Concurrency: immutable exception objects.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["AuthError", "CredentialError", "Forbidden", "ReviewUnavailable", "Unauthenticated"]


class AuthError(SMCError):
    """Base of every error raised by :mod:`smc.auth`."""


class Unauthenticated(AuthError):
    """No credential, or one that does not prove an identity (HTTP 401)."""


class Forbidden(AuthError):
    """An authenticated principal may not do this (HTTP 403)."""

    def __init__(self, *, principal: str, verb: str, resource: str, namespace: str) -> None:
        self.principal = principal
        self.verb = verb
        self.resource = resource
        self.namespace = namespace
        where = f"in namespace {namespace!r}" if namespace else "in all namespaces"
        super().__init__(f"{principal} may not {verb} {resource} {where}")


class CredentialError(AuthError):
    """A credential or TLS file cannot be created, read or used."""


class ReviewUnavailable(AuthError):
    """The Kubernetes apiserver did not answer a TokenReview/SubjectAccessReview."""
