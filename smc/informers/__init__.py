"""Informers: sources that observe the world and append what they see to the log.

Role: public API of :mod:`smc.informers`. For now: the VM provider plugin interface
(:class:`VMProvider`, discovered through entry point group ``smc.vm_providers``), the bridge that
applies provider reports (:class:`ProviderBridge`) and the shipped inventory directory provider.
Concurrency: providers run as tasks on the ``smc serve`` asyncio loop.
"""

from smc.informers._errors import InformersError, ProviderNotFound
from smc.informers._vm import (
    ENTRY_POINT_GROUP,
    ProviderBridge,
    VMProvider,
    VMReport,
    VMSink,
    available_vm_providers,
    load_vm_provider,
)
from smc.informers.inventory import InventoryDirectoryProvider

__all__ = [
    "ENTRY_POINT_GROUP",
    "InformersError",
    "InventoryDirectoryProvider",
    "ProviderBridge",
    "ProviderNotFound",
    "VMProvider",
    "VMReport",
    "VMSink",
    "available_vm_providers",
    "load_vm_provider",
]
