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
    #: The aggregate key as a ``str.format`` template over the payload's fields, e.g.
    #: ``"service/{namespace}/{name}"``: every event of one aggregate gets the same key.
    AGGREGATE: ClassVar[str] = ""
    envelope: Envelope

    @classmethod
    def aggregate_of(cls, payload: Mapping[str, Any]) -> str:
        """Aggregate key for a payload of this type (also the Kafka message key)."""
        if not cls.AGGREGATE:
            raise NotImplementedError(f"{cls.__name__} names no AGGREGATE template")
        return cls.AGGREGATE.format_map(payload)

    @property
    def event_id(self) -> str:
        return self.envelope.event_id

    @property
    def aggregate(self) -> str:
        return self.envelope.aggregate


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
    AGGREGATE = "service/{namespace}/{name}"
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    backing: str
    selector: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ServiceRemoved(Event):
    TYPE = "smc.registry.ServiceRemoved"
    STREAM = REGISTRY
    AGGREGATE = "service/{namespace}/{name}"
    namespace: str
    name: str


@dataclass(frozen=True, kw_only=True)
class EndpointsChanged(Event):
    TYPE = "smc.registry.EndpointsChanged"
    STREAM = REGISTRY
    AGGREGATE = "endpoints/{namespace}/{service}"
    namespace: str
    service: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, kw_only=True)
class WorkloadJoined(Event):
    TYPE = "smc.registry.WorkloadJoined"
    STREAM = REGISTRY
    AGGREGATE = "workload/{kind}/{namespace}/{name}"
    kind: str
    namespace: str
    name: str
    address: str
    service_account: str
    labels: Mapping[str, str]
    ports: tuple[WorkloadPort, ...]


@dataclass(frozen=True, kw_only=True)
class WorkloadLeft(Event):
    TYPE = "smc.registry.WorkloadLeft"
    STREAM = REGISTRY
    AGGREGATE = "workload/{kind}/{namespace}/{name}"
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True, kw_only=True)
class VmInstanceChanged(Event):
    """An instance of a VirtualMachineGroup joined, started draining or left, with the cause.

    The workload itself travels as ``WorkloadJoined``/``WorkloadLeft``; this record is the
    group's own account of the change (what the audit shows, what ``smc get vmgroups`` folds).
    """

    TYPE = "smc.registry.VmInstanceChanged"
    STREAM = REGISTRY
    AGGREGATE = "vminstance/{namespace}/{group}/{instance_id}"
    namespace: str
    group: str
    instance_id: str
    workload: str
    phase: str
    cause: str
    provider: str
    address: str
    state: str = ""


@dataclass(frozen=True, kw_only=True)
class VmGroupStatusChanged(Event):
    """A VirtualMachineGroup's provider status: ``ok``, ``stale`` (unreachable; last known
    instances kept) or ``removed`` (the group was deleted)."""

    TYPE = "smc.registry.VmGroupStatusChanged"
    STREAM = REGISTRY
    AGGREGATE = "vmgroup/{namespace}/{group}"
    namespace: str
    group: str
    status: str
    reason: str = ""
    instances: int = 0


@dataclass(frozen=True, kw_only=True)
class ServiceAccountUpserted(Event):
    TYPE = "smc.registry.ServiceAccountUpserted"
    STREAM = REGISTRY
    AGGREGATE = "sa/{namespace}/{name}"
    namespace: str
    name: str


@dataclass(frozen=True, kw_only=True)
class ServiceAccountRemoved(Event):
    TYPE = "smc.registry.ServiceAccountRemoved"
    STREAM = REGISTRY
    AGGREGATE = "sa/{namespace}/{name}"
    namespace: str
    name: str


@dataclass(frozen=True, kw_only=True)
class SmiResourceApplied(Event):
    TYPE = "smc.policy.SmiResourceApplied"
    STREAM = POLICY
    AGGREGATE = "{kind}/{namespace}/{name}"
    kind: str
    api_version: str
    namespace: str
    name: str
    manifest_json: str


@dataclass(frozen=True, kw_only=True)
class SmiResourceDeleted(Event):
    TYPE = "smc.policy.SmiResourceDeleted"
    STREAM = POLICY
    AGGREGATE = "{kind}/{namespace}/{name}"
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True, kw_only=True)
class MeshConfigChanged(Event):
    TYPE = "smc.policy.MeshConfigChanged"
    STREAM = POLICY
    AGGREGATE = "meshconfig"
    permissive: bool
    trust_domain: str
    cert_lifetime_seconds: int
    settings: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CertificateIssued(Event):
    TYPE = "smc.certs.CertificateIssued"
    STREAM = CERTS
    AGGREGATE = "cert/{identity}"
    serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    issuer: str
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class CertificateRenewed(Event):
    TYPE = "smc.certs.CertificateRenewed"
    STREAM = CERTS
    AGGREGATE = "cert/{identity}"
    serial: str
    previous_serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    issuer: str
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class CertificateRevoked(Event):
    TYPE = "smc.certs.CertificateRevoked"
    STREAM = CERTS
    AGGREGATE = "cert/{identity}"
    serial: str
    identity: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class TrustBundleChanged(Event):
    TYPE = "smc.certs.TrustBundleChanged"
    STREAM = CERTS
    AGGREGATE = "trust/{issuer}"
    issuer: str
    roots_pem: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ProxyCertificateIssued(Event):
    """One proxy's certificate, signed over the CSR its agent made (the key never left the
    proxy's host); ``previous_serial`` is set on a renewal."""

    TYPE = "smc.certs.ProxyCertificateIssued"
    STREAM = CERTS
    AGGREGATE = "proxy/{proxy}"
    proxy: str
    serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    issuer: str
    fingerprint: str
    proof: str
    previous_serial: str = ""


@dataclass(frozen=True, kw_only=True)
class ProxyCertificateRevoked(Event):
    TYPE = "smc.certs.ProxyCertificateRevoked"
    STREAM = CERTS
    AGGREGATE = "proxy/{proxy}"
    proxy: str
    serial: str
    identity: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class JoinTokenIssued(Event):
    """A one-time join token for a VM's agent: only its SHA-256 is recorded."""

    TYPE = "smc.certs.JoinTokenIssued"
    STREAM = CERTS
    AGGREGATE = "proxy/{proxy}"
    token_sha256: str
    proxy: str
    identity: str
    expires_at: datetime


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
