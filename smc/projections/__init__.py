"""Projections: registry, policy and certificate state as pure folds over the log.

Role: public API of the projection layer and the runner that feeds it.
Concurrency: projections are single-threaded; see :mod:`smc.projections._runner`.
"""

from smc.projections._base import Projection, canonical_digest, canonical_json
from smc.projections._certs import CertRecord, CertsProjection, JoinToken, ProxyCertRecord
from smc.projections._checkpoints import CheckpointDir
from smc.projections._errors import CheckpointError, ProjectionError, ProjectionsError
from smc.projections._policy import MeshConfig, PolicyProjection, StoredResource
from smc.projections._policyview import PolicyView
from smc.projections._registry import RegistryProjection, Service, Workload
from smc.projections._runner import Checkpoint, CheckpointStore, ProjectionRunner

__all__ = [
    "CertRecord",
    "CertsProjection",
    "Checkpoint",
    "CheckpointDir",
    "CheckpointError",
    "CheckpointStore",
    "JoinToken",
    "MeshConfig",
    "PolicyProjection",
    "PolicyView",
    "Projection",
    "ProjectionError",
    "ProjectionRunner",
    "ProjectionsError",
    "ProxyCertRecord",
    "RegistryProjection",
    "Service",
    "StoredResource",
    "Workload",
    "all_projections",
    "canonical_digest",
    "canonical_json",
]


def all_projections() -> list[Projection]:
    """Fresh registry, policy and certificate projections."""
    return [RegistryProjection(), PolicyProjection(), CertsProjection()]
