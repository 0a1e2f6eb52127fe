"""SMI and SMC mesh resources: parsing, validation, normalisation and policy semantics.

Role: pure translation. ``load_documents`` / ``parse_manifest`` turn manifests of every supported
API version (access.smi-spec.io v1alpha1-3, specs.smi-spec.io v1alpha1-4, split.smi-spec.io
v1alpha1-4, smc.dev v1alpha1, policy.openservicemesh.io v1alpha1) into one immutable internal model; ``to_manifest`` writes the
canonical form back; ``check_references`` validates a whole set; ``evaluate`` answers policy
questions (deny by default, permissive mode, splits). No I/O besides parsing given text.
Concurrency: everything is pure functions and immutable values; safe from any task or thread.
"""

from __future__ import annotations

from smc.smi._errors import ManifestError, ManifestErrors, SmiError
from smc.smi._load import MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES, LoadResult, load_documents
from smc.smi._model import (
    Backend,
    HTTPMatch,
    HTTPRouteGroup,
    IdentityRef,
    MeshConfig,
    MeshService,
    Resource,
    RouteRef,
    RuleRef,
    ServicePort,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
    VirtualMachine,
    VirtualMachineGroup,
    WorkloadPort,
    vm_backs_service,
)
from smc.smi._osm_model import (
    OSM_POLICY,
    EgressPolicy,
    EgressPort,
    HTTPLocalRateLimit,
    IngressBackendPolicy,
    IngressBackendTarget,
    IngressSource,
    OutlierDetection,
    RetryPolicy,
    RouteSetting,
    TCPLocalRateLimit,
    UpstreamTrafficSetting,
)
from smc.smi._parse import SUPPORTED, parse_manifest
from smc.smi._policy import (
    ABRoute,
    Grant,
    Policy,
    SplitPlan,
    evaluate,
    http_match_matches,
    split_service_key,
)
from smc.smi._refs import (
    SET_LEVEL_KINDS,
    check_references,
    references_of,
    unresolved_references,
)
from smc.smi._render import resource_key, to_manifest

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_NODES",
    "OSM_POLICY",
    "SET_LEVEL_KINDS",
    "SUPPORTED",
    "ABRoute",
    "Backend",
    "EgressPolicy",
    "EgressPort",
    "Grant",
    "HTTPLocalRateLimit",
    "HTTPMatch",
    "HTTPRouteGroup",
    "IdentityRef",
    "IngressBackendPolicy",
    "IngressBackendTarget",
    "IngressSource",
    "LoadResult",
    "ManifestError",
    "ManifestErrors",
    "MeshConfig",
    "MeshService",
    "OutlierDetection",
    "Policy",
    "Resource",
    "RetryPolicy",
    "RouteRef",
    "RouteSetting",
    "RuleRef",
    "ServicePort",
    "SmiError",
    "SplitPlan",
    "TCPLocalRateLimit",
    "TCPRoute",
    "TrafficSplit",
    "TrafficTarget",
    "UDPRoute",
    "UpstreamTrafficSetting",
    "VirtualMachine",
    "VirtualMachineGroup",
    "WorkloadPort",
    "check_references",
    "evaluate",
    "http_match_matches",
    "load_documents",
    "parse_manifest",
    "references_of",
    "resource_key",
    "split_service_key",
    "to_manifest",
    "unresolved_references",
    "vm_backs_service",
]
