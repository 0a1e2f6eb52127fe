"""Misbehaving applications in pods of the transparent sidecar model, for traffic-policy tests.

Role: :class:`PodAppSidecar` is one workload of the transparent model on a
:class:`~smc.testing.netns.PodNetwork`: a pod network namespace whose TCP the sidecar
injector's own iptables rules (:func:`smc.injector.redirect_commands`, nat table) send through
a real Envoy running inside it as the proxy's UID, with a :class:`~smc.testing.apps.MisbehavingApp`
on ``127.0.0.1:8080`` behind it. Applications in a pod know nothing of the mesh, so the test
acts *from inside* the pod through a small driver (this module run as ``python -m
smc.testing.podapps NAME``, as root, whose connections iptables intercepts like any
application's): it makes HTTP requests and TCP/TLS connections on the test's behalf and turns
the app's failure mode on and off. The driver listens on :data:`CONTROL_PORT`, excluded from
inbound interception (like a port named in ``smc.dev/exclude-inbound-ports``). The pod calls a
mesh service at :data:`SERVICE_VIP` (any address: the outbound listener routes by destination
port and Host, as for a ClusterIP).

Concurrency: the driver is one asyncio process per pod; :class:`PodAppSidecar` methods run on
the test's event loop (admin calls of its Envoy block: call them from a worker thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from smc.testing.apps import MisbehavingApp

if TYPE_CHECKING:
    from smc.testing.envoy import AdsTLS

__all__ = ["APP_PORT", "CONTROL_PORT", "SERVICE_VIP", "PodAppSidecar"]

#: The driver's port in every pod (not intercepted).
CONTROL_PORT = 15080
#: The application's port in every pod (services' target ports land here through the sidecar).
APP_PORT = 8080
#: The address pods call mesh services at (the outbound listener matches the port and Host).
SERVICE_VIP = "10.96.0.10"
#: The proxy's UID and GID (the injector's default; iptables lets its own traffic out).
PROXY_UID = 1337
ADMIN_PORT = 15000


class PodAppSidecar:
    """A pod with an application, a driver and (after :meth:`start_envoy`) its sidecar."""

    def __init__(self, *, net: Any, namespace: str, name: str, workdir: Path) -> None:
        from smc.testing.netns import PodNetwork

        assert isinstance(net, PodNetwork)
        self.net = net
        self.namespace = namespace
        self.name = name
        self.app_name = name
        self.app_port = APP_PORT
        self.workdir = workdir
        self.pod = net.add_pod(name)
        self.address = self.pod.address
        self.envoy: Any = None
        self._session: aiohttp.ClientSession | None = None
        # The pod's SMC agent (in this process, the pod's host): see start_agent
        self.proxy_dir = workdir / f"agent-{name}"
        self._ca_pem: str | None = None
        self._agent: tuple[Any, asyncio.Task[None], asyncio.Event] | None = None

    @property
    def node_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def control(self) -> str:
        return f"http://{self.address}:{CONTROL_PORT}"

    async def start_app(self) -> None:
        """Intercept the pod's traffic (the init container's rules) and start app + driver."""
        from smc.injector import AdsAddress, InjectorConfig, redirect_commands

        config = InjectorConfig(ads=AdsAddress(host=self.net.gateway, port=1), init_install="")
        assert config.proxy_uid == PROXY_UID and config.admin_port == ADMIN_PORT
        for argv in redirect_commands(config, exclude_inbound_ports=[CONTROL_PORT]):
            done = await asyncio.to_thread(self.pod.run, argv)
            if done.returncode != 0:
                raise RuntimeError(f"{self.name}: {' '.join(argv)}: {done.stderr}")
        repo = str(Path(__file__).resolve().parents[2])
        self.pod.start(
            [sys.executable, "-m", "smc.testing.podapps", self.name],
            log=self.workdir / f"{self.name}-app.log",
            env={**os.environ, "PYTHONPATH": repo},
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with self._session.get(self.control + "/ping") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the driver of pod {self.name} did not answer in 30 s")

    async def start_agent(self, cp: Any, *, service_account: str, kind: str = "vm") -> None:
        """Run the pod's SMC agent (in this process, playing the pod's host): its key made here
        and certified through ``cp``'s certificate service, written to :attr:`proxy_dir`, which
        the proxy's group may read (its Envoy runs there as the proxy UID). Returns once it
        serves."""
        from smc.testing.sidecar import run_agent

        self.proxy_dir.mkdir(mode=0o750, exist_ok=True)
        self._ca_pem = cp.ca_bundle()
        self._agent = await run_agent(
            cp, self, service_account=service_account, kind=kind, proxy_dir=self.proxy_dir
        )
        for path in [self.proxy_dir, *self.proxy_dir.rglob("*")]:
            os.chown(path, 0, PROXY_UID)  # read by the proxy's group, written by the agent

    def start_envoy(
        self,
        *,
        ads_port: int,
        delta: bool,
        runtime: dict[str, Any] | None = None,
        args: tuple[str, ...] = (),
        ads_tls: AdsTLS | None = None,
    ) -> None:
        """Start the sidecar in the pod as the proxy's UID (admin on the pod's address);
        ``runtime``: Envoy runtime keys; ``args``: more Envoy command-line options;
        ``ads_tls``: mTLS to ADS with this client certificate (inline in the bootstrap)."""
        from smc.agent import ads_tls_transport_socket
        from smc.testing.envoy import EnvoyProcess, ads_bootstrap, envoy_binary
        from smc.testing.netns import world_readable_copy

        boot = ads_bootstrap(
            node_id=self.node_id,
            cluster=self.name,
            ads_host=self.net.gateway,
            ads_port=ads_port,
            delta=delta,
            admin_port=ADMIN_PORT,
            runtime=runtime,
            tls=ads_tls,
            transport_socket=(
                ads_tls_transport_socket(ca_pem=self._ca_pem, server_san=self.net.gateway)
                if self._ca_pem is not None and ads_tls is None
                else None
            ),
        )
        boot["admin"] = {"address": {"socket_address": {"address": "0.0.0.0", "port_value": 15000}}}
        binary = world_readable_copy(envoy_binary(), self.net.workdir / "bin")
        workdir = self.net.workdir / f"envoy-{self.name}"
        workdir.mkdir(exist_ok=True)
        os.chown(workdir, PROXY_UID, PROXY_UID)
        pod = self.pod
        self.envoy = EnvoyProcess(
            bootstrap=boot,
            workdir=workdir,
            log_level="warning",
            binary=binary,
            wrap=lambda argv: pod.argv(argv, uid=PROXY_UID, gid=PROXY_UID),
            admin_host=self.address,
            args=args,
            # the agent's file-based SDS paths are relative to the Envoy's working directory
            cwd=self.proxy_dir if self._agent is not None else None,
        )
        self.envoy.start()

    def rejected(self) -> dict[str, int]:
        """Non-zero ``*update_rejected`` counters of the Envoy (a NACK each)."""
        stats: dict[str, int] = self.envoy.stats()
        return {k: v for k, v in stats.items() if k.endswith("update_rejected") and v}

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.post(self.control + path, json=body) as resp:
            resp.raise_for_status()
            out: dict[str, Any] = await resp.json()
            return out

    async def set_failing(self, on: bool) -> None:
        await self._call("/failing", {"on": on})

    async def http(
        self, url: str, *, host: str, method: str = "GET", timeout: float = 5.0
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        """An HTTP request made by the pod (status 0: no answer)."""
        got = await self._call(
            "/http", {"url": url, "host": host, "method": method, "timeout": timeout}
        )
        return int(got["status"]), got.get("body"), dict(got.get("headers") or {})

    async def tcp(
        self, host: str, port: int, data: bytes, *, tls: tuple[str, str] | None = None
    ) -> bytes | None:
        """Send ``data`` on a connection the pod opens (``tls``: SNI and CA file) and read
        until the peer closes; None when no connection (or handshake) was made."""
        got = await self._call(
            "/tcp",
            {"host": host, "port": port, "data": data.decode(), "tls": list(tls) if tls else None},
        )
        reply = got.get("reply")
        return None if reply is None else str(reply).encode()

    async def stop(self) -> None:
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)
            self.envoy = None
        if self._agent is not None:
            _, task, stop = self._agent
            self._agent = None
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=5)
        await asyncio.to_thread(self.pod.stop_all)
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---- the driver (runs inside the pod) ------------------------------------------------------


async def _serve(name: str) -> None:
    app = MisbehavingApp(name=name, port=APP_PORT)
    await app.start()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def ping(_request: web.Request) -> web.Response:
        return web.json_response({"app": name})

    async def failing(request: web.Request) -> web.Response:
        app.failing = bool((await request.json())["on"])
        return web.json_response({"failing": app.failing})

    async def http(request: web.Request) -> web.Response:
        q = await request.json()
        try:
            async with session.request(
                q["method"],
                q["url"],
                headers={"Host": q["host"]},
                timeout=aiohttp.ClientTimeout(total=float(q["timeout"])),
            ) as resp:
                raw = await resp.read()
                body = None
                if resp.status == 200:
                    with contextlib.suppress(ValueError):
                        body = await resp.json(content_type=None)
                del raw
                return web.json_response(
                    {"status": resp.status, "body": body, "headers": dict(resp.headers)}
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return web.json_response({"status": 0, "error": repr(exc)})

    async def tcp(request: web.Request) -> web.Response:
        q = await request.json()
        ctx: ssl.SSLContext | None = None
        sni: str | None = None
        if q.get("tls"):
            sni, ca = q["tls"]
            ctx = ssl.create_default_context(cafile=ca)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(q["host"], int(q["port"]), ssl=ctx, server_hostname=sni),
                3,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            return web.json_response({"reply": None})
        try:
            writer.write(q["data"].encode())
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 3)
        except (OSError, ssl.SSLError, TimeoutError):
            data = b""
        finally:
            writer.close()
        return web.json_response({"reply": data.decode(errors="replace")})

    control = web.Application()
    control.router.add_get("/ping", ping)
    control.router.add_post("/failing", failing)
    control.router.add_post("/http", http)
    control.router.add_post("/tcp", tcp)
    runner = web.AppRunner(control, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", CONTROL_PORT).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="a misbehaving app and its driver, in a pod")
    parser.add_argument("name")
    asyncio.run(_serve(parser.parse_args().name))


if __name__ == "__main__":
    main()
