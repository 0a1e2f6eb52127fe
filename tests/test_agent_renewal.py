"""Agents renew on their own schedule, with a fresh key, and traffic does not notice.

Proxy certificates of 8 s (a control plane with agents, smc.testing.mesh): each agent renews at
about two thirds of the lifetime with its current certificate as proof, the running Envoy takes
the new secret from the file the agent replaced (file-based SDS), the previous certificate is recorded as superseded,
and requests from a client sidecar to a server sidecar keep succeeding across several renewals
of both.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from smc.projections import CertsProjection
from smc.testing.manifests import client_server_yaml
from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml, wait_reachable

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.envoy]

SETUP = client_server_yaml("renew", matches=[("all", "/.*", ["GET"])])


async def test_agents_renew_by_themselves_without_failed_requests(tmp_path: Path) -> None:
    cp = ControlPlane(workdir=tmp_path, agents=True, proxy_cert_lifetime=timedelta(seconds=8))
    await cp.start()
    client = Sidecar(namespace="renew", name="client-1", address="127.0.62.1", workdir=tmp_path)
    server = Sidecar(namespace="renew", name="server-1", address="127.0.62.2", workdir=tmp_path)
    try:
        for s in (client, server):
            await s.start_app()
        await cp.apply(
            "\n---\n".join(
                [
                    SETUP,
                    vm_yaml(client, service_account="client"),
                    vm_yaml(server, service_account="server", labels={"app": "server"}),
                ]
            )
        )
        await client.start_agent(cp, service_account="client")
        await server.start_agent(cp, service_account="server")
        for s in (client, server):
            s.start_envoy(ads_port=cp.port, delta=False)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as session:

            async def get() -> int:
                async with session.get(
                    client.outbound + "/x", headers={"Host": "server.renew"}
                ) as resp:
                    await resp.read()
                    return resp.status

            await wait_reachable(session, client, host="server.renew", path="/x", cp=cp)
            assert client.agent is not None and server.agent is not None
            first = {client.agent.current.serial, server.agent.current.serial}  # type: ignore[union-attr]
            statuses: list[int] = []
            deadline = time.monotonic() + 40
            while client.agent.renewals < 2 or server.agent.renewals < 2:
                assert time.monotonic() < deadline, (client.agent.renewals, server.agent.renewals)
                statuses.append(await get())
                await asyncio.sleep(0.05)
            for _ in range(20):  # and after the last renewal
                statuses.append(await get())
                await asyncio.sleep(0.05)
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        assert client.agent.failures == 0 and server.agent.failures == 0
        certs = next(p for p in cp.runner.projections if isinstance(p, CertsProjection))
        for sc in (client, server):
            mine = certs.proxy_certs[f"vm/renew/{sc.name}"]
            assert len(mine) >= 3
            assert [r.status for r in mine.values()].count("active") == 1
            renewals = [r for r in mine.values() if r.proof.startswith("certificate:")]
            assert len(renewals) >= 2
            assert sc.agent is not None and sc.agent.current is not None
            assert sc.agent.current.serial not in first
    finally:
        for s in (client, server):
            await s.stop()
        await cp.stop()
        cp.close()


async def test_a_restarted_agent_serves_its_saved_key_and_renews_with_it(tmp_path: Path) -> None:
    """A VM reboots: its join token was used once, but the agent's key (0600) and certificate
    are still in its proxy dir on the VM (smc-sds, 0750), so it serves them at once and renews
    with the certificate; without them the used token gets nothing."""
    import stat

    from smc.agent import Agent, AgentConfig

    cp = ControlPlane(workdir=tmp_path, agents=True)
    await cp.start()
    try:
        vm = Sidecar(namespace="renew", name="vm-1", address="127.0.62.9", workdir=tmp_path)
        await cp.apply(vm_yaml(vm, service_account="app"))
        token = await cp.join_token(namespace="renew", name="vm-1", service_account="app")
        (tmp_path / "token").write_text(token)
        home = tmp_path / "vm-home"
        state = home / "smc-sds"

        def make(proxy_dir: Path) -> Agent:
            return Agent(
                AgentConfig(
                    proxy="renew/vm-1",
                    ca_address=f"127.0.0.1:{cp.ca_port}",
                    ca_bundle_pem=cp.ca_bundle(),
                    proxy_dir=proxy_dir,
                    join_token_file=tmp_path / "token",
                    retry_initial=0.05,
                )
            )

        async def run_until_ready(agent: Agent, timeout: float) -> bool:
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop=stop))
            try:
                await asyncio.wait_for(agent.ready.wait(), timeout=timeout)
                return True
            except TimeoutError:
                return False
            finally:
                stop.set()
                await task

        first = make(home)
        assert await run_until_ready(first, 30)
        assert first.current is not None
        serial = first.current.serial
        assert stat.S_IMODE(state.stat().st_mode) == 0o750
        assert stat.S_IMODE((state / "default.json").stat().st_mode) == 0o640
        # restarted: the saved certificate is served at once, no new proof needed
        second = make(home)
        assert await run_until_ready(second, 10)
        assert second.current is not None and second.current.serial == serial
        renewed = await second.request()
        assert renewed.serial != serial
        certs = next(p for p in cp.runner.projections if isinstance(p, CertsProjection))
        assert certs.proxy_certs["vm/renew/vm-1"][renewed.serial].proof == f"certificate:{serial}"
        # without the state, the used join token gets nothing
        third = make(Path(tempfile.mkdtemp(prefix="smc-t-")))
        assert not await run_until_ready(third, 2)
        assert third.failures > 0 and "join-token-replayed" in (third.last_error or "")
        raw = b"".join(f.read_bytes() for f in tmp_path.glob("log.db*"))
        assert b"PRIVATE KEY" not in raw
    finally:
        await cp.stop()
        cp.close()
