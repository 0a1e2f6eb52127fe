"""Auditing the log: writer credentials, verification of a whole log, and time travel.

Role: public API of ``smc.audit``. :func:`issue_writer` mints a writer key and certificate
from the mesh CA (local or Vault); :func:`verify_log` reads a log from its start and checks
every chain, seal, writer and entitlement (``smc audit verify``). The per-record checks live in
:mod:`smc.events` (:class:`~smc.events.ChainVerifier`), shared with the projection runner.
Concurrency: blocking functions for one thread (the CLI's).
"""

from smc.audit._check import VerifyReport, verify_log
from smc.audit._credentials import issue_writer, load_trust
from smc.audit._travel import access_history, proxy_config_at, state_at
from smc.projections import CheckpointDir

__all__ = [
    "CheckpointDir",
    "VerifyReport",
    "access_history",
    "issue_writer",
    "load_trust",
    "proxy_config_at",
    "state_at",
    "verify_log",
]
