"""The OpenAPI description of the access routes and of the API's authentication.

Role: merged into :func:`smc.api.openapi_document`: the paths of :mod:`smc.api._access`
(``/v1/whoami``, ``/v1/grants``, ``/v1/grants/{name}``, ``/v1/certs``), their schemas, and the
security schemes (bearer token, client certificate) that every operation but the probes
requires (401 without a credential, 403 without the grant).
Concurrency: builds fresh dicts per call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_access"]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def add_access(doc: dict[str, Any]) -> None:
    """Add the access routes, schemas and security requirements to ``doc`` (in place)."""
    errors = _json(_ref("Errors"), "Refused; every problem is listed.")
    denied = {
        "401": _json(_ref("Errors"), "No valid credential (bearer token or client certificate)."),
        "403": _json(_ref("Errors"), "The principal lacks the grant (principal, verb, resource)."),
    }
    doc["paths"].update(
        {
            "/v1/whoami": {
                "get": {
                    "operationId": "whoami",
                    "summary": "The caller's principal as the server authenticated it",
                    "responses": {"200": _json(_ref("Principal"), "The principal.")},
                }
            },
            "/v1/grants": {
                "get": {
                    "operationId": "listGrants",
                    "summary": "AccessGrants (get accessgrants)",
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"items": {"type": "array"}}},
                            "Every grant's manifest.",
                        )
                    },
                }
            },
            "/v1/grants/{name}": {
                "put": {
                    "operationId": "putGrant",
                    "summary": "Create or replace an AccessGrant (apply accessgrants)",
                    "parameters": [_NAME],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/yaml": {"schema": {"type": "string"}},
                            "application/json": {"schema": _ref("AccessGrant")},
                        },
                    },
                    "responses": {"200": _json({"type": "object"}, "Recorded."), "422": errors},
                },
                "delete": {
                    "operationId": "deleteGrant",
                    "summary": "Delete an AccessGrant (delete accessgrants)",
                    "parameters": [_NAME],
                    "responses": {"200": _json({"type": "object"}, "Deleted."), "404": errors},
                },
            },
            "/v1/certs": {
                "get": {
                    "operationId": "listCerts",
                    "summary": "Workload certificates the log records (certs verb; no keys)",
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"items": {"type": "array"}}},
                            "Serial, identity, validity, issuer, fingerprint, status.",
                        )
                    },
                }
            },
        }
    )
    doc["components"]["schemas"].update(
        {
            "Principal": {
                "type": "object",
                "required": ["name", "groups", "method", "actor"],
                "properties": {
                    "name": {"type": "string"},
                    "groups": {"type": "array", "items": {"type": "string"}},
                    "method": {"type": "string"},
                    "actor": {"type": "string"},
                    "impersonatedBy": {"type": "string"},
                },
            },
            "AccessGrant": {
                "type": "object",
                "required": ["apiVersion", "kind", "metadata", "spec"],
                "properties": {
                    "apiVersion": {"const": "smc.dev/v1alpha1"},
                    "kind": {"const": "AccessGrant"},
                    "metadata": {"type": "object"},
                    "spec": {
                        "type": "object",
                        "properties": {
                            k: {"type": "array", "items": {"type": "string"}}
                            for k in ("subjects", "verbs", "resources", "namespaces")
                        },
                    },
                },
            },
        }
    )
    doc["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "clientCertificate": {"type": "mutualTLS"},
    }
    doc["security"] = [{"bearer": []}, {"clientCertificate": []}]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            if path in ("/healthz", "/readyz"):
                op["security"] = []
            else:
                op["responses"] = {**op["responses"], **denied}
