"""The SMC agent: runs beside one Envoy, makes its key there, and serves it SDS locally.

Role: public API of ``smc.agent`` (``python -m smc.agent`` or ``smc agent``). :class:`Agent`
generates the proxy's key in its own process, sends a CSR with a proof of identity to the
control plane's certificate service (:mod:`smc.identity`) over TLS, serves the certificate and
key to its Envoy over a unix-socket SDS server (:class:`SdsServer`), and renews on its own
schedule with its current certificate as proof. :mod:`smc.agent._protocol` is the wire
format; :mod:`smc.agent._bootstrap` the bootstrap pieces that point Envoy at the agent. See
``docs/identity.md``.
Concurrency: one asyncio loop per agent.
"""

from smc.agent._agent import Agent, AgentConfig, CertificateClient
from smc.agent._bootstrap import (
    AGENT_CLUSTER,
    ads_tls_transport_socket,
    agent_cluster,
    agent_sds_config,
)
from smc.agent._errors import AgentError, InvalidMessage, SigningRefused
from smc.agent._protocol import SIGN_METHOD, SignRequest, SignResponse, renewal_message
from smc.agent._sds import SdsServer, WorkloadSecret

__all__ = [
    "AGENT_CLUSTER",
    "SIGN_METHOD",
    "Agent",
    "AgentConfig",
    "AgentError",
    "CertificateClient",
    "InvalidMessage",
    "SdsServer",
    "SignRequest",
    "SignResponse",
    "SigningRefused",
    "WorkloadSecret",
    "ads_tls_transport_socket",
    "agent_cluster",
    "agent_sds_config",
    "renewal_message",
]
