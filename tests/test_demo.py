"""``smc demo`` as a user runs it: a real process with the real control plane and real Envoys.

The first test runs ``smc --log sqlite:///... demo --duration 20 --no-live --json-summary F`` and
checks the summary (bookbuyer allowed, bookthief only denied, the 90/10 split within a 99.9 %
binomial band, the VM-backed bookwarehouse served the bookstores over mTLS, no NACK), the audit
trail of the kept log (every mesh change by actor ``demo``) and that no Envoy outlived the process.
The second sends SIGINT to a running demo and checks the documented clean exit: code 0, the
summary printed, no orphan process; before that, from the attacker's side, that each proxy's
key was made by its own ``python -m smc.agent`` process and that no byte of any key is in the
demo process's memory (read as root through /proc), its work directory (log, CA, key store)
or its output. Each test uses its own loopback /24 and TMPDIR, so leftover
processes are found by the tmp path in their command line.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}


def _smc(*args: str) -> list[str]:
    return [sys.executable, "-m", "smc.cli", *args]


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (other than zombies) that contain ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z" and int(proc.name) != os.getpid():
            found.append(f"{proc.name}: {cmdline}")
    return found


def _assert_no_orphans(tmp_path: Path, summary: dict[str, Any] | None) -> None:
    deadline = time.monotonic() + 5  # SIGTERMed children may take a moment to vanish
    while (left := _processes_mentioning(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"processes left behind: {left}"
    for pid in (summary or {}).get("envoy_pids", []):
        cmd = Path(f"/proc/{pid}/cmdline")
        alive = cmd.exists() and b"envoy" in cmd.read_bytes()
        assert not alive, f"Envoy pid {pid} still running"


def _agent_keys(tmp_path: Path) -> dict[Path, tuple[int, list[bytes]]]:
    """Per proxy dir of a running agent process of this test (``python -m smc.agent``): the
    agent's pid and byte strings only that proxy's key has: the private scalar, the PKCS #8
    DER, and two runs of the PEM's base64 of the scalar, each within one PEM line (the first
    48 characters, PKCS #8's header, are the same in every P-256 key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out: dict[Path, tuple[int, list[bytes]]] = {}
    for line in _processes_mentioning(str(tmp_path)):
        pid, _, cmd = line.partition(": ")
        argv = cmd.split()
        if "smc.agent" not in argv:
            continue
        proxy_dir = Path(argv[argv.index("--proxy-dir") + 1])
        doc = json.loads((proxy_dir / "smc-sds" / "default.json").read_text())
        pem = doc["resources"][0]["tls_certificate"]["private_key"]["inline_string"]
        key = serialization.load_pem_private_key(pem.encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        body = "".join(pem.strip().splitlines()[1:-1])
        out[proxy_dir] = (
            int(pid),
            [
                key.private_numbers().private_value.to_bytes(32, "big"),
                der,
                body[48:64].encode(),
                body[64:88].encode(),
            ],
        )
    return out


def _memory_holds(pid: int, needles: list[bytes]) -> list[str]:
    """Where in process ``pid``'s readable memory any of ``needles`` occurs (root reads it)."""
    found = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            overlap = max(len(n) for n in needles)
            at, tail = start, b""
            while at < end:
                try:
                    mem.seek(at)
                    chunk = mem.read(min(8 << 20, end - at))
                except OSError:
                    break
                if not chunk:
                    break
                data = tail + chunk
                found += [f"{line.strip()} holds a key" for n in needles if n in data]
                tail = data[-overlap:]
                at += len(chunk)
    return found


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """On a failed test: kill the demo and everything in its session (its Envoys)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _binomial_interval(n: int, p: float, confidence: float) -> tuple[int, int]:
    """Smallest central interval [lo, hi] holding ``confidence`` of Binomial(n, p)."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    tail = (1 - confidence) / 2
    acc, lo = 0.0, 0
    while acc + pmf[lo] < tail:
        acc += pmf[lo]
        lo += 1
    acc, hi = 0.0, n
    while acc + pmf[hi] < tail:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


def test_demo_runs_policy_split_and_vm_then_exits_clean(tmp_path: Path) -> None:
    summary_file = tmp_path / "summary.json"
    log_url = f"sqlite:///{tmp_path / 'demo-log.db'}"
    started = time.monotonic()
    proc = subprocess.Popen(
        _smc(
            "--log",
            log_url,
            "demo",
            "--duration",
            "20",
            "--no-live",
            "--json-summary",
            str(summary_file),
            "--net",
            "127.0.71",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    took = time.monotonic() - started
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    summary = json.loads(summary_file.read_text())
    _assert_no_orphans(tmp_path, summary)
    assert took < 60, took
    assert summary["stopped_by"] == "duration"
    assert 19.5 <= summary["traffic_seconds"] <= 22
    flows = summary["flows"]

    buyer = flows["bookbuyer -> bookstore"]
    assert buyer["allowed"] >= 200, buyer  # 20 req/s for 20 s
    assert buyer["denied"] == 0 and buyer["errors"] == 0, buyer

    thief = flows["bookthief -> bookstore"]
    assert thief["denied"] >= 100, thief
    assert thief["allowed"] == 0 and thief["errors"] == 0, thief
    assert thief["outcomes"] == {"403": thief["denied"]}

    # the split: bookbuyer's answers came from v1 and v2 at about 90/10
    v1 = summary["split"]["observed"]["bookstore-v1"]
    v2 = summary["split"]["observed"]["bookstore-v2"]
    assert summary["split"]["target"] == {"bookstore-v1": 90, "bookstore-v2": 10}
    assert v1 + v2 == buyer["allowed"]
    lo, hi = _binomial_interval(v1 + v2, 0.10, 0.999)
    assert lo <= v2 <= hi, (v1, v2, (lo, hi))

    # the bookstore apps saw only bookbuyer's identity (mTLS; the thief never got through)
    served = summary["served"]
    for version, n in (("bookstore-v1", v1), ("bookstore-v2", v2)):
        assert served[version]["total"] == n
        assert set(served[version]["callers"]) == {
            "spiffe://cluster.local/ns/bookbuyer/sa/bookbuyer"
        }

    # the VM-backed bookwarehouse served both bookstore versions
    assert summary["workloads"]["bookwarehouse/bookwarehouse-vm-1"]["kind"] == "vm"
    restocks = [flows[f"bookstore-{v} -> bookwarehouse"] for v in ("v1", "v2")]
    for flow in restocks:
        assert flow["allowed"] >= 20 and flow["denied"] == 0 and flow["errors"] == 0, flow
        assert flow["backends"] == {"bookwarehouse": flow["allowed"]}
    warehouse = served["bookwarehouse"]
    assert warehouse["total"] == sum(f["allowed"] for f in restocks)
    assert set(warehouse["callers"]) == {"spiffe://cluster.local/ns/bookstore/sa/bookstore"}

    # every sidecar was connected, nothing was NACKed
    assert summary["proxies_connected"] == 5
    assert summary["nacks"] == [] and summary["envoy_rejected"] == {}
    assert len(summary["envoy_pids"]) == 5

    # the screen: periodic lines and the final summary on stdout, progress on stderr
    assert stdout.count("bookbuyer -> bookstore: allowed=") >= 5
    assert "smc demo summary (stopped by duration" in stdout
    assert "mesh ready in" in stderr and "stopped: Envoys" in stderr

    # the root --log was honoured; every mesh change the demo made is by actor "demo"
    assert summary["log"]["url"] == log_url
    audit = subprocess.run(
        _smc("--log", log_url, "audit", "--json"),
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=60,
    )
    assert audit.returncode == 0, audit.stderr
    events = json.loads(audit.stdout)["events"]
    assert len(events) == summary["log"]["events"] > 10
    mesh = [e for e in events if not e["type"].startswith("smc.certs.")]
    certs = [e for e in events if e["type"].startswith("smc.certs.")]
    assert {e["actor"] for e in mesh} == {"demo"}
    assert {e["actor"] for e in certs} <= {"ca"}  # the local CA records what it issued
    # one certificate per proxy, each made over its agent's CSR (the key never left it)
    per_proxy = [e for e in certs if e["type"] == "smc.certs.ProxyCertificateIssued"]
    assert len(per_proxy) >= 5
    types = {e["type"] for e in mesh}
    assert {"smc.registry.WorkloadJoined", "smc.policy.SmiResourceApplied"} <= types


def test_demo_stops_clean_on_sigint(tmp_path: Path) -> None:
    summary_file = tmp_path / "summary.json"
    err_path = tmp_path / "stderr.txt"
    out_path = tmp_path / "stdout.txt"
    started = time.monotonic()
    with open(err_path, "w") as err, open(out_path, "w") as out:
        proc = subprocess.Popen(
            _smc(
                "demo",
                "--no-live",
                "--split",
                "50/50",
                "--json-summary",
                str(summary_file),
                "--net",
                "127.0.72",
            ),
            stdout=out,
            stderr=err,
            env=_env(tmp_path),
            start_new_session=True,
        )
        try:
            while "traffic running" not in err_path.read_text():
                assert proc.poll() is None, err_path.read_text()[-3000:]
                assert time.monotonic() - started < 60, "demo did not get ready"
                time.sleep(0.1)
            time.sleep(max(3.0, 10 - (time.monotonic() - started)))
            assert proc.poll() is None
            # every proxy's key was made by its own agent process, and neither the demo
            # process (which hosts the control plane) nor its work directory (log, CA, key
            # store) holds any byte of one
            keys = _agent_keys(tmp_path)
            agents = sorted(pid for pid, _ in keys.values())
            assert len(keys) == 5 and proc.pid not in agents, keys
            needles = [n for _, per_key in keys.values() for n in per_key]
            if os.geteuid() == 0:  # reading another process's memory needs root here
                assert _memory_holds(proc.pid, needles) == []
                # the search finds a key where one is: each Envoy (working directory: its
                # proxy dir) holds the key its agent made
                envoys = [
                    int(line.partition(":")[0])
                    for line in _processes_mentioning(str(tmp_path))
                    if "/envoy " in line
                ]
                assert len(envoys) == 5, envoys
                for pid in envoys:
                    home = Path(os.readlink(f"/proc/{pid}/cwd"))
                    assert _memory_holds(pid, keys[home][1]), home
            (workdir,) = tmp_path.glob("smc-demo-*")
            for f in workdir.rglob("*"):
                if f.is_file():
                    data = f.read_bytes()
                    assert not any(n in data for n in needles), f
                    assert b"PRIVATE KEY" not in data or f.is_relative_to(workdir / "ca"), f
            # as Ctrl-C on a terminal: SIGINT to the whole process group (Envoys included)
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=30)
        finally:
            _kill_group(proc)
    stderr = err_path.read_text()
    stdout = out_path.read_text()
    assert code == 0, stderr[-3000:]  # Ctrl-C is the normal way to end the demo: exit 0
    assert "Traceback" not in stderr
    assert "SIGINT: stopping the demo" in stderr
    assert "smc demo summary (stopped by SIGINT" in stdout
    summary = json.loads(summary_file.read_text())
    _assert_no_orphans(tmp_path, summary)
    assert sorted(summary["agent_pids"]) == agents
    assert not any(n in (stdout + stderr).encode() for n in needles)
    assert summary["stopped_by"] == "SIGINT"
    assert summary["split"]["target"] == {"bookstore-v1": 50, "bookstore-v2": 50}
    buyer = summary["flows"]["bookbuyer -> bookstore"]
    assert buyer["allowed"] > 0 and buyer["errors"] == 0, buyer
    # the temporary work directory (log, CA, Envoy files) is gone
    assert not list(tmp_path.glob("smc-demo-*"))
