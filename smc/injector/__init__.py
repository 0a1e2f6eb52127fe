"""SMC's sidecar injector (a mutating admission webhook) and VM bootstrap bundles.

Role: public API of ``smc.injector``. :func:`mutate` turns a Pod into the JSONPatch that adds the
Envoy sidecar, the traffic-redirecting init container and the inline bootstrap (pure; see
:mod:`smc.injector._mutate`); :class:`WebhookServer` answers AdmissionReview v1 over HTTPS with
it, keeping bootstrap keys in per-pod Secrets through :class:`BootstrapSecrets`; :func:`issue_serving_certificate` signs the webhook's certificate (DNS/IP SANs) with SMC's
local CA; :func:`write_vm_bootstrap` writes the bootstrap, certificates and run script of a
VirtualMachine's Envoy; :func:`envoy_bootstrap` is the bootstrap both share.
``python -m smc.injector`` runs the webhook (see :mod:`smc.injector.__main__`).
Concurrency: the translation functions are pure; the server runs on one asyncio loop and
issues certificates in worker threads; the VM writer is blocking file I/O.
"""

from smc.injector._bootstrap import (
    ADS_CLUSTER,
    CA_SDS_FILE,
    CERT_SDS_FILE,
    AdsAddress,
    TlsSources,
    envoy_bootstrap,
    parse_ads_address,
    watched_tls_files,
)
from smc.injector._errors import (
    InjectorError,
    InvalidAdmissionReview,
    InvalidPod,
    UnknownVirtualMachine,
)
from smc.injector._mutate import (
    AGENT_CONTAINER,
    AGENT_SECRET,
    ANNOTATION_BOOTSTRAP_SECRET,
    ANNOTATION_EXCLUDE_INBOUND,
    ANNOTATION_EXCLUDE_OUTBOUND,
    ANNOTATION_INJECT,
    ANNOTATION_NODE_ID,
    ANNOTATION_STATUS,
    BOOTSTRAP_MOUNT,
    BOOTSTRAP_VOLUME,
    INIT_CONTAINER,
    LABEL_INTERCEPTION,
    NAMESPACE_LABEL,
    PROXY_CONTAINER,
    PROXY_DIR,
    PROXY_VOLUME,
    TOKEN_VOLUME,
    AgentSidecar,
    BootstrapCredentials,
    Decision,
    InjectorConfig,
    injection_decision,
    mutate,
    pod_identity,
    redirect_commands,
)
from smc.injector._probes import ANNOTATION_ORIGINAL_PROBES, PROBE_BASE_PORT, TCP_PROBE_PATH
from smc.injector._secrets import BOOTSTRAP_LABEL, BootstrapSecrets, bootstrap_secret_name
from smc.injector._server import (
    API_VERSION,
    AdmissionRequest,
    CredentialSource,
    NamespaceLabels,
    WebhookServer,
    assume_opted_in,
    issuer_credentials,
    kube_namespace_labels,
    parse_review,
    review_response,
)
from smc.injector._tls import issue_serving_certificate, server_ssl_context
from smc.injector._uninject import uninject
from smc.injector._vm import VmBootstrapFiles, find_vm, vm_node_id, write_vm_bootstrap

__all__ = [
    "ADS_CLUSTER",
    "AGENT_CONTAINER",
    "AGENT_SECRET",
    "ANNOTATION_BOOTSTRAP_SECRET",
    "ANNOTATION_EXCLUDE_INBOUND",
    "ANNOTATION_EXCLUDE_OUTBOUND",
    "ANNOTATION_INJECT",
    "ANNOTATION_NODE_ID",
    "ANNOTATION_ORIGINAL_PROBES",
    "ANNOTATION_STATUS",
    "API_VERSION",
    "BOOTSTRAP_LABEL",
    "BOOTSTRAP_MOUNT",
    "BOOTSTRAP_VOLUME",
    "CA_SDS_FILE",
    "CERT_SDS_FILE",
    "INIT_CONTAINER",
    "LABEL_INTERCEPTION",
    "NAMESPACE_LABEL",
    "PROBE_BASE_PORT",
    "PROXY_CONTAINER",
    "PROXY_DIR",
    "PROXY_VOLUME",
    "TCP_PROBE_PATH",
    "TOKEN_VOLUME",
    "AdmissionRequest",
    "AdsAddress",
    "AgentSidecar",
    "BootstrapCredentials",
    "BootstrapSecrets",
    "CredentialSource",
    "Decision",
    "InjectorConfig",
    "InjectorError",
    "InvalidAdmissionReview",
    "InvalidPod",
    "NamespaceLabels",
    "TlsSources",
    "UnknownVirtualMachine",
    "VmBootstrapFiles",
    "WebhookServer",
    "assume_opted_in",
    "bootstrap_secret_name",
    "envoy_bootstrap",
    "find_vm",
    "injection_decision",
    "issue_serving_certificate",
    "issuer_credentials",
    "kube_namespace_labels",
    "mutate",
    "parse_ads_address",
    "parse_review",
    "pod_identity",
    "redirect_commands",
    "review_response",
    "server_ssl_context",
    "uninject",
    "vm_node_id",
    "watched_tls_files",
    "write_vm_bootstrap",
]
