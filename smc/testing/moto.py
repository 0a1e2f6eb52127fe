"""A real AWS-API-compatible server for tests and benchmarks: moto's server mode on 127.0.0.1.

Role: :class:`MotoServer` starts ``python -m moto.server`` (PyPI ``moto[server]``) as a child
process on a free port, waits until it answers, and hands out boto3 clients and the options
the ``aws`` VM provider needs (``endpoint_url``, ``region``); credentials are dummy values
set in the environment of whoever uses it (:meth:`MotoServer.env`). :meth:`stop` /
:meth:`start` take the server down and up again on the same port (a provider outage; state is
lost, as after a real endpoint swap, so tests stop it only to test staleness).
:func:`auto_scaling_group` creates a VPC, a subnet (by default on 127.0.0.0/24, so instances
get addresses where real Envoys can stand in for them), a launch template with user data,
and an Auto Scaling group.
Concurrency: used from one thread; the child dies with the test process.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smc.testing._proc import die_with_parent
from smc.testing.ports import free_port

__all__ = ["MotoServer", "auto_scaling_group", "moto_server"]

REGION = "us-east-1"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


class MotoServer:
    """moto's server on 127.0.0.1:``port`` (see the module docstring)."""

    def __init__(self, *, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def env() -> dict[str, str]:
        """Dummy credentials and region for boto3 (set them in ``os.environ`` or a child)."""
        return dict(_ENV)

    def provider_options(self, **extra: Any) -> dict[str, Any]:
        """Options for ``load_cloud_provider("aws", ...)``."""
        return {"endpoint_url": self.endpoint_url, "region": REGION, **extra}

    def start(self, *, timeout: float = 30.0) -> None:
        logf = open(self.workdir / f"moto-{self.port}.log", "ab")  # noqa: SIM115 - child owns it
        self.proc = subprocess.Popen(
            die_with_parent(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
            ),
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **_ENV},
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moto server did not listen on {self.port} in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_ENV["AWS_SECRET_ACCESS_KEY"],
        )


@contextlib.contextmanager
def moto_server(workdir: Path) -> Iterator[MotoServer]:
    """A started :class:`MotoServer`, stopped on exit."""
    server = MotoServer(workdir=workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def auto_scaling_group(
    server: MotoServer,
    name: str,
    *,
    cidr: str = "127.0.0.0/24",
    capacity: int = 0,
    max_size: int = 2000,
    tags: dict[str, str] | None = None,
    user_data: str = "",
) -> str:
    """Create a VPC + subnet on ``cidr``, a launch template and the Auto Scaling group
    ``name`` (``capacity`` instances); returns the subnet id."""
    ec2 = server.client("ec2")
    asg = server.client("autoscaling")
    vpc_cidr = cidr.rsplit(".", 2)[0] + ".0.0/16" if cidr.endswith("/24") else cidr
    vpc = ec2.create_vpc(CidrBlock=vpc_cidr)["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr)["Subnet"]["SubnetId"]
    data: dict[str, Any] = {"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"}
    if user_data:
        data["UserData"] = base64.b64encode(user_data.encode()).decode()
    ec2.create_launch_template(LaunchTemplateName=f"{name}-template", LaunchTemplateData=data)
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateName": f"{name}-template"},
        MinSize=0,
        MaxSize=max_size,
        DesiredCapacity=capacity,
        VPCZoneIdentifier=subnet,
        Tags=[{"Key": k, "Value": v, "PropagateAtLaunch": True} for k, v in (tags or {}).items()],
    )
    return str(subnet)
