"""``smc vm bootstrap``: the bundle written for a VirtualMachine known to the registry (real
SQLite log, real CA), checked by real Envoy (``--mode validate``), and one VM Envoy started with
the bundle's own run script getting its listeners from a real ``smc serve``."""

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

from smc.ca import verify_certificate
from smc.cli import cli
from smc.injector import find_vm, vm_node_id
from smc.injector._errors import UnknownVirtualMachine
from smc.projections import Workload
from smc.testing.envoy import envoy_binary
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
    assert names == ["bootstrap.yaml", "ca.pem", "cert.pem", "key.pem", "run-envoy.sh"]
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert os.access(out / "run-envoy.sh", os.X_OK)
    doc = yaml.safe_load((out / "bootstrap.yaml").read_text())
    assert doc["node"]["id"] == "fleet/vm-1"
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    xds = doc["static_resources"]["clusters"][0]
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 15010}
    }
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificates"][0]["private_key"] == {
        "filename": str((out / "key.pem").absolute())
    }
    # The certificate is the VM's identity in the mesh's trust domain, from our CA.
    sid = verify_certificate(
        cert_pem=(out / "cert.pem").read_text(), trust_bundle=[(out / "ca.pem").read_text()]
    )
    assert sid.uri == "spiffe://example.org/ns/fleet/sa/fleet-app"
    assert "PRIVATE KEY" in (out / "key.pem").read_text()
    assert "PRIVATE KEY" not in (out / "bootstrap.yaml").read_text()
    done = _validate(out / "bootstrap.yaml", out)
    assert done.returncode == 0, done.stdout + done.stderr
    # Envoy really reads the key: a corrupt one fails validation.
    (out / "key.pem").write_text("garbage\n")
    assert _validate(out / "bootstrap.yaml", out).returncode != 0
    # A rerun replaces the bundle whole and the key stays 0600.
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
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
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
        ([], "--ca"),
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
@pytest.mark.timeout(120)
def test_vm_envoy_started_by_the_run_script_gets_config_from_smc_serve(
    mesh_db: Path, tmp_path: Path
) -> None:
    xds_port, admin_port = free_port(), free_port()
    out = tmp_path / "bundle"
    ca = f"local:{tmp_path / 'ca'}"
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
        "--ca",
        ca,
        "--plaintext",
        "--admin-port",
        str(admin_port),
    )
    assert res.exit_code == 0, res.output
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
            "--ca",
            ca,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    envoy = None
    try:
        envoy = subprocess.Popen(
            [str(out / "run-envoy.sh"), "--base-id", str(os.getpid() % 50000 + 7)],
            env={**os.environ, "ENVOY": str(envoy_binary()), "ENVOY_LOG_LEVEL": "warning"},
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
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
    finally:
        for proc in (envoy, serve):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
