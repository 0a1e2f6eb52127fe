"""Manifests for tests: the client -> server mesh most end-to-end tests start from.

Role: small writers of YAML documents, so tests state only what differs between them (names,
matches, sources) instead of repeating whole manifests: :func:`mesh_service_yaml` (a
``MeshService``), :func:`route_group_yaml` (an SMI ``HTTPRouteGroup``),
:func:`traffic_target_yaml` (an SMI ``TrafficTarget`` from service accounts to one service
account), :func:`one_vm_service_yaml` (one service on one VM) and
:func:`client_server_yaml`, the three together: service ``server`` backed by VMs
labelled ``app: server`` on port 80 -> 8080, route group ``routes`` and TrafficTarget
``to-server`` letting ``client`` in. Documents are joined with ``---``; apply them with
:meth:`smc.testing.mesh.ControlPlane.apply`, ``smc apply`` or the HTTP API.

Concurrency: pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "client_server_yaml",
    "mesh_service_yaml",
    "one_vm_service_yaml",
    "route_group_yaml",
    "traffic_target_yaml",
]

#: An HTTPRouteGroup match: (name, path regex, methods).
Match = tuple[str, str, Sequence[str]]

GET_API: tuple[Match, ...] = (("get-api", "/api", ("GET",)),)


def mesh_service_yaml(
    namespace: str,
    name: str = "server",
    *,
    app: str | None = None,
    port: int = 80,
    target_port: int = 8080,
    backing: str = "vm",
) -> str:
    """A ``MeshService`` ``namespace/name`` selecting ``app: <app>`` (default: ``name``)."""
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  backing: {backing}\n  selector: {{app: {app or name}}}\n"
        f"  ports: [{{name: http, port: {port}, targetPort: {target_port}}}]\n"
    )


def route_group_yaml(
    namespace: str, name: str = "routes", *, matches: Sequence[Match] = GET_API
) -> str:
    """An ``HTTPRouteGroup`` with one match per ``(name, path regex, methods)``."""
    lines = "".join(
        f'  - {{name: {m}, pathRegex: "{rx}", methods: [{", ".join(methods)}]}}\n'
        for m, rx, methods in matches
    )
    return (
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  matches:\n{lines}"
    )


def traffic_target_yaml(
    namespace: str,
    name: str = "to-server",
    *,
    destination: str = "server",
    sources: Sequence[str] = ("client",),
    route_group: str = "routes",
    matches: Sequence[str] = ("get-api",),
) -> str:
    """A ``TrafficTarget`` letting service accounts ``sources`` reach ``destination`` (all in
    ``namespace``) on the ``matches`` of ``route_group``."""
    srcs = "".join(
        f"  - {{kind: ServiceAccount, name: {s}, namespace: {namespace}}}\n" for s in sources
    )
    return (
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        "spec:\n"
        f"  destination: {{kind: ServiceAccount, name: {destination}, namespace: {namespace}}}\n"
        f"  rules: [{{kind: HTTPRouteGroup, name: {route_group}, "
        f"matches: [{', '.join(matches)}]}}]\n"
        f"  sources:\n{srcs}"
    )


def client_server_yaml(
    namespace: str,
    *,
    matches: Sequence[Match] = GET_API,
    allowed: Sequence[str] | None = None,
    sources: Sequence[str] = ("client",),
    target: str = "to-server",
) -> str:
    """Service ``server``, route group ``routes`` (``matches``) and TrafficTarget ``target``
    letting ``sources`` reach ``server`` on ``allowed`` (default: every match)."""
    return "---\n".join(
        [
            mesh_service_yaml(namespace),
            route_group_yaml(namespace, matches=matches),
            traffic_target_yaml(
                namespace,
                target,
                sources=sources,
                matches=[m[0] for m in matches] if allowed is None else allowed,
            ),
        ]
    )


def one_vm_service_yaml(
    namespace: str = "demo", name: str = "web", *, address: str = "127.0.0.1", port: int = 8080
) -> bytes:
    """An HTTP ``MeshService`` ``namespace/name`` on port ``port`` and its one VM ``<name>-1``
    (service account ``name``) at ``address``, serving the same port: the smallest mesh a proxy
    has a place in."""
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  backing: vm\n  selector: {{app: {name}}}\n"
        f"  ports: [{{name: http, port: {port}, protocol: http}}]\n"
        "---\n"
        "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
        f"metadata: {{name: {name}-1, namespace: {namespace}, labels: {{app: {name}}}}}\n"
        f"spec:\n  address: {address}\n  serviceAccount: {name}\n"
        f"  ports: [{{name: http, port: {port}, protocol: http}}]\n"
    ).encode()
