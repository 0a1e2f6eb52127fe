"""Validation of ``VirtualMachineGroup`` manifests (smc.dev/v1alpha1).

Role: the parser :mod:`smc.smi._parse` dispatches to for kind ``VirtualMachineGroup``; it reads
the template (service account, labels, ports, services), the membership (``spec.provider``:
a provider name plus a cloud group or a tag selector) and the drain and join-token settings,
reporting every problem with its field path. Kept in its own module so the shared parser only
carries a one-line hook.

Manifest::

    apiVersion: smc.dev/v1alpha1
    kind: VirtualMachineGroup
    metadata: {name: web, namespace: shop}
    spec:
      template:
        metadata: {labels: {app: web}}
        serviceAccount: web
        ports: [{name: http, port: 8080}]
        services: [web]
      provider: {name: aws, group: web-asg, region: us-east-1}   # or selector: {role: web}
      drain: 10s
      joinTokenTTL: 10m
      readiness: proxy      # traffic once the instance's proxy ACKed its config (or: running)

Concurrency: pure functions over their arguments; safe everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from smc.smi._model import VirtualMachineGroup, WorkloadPort

if TYPE_CHECKING:
    from smc.smi._reader import _Reader

__all__ = ["RESERVED_LABEL_PREFIXES", "parse_vm_group", "vm_group_manifest"]

#: Label prefixes only SMC may set on a workload (group membership, ownership, drain state).
RESERVED_LABEL_PREFIXES = ("smc.dev/", "backs.smc.dev/")

_MAX_DRAIN = 3600
_MIN_TOKEN, _MAX_TOKEN = 60, 86400


def parse_vm_group(
    r: _Reader, obj: Mapping[str, object], version: str, namespace: str, name: str
) -> VirtualMachineGroup:
    """Read one VirtualMachineGroup (``r`` collects the errors; raises its abort on failure)."""
    from smc.smi._parse_smc import _duration, _unique_names, _workload_ports
    from smc.smi._reader import _Abort, _body, _join

    body, base = _body(
        r,
        obj,
        top_level=False,
        allowed=("template", "provider", "drain", "joinTokenTTL", "readiness"),
        required=("template", "provider"),
    )
    if len(name) > 63:
        r.fail("metadata.name", f"a group name is at most 63 characters, got {len(name)}")
    tp = _join(base, "template")
    template = r.mapping(
        body.get("template"),
        tp,
        allowed=("metadata", "serviceAccount", "ports", "services"),
        required=("serviceAccount",),
    )
    sa: str | None = None
    labels: tuple[tuple[str, str], ...] | None = ()
    ports: list[WorkloadPort] = []
    services: list[str] = []
    if template is not None:
        mp = _join(tp, "metadata")
        meta = template.get("metadata")
        if meta is not None:
            m = r.mapping(meta, mp, allowed=("labels",))
            if m is not None:
                labels = r.labels(m.get("labels"), _join(mp, "labels"))
                for k, _ in labels or ():
                    if k.startswith(RESERVED_LABEL_PREFIXES):
                        r.fail(_join(_join(mp, "labels"), k), f"label {k!r} is reserved for SMC")
        sa = r.dns_subdomain(template.get("serviceAccount"), _join(tp, "serviceAccount"))
        ports = _workload_ports(r, template.get("ports"), _join(tp, "ports"))
        services = _unique_names(r, template.get("services"), _join(tp, "services"), r.dns_label)
    pvp = _join(base, "provider")
    provider = r.mapping(
        body.get("provider"),
        pvp,
        allowed=("name", "group", "selector", "region"),
        required=("name",),
    )
    provider_name: str | None = None
    cloud_group: str | None = None
    selector: tuple[tuple[str, str], ...] | None = ()
    region: str | None = None
    if provider is not None:
        provider_name = r.dns_label(provider.get("name"), _join(pvp, "name"))
        if provider.get("group") is not None:
            cloud_group = r.string(provider.get("group"), _join(pvp, "group"), max_len=255)
        selector = r.labels(provider.get("selector"), _join(pvp, "selector"))
        if provider.get("region") is not None:
            region = r.dns_label(provider.get("region"), _join(pvp, "region"))
        if provider.get("group") is not None and provider.get("selector") is not None:
            r.fail(pvp, "give either group (a cloud group) or selector (instance labels), not both")
        elif provider.get("group") is None and not selector:
            r.fail(
                pvp,
                "membership is missing: give group (a cloud group such as an Auto Scaling "
                "group) or a non-empty selector (instance labels)",
            )
    drain = 10
    if body.get("drain") is not None:
        dp = _join(base, "drain")
        seconds = _duration(r, body.get("drain"), dp)
        if seconds is not None:
            if seconds > _MAX_DRAIN:
                r.fail(dp, f"must be at most 1h, got {seconds}s")
            else:
                drain = seconds
    token = 600
    if body.get("joinTokenTTL") is not None:
        kp = _join(base, "joinTokenTTL")
        seconds = _duration(r, body.get("joinTokenTTL"), kp)
        if seconds is not None:
            if not _MIN_TOKEN <= seconds <= _MAX_TOKEN:
                r.fail(kp, f"must be between 1m and 24h, got {seconds}s")
            else:
                token = seconds
    readiness = body.get("readiness") or "proxy"
    if readiness not in ("proxy", "running"):
        r.fail(_join(base, "readiness"), f"must be proxy or running, got {readiness!r}")
    if r.errors or sa is None or provider_name is None or labels is None or selector is None:
        raise _Abort
    return VirtualMachineGroup(
        namespace=namespace,
        name=name,
        service_account=sa,
        labels=labels,
        ports=tuple(ports),
        services=tuple(sorted(services)),
        provider=provider_name,
        cloud_group=cloud_group,
        selector=selector,
        region=region,
        drain_seconds=drain,
        join_token_seconds=token,
        readiness="running" if readiness == "running" else "proxy",
    )


def vm_group_manifest(group: VirtualMachineGroup) -> dict[str, object]:
    """The canonical manifest of ``group`` (``parse`` of it gives ``group`` back)."""
    template: dict[str, object] = {
        "serviceAccount": group.service_account,
        "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol} for p in group.ports],
        "services": list(group.services),
    }
    if group.labels:
        template["metadata"] = {"labels": dict(group.labels)}
    provider: dict[str, object] = {"name": group.provider}
    if group.cloud_group is not None:
        provider["group"] = group.cloud_group
    else:
        provider["selector"] = dict(group.selector)
    if group.region is not None:
        provider["region"] = group.region
    return {
        "apiVersion": "smc.dev/v1alpha1",
        "kind": "VirtualMachineGroup",
        "metadata": {"name": group.name, "namespace": group.namespace},
        "spec": {
            "template": template,
            "provider": provider,
            "drain": f"{group.drain_seconds}s",
            "joinTokenTTL": f"{group.join_token_seconds}s",
            "readiness": group.readiness,
        },
    }
