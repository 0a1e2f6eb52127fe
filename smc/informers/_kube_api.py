"""Kubernetes API basics for the informers: where the apiserver is, the watched resources,
and the sinks the informers emit to.

Role: :class:`KubeEndpoint` (address and credentials from a kubeconfig or the in-cluster
files), :class:`KubeResource` and the watched resource lists, the errors the reflectors use
between them, and :class:`EventSink` / :class:`LogSink`. Split from :mod:`smc.informers._kube`
(which re-exports the public names).
Concurrency: immutable values; :class:`LogSink` appends in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from smc.events import (
    Event,
    EventLog,
)
from smc.informers._errors import InformersError

#: Label that puts a namespace in the mesh (value ``true``).
MEMBER_LABEL = "smc.dev/monitored"
_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(InformersError):
    """No usable apiserver address or credentials (kubeconfig, in-cluster files)."""


class _Gone(Exception):
    """The resourceVersion asked for was compacted away (HTTP 410 / watch ERROR 410)."""


class _Transient(Exception):
    """A failure worth retrying (apiserver unavailable, bad gateway, throttled...)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class KubeEndpoint:
    """Where the apiserver is and how to authenticate (bearer token, CA file)."""

    host: str
    token: str = field(repr=False)
    ca_file: str | None = None
    ca_data: str | None = field(default=None, repr=False)  # PEM, instead of ca_file

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)

    @classmethod
    def in_cluster(cls) -> KubeEndpoint:
        """From the pod's service-account files and ``KUBERNETES_SERVICE_HOST/PORT``."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token = _SA_DIR / "token"
        if not host or not token.is_file():
            raise KubeConfigError(
                f"not running in a pod: KUBERNETES_SERVICE_HOST or {token} is missing"
            )
        h = f"[{host}]" if ":" in host else host
        return cls(
            host=f"https://{h}:{port}",
            token=token.read_text().strip(),
            ca_file=str(_SA_DIR / "ca.crt"),
        )

    @classmethod
    def from_kubeconfig(cls, path: str | Path, *, context: str | None = None) -> KubeEndpoint:
        """From a kubeconfig whose user has a ``token`` (or ``tokenFile``)."""
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"{path}: cannot read kubeconfig: {exc}") from exc
        if not isinstance(doc, dict):
            raise KubeConfigError(f"{path}: a kubeconfig must be a mapping")

        def named(section: str, name: object) -> dict[str, Any]:
            for item in doc.get(section) or []:
                if isinstance(item, dict) and item.get("name") == name:
                    value = item.get(section[:-1])
                    if isinstance(value, dict):
                        return value
            raise KubeConfigError(f"{path}: {section[:-1]} {name!r} not found")

        ctx = named("contexts", context or doc.get("current-context"))
        cluster = named("clusters", ctx.get("cluster"))
        user = named("users", ctx.get("user"))
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = Path(str(user["tokenFile"])).read_text().strip()
        if not isinstance(token, str) or not token:
            raise KubeConfigError(f"{path}: user {ctx.get('user')!r} has no bearer token")
        server = cluster.get("server")
        if not isinstance(server, str) or not server.startswith("https://"):
            raise KubeConfigError(f"{path}: cluster server {server!r} is not an https URL")
        ca = cluster.get("certificate-authority")
        ca_data = None
        if cluster.get("certificate-authority-data"):
            try:
                ca_data = base64.b64decode(str(cluster["certificate-authority-data"])).decode()
            except ValueError as exc:
                raise KubeConfigError(f"{path}: certificate-authority-data: {exc}") from exc
        return cls(
            host=server.rstrip("/"),
            token=token,
            ca_file=str(ca) if ca and not ca_data else None,
            ca_data=ca_data,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class KubeResource:
    """One watched resource type: ``kind`` and where its collection lives."""

    kind: str
    group: str
    version: str
    plural: str

    @property
    def path(self) -> str:
        """Cluster-wide collection path, e.g. ``/api/v1/pods``."""
        if not self.group:
            return f"/api/{self.version}/{self.plural}"
        return f"/apis/{self.group}/{self.version}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


NAMESPACES = KubeResource(kind="Namespace", group="", version="v1", plural="namespaces")
CORE_RESOURCES: tuple[KubeResource, ...] = (
    KubeResource(kind="ServiceAccount", group="", version="v1", plural="serviceaccounts"),
    KubeResource(kind="Service", group="", version="v1", plural="services"),
    KubeResource(
        kind="EndpointSlice", group="discovery.k8s.io", version="v1", plural="endpointslices"
    ),
    KubeResource(kind="Pod", group="", version="v1", plural="pods"),
)
#: The SMI kinds, each watched at its newest (storage) version.
SMI_RESOURCES: tuple[KubeResource, ...] = (
    KubeResource(
        kind="TrafficTarget",
        group="access.smi-spec.io",
        version="v1alpha3",
        plural="traffictargets",
    ),
    KubeResource(
        kind="HTTPRouteGroup",
        group="specs.smi-spec.io",
        version="v1alpha4",
        plural="httproutegroups",
    ),
    KubeResource(
        kind="TCPRoute", group="specs.smi-spec.io", version="v1alpha4", plural="tcproutes"
    ),
    KubeResource(
        kind="UDPRoute", group="specs.smi-spec.io", version="v1alpha4", plural="udproutes"
    ),
    KubeResource(
        kind="TrafficSplit", group="split.smi-spec.io", version="v1alpha4", plural="trafficsplits"
    ),
    # Open Service Mesh's policy kinds (deploy/k8s/crds/policy-*.yaml).
    *(
        KubeResource(
            kind=kind, group="policy.openservicemesh.io", version="v1alpha1", plural=plural
        )
        for kind, plural in (
            ("Egress", "egresses"),
            ("IngressBackend", "ingressbackends"),
            ("Retry", "retries"),
            ("UpstreamTrafficSetting", "upstreamtrafficsettings"),
        )
    ),
)


@runtime_checkable
class EventSink(Protocol):
    """Receives the informers' events, in order; returns once they are durable."""

    async def emit(self, events: Sequence[Event]) -> None: ...


class LogSink:
    """Appends to an :class:`smc.events.EventLog` (in a worker thread)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    async def emit(self, events: Sequence[Event]) -> None:
        if events:
            await asyncio.to_thread(self.log.append, list(events))
