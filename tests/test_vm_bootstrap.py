"""``smc vm bootstrap``: the bundle written for a VirtualMachine known to the registry (real
SQLite log, real CA), checked by real Envoy (``--mode validate``): no key in it, a one-time join
token (0600) recorded on the log by digest only. One VM started with the bundle's own run
script: its SMC agent makes the key on the "VM", gets a certificate with the join token from a
real ``smc serve`` (--workload-keys agent), and its Envoy gets its listeners over mTLS with it;
the same join token is refused a second time."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from smc.agent import agent_sds_config
from smc.auth import token_digest
from smc.cli import cli
from smc.events import SqliteLog
from smc.injector import find_vm, vm_node_id
from smc.injector._errors import UnknownVirtualMachine
from smc.projections import CertsProjection, ProjectionRunner, Workload
from smc.testing.envoy import envoy_binary, write_validate_secret
from smc.testing.ports import free_port

MESH = """\
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: smc-system}
spec: {trustDomain: example.org, permissiveTrafficMode: true}
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: fleet, namespace: fleet}
spec:
  backing: vm
  selector: {app: fleet}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: vm-1, namespace: fleet, labels: {app: fleet}}
spec:
  address: 127.0.52.1
  serviceAccount: fleet-app
  ports: [{name: http, port: 8080}]
"""


def run(db: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--log", f"sqlite:///{db}", *args])


@pytest.fixture
def mesh_db(tmp_path: Path) -> Path:
    db = tmp_path / "smc.db"
    manifests = tmp_path / "mesh.yaml"
    manifests.write_text(MESH)
    res = run(db, "apply", "-f", str(manifests))
    assert res.exit_code == 0, res.output
    return db


def _validate(bootstrap: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", bootstrap.name],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.envoy
def test_bootstrap_bundle_is_written_and_validates_with_envoy(
    mesh_db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    res = run(
        mesh_db,
        "vm",
        "bootstrap",
        "vm-1",
        "--namespace",
        "fleet",
        "--out",
        str(out),
        "--ads",
        "127.0.0.1:15010",
        "--ca",
        f"local:{tmp_path / 'ca'}",
    )
    assert res.exit_code == 0, res.output
    assert "node id fleet/vm-1" in res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["agent", "bootstrap.yaml", "ca.pem", "join-token", "run-envoy.sh"]
    assert stat.S_IMODE((out / "join-token").stat().st_mode) == 0o600
    assert os.access(out / "run-envoy.sh", os.X_OK)
    token = (out / "join-token").read_text().strip()
    assert len(token) >= 40
    # the log records the token's digest for this proxy, never the token
    certs = CertsProjection()
    ProjectionRunner(log=SqliteLog(mesh_db), projections=[certs]).catch_up()
    (recorded,) = [certs.join_token(d) for d in certs.join_tokens]
    assert recorded is not None
    assert recorded.token_sha256 == token_digest(token)
    assert recorded.proxy == "vm/fleet/vm-1" and not recorded.used_by
    assert token.encode() not in mesh_db.read_bytes()
    doc = yaml.safe_load((out / "bootstrap.yaml").read_text())
    assert doc["node"]["id"] == "fleet/vm-1"
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    xds = doc["static_resources"]["clusters"][0]
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 15010}
    }
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
    # the ADS client certificate and key come from the agent's file (file-based SDS, relative
    # to Envoy's working directory: run-envoy.sh runs it in the bundle's directory), the CA
    # from ca.pem
    assert tls["tls_certificate_sds_secret_configs"][0] == {
        "name": "default",
        "sds_config": agent_sds_config(),
    }
    assert len(doc["static_resources"]["clusters"]) == 1
    script = (out / "run-envoy.sh").read_text()
    assert f"--proxy-dir {out.absolute()}" in script and f"cd {out.absolute()}" in script
    assert tls["validation_context"]["trusted_ca"] == {"filename": str((out / "ca.pem").absolute())}
    for f in out.rglob("*"):
        if f.is_file():
            assert "PRIVATE KEY" not in f.read_text(), f
    assert "--join-token-file" in (out / "run-envoy.sh").read_text()
    assert ":15012" in (out / "run-envoy.sh").read_text()
    write_validate_secret(out)  # what the agent writes before run-envoy.sh starts Envoy
    done = _validate(out / "bootstrap.yaml", out)
    assert done.returncode == 0, done.stdout + done.stderr
    # A rerun replaces the bundle whole, with a new token, still 0600.
    res = run(
        mesh_db,
        "vm",
        "bootstrap",
        "vm-1",
        "-n",
        "fleet",
        "--out",
        str(out),
        "--ads",
        "cp.example.org:15010",
        "--ca",
        f"local:{tmp_path / 'ca'}",
        "--delta",
    )
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE((out / "join-token").stat().st_mode) == 0o600
    assert (out / "join-token").read_text().strip() != token
    doc = yaml.safe_load((out / "bootstrap.yaml").read_text())
    xds = doc["static_resources"]["clusters"][0]
    assert (
        xds["type"] == "STRICT_DNS"
        and xds["transport_socket"]["typed_config"]["sni"] == "cp.example.org"
    )
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert _validate(out / "bootstrap.yaml", out).returncode == 0


def test_unknown_vm_is_a_clear_error(mesh_db: Path, tmp_path: Path) -> None:
    res = run(
        mesh_db,
        "vm",
        "bootstrap",
        "vm-9",
        "-n",
        "fleet",
        "--out",
        str(tmp_path / "x"),
        "--ca",
        f"local:{tmp_path / 'ca'}",
    )
    assert res.exit_code == 1
    assert "no VirtualMachine fleet/vm-9 in the registry" in res.output
    assert "VMs in fleet: vm-1" in res.output
    assert not (tmp_path / "x").exists()
    res = run(mesh_db, "vm", "bootstrap", "vm-1", "-n", "other", "--ca", f"local:{tmp_path / 'ca'}")
    assert res.exit_code == 1 and "no VM in other" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ads", "nope"], "--ads 'nope' is not HOST:PORT"),
        (["--ads", "bad_host!:1"], "neither an IP address nor a DNS name"),
        (["--lifetime", "forever"], "not a duration"),
        (["--ca-address", "nope"], "--ca-address 'nope' is not HOST:PORT"),
        ([], "no mesh trust bundle on the log yet"),
    ],
)
def test_bad_options_are_refused(
    mesh_db: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    ca = [] if not args else ["--ca", f"local:{tmp_path / 'ca'}"]
    res = run(
        mesh_db, "vm", "bootstrap", "vm-1", "-n", "fleet", "--out", str(tmp_path / "o"), *ca, *args
    )
    assert res.exit_code != 0
    assert message in res.output, res.output


def test_node_id_takes_the_long_form_when_a_pod_shares_the_name() -> None:
    def wl(kind: str) -> Workload:
        return Workload(
            kind=kind,
            namespace="fleet",
            name="vm-1",
            address="127.0.0.1",
            service_account="app",
            labels=(),
            ports=(),
        )

    vm = wl("vm")
    assert vm_node_id(vm, {("vm", "fleet", "vm-1"): vm}) == "fleet/vm-1"
    both = {("vm", "fleet", "vm-1"): vm, ("pod", "fleet", "vm-1"): wl("pod")}
    assert vm_node_id(vm, both) == "vm/fleet/vm-1"
    with pytest.raises(UnknownVirtualMachine):
        find_vm({("pod", "fleet", "vm-1"): wl("pod")}, namespace="fleet", name="vm-1")


@pytest.mark.envoy
@pytest.mark.timeout(180)
def test_vm_envoy_started_by_the_run_script_gets_config_from_smc_serve(
    mesh_db: Path, tmp_path: Path
) -> None:
    xds_port, ca_port, admin_port = free_port(), free_port(), free_port()
    out = tmp_path / "bundle"
    ca = f"local:{tmp_path / 'ca'}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smc.cli",
            "--log",
            f"sqlite:///{mesh_db}",
            "serve",
            "--http",
            "off",
            "--xds",
            f"127.0.0.1:{xds_port}",
            "--xds-tls",
            "--ca-listen",
            f"127.0.0.1:{ca_port}",
            "--workload-keys",
            "agent",
            "--ca",
            ca,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    envoy = None
    try:
        # serve's CA records the trust bundle; the bootstrap reads it from the log
        deadline = time.monotonic() + 60
        while True:
            res = run(
                mesh_db,
                "vm",
                "bootstrap",
                "vm-1",
                "-n",
                "fleet",
                "--out",
                str(out),
                "--ads",
                f"127.0.0.1:{xds_port}",
                "--ca-address",
                f"127.0.0.1:{ca_port}",
                "--admin-port",
                str(admin_port),
            )
            if res.exit_code == 0 or time.monotonic() > deadline:
                break
            assert serve.poll() is None, serve.stderr.read().decode() if serve.stderr else ""
            time.sleep(0.3)
        assert res.exit_code == 0, res.output
        envoy = subprocess.Popen(
            [str(out / "run-envoy.sh"), "--base-id", str(os.getpid() % 50000 + 7)],
            env={
                **env,
                "ENVOY": str(envoy_binary()),
                "ENVOY_LOG_LEVEL": "warning",
                "SMC_PYTHON": sys.executable,
            },
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 90
        names: list[str] = []
        while time.monotonic() < deadline:
            assert envoy.poll() is None, envoy.stderr.read().decode() if envoy.stderr else ""
            assert serve.poll() is None, serve.stderr.read().decode() if serve.stderr else ""
            try:
                url = f"http://127.0.0.1:{admin_port}/listeners?format=json"
                with urllib.request.urlopen(url, timeout=2) as r:
                    names = [x["name"] for x in json.loads(r.read()).get("listener_statuses", [])]
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if "outbound" in names:
                break
            time.sleep(0.2)
        assert "outbound" in names, names
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/server_info", timeout=2) as r:
            info = json.loads(r.read())
        assert info["node"]["id"] == "fleet/vm-1"
        # the agent's certificate is the VM's identity, made on the VM: the log has it for the
        # proxy, proven with the join token, which is now used
        certs = CertsProjection()
        ProjectionRunner(log=SqliteLog(mesh_db), projections=[certs]).catch_up()
        rec = certs.proxy_cert("vm/fleet/vm-1")
        assert rec is not None and rec.identity == "spiffe://example.org/ns/fleet/sa/fleet-app"
        (token,) = [t for d in certs.join_tokens if (t := certs.join_token(d)) and t.used_by]
        assert rec.proof == f"join-token:{token.token_sha256}"
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/certs", timeout=2) as r:
            loaded = json.loads(r.read())
        serials = {
            c["serial_number"].lower().lstrip("0")
            for e in loaded.get("certificates", [])
            for c in e.get("cert_chain", [])
        }
        assert rec.serial.lstrip("0") in serials
        # the join token cannot be used again (a copy of the bundle gets nothing)
        again = subprocess.run(
            [
                sys.executable,
                "-c",
                "import asyncio, sys\n"
                "from pathlib import Path\n"
                "from cryptography import x509\n"
                "from cryptography.hazmat.primitives import hashes, serialization\n"
                "from cryptography.hazmat.primitives.asymmetric import ec\n"
                "from smc.agent import CertificateClient, SignRequest, SigningRefused\n"
                "k = ec.generate_private_key(ec.SECP256R1())\n"
                "csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))"
                ".sign(k, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()\n"
                "async def main():\n"
                f"    c = CertificateClient(address='127.0.0.1:{ca_port}', "
                f"ca_pem=Path('{out / 'ca.pem'}').read_text())\n"
                "    try:\n"
                f"        await c.sign(SignRequest(proxy='fleet/vm-1', csr_pem=csr, "
                f"join_token=Path('{out / 'join-token'}').read_text().strip()))\n"
                "    except SigningRefused as e:\n"
                "        print(e.code, e)\n"
                "    finally:\n"
                "        await c.close()\n"
                "asyncio.run(main())\n",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "UNAUTHENTICATED" in again.stdout and "join-token-replayed" in again.stdout, (
            again.stdout + again.stderr
        )
    finally:
        for proc in (envoy, serve):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
