"""Informers: sources that observe the world and append what they see to the log.

Role: public API of :mod:`smc.informers`: the cloud VM provider interface
(:class:`CloudProvider`, the ``aws`` provider in :mod:`smc.informers.aws`) and the controller
that keeps VirtualMachineGroup instances in the mesh (:class:`VmGroupController`), the VM
provider plugin interface
(:class:`VMProvider`, discovered through entry point group ``smc.vm_providers``), the bridge that
applies provider reports (:class:`ProviderBridge`), the shipped inventory directory provider, and
the Kubernetes informers (:class:`KubeInformers`: list + watch of namespaces, services, endpoint
slices, pods, service accounts and SMI resources into events with deterministic ids).
Concurrency: providers and informers run as tasks on the ``smc serve`` asyncio loop.
"""

from smc.informers._cloud import (
    CloudInstance,
    CloudProvider,
    GroupQuery,
    ProviderStats,
    ProviderUnavailable,
    load_cloud_provider,
    tags_to_labels,
)
from smc.informers._errors import InformersError, ProviderNotFound
from smc.informers._kube import (
    CORE_RESOURCES,
    MEMBER_LABEL,
    SMI_RESOURCES,
    EventSink,
    KubeConfigError,
    KubeEndpoint,
    KubeInformers,
    KubeResource,
    LogSink,
    WatchStats,
)
from smc.informers._vm import (
    ENTRY_POINT_GROUP,
    ProviderBridge,
    VMProvider,
    VMReport,
    VMSink,
    available_vm_providers,
    load_vm_provider,
)
from smc.informers._vmgroup import DrainWaiter, PollResult, VmGroupController, workload_name
from smc.informers.inventory import InventoryDirectoryProvider

__all__ = [
    "CORE_RESOURCES",
    "ENTRY_POINT_GROUP",
    "MEMBER_LABEL",
    "SMI_RESOURCES",
    "CloudInstance",
    "CloudProvider",
    "DrainWaiter",
    "EventSink",
    "GroupQuery",
    "InformersError",
    "InventoryDirectoryProvider",
    "KubeConfigError",
    "KubeEndpoint",
    "KubeInformers",
    "KubeResource",
    "LogSink",
    "PollResult",
    "ProviderBridge",
    "ProviderNotFound",
    "ProviderStats",
    "ProviderUnavailable",
    "VMProvider",
    "VMReport",
    "VMSink",
    "VmGroupController",
    "WatchStats",
    "available_vm_providers",
    "load_cloud_provider",
    "load_vm_provider",
    "tags_to_labels",
    "workload_name",
]
