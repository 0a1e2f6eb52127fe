"""SMI objects made through a real apiserver's ``CustomObjectsApi``, for tests.

Role: :func:`create_http_traffic_target` creates an HTTPRouteGroup and the TrafficTarget that
allows one service account to call another on its matches. Concurrency: plain blocking calls on
the client given; no state of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["create_http_traffic_target"]


def create_http_traffic_target(
    custom: Any,
    namespace: str,
    *,
    name: str,
    source: str,
    destination: str,
    matches: Sequence[Mapping[str, Any]],
) -> None:
    """Through a ``CustomObjectsApi``: an HTTPRouteGroup ``name`` with ``matches`` (each with a
    ``name``) and a TrafficTarget ``name`` letting service account ``source`` call
    ``destination`` (both of ``namespace``) on all of them."""
    custom.create_namespaced_custom_object(
        "specs.smi-spec.io",
        "v1alpha4",
        namespace,
        "httproutegroups",
        {
            "apiVersion": "specs.smi-spec.io/v1alpha4",
            "kind": "HTTPRouteGroup",
            "metadata": {"name": name},
            "spec": {"matches": [dict(m) for m in matches]},
        },
    )
    custom.create_namespaced_custom_object(
        "access.smi-spec.io",
        "v1alpha3",
        namespace,
        "traffictargets",
        {
            "apiVersion": "access.smi-spec.io/v1alpha3",
            "kind": "TrafficTarget",
            "metadata": {"name": name},
            "spec": {
                "destination": {
                    "kind": "ServiceAccount",
                    "name": destination,
                    "namespace": namespace,
                },
                "sources": [{"kind": "ServiceAccount", "name": source, "namespace": namespace}],
                "rules": [
                    {
                        "kind": "HTTPRouteGroup",
                        "name": name,
                        "matches": [m["name"] for m in matches],
                    }
                ],
            },
        },
    )
