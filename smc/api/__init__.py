"""The declarative mesh API: the mesh-change service (manifests -> events) and its HTTP API.

Role: public API of :mod:`smc.api`. :class:`MeshChanges` plans and appends changes against the
projections (used by ``smc apply``/``smc delete``); :class:`LiveMeshChanges` binds it to a running
projection runner (``smc serve``: HTTP API, VM providers); :func:`create_app` builds the aiohttp
application; the ``*_view`` functions render projections as JSON rows.
Concurrency: see each module; planning reads projections on the thread that feeds them.
"""

from smc.api._changes import (
    BACKS_LABEL_PREFIX,
    MANAGED_BY_LABEL,
    ChangeReport,
    CurrentResources,
    DocumentResult,
    MeshChanges,
    Plan,
    Status,
    current_resources,
)
from smc.api._changes_model import error_dict
from smc.api._errors import ApiError, BodyError, ChangeNotApplied
from smc.api._http import MAX_BODY_BYTES, ApiContext, HttpApi, create_app, start_http
from smc.api._live import LiveMeshChanges
from smc.api._openapi import openapi_document
from smc.api._views import (
    meshconfig_view,
    policies_view,
    policy_check,
    services_view,
    vmgroups_view,
    workloads_view,
)

__all__ = [
    "BACKS_LABEL_PREFIX",
    "MANAGED_BY_LABEL",
    "MAX_BODY_BYTES",
    "ApiContext",
    "ApiError",
    "BodyError",
    "ChangeNotApplied",
    "ChangeReport",
    "CurrentResources",
    "DocumentResult",
    "HttpApi",
    "LiveMeshChanges",
    "MeshChanges",
    "Plan",
    "Status",
    "create_app",
    "current_resources",
    "error_dict",
    "meshconfig_view",
    "openapi_document",
    "policies_view",
    "policy_check",
    "services_view",
    "start_http",
    "vmgroups_view",
    "workloads_view",
]
