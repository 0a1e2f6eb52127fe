"""Validation and normalisation of OSM's policy kinds (``policy.openservicemesh.io/v1alpha1``).

Role: the parsers :mod:`smc.smi._parse` dispatches to for Egress, IngressBackend, Retry and
UpstreamTrafficSetting. OSM manifests are accepted as OSM wrote them (same fields, same
defaults); every problem is reported with its field path, like every other kind. Each parser
also builds the normalised spec (durations as Go durations, CIDRs compressed, lists sorted
where order carries no meaning) kept as ``spec_json``.
SMC extensions, documented in docs/traffic-policy.md: ``UpstreamTrafficSetting.spec.
outlierDetection`` and ``spec.httpRoutes[].timeout``.
Layout: shared helpers in :mod:`smc.smi._osm_common`; Egress and IngressBackend in
:mod:`smc.smi._osm_access`; Retry in :mod:`smc.smi._osm_retry`; UpstreamTrafficSetting in
:mod:`smc.smi._osm_upstream`; ``MeshConfig.spec.observability`` in
:mod:`smc.smi._osm_observability`. This module is the thin entry the rest of smc imports.
Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

from typing import Any

from smc.smi._osm_access import _egress, _ingress_backend
from smc.smi._osm_common import format_go_duration
from smc.smi._osm_observability import DEFAULT_ACCESS_LOG_PATH, observability_json
from smc.smi._osm_retry import _retry
from smc.smi._osm_upstream import _upstream

__all__ = ["DEFAULT_ACCESS_LOG_PATH", "OSM_PARSERS", "format_go_duration", "observability_json"]

OSM_PARSERS: dict[str, Any] = {
    "Egress": _egress,
    "IngressBackend": _ingress_backend,
    "Retry": _retry,
    "UpstreamTrafficSetting": _upstream,
}
