"""The ``smc`` command line: one click group, with commands registered from sibling modules.

Role: entry point (``smc = smc.cli:main``). Each command family lives in its own private module
and registers itself on :data:`cli`; errors from the SMC exception tree become one clear line on
stderr and exit code 1, never a traceback.
Concurrency: one command per process.
"""

from __future__ import annotations

from smc.cli import _agent as _agent
from smc.cli import _apply as _apply
from smc.cli import _audit as _audit
from smc.cli import _certs as _certs
from smc.cli import _completion as _completion
from smc.cli import _demo as _demo
from smc.cli import _get as _get
from smc.cli import _kubectl as _kubectl
from smc.cli import _log as _log
from smc.cli import _policycheck as _policycheck
from smc.cli import _proxy as _proxy
from smc.cli import _proxycerts as _proxycerts
from smc.cli import _serve as _serve
from smc.cli import _vm as _vm
from smc.cli import _vmjoin as _vmjoin
from smc.cli._app import cli, main

__all__ = ["cli", "main"]
