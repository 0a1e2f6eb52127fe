"""The OpenAPI 3.1 document of SMC's HTTP API (served at ``/openapi.json``).

Role: a hand-written, complete description of every endpoint of :mod:`smc.api._http`, its
parameters, request bodies and response schemas. The test suite checks that every route the
server registers is described here.
Concurrency: builds a fresh dict per call; no shared state.
"""

from __future__ import annotations

from typing import Any

from smc.api._openapi_access import add_access

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = _json(_ref("Errors"), "The request was refused; every problem is listed.")


def _change_op(verb: str, summary: str, extra: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "operationId": verb,
        "summary": summary,
        "parameters": [
            {
                "name": "X-Request-Id",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 200},
                "description": "Idempotency key: events get ids derived from it, so a retried "
                "request is applied once. Generated when absent.",
            },
            {
                "name": "X-SMC-Actor",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 253},
                "description": "Act as this name (impersonation: needs the impersonate grant; "
                "events record 'PRINCIPAL as NAME'). Default: the authenticated principal.",
            },
            *extra,
        ],
        "requestBody": {
            "required": True,
            "description": "Manifests: multi-document YAML, JSON (an object or an array), or a "
            'JSON envelope {"documents": [...]}. At most 4 MiB.',
            "content": {
                "application/yaml": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}},
                "application/json": {
                    "schema": {
                        "oneOf": [
                            _ref("DocumentsEnvelope"),
                            _ref("Manifest"),
                            {"type": "array", "items": _ref("Manifest")},
                        ]
                    }
                },
            },
        },
        "responses": {
            "200": _json(_ref("ChangeReport"), "Every document was applied (or unchanged)."),
            "400": _ERRORS,
            "413": _ERRORS,
            "422": _json(
                _ref("ChangeReport"),
                "Some documents were refused (listed in errors); the valid ones were applied.",
            ),
            "500": _ERRORS,
            "503": _ERRORS,
            "504": _ERRORS,
            "507": _ERRORS,
        },
    }


def _list_op(op: str, summary: str, item: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "operationId": op,
        "summary": summary,
        "parameters": params,
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "required": ["items"],
                    "properties": {"items": {"type": "array", "items": _ref(item)}},
                },
                summary,
            )
        },
    }


def openapi_document(*, server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document (``server_url``: where the API is served, if known)."""
    str_map = {"type": "object", "additionalProperties": {"type": "string"}}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "SMC mesh API",
            "version": "1",
            "description": "Declarative API of SMC, an event-sourced service mesh control "
            "plane: apply and delete SMI resources, MeshServices, VirtualMachines and the "
            "MeshConfig; read services, workloads and policies from the projections.",
        },
        "paths": {
            "/v1/apply": {
                "post": _change_op(
                    "apply",
                    "Create or update resources (kubectl apply)",
                    [
                        {
                            "name": "dryRun",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean"},
                            "description": "Report what would change; append nothing.",
                        }
                    ],
                )
            },
            "/v1/delete": {
                "post": _change_op(
                    "delete",
                    "Delete resources named by manifests (kubectl delete -f)",
                    [
                        {
                            "name": "ignoreNotFound",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean"},
                        },
                        {
                            "name": "dryRun",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean"},
                        },
                    ],
                )
            },
            "/v1/services": {"get": _list_op("listServices", "Mesh services", "Service", [])},
            "/v1/workloads": {
                "get": _list_op("listWorkloads", "Workloads (pods and VMs)", "Workload", [])
            },
            "/v1/vmgroups": {
                "get": _list_op(
                    "listVmGroups",
                    "VirtualMachineGroups: provider status and instances",
                    "VmGroup",
                    [],
                )
            },
            "/v1/policies": {
                "get": _list_op(
                    "listPolicies",
                    "Stored SMI resources",
                    "PolicyResource",
                    [
                        {
                            "name": "kind",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "string",
                                "enum": [
                                    "TrafficTarget",
                                    "HTTPRouteGroup",
                                    "TCPRoute",
                                    "UDPRoute",
                                    "TrafficSplit",
                                ],
                            },
                        }
                    ],
                )
            },
            "/v1/meshconfig": {
                "get": {
                    "operationId": "getMeshConfig",
                    "summary": "The mesh configuration in force",
                    "responses": {"200": _json(_ref("MeshConfig"), "The mesh configuration.")},
                }
            },
            "/v1/policy/check": {
                "get": {
                    "operationId": "checkPolicy",
                    "summary": "May one identity reach another (on this path/method/port)?",
                    "parameters": [
                        {
                            "name": "from",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[^/]+/[^/]+$"},
                            "description": "Source identity ns/serviceaccount.",
                        },
                        {
                            "name": "to",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[^/]+/[^/]+$"},
                            "description": "Destination identity ns/serviceaccount.",
                        },
                        {"name": "path", "in": "query", "schema": {"type": "string"}},
                        {"name": "method", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "port",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 65535},
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("PolicyDecision"), "The decision."),
                        "400": _ERRORS,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness",
                    "responses": {
                        "200": _json(_ref("Status"), "The server is running."),
                        "500": _json(
                            _ref("Status"), "The log is corrupt (reason names the record)."
                        ),
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: projections caught up and the log readable/writable",
                    "responses": {
                        "200": _json(_ref("Status"), "Caught up."),
                        "503": _json(
                            _ref("Status"), "Still replaying the log, or the log is unavailable."
                        ),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
                }
            },
        },
        "components": {
            "schemas": {
                "Manifest": {
                    "type": "object",
                    "required": ["apiVersion", "kind", "metadata"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": {"type": "object"},
                    },
                },
                "DocumentsEnvelope": {
                    "type": "object",
                    "required": ["documents"],
                    "properties": {"documents": {"type": "array", "items": _ref("Manifest")}},
                },
                "Error": {
                    "type": "object",
                    "required": ["document", "field", "reason"],
                    "properties": {
                        "document": {
                            "type": ["string", "null"],
                            "description": "Kind/ns/name, or source#N for unreadable documents.",
                        },
                        "kind": {"type": ["string", "null"]},
                        "name": {"type": ["string", "null"]},
                        "field": {
                            "type": "string",
                            "description": "Field path, e.g. spec.rules[0].",
                        },
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
                "Errors": {
                    "type": "object",
                    "required": ["errors"],
                    "properties": {"errors": {"type": "array", "items": _ref("Error")}},
                },
                "DocumentResult": {
                    "type": "object",
                    "required": ["document", "status", "errors"],
                    "properties": {
                        "document": {"type": "string"},
                        "kind": {"type": ["string", "null"]},
                        "name": {"type": ["string", "null"]},
                        "status": {
                            "enum": [
                                "created",
                                "configured",
                                "unchanged",
                                "deleted",
                                "not found",
                                "error",
                            ]
                        },
                        "errors": {"type": "array", "items": _ref("Error")},
                    },
                },
                "ChangeReport": {
                    "type": "object",
                    "required": ["ok", "results", "errors", "events"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "requestId": {"type": "string"},
                        "actor": {"type": "string"},
                        "dryRun": {"type": "boolean"},
                        "results": {"type": "array", "items": _ref("DocumentResult")},
                        "errors": {"type": "array", "items": _ref("Error")},
                        "events": {"type": "integer", "description": "Events appended."},
                        "duplicates": {
                            "type": "integer",
                            "description": "Events the log already held (a retried request).",
                        },
                    },
                },
                "Port": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "port": {"type": "integer"},
                        "protocol": {"enum": ["http", "grpc", "tcp", "udp"]},
                        "targetPort": {"type": "integer"},
                    },
                },
                "Service": {
                    "type": "object",
                    "required": ["namespace", "name", "backing", "ports"],
                    "properties": {
                        "namespace": {"type": "string"},
                        "name": {"type": "string"},
                        "backing": {"enum": ["kubernetes", "vm"]},
                        "ports": {"type": "array", "items": _ref("Port")},
                        "selector": str_map,
                        "managedBy": {"type": ["string", "null"]},
                        "endpoints": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "address": {"type": "string"},
                                    "port": {"type": "integer"},
                                    "workload": {"type": ["string", "null"]},
                                    "ready": {"type": "boolean"},
                                },
                            },
                        },
                    },
                },
                "VmGroup": {
                    "type": "object",
                    "required": ["namespace", "name", "status", "instances"],
                    "properties": {
                        "namespace": {"type": "string"},
                        "name": {"type": "string"},
                        "provider": {"type": ["string", "null"]},
                        "cloudGroup": {"type": ["string", "null"]},
                        "selector": {"type": "object"},
                        "status": {"enum": ["ok", "stale", "removed"]},
                        "reason": {"type": "string"},
                        "joined": {"type": "integer"},
                        "draining": {"type": "integer"},
                        "instances": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "Workload": {
                    "type": "object",
                    "required": ["kind", "namespace", "name", "address", "serviceAccount"],
                    "properties": {
                        "kind": {"enum": ["pod", "vm"]},
                        "namespace": {"type": "string"},
                        "name": {"type": "string"},
                        "address": {"type": "string"},
                        "serviceAccount": {"type": "string"},
                        "identity": {"type": "string"},
                        "labels": str_map,
                        "services": {"type": "array", "items": {"type": "string"}},
                        "managedBy": {"type": ["string", "null"]},
                        "ports": {"type": "array", "items": _ref("Port")},
                    },
                },
                "PolicyResource": {
                    "type": "object",
                    "required": ["kind", "namespace", "name", "apiVersion", "manifest"],
                    "properties": {
                        "kind": {"type": "string"},
                        "namespace": {"type": "string"},
                        "name": {"type": "string"},
                        "apiVersion": {"type": "string"},
                        "manifest": _ref("Manifest"),
                    },
                },
                "MeshConfig": {
                    "type": "object",
                    "required": ["permissiveTrafficMode", "trustDomain"],
                    "properties": {
                        "resource": {"type": ["string", "null"]},
                        "permissiveTrafficMode": {"type": "boolean"},
                        "trustDomain": {"type": "string"},
                        "certificateLifetimeSeconds": {"type": "integer"},
                        "settings": str_map,
                    },
                },
                "PolicyDecision": {
                    "type": "object",
                    "required": ["allowed", "decision", "reason"],
                    "properties": {
                        "allowed": {"type": "boolean"},
                        "decision": {"enum": ["allow", "deny"]},
                        "reason": {"type": "string"},
                        "source": {"type": "string"},
                        "destination": {"type": "string"},
                        "sourceSpiffeId": {"type": "string"},
                        "destinationSpiffeId": {"type": "string"},
                        "grants": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "Status": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": {"type": "string"},
                        "position": {"type": "object"},
                        "applied": {"type": "integer"},
                        "reason": {"type": "string"},
                        "log": {"type": "object"},
                    },
                },
            }
        },
    }
    add_access(doc)
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
