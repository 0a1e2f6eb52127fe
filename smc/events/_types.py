"""SMC's event types: an envelope plus one frozen dataclass per Avro record in ``schemas/``.

Role: the vocabulary of the log. Each class names its Avro record (``TYPE``), the stream it
goes to (``STREAM``) and how its aggregate key is derived from its payload. Field names and
types mirror the newest schema version of that record (checked by the test suite).
Concurrency: immutable values; safe to share between threads and tasks.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

__all__ = [
    "CERTS",
    "EVENT_TYPES",
    "POLICY",
    "REGISTRY",
    "STREAMS",
    "CertificateIssued",
    "CertificateRenewed",
    "CertificateRevoked",
    "Endpoint",
    "EndpointsChanged",
    "Envelope",
    "Event",
    "JoinTokenIssued",
    "MeshConfigChanged",
    "ProxyCertificateIssued",
    "ProxyCertificateRevoked",
    "ServiceAccountRemoved",
    "ServiceAccountUpserted",
    "ServicePort",
    "ServiceRemoved",
    "ServiceUpserted",
    "SmiResourceApplied",
    "SmiResourceDeleted",
    "TrustBundleChanged",
    "VmGroupStatusChanged",
    "VmInstanceChanged",
    "WorkloadJoined",
    "WorkloadLeft",
    "WorkloadPort",
    "deterministic_id",
    "make_event",
]

REGISTRY = "smc.registry"
POLICY = "smc.policy"
CERTS = "smc.certs"
STREAMS: tuple[str, ...] = (REGISTRY, POLICY, CERTS)

_ID_NAMESPACE = uuid.UUID("6b1f7f36-6c1b-4f43-9a57-2c6f1b0d5e11")


def deterministic_id(*parts: str) -> str:
    """An event id derived from its cause (e.g. ``("k8s", uid, resourceVersion)``).

    The same cause always gives the same id, so a retried or duplicated append is applied once.
    """
    return str(uuid.uuid5(_ID_NAMESPACE, "\x1f".join(parts)))


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """Metadata of every event. The schema fingerprint travels in the record header."""

    event_id: str
    aggregate: str
    occurred_at: datetime
    source: str
    actor: str
    causation_id: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of all events. Subclasses set ``TYPE`` (Avro full name) and ``STREAM``."""

    TYPE: ClassVar[str] = ""
    STREAM: ClassVar[str] = ""
    envelope: Envelope

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        """Aggregate key for a payload of this type (also the Kafka message key)."""
        raise NotImplementedError  # pragma: no cover - every concrete type overrides it

    @property
    def event_id(self) -> str:
        return self.envelope.event_id

    @property
    def aggregate(self) -> str:
        return self.envelope.aggregate


def _nsname(prefix: str, p: Mapping[str, Any], name: str = "name") -> str:
    return f"{prefix}/{p['namespace']}/{p[name]}"


@dataclass(frozen=True, kw_only=True)
class ServicePort:
    name: str
    port: int
    protocol: str
    target_port: int


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    address: str
    port: int
    workload: str | None = None
    ready: bool = True


@dataclass(frozen=True, kw_only=True)
class WorkloadPort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, kw_only=True)
class ServiceUpserted(Event):
    TYPE = "smc.registry.ServiceUpserted"
    STREAM = REGISTRY
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    backing: str
    selector: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return _nsname("service", payload)


@dataclass(frozen=True, kw_only=True)
class ServiceRemoved(Event):
    TYPE = "smc.registry.ServiceRemoved"
    STREAM = REGISTRY
    namespace: str
    name: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return _nsname("service", payload)


@dataclass(frozen=True, kw_only=True)
class EndpointsChanged(Event):
    TYPE = "smc.registry.EndpointsChanged"
    STREAM = REGISTRY
    namespace: str
    service: str
    endpoints: tuple[Endpoint, ...]

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return _nsname("endpoints", payload, "service")


@dataclass(frozen=True, kw_only=True)
class WorkloadJoined(Event):
    TYPE = "smc.registry.WorkloadJoined"
    STREAM = REGISTRY
    kind: str
    namespace: str
    name: str
    address: str
    service_account: str
    labels: Mapping[str, str]
    ports: tuple[WorkloadPort, ...]

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"workload/{payload['kind']}/{payload['namespace']}/{payload['name']}"


@dataclass(frozen=True, kw_only=True)
class WorkloadLeft(Event):
    TYPE = "smc.registry.WorkloadLeft"
    STREAM = REGISTRY
    kind: str
    namespace: str
    name: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"workload/{payload['kind']}/{payload['namespace']}/{payload['name']}"


@dataclass(frozen=True, kw_only=True)
class VmInstanceChanged(Event):
    """An instance of a VirtualMachineGroup joined, started draining or left, with the cause.

    The workload itself travels as ``WorkloadJoined``/``WorkloadLeft``; this record is the
    group's own account of the change (what the audit shows, what ``smc get vmgroups`` folds).
    """

    TYPE = "smc.registry.VmInstanceChanged"
    STREAM = REGISTRY
    namespace: str
    group: str
    instance_id: str
    workload: str
    phase: str
    cause: str
    provider: str
    address: str
    state: str = ""

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"vminstance/{payload['namespace']}/{payload['group']}/{payload['instance_id']}"


@dataclass(frozen=True, kw_only=True)
class VmGroupStatusChanged(Event):
    """A VirtualMachineGroup's provider status: ``ok``, ``stale`` (unreachable; last known
    instances kept) or ``removed`` (the group was deleted)."""

    TYPE = "smc.registry.VmGroupStatusChanged"
    STREAM = REGISTRY
    namespace: str
    group: str
    status: str
    reason: str = ""
    instances: int = 0

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"vmgroup/{payload['namespace']}/{payload['group']}"


@dataclass(frozen=True, kw_only=True)
class ServiceAccountUpserted(Event):
    TYPE = "smc.registry.ServiceAccountUpserted"
    STREAM = REGISTRY
    namespace: str
    name: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return _nsname("sa", payload)


@dataclass(frozen=True, kw_only=True)
class ServiceAccountRemoved(Event):
    TYPE = "smc.registry.ServiceAccountRemoved"
    STREAM = REGISTRY
    namespace: str
    name: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return _nsname("sa", payload)


@dataclass(frozen=True, kw_only=True)
class SmiResourceApplied(Event):
    TYPE = "smc.policy.SmiResourceApplied"
    STREAM = POLICY
    kind: str
    api_version: str
    namespace: str
    name: str
    manifest_json: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"{payload['kind']}/{payload['namespace']}/{payload['name']}"


@dataclass(frozen=True, kw_only=True)
class SmiResourceDeleted(Event):
    TYPE = "smc.policy.SmiResourceDeleted"
    STREAM = POLICY
    kind: str
    namespace: str
    name: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"{payload['kind']}/{payload['namespace']}/{payload['name']}"


@dataclass(frozen=True, kw_only=True)
class MeshConfigChanged(Event):
    TYPE = "smc.policy.MeshConfigChanged"
    STREAM = POLICY
    permissive: bool
    trust_domain: str
    cert_lifetime_seconds: int
    settings: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return "meshconfig"


@dataclass(frozen=True, kw_only=True)
class CertificateIssued(Event):
    TYPE = "smc.certs.CertificateIssued"
    STREAM = CERTS
    serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    issuer: str
    fingerprint: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"cert/{payload['identity']}"


@dataclass(frozen=True, kw_only=True)
class CertificateRenewed(Event):
    TYPE = "smc.certs.CertificateRenewed"
    STREAM = CERTS
    serial: str
    previous_serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    issuer: str
    fingerprint: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"cert/{payload['identity']}"


@dataclass(frozen=True, kw_only=True)
class CertificateRevoked(Event):
    TYPE = "smc.certs.CertificateRevoked"
    STREAM = CERTS
    serial: str
    identity: str
    reason: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"cert/{payload['identity']}"


@dataclass(frozen=True, kw_only=True)
class TrustBundleChanged(Event):
    TYPE = "smc.certs.TrustBundleChanged"
    STREAM = CERTS
    issuer: str
    roots_pem: tuple[str, ...]

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"trust/{payload['issuer']}"


@dataclass(frozen=True, kw_only=True)
class ProxyCertificateIssued(Event):
    """One proxy's certificate, signed over the CSR its agent made (the key never left the
    proxy's host); ``previous_serial`` is set on a renewal."""

    TYPE = "smc.certs.ProxyCertificateIssued"
    STREAM = CERTS
    proxy: str
    serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    issuer: str
    fingerprint: str
    proof: str
    previous_serial: str = ""

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"proxy/{payload['proxy']}"


@dataclass(frozen=True, kw_only=True)
class ProxyCertificateRevoked(Event):
    TYPE = "smc.certs.ProxyCertificateRevoked"
    STREAM = CERTS
    proxy: str
    serial: str
    identity: str
    reason: str

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"proxy/{payload['proxy']}"


@dataclass(frozen=True, kw_only=True)
class JoinTokenIssued(Event):
    """A one-time join token for a VM's agent: only its SHA-256 is recorded."""

    TYPE = "smc.certs.JoinTokenIssued"
    STREAM = CERTS
    token_sha256: str
    proxy: str
    identity: str
    expires_at: datetime

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        return f"proxy/{payload['proxy']}"


EVENT_TYPES: Mapping[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        ServiceUpserted,
        ServiceRemoved,
        EndpointsChanged,
        WorkloadJoined,
        WorkloadLeft,
        ServiceAccountUpserted,
        ServiceAccountRemoved,
        SmiResourceApplied,
        SmiResourceDeleted,
        MeshConfigChanged,
        CertificateIssued,
        CertificateRenewed,
        CertificateRevoked,
        TrustBundleChanged,
        ProxyCertificateIssued,
        ProxyCertificateRevoked,
        JoinTokenIssued,
        VmInstanceChanged,
        VmGroupStatusChanged,
    )
}

E = TypeVar("E", bound=Event)


def make_event(
    cls: type[E],
    *,
    source: str,
    actor: str,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    causation_id: str | None = None,
    correlation_id: str | None = None,
    **payload: Any,
) -> E:
    """Build an event of ``cls``; the aggregate key is derived from the payload.

    Without ``event_id`` a random id is used; wherever the change has a cause (an API request
    id, a Kubernetes uid + resourceVersion) pass :func:`deterministic_id` of it instead, so a
    retried or duplicated append is applied once.
    """
    when = occurred_at or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # Avro timestamp-millis keeps milliseconds: round here so an event equals its decoded self.
    when = when.replace(microsecond=when.microsecond // 1000 * 1000)
    aggregate = cls.aggregate_of(payload)
    if event_id is None:
        event_id = str(uuid.uuid4())
    env = Envelope(
        event_id=event_id,
        aggregate=aggregate,
        occurred_at=when,
        source=source,
        actor=actor,
        causation_id=causation_id,
        correlation_id=correlation_id,
    )
    return cls(envelope=env, **payload)
