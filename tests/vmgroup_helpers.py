"""Set-ups the VM group tests share: a moto server with its AWS environment, a group controller
wired to a running control plane, and a bounded wait for a condition."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smc.cli._vmgroups import proxy_ready_check
from smc.informers import VmGroupController, load_cloud_provider
from smc.testing.mesh import ControlPlane
from smc.testing.moto import MotoServer


@contextlib.contextmanager
def moto_server(workdir: Path) -> Iterator[MotoServer]:
    """A started moto server with its AWS environment set; the environment is put back after."""
    server = MotoServer(workdir=workdir)
    saved = {k: os.environ.get(k) for k in MotoServer.env()}
    os.environ.update(MotoServer.env())
    try:
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def group_controller(cp: ControlPlane, moto: MotoServer, **extra: Any) -> VmGroupController:
    """A controller polling ``moto`` every 0.2 s for ``cp``: drains wait for the proxies' ACKs,
    instances serve once their proxy is ready."""
    provider = load_cloud_provider("aws", **moto.provider_options(timeout=30))

    async def waiter(event_id: str, timeout: float) -> None:
        await cp.controller.wait_acked(event_id, timeout=timeout)

    return VmGroupController(
        live=cp.live,
        providers={"aws": provider},
        interval=0.2,
        drain_waiter=waiter,
        ready_check=proxy_ready_check(cp.server),
        **extra,
    )


def smc_cli(
    log_db: Path, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``smc --log sqlite:///LOG_DB ARGS...`` run as a user runs it, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "smc.cli", "--log", f"sqlite:///{log_db}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


async def until(pred: Any, what: str, timeout: float = 90.0, diag: Any = None) -> None:
    """Wait for a condition (generous bound: the test machine is shared and loaded)."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            detail = f": {diag()}" if diag else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        await asyncio.sleep(0.05)
