"""Errors of the sidecar injector and the VM bootstrap writer.

Role: the exception tree of :mod:`smc.injector` (all subclasses of :class:`smc.errors.SMCError`).
Concurrency: plain classes, no state; safe everywhere.
"""

from __future__ import annotations

from smc.errors import SMCError

__all__ = ["InjectorError", "InvalidAdmissionReview", "InvalidPod", "UnknownVirtualMachine"]


class InjectorError(SMCError):
    """Base class of the injector's errors."""


class InvalidAdmissionReview(InjectorError):
    """An AdmissionReview body that cannot be answered; the message names the field.
    ``uid`` is the request's uid when it could be read (the answer can then be a review)."""

    def __init__(self, message: str, uid: str | None = None) -> None:
        super().__init__(message)
        self.uid = uid


class InvalidPod(InjectorError):
    """A Pod object that cannot be mutated; the message names the field and the reason."""


class UnknownVirtualMachine(InjectorError):
    """``smc vm bootstrap`` named a VirtualMachine the registry does not hold."""
