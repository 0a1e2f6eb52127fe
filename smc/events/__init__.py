"""Events: the envelope and types, the Avro codec, and the event logs.

Role: public API of the event layer; everything else in :mod:`smc` reads and writes the log
through it. Concurrency: see each backend (``SqliteLog``, ``KafkaLog``).
"""

from smc.events._codec import MAGIC, Codec, default_codec, schemas_dir
from smc.events._errors import (
    DecodeError,
    EventError,
    InvalidEvent,
    LogError,
    LogUnavailable,
    UnknownSchema,
)
from smc.events._kafka import KafkaLog
from smc.events._kafka_topics import DEFAULT_TOPICS, TopicSetupError, ensure_topics
from smc.events._log import Appended, EventLog, Position, Record, TopicPartition
from smc.events._open import open_log
from smc.events._sqlite import SqliteLog
from smc.events._types import (
    CERTS,
    EVENT_TYPES,
    POLICY,
    REGISTRY,
    STREAMS,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    Endpoint,
    EndpointsChanged,
    Envelope,
    Event,
    MeshConfigChanged,
    ServiceAccountRemoved,
    ServiceAccountUpserted,
    ServicePort,
    ServiceRemoved,
    ServiceUpserted,
    SmiResourceApplied,
    SmiResourceDeleted,
    TrustBundleChanged,
    WorkloadJoined,
    WorkloadLeft,
    WorkloadPort,
    deterministic_id,
    make_event,
)

__all__ = [
    "CERTS",
    "DEFAULT_TOPICS",
    "EVENT_TYPES",
    "MAGIC",
    "POLICY",
    "REGISTRY",
    "STREAMS",
    "Appended",
    "CertificateIssued",
    "CertificateRenewed",
    "CertificateRevoked",
    "Codec",
    "DecodeError",
    "Endpoint",
    "EndpointsChanged",
    "Envelope",
    "Event",
    "EventError",
    "EventLog",
    "InvalidEvent",
    "KafkaLog",
    "LogError",
    "LogUnavailable",
    "MeshConfigChanged",
    "Position",
    "Record",
    "ServiceAccountRemoved",
    "ServiceAccountUpserted",
    "ServicePort",
    "ServiceRemoved",
    "ServiceUpserted",
    "SmiResourceApplied",
    "SmiResourceDeleted",
    "SqliteLog",
    "TopicPartition",
    "TopicSetupError",
    "TrustBundleChanged",
    "UnknownSchema",
    "WorkloadJoined",
    "WorkloadLeft",
    "WorkloadPort",
    "default_codec",
    "deterministic_id",
    "ensure_topics",
    "make_event",
    "open_log",
    "schemas_dir",
]
