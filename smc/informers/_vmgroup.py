"""``VmGroupController``: VirtualMachineGroup instances join and leave the mesh on their own.

Role: inside ``smc serve``, for every ``VirtualMachineGroup`` on the log, polls the group's
cloud provider (:mod:`smc.informers._cloud`) every ``interval`` seconds (and at once when a
group is applied) and turns what changed into events:

- an instance that is running with an address and is not in the mesh (or whose address, tags
  or the group's template changed) -> ``WorkloadJoined(kind="vm")`` named
  ``<group>-<instance id>`` (node id ``<namespace>/<group>-<instance id>``) with the template's
  service account, ports and services, its tags and template labels, and
  ``VmInstanceChanged(phase="joined", cause=scale-out|discovered|...)``; a ServiceAccount
  upsert first when the identity is new. With ``readiness: proxy`` (the default) it joins
  labelled ``smc.dev/warming: "true"``: its proxy gets its config, no client sends it
  traffic, until ``ready_check`` sees that proxy ACK its listeners; then the label goes and
  ``VmInstanceChanged(phase="serving", cause="proxy-ready")`` is appended;
- an instance that left the group, stopped or was terminated -> a drain: ``WorkloadJoined``
  labelled ``smc.dev/draining: "true"`` (its endpoint leaves every service's EDS, its own
  proxy keeps its config and certificate) and ``VmInstanceChanged(phase="draining")``; once
  every connected proxy ACKed the config without it (``drain_waiter``), plus the group's
  ``drain`` time for in-flight requests, ``WorkloadLeft`` and ``VmInstanceChanged(phase=
  "left")``. Only then does the certificate controller revoke what the workload held;
- with ``join_tokens``, a group whose provider can set user data (an Auto Scaling group's
  launch template) gets a join token there (:mod:`smc.identity._groupjoin`), renewed at half
  its life; a booting instance's agent trades it once for its own certificate;
- a provider that cannot be read keeps the last known instances and appends
  ``VmGroupStatusChanged(status="stale")`` once (``ok`` again when it answers).

Event ids derive from the instance, its incarnation and the change, so replicas polling the
same cloud append each change once. Drains in progress are resumed after a restart from the
registry (phase ``draining``).
The joins are in :mod:`smc.informers._vmgroup_join`, the drains in
:mod:`smc.informers._vmgroup_drain`, the shared state, appends and metrics in
:mod:`smc.informers._vmgroup_base`; this module polls and re-exports the public types.
Concurrency: coroutines on the serve loop (the projections are read there); appends run in a
worker thread; provider calls in the provider's own threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from smc.informers._cloud import (
    CloudProvider,
    GroupQuery,
    ProviderUnavailable,
    UserDataDelivery,
)
from smc.informers._vmgroup_base import (
    DrainWaiter,
    JoinTokens,
    PollResult,
    ReadyCheck,
    workload_name,
)
from smc.informers._vmgroup_join import _VmGroupJoins
from smc.smi import VirtualMachineGroup

__all__ = [
    "DrainWaiter",
    "JoinTokens",
    "PollResult",
    "ReadyCheck",
    "VmGroupController",
    "workload_name",
]

log = logging.getLogger("smc.informers.vmgroup")


class VmGroupController(_VmGroupJoins):
    """Keeps every VirtualMachineGroup's instances in the registry (see module docstring)."""

    # -- the loop -----------------------------------------------------------------------------
    async def run(self, *, stop: asyncio.Event) -> None:
        """Poll every ``interval`` seconds (or when a group changed) until ``stop``."""
        await self.live.runner.caught_up.wait()
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.poll_once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("VM group poll failed; retrying")
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait(
                    {waiter, stopper}, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                stopper.cancel()
        finally:
            for t in list(self._drains.values()):
                t.cancel()
            await asyncio.gather(*self._drains.values(), return_exceptions=True)

    async def poll_once(self) -> list[PollResult]:
        """Poll every group once; drains continue in the background."""
        await self.live.runner.caught_up.wait()
        self.polls += 1
        if self.read_only:
            self._update_gauges()
            return []
        groups = self.groups()
        results = list(await asyncio.gather(*(self._poll_group(g) for g in groups)))
        present = {(g.namespace, g.name) for g in groups}
        for key, state in list(self.registry.vm_groups.groups.items()):
            if key not in present:
                await self._remove_group(key, state)
        self._resume_drains()
        self._update_gauges()
        return results

    # -- one group ---------------------------------------------------------------------------
    async def _poll_group(self, group: VirtualMachineGroup) -> PollResult:
        key = (group.namespace, group.name)
        provider = self.providers.get(group.provider)
        if provider is None:
            reason = (
                f"provider {group.provider!r} is not configured on this server "
                f"(smc serve --cloud {group.provider}:...)"
            )
            await self._set_status(group, "stale", reason)
            return PollResult(group=group.name, stale=True)
        known = self._known.get(key, {})
        query = GroupQuery(
            cloud_group=group.cloud_group, selector=group.selector, region=group.region
        )
        started = time.perf_counter()
        try:
            listing = await provider.list_instances(query, known=known)
        except ProviderUnavailable as exc:
            self._count_calls(provider)
            log.warning("VM group %s/%s: %s", group.namespace, group.name, exc)
            await self._set_status(group, "stale", str(exc))
            return PollResult(group=group.name, stale=True)
        self._count_calls(provider)
        self._known[key] = {i.instance_id: i for i in listing}
        await self._set_status(group, "ok", "")
        await self._ensure_join_token(group, provider, query)
        result = await self._reconcile(group, listing)
        self._poll_seconds.labels(provider.name).observe(time.perf_counter() - started)
        return result

    async def _ensure_join_token(
        self, group: VirtualMachineGroup, provider: CloudProvider, query: GroupQuery
    ) -> None:
        """Give the group's user data a fresh join token when it has none or half the current
        one's life is gone (only the digest goes on the log)."""
        if self.join_tokens is None or not isinstance(provider, UserDataDelivery):
            return
        key = (group.namespace, group.name)
        now = datetime.now(UTC)
        expiry = self._token_expiry.get(key)
        if expiry is not None and now < expiry - timedelta(seconds=group.join_token_seconds / 2):
            return
        token, event, expires = self.join_tokens.make(
            group, trust_domain=self.policy.mesh.trust_domain
        )
        await self._append([event], log=self.certs_log)
        try:
            delivered = await provider.deliver_user_data(
                query, self.join_tokens.user_data(group, token, expires)
            )
        except ProviderUnavailable as exc:
            log.warning("VM group %s/%s: join token not delivered: %s", *key, exc)
            return
        if delivered:
            self._token_expiry[key] = expires
            self.tokens_issued += 1
        else:
            self._token_expiry[key] = datetime.max.replace(tzinfo=UTC)  # nowhere to put one
