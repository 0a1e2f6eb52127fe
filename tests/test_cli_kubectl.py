"""The kubectl-grade CLI: --version, -o table|json|yaml|name, get with kinds/short names/NAME/
-n/-A/-l/--watch, read commands that never create a log, policy check's exit status, shell
completion (run by a real bash) and ``smc diff -f``. Real SQLite logs; subprocesses where a
real process matters (completion, watch)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from smc.cli import cli

DATA = Path(__file__).parent / "data" / "smi"
HYBRID = DATA / "hybrid-mesh.yaml"
ACCESS = DATA / "access-v1alpha3.yaml"


def run(db: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--log", f"sqlite:///{db}", *args])


def smc(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smc.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "smc.db"
    assert run(path, "apply", "-f", str(HYBRID)).exit_code == 0
    assert run(path, "apply", "-f", str(ACCESS)).exit_code == 0
    return path


def test_version() -> None:
    from importlib.metadata import version

    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"smc {version('smc')}"


def test_read_commands_never_create_a_log(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "smc.db"
    for args in (
        ["get", "services"],
        ["get", "svc", "-o", "json"],
        ["policy", "check", "--from", "a/b", "--to", "c/d"],
        ["log", "tail"],
        ["log", "replay"],
        ["audit"],
        ["certs", "list"],
        ["diff", "-f", str(HYBRID)],
    ):
        res = run(missing, *args)
        assert res.exit_code in (1, 0) and not missing.exists(), (args, res.output)
        assert not missing.parent.exists(), args
        if args[0] != "diff":  # diff plans against an empty mesh, as a dry run
            assert res.exit_code == 1, (args, res.output)
            assert f"no event log at {missing}" in res.output, (args, res.output)


def test_get_kinds_short_names_name_namespace_selector(db: Path) -> None:
    long = json.loads(run(db, "get", "services", "-o", "json").output)
    for alias in ("svc", "service", "meshservices", "SVC"):
        assert json.loads(run(db, "get", alias, "-o", "json").output) == long
    names = run(db, "get", "svc", "-o", "name").output.split()
    assert names == [f"services/{s['namespace']}/{s['name']}" for s in long]
    assert "services/bookstore/bookstore" in names
    one = run(db, "get", "svc", "bookstore", "-n", "bookstore", "-o", "json")
    assert one.exit_code == 0 and json.loads(one.output)["name"] == "bookstore"
    as_yaml = yaml.safe_load(run(db, "get", "svc", "bookstore", "-o", "yaml").output)
    assert as_yaml == json.loads(one.output)
    missing = run(db, "get", "svc", "bookstore", "-n", "elsewhere")
    assert missing.exit_code == 1 and "services 'bookstore' not found" in missing.output
    assert run(db, "get", "svc", "-n", "bookstore", "-o", "name").output.split() == [
        "services/bookstore/bookstore"
    ]
    assert run(db, "get", "svc", "-A", "-o", "name").output.split() == names
    both = run(db, "get", "svc", "-A", "-n", "x")
    assert both.exit_code == 2 and "exclude each other" in both.output
    vms = run(db, "get", "vm", "-l", "zone=eu-1", "-o", "name").output.split()
    assert vms and all(v.startswith("virtualmachines/bookwarehouse/") for v in vms)
    assert run(
        db, "get", "wl", "-l", "zone!=eu-1,app=bookwarehouse", "-o", "name"
    ).output.split() == [
        v
        for v in run(db, "get", "wl", "-l", "app=bookwarehouse", "-o", "name").output.split()
        if v.replace("workloads", "virtualmachines") not in vms
    ]
    assert run(db, "get", "wl", "-l", "zone in (eu-1, us-2)", "-o", "name").output.split()
    assert run(db, "get", "wl", "-l", "!zone", "-o", "json").output.strip() != ""
    bad = run(db, "get", "wl", "-l", "a==b==c")
    assert bad.exit_code == 2 and "not a label selector term" in bad.output
    unknown = run(db, "get", "gadgets")
    assert unknown.exit_code == 2 and "unknown kind 'gadgets'" in unknown.output
    tts = run(db, "get", "tt", "-o", "name").output.split()
    assert tts and all(t.startswith("traffictargets/") for t in tts)
    assert run(db, "get", "hrg", "-o", "name").output.split()
    table = run(db, "get", "tt")
    assert table.exit_code == 0 and "NAMESPACE" in table.output


def test_output_formats_on_writes_and_checks(tmp_path: Path, db: Path) -> None:
    fresh = tmp_path / "fresh.db"
    named = run(fresh, "apply", "-f", str(ACCESS), "-o", "name")
    assert named.exit_code == 0
    assert "traffictarget/default/api-service-metrics" in named.output.split()
    again = yaml.safe_load(run(fresh, "apply", "-f", str(ACCESS), "-o", "yaml").output)
    assert {r["status"] for r in again["results"]} == {"unchanged"}
    table = run(fresh, "apply", "-f", str(ACCESS), "-o", "table")
    assert "TrafficTarget/default/api-service-metrics unchanged" in table.output
    text = run(fresh, "apply", "-f", str(ACCESS), "-o", "text")  # the old name still works
    assert text.output == table.output
    args = ["policy", "check", "--from", "default/prometheus", "--to", "default/api-service"]
    allow = run(db, *args, "--path", "/metrics", "--method", "GET", "--port", "8080", "-o", "name")
    assert allow.exit_code == 0 and allow.output.strip() == "allow"
    deny = run(db, *args, "--path", "/metrics", "--method", "POST", "-o", "yaml")
    assert deny.exit_code == 1 and yaml.safe_load(deny.output)["decision"] == "deny"
    gone = run(fresh, "delete", "-f", str(ACCESS), "-o", "json")
    assert gone.exit_code == 0
    assert {r["status"] for r in json.loads(gone.output)["results"]} == {"deleted"}


def test_diff_shows_what_apply_would_change(tmp_path: Path, db: Path) -> None:
    same = run(db, "diff", "-f", str(HYBRID))
    assert same.exit_code == 0 and same.output == ""
    changed = tmp_path / "changed.yaml"
    changed.write_text(HYBRID.read_text().replace("14001", "14002"))
    res = run(db, "diff", "-f", str(changed))
    assert res.exit_code == 1
    assert "--- stored/MeshService/bookstore/bookstore" in res.output
    assert "-    port: 14001\n+    port: 14002" in res.output
    before = run(db, "log", "tail", "--json").output
    assert run(db, "log", "tail", "--json").output == before  # diff appended nothing
    new = tmp_path / "new.yaml"
    new.write_text(
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\nmetadata: {name: extra, namespace: x}\n"
        "spec: {ports: [{name: http, port: 80, protocol: http}], selector: {app: x}}\n"
    )
    created = run(db, "diff", "-f", str(new))
    assert created.exit_code == 1 and "+++ applied/MeshService/x/extra" in created.output
    assert "--- /dev/null" in created.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: smc.dev/v1alpha1\nkind: MeshService\nmetadata: {name: b}\n")
    bad = run(db, "diff", "-f", str(broken))
    assert bad.exit_code == 2 and "error:" in bad.output


def test_bash_completion_completes_commands_and_kinds(tmp_path: Path) -> None:
    script = smc("completion", "bash")
    assert script.returncode == 0 and "_smc_completion" in script.stdout
    (tmp_path / "smc.bash").write_text(script.stdout)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "smc").write_text(f'#!/bin/sh\nexec {sys.executable} -m smc.cli "$@"\n')
    (shim / "smc").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        prog = (
            f"source {tmp_path / 'smc.bash'}\n"
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            "_smc_completion smc\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        done = subprocess.run(
            ["bash", "-c", prog], capture_output=True, text=True, env=env, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert "get" in complete("smc ge")
    assert {"services", "splits"} <= set(complete("smc get s"))
    assert "--output" in complete("smc get svc --out")
    for shell, marker in (("zsh", "#compdef smc"), ("fish", "complete --no-files --command smc")):
        text = smc("completion", shell)
        assert text.returncode == 0 and marker in text.stdout, text.stdout[:200]
        binary = shutil.which(shell)
        if binary is not None:  # syntax-check with the real shell when it is installed
            (tmp_path / f"smc.{shell}").write_text(text.stdout)
            assert subprocess.run([binary, "-n", str(tmp_path / f"smc.{shell}")]).returncode == 0
    assert smc("completion", "tcsh").returncode == 2


def test_get_watch_prints_changes_until_interrupted(tmp_path: Path, db: Path) -> None:
    # Started as a shell without job control starts a background command: SIGINT ignored
    # (`trap '' INT` is kept across exec). The watch must still end on SIGINT, as kubectl's.
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            'trap \'\' INT; exec "$0" "$@"',
            sys.executable,
            "-m",
            "smc.cli",
            "--log",
            f"sqlite:///{db}",
            "get",
            "svc",
            "-w",
            "-o",
            "name",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = [proc.stdout.readline().strip() for _ in range(2)]
        assert "services/bookstore/bookstore" in first
        new = tmp_path / "new.yaml"
        new.write_text(
            "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
            "metadata: {name: late, namespace: x}\n"
            "spec: {ports: [{name: http, port: 80, protocol: http}], selector: {app: x}}\n"
        )
        assert run(db, "apply", "-f", str(new)).exit_code == 0
        assert proc.stdout.readline().strip() == "services/x/late"
        assert run(db, "delete", "-f", str(new)).exit_code == 0
        assert proc.stdout.readline().strip() == "services/x/late"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read() if proc.stderr else ""


def test_output_formats_on_log_audit_and_certs(db: Path) -> None:
    lines = [
        json.loads(x)
        for x in run(db, "log", "tail", "--from-start", "-o", "json").output.splitlines()
    ]
    assert lines and lines == [
        json.loads(x) for x in run(db, "log", "tail", "--from-start", "--json").output.splitlines()
    ]
    docs = list(yaml.safe_load_all(run(db, "log", "tail", "--from-start", "-o", "yaml").output))
    assert docs == lines
    names = run(db, "log", "tail", "--from-start", "-o", "name").output.split()
    assert names == [f"event/{x['event_id']}" for x in lines]
    audit_names = run(db, "audit", "-o", "name").output.split()
    assert sorted(audit_names) == sorted(names)
    audit = yaml.safe_load(run(db, "audit", "-o", "yaml").output)
    assert audit == json.loads(run(db, "audit", "--json").output)
    replay = yaml.safe_load(run(db, "log", "replay", "-o", "yaml").output)
    assert replay["events"] == len(lines)
    assert run(db, "log", "replay", "-o", "name").exit_code == 2
    certs = run(db, "certs", "list", "-o", "yaml")
    assert certs.exit_code == 0 and yaml.safe_load(certs.output) == []
