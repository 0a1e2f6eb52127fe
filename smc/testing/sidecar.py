"""One workload of an end-to-end test: an application and a real Envoy in front of it.

Role: :class:`Sidecar` is one Envoy with an ADS bootstrap whose node id names a registry
workload, plus an aiohttp application behind it on ``127.0.0.1:<app port>``, and optionally
the SMC agent beside it (in-process :class:`~smc.agent.Agent` or ``python -m smc.agent`` as
its own process) that makes the proxy's key in its proxy dir. :func:`vm_yaml` writes the
VirtualMachine manifest of a sidecar (label ``smc.dev/app-port``); :func:`wait_reachable`
polls a sidecar's outbound listener until the mesh carries a request. Used with
:class:`smc.testing.mesh.ControlPlane` (which re-exports these names).
Concurrency: the caller's asyncio loop; Envoy start/stop and admin calls are blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web

from smc.agent import Agent, AgentConfig, ads_tls_transport_socket
from smc.testing.envoy import AdsTLS, EnvoyProcess, ads_bootstrap
from smc.testing.ports import free_port

if TYPE_CHECKING:
    from smc.testing.mesh import ControlPlane

__all__ = ["Sidecar", "run_agent", "vm_yaml", "wait_reachable"]


async def _echo(name: str, request: web.Request) -> web.Response:
    try:
        delay = float(request.query.get("delay", "0"))
    except ValueError:
        delay = 0.0
    if 0 < delay <= 30:  # a slow request (?delay=SECONDS), e.g. in flight during a drain
        await asyncio.sleep(delay)
    return web.json_response(
        {
            "app": name,
            "path": request.path,
            "method": request.method,
            "xfcc": request.headers.get("x-forwarded-client-cert", ""),
        }
    )


class Sidecar:
    """One workload: an application on ``127.0.0.1:app_port`` and a real Envoy in front of it,
    listening on ``address`` (inbound: the service target ports; outbound: 15001)."""

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        address: str,
        app_name: str | None = None,
        workdir: Path,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.address = address
        self.app_name = app_name or name
        self.workdir = workdir
        self.app_port = free_port()
        self.envoy: EnvoyProcess | None = None
        self._app: web.AppRunner | None = None
        self.agent: Agent | None = None
        self._agent_dir: Path | None = None
        self._ca_pem = ""
        self._agent_stop = asyncio.Event()
        self._agent_task: asyncio.Task[None] | None = None
        #: The agent as its own process (``python -m smc.agent``), see :meth:`start_agent_process`.
        self.agent_process: asyncio.subprocess.Process | None = None

    @property
    def node_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def outbound(self) -> str:
        return f"http://{self.address}:15001"

    async def start_app(self) -> None:
        app = web.Application()

        async def handle(request: web.Request) -> web.Response:
            return await _echo(self.app_name, request)

        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.app_port).start()
        self._app = runner

    @property
    def proxy_dir(self) -> Path:
        """The agent's proxy dir, where it writes ``smc-sds/default.json``: the Envoy's working
        directory (a private temporary directory)."""
        if self._agent_dir is None:
            self._agent_dir = Path(tempfile.mkdtemp(prefix="smc-agent-"))
        return self._agent_dir

    async def start_agent(
        self, cp: ControlPlane, *, service_account: str, kind: str = "vm"
    ) -> Agent:
        """Run an SMC agent for this registered sidecar (a VM, or a pod outside Kubernetes): a
        join token from ``cp``, the key made here, its certificate written to
        :attr:`proxy_dir`; its Envoy then speaks mTLS to ADS with it. Returns once it serves."""
        self._ca_pem = cp.ca_bundle()
        self.agent, self._agent_task, self._agent_stop = await run_agent(
            cp, self, service_account=service_account, kind=kind, proxy_dir=self.proxy_dir
        )
        return self.agent

    @property
    def agent_ready_file(self) -> Path:
        return self.proxy_dir / "ready.json"

    @property
    def agent_log(self) -> Path:
        return self.proxy_dir / "agent.log"

    async def start_agent_process(
        self,
        cp: ControlPlane,
        *,
        service_account: str,
        kind: str = "vm",
        timeout: float = 60,
        new_token: bool = True,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> asyncio.subprocess.Process:
        """Like :meth:`start_agent`, but the deployable agent: ``python -m smc.agent`` as its
        own process (standard library only), its stdout and stderr in :attr:`agent_log`.
        Returns once its ready file is written. ``new_token=False``: a restart with the join
        token of the first start; ``wrap``: how to run the command (e.g. in a memory cgroup,
        :meth:`smc.testing.cgroup.MemoryCgroup.wrap`; the same pid)."""

        folder = self.proxy_dir
        self._ca_pem = cp.ca_bundle()
        token_file = folder / "join-token"
        if new_token:
            token = await cp.join_token(
                namespace=self.namespace,
                name=self.name,
                service_account=service_account,
                kind=kind,
            )
            token_file.write_text(token)
            token_file.chmod(0o600)
        (folder / "ca.pem").write_text(cp.ca_bundle())
        argv = [
            sys.executable, "-m", "smc.agent", "--node-id", self.node_id,
            "--ca-address", f"127.0.0.1:{cp.ca_port}", "--ca-bundle", str(folder / "ca.pem"),
            "--proxy-dir", str(folder), "--join-token-file", str(token_file),
            "--ready-file", str(self.agent_ready_file), "--retry-initial", "0.1",
        ]  # fmt: skip
        if wrap is not None:
            argv = wrap(argv)
        with open(self.agent_log, "ab") as out:
            proc = self.agent_process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.agent_ready_file.exists():
            if proc.returncode is not None:
                raise RuntimeError(f"agent exited: {self.agent_log.read_text()[-3000:]}")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"agent process of {self.node_id}: no certificate")
            await asyncio.sleep(0.01)
        return proc

    async def stop_agent_process(self) -> int | None:
        """SIGTERM the agent process; its exit status."""
        proc, self.agent_process = self.agent_process, None
        if proc is None:
            return None
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        return proc.returncode

    def start_envoy(
        self,
        *,
        ads_port: int,
        delta: bool,
        stats_sink: bool = False,
        runtime: dict[str, Any] | None = None,
        args: tuple[str, ...] = (),
        own_secret: bool = False,
        ads_tls: AdsTLS | None = None,
    ) -> None:
        """Start the Envoy; ``stats_sink``: it streams its stats to the control plane (the
        traffic edges of the console's map); ``runtime``: Envoy runtime keys; ``args``: more
        Envoy command-line options. ``own_secret``: no agent, the test is the proxy's host and
        writes a throwaway self-signed key where an agent would
        (:func:`smc.testing.envoy.write_validate_secret`), so that an Envoy of a control plane
        with agents (``smc serve``'s default, cleartext ADS: no key on it) loads the listeners
        and clusters that read that file; not a mesh credential (no mTLS traffic with it).
        ``ads_tls``: mTLS to ADS with this client certificate (a control plane with its own
        keys, ``--xds-tls``) instead of the agent's."""
        if own_secret and not self._has_agent:
            from smc.testing.envoy import write_validate_secret

            write_validate_secret(self.proxy_dir)
        boot = ads_bootstrap(
            node_id=self.node_id,
            cluster=self.name,
            ads_host="127.0.0.1",
            ads_port=ads_port,
            delta=delta,
            admin_port=free_port(),
            stats_sink=stats_sink,
            runtime=runtime,
            transport_socket=(
                ads_tls_transport_socket(ca_pem=self._ca_pem, server_san="127.0.0.1")
                if self._has_agent and ads_tls is None
                else None
            ),
            tls=ads_tls,
        )
        self.envoy = EnvoyProcess(
            bootstrap=boot,
            workdir=self.workdir / f"envoy-{self.name}-{'delta' if delta else 'sotw'}",
            log_level="warning",
            args=args,
            # the agent's file-based SDS paths are relative to the Envoy's working directory
            cwd=self.proxy_dir if self._has_agent or own_secret else None,
        )
        self.envoy.start()

    @property
    def _has_agent(self) -> bool:
        return self.agent is not None or self.agent_process is not None

    async def stop(self) -> None:
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)
            self.envoy = None
        await self.stop_agent_process()
        if self._agent_task is not None:
            self._agent_stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._agent_task, timeout=5)
            self._agent_task = None
        if self._agent_dir is not None:
            shutil.rmtree(self._agent_dir, ignore_errors=True)
            self._agent_dir = None
        if self._app is not None:
            await self._app.cleanup()
            self._app = None

    def rejected(self) -> dict[str, int]:
        """Non-zero ``*update_rejected`` counters of the Envoy (a NACK each)."""
        assert self.envoy is not None
        return {k: v for k, v in self.envoy.stats().items() if k.endswith("update_rejected") and v}

    def cert_serials(self) -> set[int]:
        """Serials of the certificates the Envoy has loaded (which workload certificate it
        serves now)."""
        assert self.envoy is not None
        return self.envoy.cert_serials()


class _Proxy(Protocol):
    namespace: str
    name: str

    @property
    def node_id(self) -> str: ...


async def run_agent(
    cp: ControlPlane, proxy: _Proxy, *, service_account: str, kind: str, proxy_dir: Path
) -> tuple[Agent, asyncio.Task[None], asyncio.Event]:
    """An in-process SMC agent for ``proxy``, registered workload ``kind/namespace/name``: a
    join token from ``cp`` in ``proxy_dir``, the key made here, its certificate written
    there. Returns once it serves: the agent, its task and the event that stops it."""
    node_id, namespace, name = proxy.node_id, proxy.namespace, proxy.name
    token_file = proxy_dir / "join-token"
    token_file.write_text(
        await cp.join_token(
            namespace=namespace, name=name, service_account=service_account, kind=kind
        )
    )
    token_file.chmod(0o600)
    agent = Agent(
        AgentConfig(
            proxy=node_id,
            ca_address=f"127.0.0.1:{cp.ca_port}",
            ca_bundle_pem=cp.ca_bundle(),
            proxy_dir=proxy_dir,
            join_token_file=token_file,
            retry_initial=0.1,
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop=stop))
    ready = asyncio.ensure_future(agent.ready.wait())
    await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()  # raises what stopped the agent
    if not agent.ready.is_set():
        stop.set()
        raise TimeoutError(f"agent of {node_id}: no certificate in 30s")
    return agent, task, stop


async def wait_reachable(
    session: aiohttp.ClientSession,
    sidecar: Sidecar,
    *,
    host: str,
    path: str = "/",
    timeout: float = 30.0,
    cp: ControlPlane | None = None,
) -> None:
    """Poll ``sidecar``'s outbound listener with ``GET path`` (``Host: host``) until it answers
    200: the mesh carries the request end to end. Connection errors and other statuses are
    retried; after ``timeout`` seconds raises AssertionError with the last answer and, given
    ``cp``, its :meth:`ControlPlane.diagnosis`."""
    deadline = time.monotonic() + timeout
    last = "nothing yet"
    while True:
        try:
            async with session.get(sidecar.outbound + path, headers={"Host": host}) as resp:
                await resp.read()
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            where = f"\n{cp.diagnosis()}" if cp is not None else ""
            raise AssertionError(
                f"no request from {sidecar.node_id} to {host}{path} through the mesh within "
                f"{timeout}s (last answer: {last}){where}"
            )
        await asyncio.sleep(0.1)


def vm_yaml(
    sidecar: Sidecar,
    *,
    service_account: str,
    labels: dict[str, str] | None = None,
    services: tuple[str, ...] = (),
) -> str:
    """The VirtualMachine manifest registering ``sidecar`` (app port as ``smc.dev/app-port``)."""
    all_labels = {"smc.dev/app-port": str(sidecar.app_port), **(labels or {})}
    label_lines = "".join(f'\n    {k}: "{v}"' for k, v in sorted(all_labels.items()))
    svc = f"\n  services: [{', '.join(services)}]" if services else ""
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
        f"metadata:\n  name: {sidecar.name}\n  namespace: {sidecar.namespace}\n"
        f"  labels:{label_lines}\n"
        f"spec:\n  address: {sidecar.address}\n  serviceAccount: {service_account}{svc}\n"
    )
