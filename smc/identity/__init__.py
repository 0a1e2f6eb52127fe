"""Per-proxy workload identity on the control plane: proof, then a signature.

Role: public API of ``smc.identity``. :class:`ProxyCertificateService` signs the CSRs SMC
agents send (see :mod:`smc.agent`) once the caller proved who it is (a pod's projected
service-account token checked by :func:`review_pod_token` with
:class:`smc.auth.TokenReviewer`, a VM's one-time join token, or the
proxy's current certificate), and records each certificate per proxy on the log (never a
key); :class:`CertificateServer` serves it over HTTPS; :class:`ProxyRevoker` revokes a
proxy's certificate when its pod or VM leaves; :class:`IdentityHook` wires them into
``smc serve``. The design is in ``docs/identity.md``.
Concurrency: asyncio (one loop); issuers and the log are called in worker threads.
"""

from smc.identity._errors import IdentityError, ProofRefused, ServiceNotReady
from smc.identity._groupjoin import (
    GroupJoinTokens,
    check_group_join,
    group_join_token_event,
    join_user_data,
    parse_user_data,
)
from smc.identity._https import CertificateServer
from smc.identity._join import join_token_event
from smc.identity._podtoken import PodToken, review_pod_token
from smc.identity._serve import (
    AgentCertSource,
    IdentityHook,
    IdentityOptions,
    TrustOnlyController,
    run_trust_only,
)
from smc.identity._service import ProxyCertificateService, ProxyRevoker, canonical_proxy

__all__ = [
    "AgentCertSource",
    "CertificateServer",
    "GroupJoinTokens",
    "IdentityError",
    "IdentityHook",
    "IdentityOptions",
    "PodToken",
    "ProofRefused",
    "ProxyCertificateService",
    "ProxyRevoker",
    "ServiceNotReady",
    "TrustOnlyController",
    "canonical_proxy",
    "check_group_join",
    "group_join_token_event",
    "join_token_event",
    "join_user_data",
    "parse_user_data",
    "review_pod_token",
    "run_trust_only",
]
