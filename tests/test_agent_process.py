"""The deployable agent, ``python -m smc.agent``, as its own process beside real Envoys.

A control plane with agents (smc.testing.mesh, proxy certificates of 8 s) and two VM sidecars
whose agents run as processes (standard library only: keys through OpenSSL's links in
Python's ``ssl``, the CSR over HTTPS), each in its own memory cgroup limited to 30 MB as a
pod's container would be. Checked:

- traffic client -> server over mTLS keeps succeeding while both agents renew several times
  (each renewal replaces ``smc-sds/default.json``; Envoy reloads it on the rename; no NACK);
- the agent stays small through its renewals: no child process, neither grpcio nor
  cryptography mapped, its peak (VmHWM: every page it mapped, shared or not) < 30 MB, and the
  kernel's peak charge of its cgroup (``memory.max_usage_in_bytes``: anonymous memory, the page
  cache it brought in, kernel memory) < 30 MB with no OOM kill under the 30 MB limit;
- from the attacker's side: the key's file and directory cannot be read nor listed by another
  user; no key byte is in the agent's output (its log), its ready file, its public status,
  nor on the control plane's log;
- a SIGTERM stops it cleanly; restarted, it serves the certificate it holds at once (its
  one-time join token is used) and renews with it; once that certificate is revoked, the agent
  neither renews with it nor replays the spent join token, and a new join token written to the
  file brings it back without a restart; a proxy dir whose ``smc-sds`` is a symlink is
  refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from smc.agent._files import read_secret
from smc.auth import token_digest
from smc.events import ProxyCertificateRevoked, deterministic_id, make_event
from smc.projections import CertsProjection
from smc.testing import cgroup
from smc.testing.manifests import client_server_yaml
from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml, wait_reachable

pytestmark = [pytest.mark.envoy]

NOBODY = 65534

SETUP = client_server_yaml("aproc", matches=[("all", "/.*", ["GET"])])


LIMIT = 30 * 1024 * 1024  # the pod's memory limit the target names


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    return int(_status(pid)[field].split()[0]) / 1024


def _ready(sc: Sidecar) -> dict[str, object]:
    data = json.loads(sc.agent_ready_file.read_text())
    assert isinstance(data, dict)
    return data


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), user=NOBODY, group=NOBODY, capture_output=True, text=True, check=False
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_agent_processes_renew_hitless_stay_small_and_keep_their_keys(
    tmp_path: Path,
) -> None:
    cp = ControlPlane(workdir=tmp_path, agents=True, proxy_cert_lifetime=timedelta(seconds=8))
    await cp.start()
    groups: list[cgroup.MemoryCgroup] | None = [] if cgroup.available() else None
    client = Sidecar(namespace="aproc", name="client-1", address="127.0.63.1", workdir=tmp_path)
    server = Sidecar(namespace="aproc", name="server-1", address="127.0.63.2", workdir=tmp_path)
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
        for s, sa in ((client, "client"), (server, "server")):
            if groups is not None:
                group = cgroup.MemoryCgroup(f"smc-test-{os.getpid()}-{s.name}", limit_bytes=LIMIT)
                groups.append(group)
            await s.start_agent_process(
                cp, service_account=sa, wrap=None if groups is None else groups[-1].wrap
            )
            s.start_envoy(ads_port=cp.port, delta=False)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as session:

            async def get() -> int:
                async with session.get(
                    client.outbound + "/x", headers={"Host": "server.aproc"}
                ) as resp:
                    await resp.read()
                    return resp.status

            await wait_reachable(session, client, host="server.aproc", path="/x", timeout=40, cp=cp)
            first = {str(_ready(s)["serial"]) for s in (client, server)}
            statuses: list[int] = []
            rss: list[float] = []
            deadline = time.monotonic() + 60
            while any(int(str(_ready(s)["certificates"])) < 3 for s in (client, server)):
                assert time.monotonic() < deadline, [_ready(s) for s in (client, server)]
                statuses.append(await get())
                for s in (client, server):
                    assert s.agent_process is not None
                    rss.append(_rss_mb(s.agent_process.pid))
                await asyncio.sleep(0.05)
            for _ in range(20):  # and after the last renewal
                statuses.append(await get())
                await asyncio.sleep(0.05)
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        for s in (client, server):
            assert s.envoy is not None and not s.rejected(), s.rejected()
            stats = s.envoy.stats()
            assert stats.get("sds.default.update_success", 0) >= 3, stats
        certs = next(p for p in cp.runner.projections if isinstance(p, CertsProjection))
        for s in (client, server):
            mine = certs.proxy_certs[f"vm/aproc/{s.name}"]
            assert len([r for r in mine.values() if r.proof.startswith("certificate:")]) >= 2
            assert str(_ready(s)["serial"]) not in first
            assert int(str(_ready(s)["failures"])) == 0
            # the agent is small, holds neither grpcio nor cryptography, and starts no child
            assert s.agent_process is not None
            pid = s.agent_process.pid
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "cygrpc" not in maps and "_rust.abi3" not in maps
            assert _rss_mb(pid, "VmHWM") < 30.0, _status(pid)
            assert int(str(_ready(s)["peak_rss_kb"])) / 1024 < 30.0
            assert not Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert max(rss) < 30.0, max(rss)
        if groups is not None:  # what the kernel charged each agent, as a pod's limit would
            for group in groups:
                fig = group.figures()
                print(group.path.name, {k: round(v, 2) for k, v in fig.items()})
                assert fig["max_usage_mb"] < 30.0 and fig["oom_kills"] == 0, fig

        # -- the attacker's side: another user, logs, status files ---------------------------
        sds = server.proxy_dir / "smc-sds"
        secret = sds / "default.json"
        assert (sds.stat().st_mode & 0o007) == 0 and (secret.stat().st_mode & 0o037) == 0
        os.chmod(server.proxy_dir, 0o755)  # even with the proxy dir itself open to everyone
        assert _as_nobody("cat", str(secret)).returncode != 0
        assert _as_nobody("ls", str(sds)).returncode != 0
        found = read_secret(server.proxy_dir)
        assert found is not None
        key_pem = found[1]
        # the base64 of the key's private scalar (the first 48 characters, PKCS #8's header,
        # are the same in every P-256 key), whatever the line breaks
        body = "".join(key_pem.strip().splitlines()[1:-1])[48:]
        for s in (client, server):
            for text in (
                s.agent_log.read_text(errors="replace"),
                s.agent_ready_file.read_text(),
                (s.proxy_dir / "smc-sds" / "certificate.json").read_text(),
            ):
                assert "PRIVATE KEY" not in text
                assert body[:40] not in text.replace("\\n", "").replace("\n", "")
        raw = b"".join(f.read_bytes() for f in tmp_path.glob("log.db*"))
        assert b"PRIVATE KEY" not in raw and body[:40].encode() not in raw

        # -- SIGTERM, then a restart: the held certificate, renewed with itself --------------
        held = str(_ready(server)["serial"])
        started = time.monotonic()
        assert await server.stop_agent_process() == 0
        assert time.monotonic() - started < 10
        server.agent_ready_file.unlink()
        await server.start_agent_process(cp, service_account="server", new_token=False)
        # held until due, then renewed with itself: the used join token is never shown again
        deadline = time.monotonic() + 30
        mine = certs.proxy_certs["vm/aproc/server-1"]
        while not any(r.proof == f"certificate:{held}" for r in mine.values()):
            assert time.monotonic() < deadline, server.agent_log.read_text()[-3000:]
            await asyncio.sleep(0.1)
            mine = certs.proxy_certs["vm/aproc/server-1"]
        # -- revoked: the certificate is no proof any more, the spent join token neither; a new
        #    join token written to the file brings the running agent back ------------------
        revoked: set[str] = set()

        async def revoke(serial: str) -> None:
            revoked.add(serial)
            await asyncio.to_thread(cp.issuer.revoke, serial=serial)
            await asyncio.to_thread(
                cp.log.append,
                [
                    make_event(
                        ProxyCertificateRevoked,
                        source="test",
                        actor="ca",
                        event_id=deterministic_id("test", "revoke", serial),
                        proxy="vm/aproc/server-1",
                        serial=serial,
                        identity="spiffe://cluster.local/ns/aproc/sa/server",
                        reason="test",
                    )
                ],
            )

        deadline = time.monotonic() + 40
        while "was used already" not in server.agent_log.read_text():
            assert time.monotonic() < deadline, server.agent_log.read_text()[-3000:]
            current = str(_ready(server)["serial"])
            if current not in revoked:  # it may renew before the revocation is applied
                await revoke(current)
            await asyncio.sleep(0.1)
        assert "certificate-revoked" in server.agent_log.read_text()
        fresh = await cp.join_token(namespace="aproc", name="server-1", service_account="server")
        (server.proxy_dir / "join-token").write_text(fresh)
        deadline = time.monotonic() + 60
        while str(_ready(server)["serial"]) in revoked:
            assert time.monotonic() < deadline, server.agent_log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        latest = certs.proxy_certs["vm/aproc/server-1"][str(_ready(server)["serial"])]
        assert latest.proof == f"join-token:{token_digest(fresh)}"
        # the spent join token was never presented again, not even after the restart
        assert cp.identity is not None
        assert cp.identity.refused.get("join-token-replayed", 0) == 0, cp.identity.refused
        assert cp.identity.refused.get("certificate-revoked", 0) >= 1
    finally:
        for s in (client, server):
            await s.stop()
        await cp.stop()
        cp.close()
        for group in groups or ():
            group.remove()


async def test_agent_process_writes_and_renews_pem_files_for_proxyless_grpc(
    tmp_path: Path,
) -> None:
    """``python -m smc.agent --cert-dir D`` (a proxyless gRPC workload's ``file_watcher``
    files): cert.pem (leaf and chain), key.pem (0600, the agent's key, matching the leaf) and
    ca.pem (the mesh roots), replaced at each renewal; no key anywhere else but the proxy dir."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cp = ControlPlane(workdir=tmp_path, agents=True, proxy_cert_lifetime=timedelta(seconds=4))
    await cp.start()
    grpc_app = Sidecar(namespace="aproc", name="greeter-1", address="127.0.63.9", workdir=tmp_path)
    files = tmp_path / "grpc-certs"
    try:
        await cp.apply("\n---\n".join([SETUP, vm_yaml(grpc_app, service_account="greeter")]))
        await grpc_app.start_agent_process(
            cp, service_account="greeter", wrap=lambda argv: [*argv, "--cert-dir", str(files)]
        )
        seen: set[int] = set()
        deadline = time.monotonic() + 40
        while len(seen) < 3:  # the first certificate and two renewals
            assert time.monotonic() < deadline, grpc_app.agent_log.read_text()[-3000:]
            try:
                chain = x509.load_pem_x509_certificates((files / "cert.pem").read_bytes())
                key = serialization.load_pem_private_key((files / "key.pem").read_bytes(), None)
            except (OSError, ValueError):  # between the two renames of a renewal
                await asyncio.sleep(0.05)
                continue
            leaf_key = (
                chain[0]
                .public_key()
                .public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            mine = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if leaf_key == mine:
                seen.add(chain[0].serial_number)
            await asyncio.sleep(0.05)
        assert (files / "key.pem").stat().st_mode & 0o077 == 0
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://cluster.local/ns/aproc/sa/greeter"
        ]
        roots = x509.load_pem_x509_certificates((files / "ca.pem").read_bytes())
        assert {r.subject for r in roots} >= {chain[-1].issuer}
        assert int(str(_ready(grpc_app)["failures"])) == 0
    finally:
        await grpc_app.stop()
        await cp.stop()
        cp.close()


@pytest.mark.parametrize("command", [["smc.agent"], ["smc.cli", "agent"]])
def test_a_symlinked_sds_dir_is_refused(tmp_path: Path, command: list[str]) -> None:
    """Someone who may write the proxy dir points ``smc-sds`` elsewhere: the agent refuses to
    start rather than write the key there (``smc agent`` becomes ``python -m smc.agent``)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proxy = tmp_path / "proxy"
    proxy.mkdir()
    (proxy / "smc-sds").symlink_to(elsewhere)
    (tmp_path / "ca.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
    )
    done = subprocess.run(
        [
            sys.executable, "-m", *command, "--node-id", "ns/p", "--ca-address",
            "127.0.0.1:1", "--ca-bundle", str(tmp_path / "ca.pem"), "--proxy-dir", str(proxy),
            "--token-file", str(tmp_path / "token"),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "smc-sds" in done.stderr and "not a directory" in done.stderr
    assert not any(elsewhere.iterdir())


def test_an_sds_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    """Another user made ``smc-sds`` first (to read what lands in it): the agent refuses it."""
    proxy = tmp_path / "proxy"
    (proxy / "smc-sds").mkdir(parents=True)
    os.chown(proxy / "smc-sds", NOBODY, NOBODY)
    (tmp_path / "ca.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
    )
    done = subprocess.run(
        [
            sys.executable, "-m", "smc.agent", "--node-id", "ns/p", "--ca-address",
            "127.0.0.1:1", "--ca-bundle", str(tmp_path / "ca.pem"), "--proxy-dir", str(proxy),
            "--token-file", str(tmp_path / "token"),
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"belongs to uid {NOBODY}" in done.stderr
    assert not any((proxy / "smc-sds").iterdir())
