"""The SMC agent: runs beside one Envoy, makes its key there, and hands it to that Envoy only.

Role: public API of ``smc.agent`` (``python -m smc.agent`` or ``smc agent``). :class:`Agent`
generates the proxy's key on the proxy's host, sends a CSR with a proof of identity to the
control plane's certificate service (:mod:`smc.identity`) over TLS, writes the certificate
and key where its Envoy reads them with file-based SDS (``smc-sds/default.json`` in the proxy
dir, 0640; :mod:`smc.agent._files`), and renews on its own schedule with its current
certificate as proof. ``python -m smc.agent`` is a small process (standard library only,
:mod:`smc.agent.__main__`, :mod:`smc.agent._step`) that does the same work with OpenSSL
through Python's ``ssl`` links, so neither grpcio nor cryptography is resident beside every
proxy. :mod:`smc.agent._protocol` is the wire format (JSON over HTTPS, :mod:`smc.agent._client`);
:mod:`smc.agent._bootstrap` the bootstrap pieces that point Envoy at the agent's file. See
``docs/identity.md``.
The heavy names (:class:`Agent`, :class:`AgentConfig`, :class:`CertificateClient`,
:func:`ads_tls_transport_socket`) are imported when first used, so importing this package
stays cheap for the resident process.
Concurrency: one asyncio loop per in-process agent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smc.agent._errors import AgentError, InvalidMessage, SigningRefused
from smc.agent._files import SDS_DIR, agent_sds_config
from smc.agent._protocol import SIGN_METHOD, SignRequest, SignResponse, renewal_message

if TYPE_CHECKING:
    from smc.agent._agent import Agent, AgentConfig
    from smc.agent._bootstrap import ads_tls_transport_socket
    from smc.agent._client import CertificateClient

__all__ = [
    "SDS_DIR",
    "SIGN_METHOD",
    "Agent",
    "AgentConfig",
    "AgentError",
    "CertificateClient",
    "InvalidMessage",
    "SignRequest",
    "SignResponse",
    "SigningRefused",
    "ads_tls_transport_socket",
    "agent_sds_config",
    "renewal_message",
]

_LAZY = {
    "Agent": "smc.agent._agent",
    "AgentConfig": "smc.agent._agent",
    "CertificateClient": "smc.agent._client",
    "ads_tls_transport_socket": "smc.agent._bootstrap",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'smc.agent' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
