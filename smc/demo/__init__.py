"""``smc demo``: a bookstore mesh on 127.0.0.1, run by the real control plane and real Envoys.

Role: public API of :mod:`smc.demo`. :class:`BookstoreDemo` starts and stops the whole demo
(see :mod:`smc.demo._mesh`); :class:`BookApp`/:class:`Flow` are its applications and traffic
counters; :func:`live_view`, :func:`plain_line` and :func:`summary_lines` render it. The CLI
command is in :mod:`smc.cli._demo`.
Concurrency: one asyncio loop; see each module.
"""

from smc.demo._apps import BookApp, Flow, caller_identity, client_loop, probe
from smc.demo._errors import DemoError
from smc.demo._mesh import (
    DEFAULT_MANIFESTS,
    WORKLOADS,
    BookstoreDemo,
    DemoOptions,
    DemoStatus,
    parse_split,
)
from smc.demo._view import live_view, plain_line, summary_lines

__all__ = [
    "DEFAULT_MANIFESTS",
    "WORKLOADS",
    "BookApp",
    "BookstoreDemo",
    "DemoError",
    "DemoOptions",
    "DemoStatus",
    "Flow",
    "caller_identity",
    "client_loop",
    "live_view",
    "parse_split",
    "plain_line",
    "probe",
    "summary_lines",
]
