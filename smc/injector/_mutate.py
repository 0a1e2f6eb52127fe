"""Sidecar injection as a pure translation: a Pod in, the JSONPatch that adds SMC's proxy out.

Role: :func:`injection_decision` says whether a pod gets the sidecar: its namespace must carry
the label ``smc.dev/inject=enabled`` (opt-in), the pod must not carry the annotation
``smc.dev/inject: "false"`` (opt-out), nor use the host network, nor already carry the sidecar
(the ``smc.dev/status`` annotation or a container named ``smc-proxy``): re-invocation is a no-op.
:func:`mutate` returns the RFC 6902 operations that add

- ``smc-init``, an init container (``NET_ADMIN``/``NET_RAW``) whose iptables rules (nat table)
  redirect inbound TCP to the proxy's inbound port (default 15006) and outbound TCP to the
  outbound listener (15001, :data:`smc.xds.OUTBOUND_PORT`), excluding the proxy's own UID/GID,
  loopback, the proxy's ports, and the ports/CIDRs the pod excludes by annotation
  (``smc.dev/exclude-inbound-ports: "9090,9091"``, ``smc.dev/exclude-outbound-cidrs:
  "10.0.0.0/8"``);
- ``smc-proxy``, the Envoy container (image configurable), running as the proxy UID with a
  read-only root filesystem; its bootstrap is inline (env ``SMC_ENVOY_BOOTSTRAP``, passed with
  ``--config-yaml``: no ConfigMap), with node id ``<namespace>/<pod name>`` (the node-id scheme
  of :mod:`smc.xds`; for a pod named by ``generateName`` the id is completed from the pod's own
  name at start via ``--service-node``), the ADS address of the control plane, and, with TLS,
  the bootstrap certificate, key and trust bundle from SMC's CA in env variables that the
  bootstrap reads as Envoy data sources (mTLS to the control plane); or, when the credentials
  carry a Secret name (the webhook's default: no key in the pod spec), from that per-pod
  Secret (named in the ``smc.dev/bootstrap-secret`` annotation) mounted read-only at
  ``/etc/smc/bootstrap``, read through file-based SDS with the directory watched, so a renewed
  Secret reaches the running proxy;
- with :attr:`InjectorConfig.agent` (``--credentials agent``): no credential at all. An
  ``smc-agent`` native sidecar (an init container with ``restartPolicy: Always``: the SMC
  image, ``python -m smc.agent``, the proxy's UID, so its traffic to the control plane is not
  redirected and Envoy may read its files) makes the proxy's key in the pod, proves the pod
  with a projected service-account token (volume ``smc-token``: audience-bound, expiring,
  mounted in that container only) and writes the certificate and key to
  ``/var/run/smc/smc-sds/default.json`` (0640, directory 0750) in the shared
  ``smc-proxy-run`` volume, an ``emptyDir`` of medium ``Memory``, so the key never touches a
  disk. Its startup probe passes once that file exists, so the kubelet starts Envoy (working
  directory ``/var/run/smc``) only then; Envoy reads the file with file-based SDS for its ADS
  client certificate and its listeners, reloading it on every renewal, and verifies the
  control plane with the mesh trust bundle (public, inline in the env). The patch, the pod
  spec and every Secret then hold no key nor token: a forged AdmissionReview gets nothing
  secret;
- the ``smc-proxy-run`` emptyDir volume (Envoy's writable working directory), the
  ``smc.dev/status`` and ``smc.dev/node-id`` annotations, and the label
  ``smc.dev/interception: iptables``, which the informers carry into the registry and which
  makes the xDS builder give this proxy transparent listeners (``0.0.0.0:15006`` inbound,
  ``0.0.0.0:15001`` outbound, matching on the original destination) instead of explicit ones.

Concurrency: pure functions and immutable values; safe everywhere. Issuing the bootstrap
certificate is I/O and happens outside (see :mod:`smc.injector._server`).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from smc.agent._files import SDS_DIR, SECRET_FILE
from smc.injector._bootstrap import AdsAddress, TlsSources, envoy_bootstrap
from smc.injector._errors import InjectorError, InvalidPod
from smc.injector._probes import (
    ANNOTATION_ORIGINAL_PROBES,
    plan_probes,
    probe_static_resources,
)

__all__ = [
    "AGENT_CONTAINER",
    "AGENT_SECRET",
    "ANNOTATION_BOOTSTRAP_SECRET",
    "ANNOTATION_EXCLUDE_INBOUND",
    "ANNOTATION_EXCLUDE_OUTBOUND",
    "ANNOTATION_INJECT",
    "ANNOTATION_NODE_ID",
    "ANNOTATION_STATUS",
    "BOOTSTRAP_MOUNT",
    "BOOTSTRAP_VOLUME",
    "INIT_CONTAINER",
    "LABEL_INTERCEPTION",
    "NAMESPACE_LABEL",
    "PROXY_CONTAINER",
    "PROXY_DIR",
    "PROXY_VOLUME",
    "TOKEN_VOLUME",
    "AgentSidecar",
    "BootstrapCredentials",
    "Decision",
    "InjectorConfig",
    "injection_decision",
    "mutate",
    "pod_identity",
    "redirect_commands",
]

NAMESPACE_LABEL = "smc.dev/inject"
ANNOTATION_INJECT = "smc.dev/inject"
ANNOTATION_STATUS = "smc.dev/status"
ANNOTATION_NODE_ID = "smc.dev/node-id"
ANNOTATION_EXCLUDE_INBOUND = "smc.dev/exclude-inbound-ports"
ANNOTATION_EXCLUDE_OUTBOUND = "smc.dev/exclude-outbound-cidrs"
PROXY_CONTAINER = "smc-proxy"
INIT_CONTAINER = "smc-init"
PROXY_VOLUME = "smc-proxy-run"
#: Same value as :data:`smc.xds.INTERCEPTION_LABEL` (not imported: the webhook stays light).
LABEL_INTERCEPTION = "smc.dev/interception"
ENV_BOOTSTRAP = "SMC_ENVOY_BOOTSTRAP"
ENV_CERT = "SMC_PROXY_CERT"
ENV_KEY = "SMC_PROXY_KEY"
ENV_CA = "SMC_PROXY_CA"
#: Pod annotation naming the Secret that holds the proxy's bootstrap credentials.
ANNOTATION_BOOTSTRAP_SECRET = "smc.dev/bootstrap-secret"
#: Where the proxy mounts its bootstrap Secret (read through file-based SDS, watched).
BOOTSTRAP_MOUNT = "/etc/smc/bootstrap"
BOOTSTRAP_VOLUME = "smc-bootstrap"
AGENT_CONTAINER = "smc-agent"
#: Envoy's working directory, the shared ``smc-proxy-run`` volume: the agent's proxy dir.
PROXY_DIR = "/var/run/smc"
#: The file the agent writes and Envoy reads (file-based SDS, relative to :data:`PROXY_DIR`).
AGENT_SECRET = f"{PROXY_DIR}/{SDS_DIR}/{SECRET_FILE}"
TOKEN_VOLUME = "smc-token"
TOKEN_MOUNT = "/var/run/secrets/smc"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SA = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentSidecar:
    """The SMC agent the injector adds beside Envoy (see the module docstring)."""

    image: str = "smc:latest"
    ca_address: str = "smc.smc-system.svc:15012"  # the certificate service
    ca_pem: str = ""  # the mesh trust bundle (public): verifies the control plane
    audience: str = "smc"
    token_seconds: int = 3600
    server_name: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class InjectorConfig:
    """What the injector adds to a pod."""

    ads: AdsAddress
    proxy_image: str = "envoyproxy/envoy:v1.40.0"
    init_image: str = "alpine:3.20"
    #: Shell run in the init container before the rules (empty when the image has iptables).
    init_install: str = "apk add --no-cache iptables >/dev/null"
    trust_domain: str = "cluster.local"
    tls: bool = True
    #: SNI and required DNS SAN of the control plane's certificate (None: no SAN check).
    ads_server_name: str | None = None
    delta: bool = False
    proxy_uid: int = 1337
    inbound_port: int = 15006
    outbound_port: int = 15001
    admin_port: int = 15000
    log_level: str = "info"
    bootstrap_lifetime: timedelta = timedelta(hours=24)
    #: The SMC agent beside Envoy makes the proxy's key (no credential in the pod spec).
    agent: AgentSidecar | None = None
    proxy_resources: Mapping[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class BootstrapCredentials:
    """The proxy's bootstrap certificate (PEM chain), key and the trust bundle. With
    ``secret_name`` they live in that Secret of the pod's namespace (the files of
    :func:`~smc.injector._bootstrap.watched_tls_files`), mounted at :data:`BOOTSTRAP_MOUNT`,
    and the pod spec only refers to it; without, they are inline in the proxy's environment."""

    cert_pem: str
    key_pem: str = field(repr=False)
    ca_pem: str
    secret_name: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """Whether to inject, and why (the webhook logs the reason)."""

    inject: bool
    reason: str


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidPod(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPod(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _check_pod(pod: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(pod, dict):
        raise InvalidPod(f"pod: expected an object, got {type(pod).__name__}")
    if pod.get("kind", "Pod") != "Pod":
        raise InvalidPod(f"kind: expected Pod, got {pod.get('kind')!r}")
    meta = _obj(pod.get("metadata"), "metadata")
    spec = _obj(pod.get("spec"), "spec")
    containers = _list(spec.get("containers"), "spec.containers")
    if not containers:
        raise InvalidPod("spec.containers: a pod needs at least one container")
    for i, c in enumerate(containers):
        _obj(c, f"spec.containers[{i}]")
    for i, c in enumerate(_list(spec.get("initContainers"), "spec.initContainers")):
        _obj(c, f"spec.initContainers[{i}]")
    _list(spec.get("volumes"), "spec.volumes")
    annotations = _obj(meta.get("annotations"), "metadata.annotations")
    for k, v in annotations.items():
        if not isinstance(v, str):
            raise InvalidPod(f"metadata.annotations[{k!r}]: expected a string")
    return meta, spec


def injection_decision(pod: Any, *, namespace_labels: Mapping[str, str]) -> Decision:
    """Should ``pod`` get the sidecar? Raises :class:`InvalidPod` for a malformed pod."""
    meta, spec = _check_pod(pod)
    annotations = _obj(meta.get("annotations"), "metadata.annotations")
    if namespace_labels.get(NAMESPACE_LABEL) != "enabled":
        return Decision(inject=False, reason=f"namespace lacks label {NAMESPACE_LABEL}=enabled")
    flag = annotations.get(ANNOTATION_INJECT)
    if flag is not None and flag.strip().lower() in ("false", "no", "0", "disabled"):
        return Decision(inject=False, reason=f"pod annotation {ANNOTATION_INJECT}={flag!r}")
    if ANNOTATION_STATUS in annotations:
        return Decision(inject=False, reason="already injected (smc.dev/status present)")
    names = {c.get("name") for c in _list(spec.get("containers"), "spec.containers")}
    names |= {c.get("name") for c in _list(spec.get("initContainers"), "spec.initContainers")}
    if PROXY_CONTAINER in names or INIT_CONTAINER in names:
        return Decision(inject=False, reason=f"already injected ({PROXY_CONTAINER} present)")
    if spec.get("hostNetwork") is True:
        return Decision(inject=False, reason="pod uses the host network")
    return Decision(inject=True, reason="namespace opted in")


def pod_identity(pod: Any, *, namespace: str | None = None) -> tuple[str, str, str | None]:
    """``(namespace, service account, pod name or None when only generateName is set)``."""
    meta, spec = _check_pod(pod)
    ns = meta.get("namespace") or namespace
    if not isinstance(ns, str) or not _NAME.match(ns):
        raise InvalidPod(f"metadata.namespace: {ns!r} is not a namespace name")
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if not isinstance(sa, str) or not _SA.match(sa):
        raise InvalidPod(f"spec.serviceAccountName: {sa!r} is not a service account name")
    name = meta.get("name")
    if name is not None and (not isinstance(name, str) or not _SA.match(name)):
        raise InvalidPod(f"metadata.name: {name!r} is not a pod name")
    if not name and not meta.get("generateName"):
        raise InvalidPod("metadata: a pod needs a name or a generateName")
    return ns, sa, name or None


def _excluded_ports(annotations: Mapping[str, str]) -> list[int]:
    raw = annotations.get(ANNOTATION_EXCLUDE_INBOUND, "")
    out = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise InvalidPod(
                f"metadata.annotations[{ANNOTATION_EXCLUDE_INBOUND!r}]: {part!r} is not a port"
            )
        out.append(int(part))
    return out


def _excluded_cidrs(annotations: Mapping[str, str]) -> list[str]:
    raw = annotations.get(ANNOTATION_EXCLUDE_OUTBOUND, "")
    out = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise InvalidPod(
                f"metadata.annotations[{ANNOTATION_EXCLUDE_OUTBOUND!r}]: {part!r} is not a CIDR"
            ) from None
        if net.version == 4:
            out.append(str(net))
    return out


def redirect_commands(
    config: InjectorConfig,
    *,
    exclude_inbound_ports: Sequence[int] = (),
    exclude_outbound_cidrs: Sequence[str] = (),
) -> list[list[str]]:
    """The iptables invocations (argv lists, nat table) that send a pod's TCP through its proxy."""

    def nat(*args: object) -> list[str]:
        return ["iptables", "-t", "nat", *map(str, args)]

    inbound = [config.admin_port, config.outbound_port, config.inbound_port, 22]
    uid = config.proxy_uid
    return [
        nat("-N", "SMC_INBOUND"),
        nat("-A", "PREROUTING", "-p", "tcp", "-j", "SMC_INBOUND"),
        *(
            nat("-A", "SMC_INBOUND", "-p", "tcp", "--dport", port, "-j", "RETURN")
            for port in dict.fromkeys([*inbound, *exclude_inbound_ports])
        ),
        nat("-A", "SMC_INBOUND", "-p", "tcp", "-j", "REDIRECT", "--to-ports", config.inbound_port),
        nat("-N", "SMC_OUTBOUND"),
        nat("-A", "OUTPUT", "-p", "tcp", "-j", "SMC_OUTBOUND"),
        nat("-A", "SMC_OUTBOUND", "-m", "owner", "--uid-owner", uid, "-j", "RETURN"),
        nat("-A", "SMC_OUTBOUND", "-m", "owner", "--gid-owner", uid, "-j", "RETURN"),
        nat("-A", "SMC_OUTBOUND", "-d", "127.0.0.1/32", "-j", "RETURN"),
        *(nat("-A", "SMC_OUTBOUND", "-d", cidr, "-j", "RETURN") for cidr in exclude_outbound_cidrs),
        nat(
            "-A", "SMC_OUTBOUND", "-p", "tcp", "-j", "REDIRECT", "--to-ports", config.outbound_port
        ),
    ]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _append(spec: Mapping[str, Any], key: str, item: Any) -> dict[str, Any]:
    if spec.get(key):
        return {"op": "add", "path": f"/spec/{key}/-", "value": item}
    return {"op": "add", "path": f"/spec/{key}", "value": [item]}


def mutate(
    pod: Any,
    *,
    namespace_labels: Mapping[str, str],
    config: InjectorConfig,
    namespace: str | None = None,
    credentials: BootstrapCredentials | None = None,
) -> list[dict[str, Any]]:
    """The JSONPatch (RFC 6902 operations) that injects the sidecar into ``pod``; ``[]`` when
    :func:`injection_decision` says no. ``namespace`` is the admission request's namespace
    (pods often arrive without ``metadata.namespace``). With ``config.tls`` the bootstrap
    ``credentials`` are required. Raises :class:`InvalidPod` naming the field at fault."""
    decision = injection_decision(pod, namespace_labels=namespace_labels)
    if not decision.inject:
        return []
    agent = config.agent
    if agent is not None:
        credentials = None  # nothing secret goes into the patch, whatever the caller gave
    elif config.tls and credentials is None:
        raise InjectorError("TLS to the control plane is on but no bootstrap credentials given")
    meta, spec = _check_pod(pod)
    annotations: dict[str, str] = _obj(meta.get("annotations"), "metadata.annotations")
    ns, sa, name = pod_identity(pod, namespace=namespace)
    node_id = f"{ns}/{name}" if name else f"{ns}/{meta.get('generateName', '')}"
    in_secret = config.tls and credentials is not None and credentials.secret_name is not None
    tls = None
    if agent is not None:
        tls = TlsSources.agent(ca={"environment_variable": ENV_CA}) if config.tls else None
    elif in_secret:
        tls = TlsSources.watched(BOOTSTRAP_MOUNT)
    elif config.tls:
        tls = TlsSources.environment(cert=ENV_CERT, key=ENV_KEY, ca=ENV_CA)
    bootstrap = envoy_bootstrap(
        node_id=node_id,
        cluster=f"{ns}/{sa}",
        ads=config.ads,
        tls=tls,
        admin_port=config.admin_port,
        delta=config.delta,
        server_name=config.ads_server_name,
        metadata={"namespace": ns, "service_account": sa, "kind": "pod"},
    )
    excluded = _excluded_ports(annotations)
    probes = plan_probes(spec, excluded=excluded, skip=(PROXY_CONTAINER,))
    probe_static_resources(probes, bootstrap)
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {
            "name": ENV_BOOTSTRAP,
            "value": json.dumps(bootstrap, sort_keys=True, separators=(",", ":")),
        },
    ]
    if agent is not None and config.tls:
        env.append({"name": ENV_CA, "value": agent.ca_pem})  # public: the mesh roots
    if credentials is not None and config.tls and not in_secret:
        env += [
            {"name": ENV_CERT, "value": credentials.cert_pem},
            {"name": ENV_KEY, "value": credentials.key_pem},
            {"name": ENV_CA, "value": credentials.ca_pem},
        ]
    args = ["--config-yaml", f"$({ENV_BOOTSTRAP})", "--log-level", config.log_level]
    if not name:  # generateName: the real name is known only once the pod exists
        args += ["--service-node", "$(POD_NAMESPACE)/$(POD_NAME)"]
    args += ["--service-cluster", f"{ns}/{sa}"]
    proxy: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": config.proxy_image,
        "command": ["envoy"],
        "args": args,
        "env": env,
        "resources": dict(config.proxy_resources),
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": PROXY_VOLUME, "mountPath": "/var/run/smc"}]
        + (
            [{"name": BOOTSTRAP_VOLUME, "mountPath": BOOTSTRAP_MOUNT, "readOnly": True}]
            if in_secret
            else []
        ),
        "workingDir": "/var/run/smc",
    }
    rules = redirect_commands(
        config,
        exclude_inbound_ports=[*excluded, *probes.ports],
        exclude_outbound_cidrs=_excluded_cidrs(annotations),
    )
    script = "set -e\n" + (config.init_install + "\n" if config.init_install else "")
    script += "\n".join(shlex.join(c) for c in rules) + "\n"
    init: dict[str, Any] = {
        "name": INIT_CONTAINER,
        "image": config.init_image,
        "command": ["sh", "-c", script],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            # Installing iptables (apk, as root) needs the default capabilities; an image that
            # already has it runs with NET_ADMIN and NET_RAW only.
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}
            | ({} if config.init_install else {"drop": ["ALL"]}),
        },
    }
    status = json.dumps(
        {
            "version": 1,
            "containers": [PROXY_CONTAINER],
            "initContainers": [INIT_CONTAINER] + ([AGENT_CONTAINER] if agent else []),
            "volumes": [PROXY_VOLUME],
            "image": config.proxy_image,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    added = {ANNOTATION_STATUS: status}
    if probes.ops:
        added[ANNOTATION_ORIGINAL_PROBES] = probes.annotation
    if name:  # with generateName the node id is known only once the pod is named
        added[ANNOTATION_NODE_ID] = node_id
    if in_secret:
        assert credentials is not None and credentials.secret_name is not None
        added[ANNOTATION_BOOTSTRAP_SECRET] = credentials.secret_name
    ops: list[dict[str, Any]] = []
    if isinstance(meta.get("annotations"), dict):
        for key, value in added.items():
            ops.append(
                {"op": "add", "path": f"/metadata/annotations/{_escape(key)}", "value": value}
            )
    else:
        if not isinstance(pod.get("metadata"), dict):
            ops.append({"op": "add", "path": "/metadata", "value": {}})
        ops.append({"op": "add", "path": "/metadata/annotations", "value": added})
    if isinstance(meta.get("labels"), dict):
        ops.append(
            {
                "op": "add",
                "path": f"/metadata/labels/{_escape(LABEL_INTERCEPTION)}",
                "value": "iptables",
            }
        )
    else:
        ops.append(
            {"op": "add", "path": "/metadata/labels", "value": {LABEL_INTERCEPTION: "iptables"}}
        )
    ops.extend(probes.ops)
    ops.append(_append(spec, "initContainers", init))
    if agent is not None:
        # after the iptables init container, before Envoy: the kubelet starts Envoy once the
        # agent's startup probe sees the first certificate
        ops.append(
            {
                "op": "add",
                "path": "/spec/initContainers/-",
                "value": _agent_container(agent, config),
            }
        )
    ops.append(_append(spec, "containers", proxy))
    # with the agent the volume holds the proxy's key: in memory (tmpfs), never on a disk
    run_volume: dict[str, Any] = {"medium": "Memory", "sizeLimit": "16Mi"} if agent else {}
    ops.append(_append(spec, "volumes", {"name": PROXY_VOLUME, "emptyDir": run_volume}))
    if agent is not None:
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": _token_volume(agent)})
    if in_secret:
        assert credentials is not None
        # Read-only for everyone in the proxy container (it runs as the proxy UID); only that
        # container mounts it.
        secret = {"secretName": credentials.secret_name, "defaultMode": 0o444}
        ops.append(
            {
                "op": "add",
                "path": "/spec/volumes/-",
                "value": {"name": BOOTSTRAP_VOLUME, "secret": secret},
            }
        )
    return ops


def _agent_container(agent: AgentSidecar, config: InjectorConfig) -> dict[str, Any]:
    args = [
        "--node-id",
        "$(POD_NAMESPACE)/$(POD_NAME)",
        "--ca-address",
        agent.ca_address,
        "--ca-bundle",
        f"env:{ENV_CA}",
        "--proxy-dir",
        PROXY_DIR,
        "--token-file",
        f"{TOKEN_MOUNT}/token",
    ]
    if agent.server_name:
        args += ["--server-name", agent.server_name]
    return {
        "name": AGENT_CONTAINER,
        "image": agent.image,
        "command": ["python", "-m", "smc.agent"],
        "args": args,
        # a native sidecar: runs for the pod's life, and Envoy starts once this probe passes
        "restartPolicy": "Always",
        "startupProbe": {
            "exec": {"command": ["test", "-s", AGENT_SECRET]},
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {"name": ENV_CA, "value": agent.ca_pem},
        ],
        # one process, stdlib only: ~14-20 MB through renewals (tests/test_agent_process.py runs
        # it in a memory cgroup limited to 30 MiB, the limit here)
        "resources": {"requests": {"cpu": "10m", "memory": "24Mi"}, "limits": {"memory": "30Mi"}},
        "securityContext": {
            # the proxy's UID: its 0640 files are Envoy's to read, and iptables lets its traffic out
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": PROXY_VOLUME, "mountPath": "/var/run/smc"},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": True},
        ],
    }


def _token_volume(agent: AgentSidecar) -> dict[str, Any]:
    """The projected service-account token the agent proves the pod with: bound to the pod
    and to ``agent.audience``, rotated by the kubelet."""
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": agent.audience,
                        "expirationSeconds": agent.token_seconds,
                        "path": "token",
                    }
                }
            ]
        },
    }
