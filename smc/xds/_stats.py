"""The mesh's labels on Envoy's own statistics (Prometheus ``/stats/prometheus``).

Role: :func:`mesh_stats_config` is the bootstrap ``stats_config`` of a sidecar: every stat
carries fixed tags ``smc_namespace`` and ``smc_workload`` (from the node id
``<namespace>/<workload>``) besides Envoy's default tags (``envoy_cluster_name`` and so on),
so a Prometheus scrape of any proxy says which mesh workload it is. Used by every bootstrap
SMC writes (injector, VM bootstrap, test harness).
Concurrency: a pure function.
"""

from __future__ import annotations

from typing import Any

__all__ = ["mesh_stats_config"]


def mesh_stats_config(node_id: str) -> dict[str, Any]:
    """Bootstrap ``stats_config`` tagging every stat with the node's namespace and workload."""
    namespace, _, workload = node_id.partition("/")
    tags = [{"tag_name": "smc_namespace", "fixed_value": namespace}]
    if workload:
        tags.append({"tag_name": "smc_workload", "fixed_value": workload})
    return {"stats_tags": tags, "use_all_default_tags": True}
