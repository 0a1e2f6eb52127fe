"""``-o table|json|yaml|name`` on every command that prints, through the one shared helper
(:mod:`smc.cli._output`): ``audit verify``, ``audit why``, ``proxy config``, ``vm bootstrap``,
``vm join``, ``writer issue`` (and the older ``--json`` kept as ``-o json``). Real SQLite log,
real local CA, sealed appends; the CLI runs in-process."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner, Result

from smc.audit import issue_writer
from smc.ca import LocalIssuer, certificate_event
from smc.cli import cli
from smc.events import Signer, SqliteLog
from smc.identity._groupjoin import join_user_data
from smc.testing.manifests import client_server_yaml

TD = "cluster.local"
VMS = """
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: client-1, namespace: demo}
spec: {address: 127.0.0.9, serviceAccount: client, ports: [{name: http, port: 8080}]}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: server-1, namespace: demo, labels: {app: server}}
spec: {address: 127.0.0.10, serviceAccount: server, ports: [{name: http, port: 8080}]}
"""
MESH = client_server_yaml("demo", target="client-to-server") + "---\n" + VMS
# commands that print something other than data: daemons, a shell script, a diff
NOT_DATA = {"agent", "serve", "demo", "completion", "diff"}


def run(
    db: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> Result:
    return CliRunner().invoke(cli, ["--log", f"sqlite:///{db}", *args], input=stdin, env=env or {})


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A log sealed by an operator writer, with a client and a server VM and a grant."""
    base = tmp_path_factory.mktemp("out")
    hour = timedelta(hours=1)
    ca = LocalIssuer(directory=base / "ca", trust_domain=TD)
    issue_writer(ca, trust_domain=TD, role="operator", name="alice", directory=base / "w")
    db = base / "log.db"
    res = run(db, "--writer", str(base / "w"), "apply", "-f", "-", stdin=MESH)
    assert res.exit_code == 0, res.output
    # the workload certificates the CA controller would record (proxy config needs them)
    issue_writer(ca, trust_domain=TD, role="ca", name="mesh-ca", directory=base / "cw")
    log = SqliteLog(db, signer=Signer.from_dir(base / "cw"))
    log.append(
        [
            certificate_event(ca.issue(identity=f"spiffe://{TD}/ns/demo/sa/{sa}", lifetime=hour))
            for sa in ("client", "server")
        ]
    )
    log.close()
    return {"db": db, "ca": base / "ca", "writer": base / "w", "trust": base / "w" / "trust.pem"}


def formats(db: Path, *args: str, codes: tuple[int, ...] = (0,)) -> dict[str, Result]:
    """The command in every format; json and yaml carry the same data."""
    out = {o: run(db, *args, "-o", o) for o in ("table", "json", "yaml", "name")}
    for o, res in out.items():
        assert res.exit_code in codes, (o, res.output)
    as_json, as_yaml = json.loads(out["json"].output), yaml.safe_load(out["yaml"].output)
    if isinstance(as_json, dict):  # a timing differs between two runs
        as_json.pop("seconds", None)
        as_yaml.pop("seconds", None)
    assert as_json == as_yaml
    return out


def test_every_data_command_takes_the_same_output_option() -> None:
    def leaves(cmd: click.Command, path: str) -> list[tuple[str, click.Command]]:
        if isinstance(cmd, click.Group):
            return [x for n, c in cmd.commands.items() for x in leaves(c, f"{path} {n}".strip())]
        return [(path, cmd)]

    missing = []
    for path, cmd in leaves(cli, ""):
        if path in NOT_DATA:
            continue
        opt = next((p for p in cmd.params if p.name == "output"), None)
        if opt is None or not isinstance(opt.type, click.Choice):
            missing.append(path)
            continue
        assert {"table", "json", "yaml", "name"} <= set(opt.type.choices), path
    assert missing == []


def test_audit_verify_formats_and_the_bad_position_by_name(
    mesh: dict[str, Path], tmp_path: Path
) -> None:
    out = formats(mesh["db"], "audit", "verify", "--trust", str(mesh["trust"]))
    report = json.loads(out["json"].output)
    assert report["verified"] == report["records"] > 0 and not report["findings"]
    assert "operator.alice" in out["table"].output
    assert out["name"].output == ""  # no bad record
    legacy = run(mesh["db"], "audit", "verify", "--trust", str(mesh["trust"]), "--json")
    assert json.loads(legacy.output).keys() == report.keys()
    assert json.loads(legacy.output)["writers"] == report["writers"]
    # an edited record: exit 1 in every format, and -o name names its position
    db = tmp_path / "edited.db"
    conn = sqlite3.connect(db)
    with sqlite3.connect(mesh["db"]) as source:
        source.backup(conn)  # the log is in WAL mode: copy it as SQLite sees it
    (v,) = conn.execute("SELECT value FROM events WHERE seq = 0").fetchone()
    conn.execute("UPDATE events SET value = ? WHERE seq = 0", (v.replace(b"server", b"serveX"),))
    conn.commit()
    conn.close()
    bad = formats(db, "audit", "verify", "--trust", str(mesh["trust"]), codes=(1,))
    first = json.loads(bad["json"].output)["findings"][0]["position"]
    assert bad["name"].output.splitlines()[0] == first
    assert f"first bad position: {first}" in bad["table"].output


def test_audit_why_formats(mesh: dict[str, Path]) -> None:
    args = ("audit", "why", "--from", "demo/client", "--to", "demo/server")
    out = formats(mesh["db"], *args, "--trust", str(mesh["trust"]))
    rows = json.loads(out["json"].output)
    assert [r["effect"] for r in rows] == ["granted"] and rows[0]["verified"]
    assert out["name"].output.split() == [str(rows[0]["position"])]
    assert "granted" in out["table"].output and "operator.alice" in out["table"].output
    assert json.loads(run(mesh["db"], *args, "--json").output)[0]["effect"] == "granted"
    # identities are checked by the shared option block, the option named
    bad = run(mesh["db"], "audit", "why", "--from", "demo", "--to", "demo/server")
    assert (
        bad.exit_code == 2 and "--from" in bad.output and "namespace/serviceaccount" in bad.output
    )
    bad = run(mesh["db"], "policy", "check", "--from", "demo/client", "--to", "a/b/c")
    assert bad.exit_code == 2 and "--to" in bad.output


def test_proxy_config_formats(mesh: dict[str, Path]) -> None:
    end = SqliteLog(mesh["db"]).end_position()
    at = ",".join(f"{s}:{p}={o}" for (s, p), o in end.items())
    out = formats(mesh["db"], "proxy", "config", "demo/client-1", "--at", at)
    data = json.loads(out["json"].output)
    assert data["reason"] == "" and data["listeners"] and data["clusters"]
    names = out["name"].output.split()
    assert {n.split("/", 1)[0] for n in names} >= {"listener", "cluster", "secret"}
    assert {f"cluster/{c['name']}" for c in data["clusters"]} <= set(names)
    table = out["table"].output.splitlines()
    assert table[0].startswith("node demo/client-1") and table[1].split() == [
        "TYPE",
        "NAME",
        "VERSION",
    ]
    assert any(line.split()[:2] == ["listener", data["listeners"][0]["name"]] for line in table)
    assert "PRIVATE KEY" not in out["json"].output + out["yaml"].output
    # the default stays the JSON it always printed
    assert (
        json.loads(run(mesh["db"], "proxy", "config", "demo/client-1", "--at", at).output) == data
    )


def test_writer_issue_formats(mesh: dict[str, Path], tmp_path: Path) -> None:
    outs: dict[str, Any] = {}
    for o in ("table", "json", "yaml", "name"):
        res = run(mesh["db"], "writer", "issue", "--role", "api", "--name", f"w-{o}",
                  "--ca", f"local:{mesh['ca']}", "--out", str(tmp_path / o), "-o", o)  # fmt: skip
        assert res.exit_code == 0, res.output
        assert (tmp_path / o / "writer.key").stat().st_mode & 0o077 == 0
        assert "PRIVATE KEY" not in res.output
        outs[o] = res.output
    facts = json.loads(outs["json"])
    assert facts["identity"].endswith("/sa/api.w-json")
    assert yaml.safe_load(outs["yaml"])["identity"].endswith("/sa/api.w-yaml")
    assert outs["name"].strip().startswith("writer/spiffe://") and "api.w-name" in outs["name"]
    assert "identity:" in outs["table"] and "api.w-table" in outs["table"]


def test_vm_bootstrap_and_join_formats(mesh: dict[str, Path], tmp_path: Path) -> None:
    outs: dict[str, Result] = {}
    for o in ("table", "json", "yaml", "name"):
        outs[o] = run(mesh["db"], "vm", "bootstrap", "client-1", "-n", "demo",
                      "--ca", f"local:{mesh['ca']}", "--out", str(tmp_path / o), "-o", o)  # fmt: skip
        assert outs[o].exit_code == 0, outs[o].output
    data = json.loads(outs["json"].output)
    assert data["nodeId"] == "demo/client-1" and data["identity"].endswith("/ns/demo/sa/client")
    assert all(Path(f).exists() for f in data["files"])
    token = (tmp_path / "json" / "join-token").read_text().strip()
    assert token and all(token not in r.output for r in outs.values())  # only its digest
    assert yaml.safe_load(outs["yaml"].output)["nodeId"] == "demo/client-1"
    assert [n.split("/", 1)[0] for n in outs["name"].output.split()] == ["file"] * 4
    assert "start it with:" in outs["table"].output
    # an instance of a VM group turning its user data into files
    ud = tmp_path / "user-data"
    ud.write_text(
        join_user_data(
            namespace="demo",
            group="web",
            token="t" * 43,
            expires_at=datetime.now(UTC) + timedelta(hours=1),
            ca="127.0.0.1:15012",
            ads="127.0.0.1:15010",
            ca_bundle_pem="".join(
                LocalIssuer(directory=mesh["ca"], trust_domain=TD).trust_bundle()
            ),
            identity=f"spiffe://{TD}/ns/demo/sa/web",
        )
    )
    joined: dict[str, Result] = {}
    for o in ("table", "json", "yaml", "name"):
        args = ["--user-data", str(ud), "--instance-id", "i-0abc", "--out", str(tmp_path / o)]
        joined[o] = run(mesh["db"], "vm", "join", *args, "-o", o)
        assert joined[o].exit_code == 0, (o, joined[o].output)
        assert "t" * 43 not in joined[o].output  # the token goes to its file only
    facts = json.loads(joined["json"].output)
    assert facts["group"] == "demo/web" and facts["instance"] == "i-0abc"
    assert yaml.safe_load(joined["yaml"].output)["nodeId"] == facts["nodeId"]
    assert len(joined["name"].output.split()) == 4 and "node id" in joined["table"].output


def test_an_unknown_format_is_refused_naming_the_option(mesh: dict[str, Path]) -> None:
    res = run(mesh["db"], "audit", "verify", "--trust", str(mesh["trust"]), "-o", "xml")
    assert res.exit_code == 2 and "'-o' / '--output'" in res.output and "xml" in res.output
