"""SMC: an event-sourced service mesh control plane for Envoy.

Role: package root; exposes the version and the root error.
Concurrency: import-only module.
"""

from smc.errors import SMCError

__all__ = ["SMCError", "__version__"]
__version__ = "0.1.0"
