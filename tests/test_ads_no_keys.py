"""No private key on cleartext ADS, whatever ``smc serve`` is told (from the attacker's side).

Against real ``smc serve`` children, a gRPC client on the host that claims a registered
workload's node id, as an attacker would:

- serve's default (agents make the keys, ADS over mTLS): the cleartext client cannot even
  open a stream;
- agents with ``--xds-plaintext`` (tests, isolated networks): the stream is served, and
  asking for every secret by name (``default``, ``ROOTCA``, the identity's SPIFFE id) plus
  listeners and clusters yields the roots only: no answer carries a private key;
- the control plane's own keys (``--workload-keys control-plane``) were removed: serve
  refuses the option (exit status 2, the option and docs/identity.md named) before it makes
  any key.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from smc.testing.manifests import one_vm_service_yaml
from smc.testing.serve import ServeProcess
from smc.xds import CLUSTER, LISTENER, SECRET

pytestmark = pytest.mark.timeout(180)

VM = one_vm_service_yaml()
NODE = "demo/web-1"
SECRETS = ["default", "ROOTCA", "spiffe://cluster.local/ns/demo/sa/web"]


async def _ask_everything(port: int, *, wait: float = 20.0) -> list[bytes]:
    """A cleartext ADS stream as ``NODE`` asking for clusters, listeners and every secret by
    name, ACKing each answer as Envoy does; the serialized answers received until each type
    answered (raises the stream's RpcError)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(chan)
        node = base_pb2.Node(id=NODE)
        outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        names = {SECRET: SECRETS}
        for t in (CLUSTER, LISTENER, SECRET):
            outbox.put_nowait(
                discovery_pb2.DiscoveryRequest(type_url=t, node=node, resource_names=names.get(t))
            )

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while (req := await outbox.get()) is not None:
                yield req

        call = stub.StreamAggregatedResources(requests())
        got: list[bytes] = []
        types: set[str] = set()
        try:
            async with asyncio.timeout(wait):
                while types != {CLUSTER, LISTENER, SECRET}:
                    resp = await call.read()
                    assert resp is not grpc.aio.EOF
                    got.append(resp.SerializeToString())
                    types.add(resp.type_url)
                    outbox.put_nowait(  # the ACK
                        discovery_pb2.DiscoveryRequest(
                            type_url=resp.type_url,
                            node=node,
                            version_info=resp.version_info,
                            response_nonce=resp.nonce,
                            resource_names=names.get(resp.type_url),
                        )
                    )
        finally:
            outbox.put_nowait(None)
            call.cancel()
        return got


def _apply(serve: ServeProcess) -> None:
    status, body = serve.request(
        "/v1/apply", method="POST", body=VM, headers={"Content-Type": "application/yaml"}
    )
    assert status == 200, body


async def test_agents_with_cleartext_ads_serve_no_key_to_a_stolen_node_id(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path)  # agents (serve's default) with --xds-plaintext
    try:
        await asyncio.to_thread(serve.wait_ready)
        await asyncio.to_thread(_apply, serve)
        answers = await _ask_everything(serve.xds_port)
        secrets = [
            r
            for raw in answers
            for r in discovery_pb2.DiscoveryResponse.FromString(raw).resources
            if r.type_url == SECRET
        ]
        assert secrets, "no secret answer at all"
        blob = b"".join(answers)
        assert b"PRIVATE KEY" not in blob and b"private_key" not in blob
        for r in secrets:  # the roots only
            assert b"ROOTCA" in r.value and b"PRIVATE" not in r.value
        # and the control plane made none: its key directory holds no key
        assert not list((tmp_path / "keys").glob("*.key")), list((tmp_path / "keys").iterdir())
    finally:
        serve.stop()


async def test_default_serve_has_no_cleartext_ads_at_all(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path, args=["--workload-keys", "agent"])  # serve's own defaults
    try:
        await asyncio.to_thread(serve.wait_ready)
        await asyncio.to_thread(_apply, serve)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _ask_everything(serve.xds_port, wait=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        serve.stop()


@pytest.mark.parametrize(
    "extra", [["--xds-plaintext"], ["--xds-plaintext", "--xds-tls"], ["--xds-tls"], []], ids=str
)
def test_control_plane_keys_are_never_served_in_cleartext(tmp_path: Path, extra: list[str]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "smc.cli",
            "--log",
            f"sqlite:///{tmp_path / 'log.db'}",
            "serve",
            "--http",
            "off",
            "--xds",
            "127.0.0.1:1",
            "--ca",
            f"local:{tmp_path / 'ca'}",
            "--keys",
            str(tmp_path / "keys"),
            "--workload-keys",
            "control-plane",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--workload-keys" in done.stderr and "docs/identity.md" in done.stderr, done.stderr
    assert not (tmp_path / "keys").exists() or not any((tmp_path / "keys").iterdir())
