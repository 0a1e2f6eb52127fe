"""``AwsProvider``: VirtualMachineGroup members from EC2 (Auto Scaling groups or tag selectors).

Role: the ``aws`` cloud provider (entry point in group ``smc.vm_providers``; see
:mod:`smc.informers._cloud`). Built on boto3; works against AWS or any AWS-API-compatible
endpoint (``endpoint_url``; the tests run moto's server on 127.0.0.1). Credentials come from
boto3's usual chain (environment, profile, instance role), never from a manifest or a flag.

Membership:

- ``group`` (an Auto Scaling group): each poll is one ``DescribeAutoScalingGroups`` call (the
  member ids and their lifecycle states), one ``DescribeInstances`` filtered to the group's
  instances that are *not* running (stopped, stopping, shutting down: a list that grows with
  changes, not with the fleet), and ``DescribeInstances`` for the ids that are new or whose
  state changed. Everything else is reused from the last poll. Every ``resync_seconds`` a full
  paged ``DescribeInstances`` of the group (``MaxResults=page_size``) refreshes addresses and
  tags. Lifecycle states Terminating*, Detaching, Standby and their kin count as leaving.
- ``selector`` (instance tags): a paged ``DescribeInstances`` filtered by the tags every poll
  (one call per ``page_size`` instances; EC2 has no change feed to do better without events).

Join tokens: :meth:`AwsProvider.deliver_user_data` gives the Auto Scaling group a copy of its
launch template with the new user data (its current join token) and deletes the copy it made
before.

Tags become labels (:func:`smc.informers._cloud.tags_to_labels`). Any API failure raises
:class:`ProviderUnavailable` with the operation and the error code (no credentials).
Concurrency: :meth:`list_instances` is a coroutine; the boto3 calls run in a worker thread
(boto3 clients are thread-safe); ``stats`` is updated from that thread only.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from smc.informers._cloud import (
    CloudInstance,
    GroupQuery,
    InstanceState,
    ProviderStats,
    ProviderUnavailable,
    tags_to_labels,
)

__all__ = ["AwsProvider"]

_EC2_STATES: dict[str, InstanceState] = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopped",
    "shutting-down": "terminating",
    "terminated": "terminated",
}
_ASG_LEAVING_PREFIXES = ("Terminating", "Terminated", "Detach", "EnteringStandby", "Standby")
_NOT_RUNNING = ["stopping", "stopped", "shutting-down", "terminated"]
_ID_CHUNK = 200


class AwsProvider:
    """EC2 / Auto Scaling membership (see the module docstring)."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        profile: str | None = None,
        page_size: int | str = 1000,
        resync_seconds: float | str = 300.0,
        timeout: float | str = 5.0,
        name: str = "aws",
    ) -> None:
        import boto3
        from botocore.config import Config

        self.name = name
        self.endpoint_url = endpoint_url or None
        self.region = region
        self.page_size = max(5, min(1000, int(page_size)))
        self.resync_seconds = float(resync_seconds)
        self.stats = ProviderStats()
        self._session = boto3.session.Session(profile_name=profile or None)
        self._config = Config(
            connect_timeout=float(timeout),
            read_timeout=float(timeout),
            retries={"max_attempts": 2, "mode": "standard"},
        )
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._last_full: dict[GroupQuery, float] = {}
        self._desired: dict[GroupQuery, int] = {}

    # -- the protocol -----------------------------------------------------------------------
    async def list_instances(
        self, query: GroupQuery, *, known: Mapping[str, CloudInstance]
    ) -> tuple[CloudInstance, ...]:
        return await asyncio.to_thread(self._list, query, dict(known))

    async def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            c.close()

    async def deliver_user_data(self, query: GroupQuery, user_data: str) -> bool:
        """Make ``user_data`` what new instances of the Auto Scaling group boot with (a copy of
        its launch template with that user data). False for a tag-selector group or a group
        without a launch template (nothing to write to)."""
        if query.cloud_group is None:
            return False
        return await asyncio.to_thread(self._deliver, query, query.cloud_group, user_data)

    def _deliver(self, query: GroupQuery, group: str, user_data: str) -> bool:
        import base64

        asg = self._client("autoscaling", query.region)
        ec2 = self._client("ec2", query.region)
        body = self._call(asg, "describe_auto_scaling_groups", AutoScalingGroupNames=[group])
        self.stats.count("DescribeAutoScalingGroups", 0)
        groups = body.get("AutoScalingGroups", [])
        if not groups:
            raise ProviderUnavailable(f"aws: Auto Scaling group {group!r} not found")
        spec = groups[0].get("LaunchTemplate")
        if not spec:
            return False  # launch configurations / mixed policies: not written to
        ref = (
            {"LaunchTemplateId": spec["LaunchTemplateId"]}
            if spec.get("LaunchTemplateId")
            else {"LaunchTemplateName": spec["LaunchTemplateName"]}
        )
        version = spec.get("Version") or "$Default"
        found = self._call(ec2, "describe_launch_template_versions", Versions=[version], **ref)
        self.stats.count("DescribeLaunchTemplateVersions", 0)
        current = found["LaunchTemplateVersions"][0]
        data = dict(current.get("LaunchTemplateData", {}))
        data["UserData"] = base64.b64encode(user_data.encode()).decode()
        # A new template (a copy of the group's, with the new user data) rather than a new
        # version: the same for AWS, and what AWS-compatible test servers implement fully.
        name = f"{group}-smc-{time.time_ns()}"[:128]
        self._call(ec2, "create_launch_template", LaunchTemplateName=name, LaunchTemplateData=data)
        self.stats.count("CreateLaunchTemplate", 0)
        self._call(
            asg,
            "update_auto_scaling_group",
            AutoScalingGroupName=group,
            LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
        )
        self.stats.count("UpdateAutoScalingGroup", 0)
        old = current.get("LaunchTemplateName", "")
        if old.startswith(f"{group}-smc-"):  # the one SMC made before: no longer used
            self._call(ec2, "delete_launch_template", LaunchTemplateName=old)
            self.stats.count("DeleteLaunchTemplate", 0)
        return True

    # -- implementation (worker thread) ------------------------------------------------------
    def _client(self, service: str, region: str | None) -> Any:
        key = (service, region or self.region)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = self._session.client(
                    service,  # type: ignore[call-overload]
                    region_name=key[1],
                    endpoint_url=self.endpoint_url,
                    config=self._config,
                )
            return client

    def _call(self, client: Any, operation: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result: dict[str, Any] = getattr(client, operation)(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise ProviderUnavailable(
                f"aws {operation}: {err.get('Code', 'error')}: {err.get('Message', '')}".rstrip()
            ) from None
        except BotoCoreError as exc:
            raise ProviderUnavailable(f"aws {operation}: {type(exc).__name__}: {exc}") from None
        return result

    def _list(
        self, query: GroupQuery, known: dict[str, CloudInstance]
    ) -> tuple[CloudInstance, ...]:
        if query.cloud_group is not None:
            return self._auto_scaling(query, query.cloud_group, known)
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in query.selector]
        filters.append(
            {"Name": "instance-state-name", "Values": ["pending", "running", *_NOT_RUNNING]}
        )
        return tuple(self._describe_paged(query.region, filters))

    def _auto_scaling(
        self, query: GroupQuery, group: str, known: dict[str, CloudInstance]
    ) -> tuple[CloudInstance, ...]:
        asg = self._client("autoscaling", query.region)
        body = self._call(asg, "describe_auto_scaling_groups", AutoScalingGroupNames=[group])
        groups = body.get("AutoScalingGroups", [])
        self.stats.count("DescribeAutoScalingGroups", 0)
        if not groups:
            raise ProviderUnavailable(f"aws: Auto Scaling group {group!r} not found")
        members: dict[str, str] = {
            m["InstanceId"]: m.get("LifecycleState", "") for m in groups[0].get("Instances", [])
        }
        desired = int(groups[0].get("DesiredCapacity", 0))
        shrunk = desired < self._desired.get(query, desired)
        self._desired[query] = desired
        group_filter = {"Name": "tag:aws:autoscaling:groupName", "Values": [group]}
        now = time.monotonic()
        last = self._last_full.get(query)
        described: dict[str, CloudInstance] = {}
        if last is None or now - last >= self.resync_seconds:
            for inst in self._describe_paged(query.region, [group_filter]):
                described[inst.instance_id] = inst
            self._last_full[query] = now
        else:
            not_running = {
                i.instance_id: i
                for i in self._describe_paged(
                    query.region,
                    [group_filter, {"Name": "instance-state-name", "Values": _NOT_RUNNING}],
                )
            }
            described.update(not_running)
            fetch = [
                i
                for i in members
                if i not in not_running
                and (i not in known or known[i].state != "running" or not known[i].address)
            ]
            for n in range(0, len(fetch), _ID_CHUNK):
                chunk = fetch[n : n + _ID_CHUNK]
                for inst in self._describe_ids(query.region, chunk):
                    described[inst.instance_id] = inst
        out: list[CloudInstance] = []
        for iid, lifecycle in sorted(members.items()):
            found = described.get(iid) or known.get(iid)
            if found is None:
                continue  # launched and gone between the two calls: next poll sees it
            inst = found
            if lifecycle.startswith(_ASG_LEAVING_PREFIXES) and inst.state in ("pending", "running"):
                inst = CloudInstance(
                    instance_id=inst.instance_id,
                    state="terminating",
                    address=inst.address,
                    labels=inst.labels,
                    incarnation=inst.incarnation,
                    zone=inst.zone,
                    cause="scale-in" if lifecycle.startswith("Terminat") else "detached",
                )
            out.append(inst)
        # instances that left the group since the last poll: say why (costs one call per
        # 200 of them, i.e. grows with the changes)
        departed = [i for i, k in known.items() if i not in members and k.state != "terminated"]
        for n in range(0, len(departed), _ID_CHUNK):
            for left in self._describe_ids(query.region, departed[n : n + _ID_CHUNK]):
                gone: InstanceState = (
                    "terminated" if left.state in ("terminating", "terminated") else "terminating"
                )
                out.append(
                    CloudInstance(
                        instance_id=left.instance_id,
                        state=gone,
                        address=left.address,
                        labels=left.labels,
                        incarnation=left.incarnation,
                        zone=left.zone,
                        cause="scale-in" if shrunk else "terminated",
                    )
                )
        return tuple(out)

    def _describe_paged(
        self, region: str | None, filters: list[dict[str, Any]]
    ) -> Iterator[CloudInstance]:
        ec2 = self._client("ec2", region)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Filters": filters, "MaxResults": self.page_size}
            if token:
                kwargs["NextToken"] = token
            body = self._call(ec2, "describe_instances", **kwargs)
            found = [_instance(i) for r in body.get("Reservations", []) for i in r["Instances"]]
            self.stats.count("DescribeInstances", len(found))
            yield from found
            token = body.get("NextToken")
            if not token:
                return

    def _describe_ids(self, region: str | None, ids: list[str]) -> list[CloudInstance]:
        ec2 = self._client("ec2", region)
        try:
            body = self._call(ec2, "describe_instances", InstanceIds=ids)
        except ProviderUnavailable as exc:
            if "InvalidInstanceID" not in str(exc):
                raise
            # one of them is gone already: describe them one by one (rare)
            if len(ids) == 1:
                self.stats.count("DescribeInstances", 0)
                return []
            return [i for one in ids for i in self._describe_ids(region, [one])]
        found = [_instance(i) for r in body.get("Reservations", []) for i in r["Instances"]]
        self.stats.count("DescribeInstances", len(found))
        return found


def _instance(raw: Mapping[str, Any]) -> CloudInstance:
    tags = {t["Key"]: t.get("Value", "") for t in raw.get("Tags", []) or []}
    launched: Any = raw.get("LaunchTime")
    return CloudInstance(
        instance_id=str(raw["InstanceId"]),
        state=_EC2_STATES.get(str(raw.get("State", {}).get("Name", "")), "terminated"),
        address=raw.get("PrivateIpAddress") or None,
        labels=tags_to_labels(tags),
        incarnation=launched.isoformat() if hasattr(launched, "isoformat") else str(launched),
        zone=str(raw.get("Placement", {}).get("AvailabilityZone", "")),
    )
