"""``smc apply`` / ``smc delete`` / ``smc get`` / ``smc policy check`` and the MeshChanges service,
on a real SQLite event log and real manifest files."""

from __future__ import annotations

import json
import os
import pwd
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from smc.api import MeshChanges
from smc.cli import cli
from smc.events import (
    Event,
    MeshConfigChanged,
    ServiceAccountUpserted,
    SmiResourceApplied,
    WorkloadJoined,
    default_codec,
)
from smc.events._log import Position
from smc.events._sqlite import SqliteLog
from smc.projections import PolicyProjection, ProjectionRunner, RegistryProjection
from smc.smi import load_documents

DATA = Path(__file__).parent / "data" / "smi"
HYBRID = DATA / "hybrid-mesh.yaml"

GROUP = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: routes, namespace: shop}
spec:
  matches:
  - name: read
    pathRegex: /items
    methods: [GET]
"""
TARGET = """\
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-to-api, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api, namespace: shop}
  rules:
  - kind: HTTPRouteGroup
    name: routes
    matches: [read]
  sources:
  - {kind: ServiceAccount, name: web, namespace: shop}
"""
BAD_SPLIT = """\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: broken, namespace: shop}
spec:
  service: api
  backends:
  - service: api-v1
    weight: 1.5
"""


def run(db: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--log", f"sqlite:///{db}", *args], input=input)


def events_of(db: Path) -> list[Event]:
    log = SqliteLog(db)
    try:
        codec = default_codec()
        return [codec.decode(r.value, where=r.where) for r in log.read(start=Position())]
    finally:
        log.close()


def write(path: Path, *docs: str) -> Path:
    path.write_text("---\n".join(docs))
    return path


def test_hybrid_mesh_applies_and_get_shows_both_kinds(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    res = run(db, "apply", "-f", str(HYBRID), "--as", "alice")
    assert res.exit_code == 0, res.output
    assert "MeshService/bookstore/bookstore created" in res.output
    assert "VirtualMachine/bookwarehouse/warehouse-vm-2 created" in res.output
    res = run(db, "get", "services", "-o", "json")
    assert res.exit_code == 0, res.output
    services = {s["name"]: s for s in json.loads(res.output)}
    assert services["bookstore"]["backing"] == "kubernetes"
    assert services["bookwarehouse"]["backing"] == "vm"
    assert services["bookwarehouse"]["ports"][1] == {
        "name": "db",
        "port": 5432,
        "protocol": "tcp",
        "targetPort": 5432,
    }
    table = run(db, "get", "services")
    assert table.exit_code == 0 and "bookstore" in table.output and "vm" in table.output
    workloads = json.loads(run(db, "get", "workloads", "-o", "json").output)
    vm2 = next(w for w in workloads if w["name"] == "warehouse-vm-2")
    assert vm2["address"] == "2001:db8::17"
    assert vm2["services"] == ["bookwarehouse"]  # explicit spec.services survives the log
    assert vm2["identity"] == "bookwarehouse/bookwarehouse"
    cfg = json.loads(run(db, "get", "meshconfig", "-o", "json").output)
    assert cfg["resource"] == "smc-system/mesh" and cfg["trustDomain"] == "cluster.local"


def test_apply_twice_is_unchanged_and_appends_nothing(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    assert run(db, "apply", "-f", str(HYBRID)).exit_code == 0
    first = events_of(db)
    # one SA event for the two VMs sharing an identity
    assert sum(isinstance(e, ServiceAccountUpserted) for e in first) == 1
    res = run(db, "apply", "-f", str(HYBRID))
    assert res.exit_code == 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 5 and all(line.endswith(" unchanged") for line in lines)
    assert len(events_of(db)) == len(first)


def test_changed_resource_is_configured(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    f = write(tmp_path / "m.yaml", GROUP, TARGET)
    assert run(db, "apply", "-f", str(f)).exit_code == 0
    write(f, GROUP.replace("/items", "/things"), TARGET)
    res = run(db, "apply", "-f", str(f))
    assert res.exit_code == 0
    assert "HTTPRouteGroup/shop/routes configured" in res.output
    assert "TrafficTarget/shop/web-to-api unchanged" in res.output
    applied = [e for e in events_of(db) if isinstance(e, SmiResourceApplied)]
    assert len(applied) == 3
    assert '"pathRegex":"/things"' in applied[-1].manifest_json


def test_invalid_and_valid_documents_in_one_file(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    f = write(tmp_path / "mixed.yaml", GROUP, BAD_SPLIT, TARGET)
    res = run(db, "apply", "-f", str(f))
    assert res.exit_code == 1
    assert "HTTPRouteGroup/shop/routes created" in res.stdout
    assert "TrafficTarget/shop/web-to-api created" in res.stdout
    assert f"{f}#2" in res.stderr and "spec.backends[0].weight" in res.stderr
    kinds = [e.kind for e in events_of(db) if isinstance(e, SmiResourceApplied)]
    assert kinds == ["HTTPRouteGroup", "TrafficTarget"]


def test_json_output_reports_every_document(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    f = write(tmp_path / "mixed.yaml", GROUP, BAD_SPLIT)
    res = run(db, "apply", "-f", str(f), "-o", "json")
    assert res.exit_code == 1
    body = json.loads(res.stdout)
    statuses = {r["document"]: r["status"] for r in body["results"]}
    assert statuses == {"HTTPRouteGroup/shop/routes": "created", f"{f}#2": "error"}
    assert body["errors"][0]["field"] == "spec.backends[0].weight"


def check(db: Path, *args: str) -> str:
    res = run(db, "policy", "check", "--from", "shop/web", "--to", "shop/api", *args)
    decision = res.output.split(":", 1)[0]
    assert res.exit_code == (0 if decision == "allow" else 1), res.output  # as kubectl auth can-i
    return decision


def test_reference_to_a_missing_group_is_pending_until_it_exists(tmp_path: Path) -> None:
    """GitOps order: the TrafficTarget first (accepted, pending, grants nothing), then its
    group (the target resolves and grants)."""
    db = tmp_path / "smc.db"
    f = write(tmp_path / "t.yaml", TARGET)
    res = run(db, "apply", "-f", str(f))
    assert res.exit_code == 0, res.output
    assert "TrafficTarget/shop/web-to-api created" in res.stdout
    assert "pending: field spec.rules[0].name: HTTPRouteGroup shop/routes does not exist" in (
        res.stderr
    )
    [tt] = json.loads(run(db, "get", "traffictargets", "-o", "json").output)
    assert tt["status"] == "pending" and "shop/routes does not exist" in tt["pending"][0]
    assert "pending" in run(db, "get", "traffictargets").output
    assert check(db, "--path", "/items", "--method", "GET") == "deny"
    # a group without the named match: the target stays pending, naming the match
    g = write(tmp_path / "g.yaml", GROUP.replace("name: read", "name: other"))
    assert run(db, "apply", "-f", str(g)).exit_code == 0
    [tt] = json.loads(run(db, "get", "traffictargets", "-o", "json").output)
    assert tt["status"] == "pending" and "spec.rules[0].matches[0]" in tt["pending"][0]
    assert check(db, "--path", "/items", "--method", "GET") == "deny"
    assert run(db, "apply", "-f", str(write(tmp_path / "g2.yaml", GROUP))).exit_code == 0
    [tt] = json.loads(run(db, "get", "traffictargets", "-o", "json").output)
    assert tt["status"] == "ready" and tt["pending"] == []
    assert check(db, "--path", "/items", "--method", "GET") == "allow"


def test_deleting_a_referenced_resource_succeeds_with_a_warning(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    both = write(tmp_path / "both.yaml", GROUP, TARGET)
    assert run(db, "apply", "-f", str(both)).exit_code == 0
    assert check(db, "--path", "/items", "--method", "GET") == "allow"
    # dropping the match the stored TrafficTarget uses: accepted, the target is pending
    g = write(tmp_path / "g.yaml", GROUP.replace("name: read", "name: other"))
    res = run(db, "apply", "-f", str(g))
    assert res.exit_code == 0, res.output
    assert check(db, "--path", "/items", "--method", "GET") == "deny"
    assert run(db, "apply", "-f", str(both)).exit_code == 0
    # deleting the group alone succeeds, warning that the target is now pending
    only_group = write(tmp_path / "og.yaml", GROUP)
    res = run(db, "delete", "-f", str(only_group))
    assert res.exit_code == 0, res.output
    assert "HTTPRouteGroup/shop/routes deleted" in res.stdout
    assert "TrafficTarget/shop/web-to-api is now pending" in res.stderr
    assert check(db, "--path", "/items", "--method", "GET") == "deny"
    res = run(db, "delete", "-f", str(both), "--ignore-not-found")
    assert res.exit_code == 0, res.output
    assert "TrafficTarget/shop/web-to-api deleted" in res.output
    assert json.loads(run(db, "get", "policies", "-o", "json").output) == []


def test_last_duplicate_in_a_file_wins(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    first = GROUP.replace("/items", "/first")
    f = write(tmp_path / "dup.yaml", first, GROUP)
    res = run(db, "apply", "-f", str(f))
    assert res.exit_code == 0, res.output
    assert res.stdout.count("HTTPRouteGroup/shop/routes created") == 1
    [g] = json.loads(run(db, "get", "policies", "-o", "json").output)
    assert g["manifest"]["spec"]["matches"][0]["pathRegex"] == "/items"


def test_delete_and_not_found(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    assert run(db, "apply", "-f", str(HYBRID)).exit_code == 0
    res = run(db, "delete", "-f", str(HYBRID), "--as", "bob")
    assert res.exit_code == 0, res.output
    assert res.output.count(" deleted") == 5
    assert json.loads(run(db, "get", "services", "-o", "json").output) == []
    assert json.loads(run(db, "get", "workloads", "-o", "json").output) == []
    cfg = json.loads(run(db, "get", "meshconfig", "-o", "json").output)
    assert cfg["resource"] is None
    res = run(db, "delete", "-f", str(HYBRID))
    assert res.exit_code == 1 and "not found" in res.stderr
    assert run(db, "delete", "-f", str(HYBRID), "--ignore-not-found").exit_code == 0


def test_actor_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "smc.db"
    """A direct log write records the operator's principal (``unix:`` + the login of the
    process uid); ``--as`` is recorded as an impersonation, with both names."""
    me = f"unix:{pwd.getpwuid(os.getuid()).pw_name}"
    assert run(db, "apply", "-f", str(HYBRID), "--as", "alice").exit_code == 0
    evs = events_of(db)
    assert evs and {e.envelope.actor for e in evs} == {f"{me} as alice"}
    assert {e.envelope.source for e in evs} == {"cli"}
    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "carol")  # the environment cannot forge the operator
    assert run(db, "delete", "-f", str(HYBRID)).exit_code == 0
    assert {e.envelope.actor for e in events_of(db)[len(evs) :]} == {me}
    audit = run(db, "audit", "--actor", "alice", "--json")
    assert audit.exit_code == 0 and len(json.loads(audit.output)["events"]) == len(evs)
    audit = run(db, "audit", "--actor", me, "--json")
    assert audit.exit_code == 0 and len(json.loads(audit.output)["events"]) == len(evs) + 5
    assert run(db, "audit", "--actor", "carol", "--json").output.count('"actor"') == 0


def test_directory_recursive_and_stdin(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    d = tmp_path / "manifests"
    (d / "nested").mkdir(parents=True)
    write(d / "a-group.yml", GROUP)
    write(d / "nested" / "b-target.yaml", TARGET)
    (d / "notes.txt").write_text("not a manifest")
    res = run(db, "apply", "-f", str(d))
    assert res.exit_code == 0, res.output
    assert "TrafficTarget/shop/web-to-api created" in res.output
    res = run(db, "apply", "-f", "-", input=BAD_SPLIT.replace("1.5", "1"))
    assert res.exit_code == 0 and "TrafficSplit/shop/broken created" in res.output
    splits = json.loads(run(db, "get", "splits", "-o", "json").output)
    assert [s["name"] for s in splits] == ["broken"]
    assert "broken" in run(db, "get", "splits").output
    assert "web-to-api" in run(db, "get", "traffictargets").output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run(db, "apply", "-f", str(empty))
    assert res.exit_code == 1 and "no *.yaml" in res.stderr


def test_unreadable_inputs(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00kind")
    res = run(db, "apply", "-f", str(tmp_path / "bin.yaml"), "-f", str(tmp_path / "missing.yaml"))
    assert res.exit_code == 1
    assert "not UTF-8" in res.stderr and "cannot read" in res.stderr
    assert events_of(db) == []


def test_second_meshconfig_and_reserved_labels_refused(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    assert run(db, "apply", "-f", str(HYBRID)).exit_code == 0
    other = textwrap.dedent(
        """\
        apiVersion: smc.dev/v1alpha1
        kind: MeshConfig
        metadata: {name: other, namespace: smc-system}
        spec: {permissiveTrafficMode: true}
        ---
        apiVersion: smc.dev/v1alpha1
        kind: VirtualMachine
        metadata:
          name: sneaky
          namespace: bookwarehouse
          labels: {smc.dev/managed-by: someone}
        spec: {address: 10.0.0.9, serviceAccount: x}
        """
    )
    res = run(db, "apply", "-f", "-", input=other)
    assert res.exit_code == 1
    assert "only one MeshConfig may exist" in res.stderr
    assert "metadata.labels" in res.stderr and "reserved" in res.stderr
    cfg = json.loads(run(db, "get", "meshconfig", "-o", "json").output)
    assert cfg["permissiveTrafficMode"] is False


def test_policy_check(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    assert run(db, "apply", "-f", str(DATA / "access-v1alpha3.yaml")).exit_code == 0
    args = ["policy", "check", "--from", "default/prometheus", "--to", "default/api-service"]
    res = run(db, *args, "--path", "/metrics", "--method", "GET", "--port", "8080")
    assert res.exit_code == 0 and res.output.startswith("allow: allowed by TrafficTarget/")
    res = run(db, *args, "--path", "/metrics", "--method", "POST", "--port", "8080")
    assert res.exit_code == 1 and res.output.startswith("deny:")
    res = run(db, "policy", "check", "--from", "default/nobody", "--to", "default/api-service")
    assert res.exit_code == 1 and res.output.startswith("deny:") and "deny by default" in res.output
    res = run(db, "policy", "check", "--from", "nonsense", "--to", "default/api-service")
    assert res.exit_code == 2 and "namespace/serviceaccount" in res.output


def test_dry_run_appends_nothing(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    res = run(db, "apply", "-f", str(HYBRID), "--dry-run")
    assert res.exit_code == 0 and "created (dry run)" in res.output
    assert events_of(db) == []


def _changes(db: Path) -> tuple[SqliteLog, MeshChanges]:
    log = SqliteLog(db)
    reg, pol = RegistryProjection(), PolicyProjection()
    ProjectionRunner(log=log, projections=[reg, pol]).catch_up()
    return log, MeshChanges(log=log, registry=reg, policy=pol)


def test_request_id_makes_retries_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "smc.db"
    resources = load_documents(HYBRID.read_text(), source="h").resources
    log1, c1 = _changes(db)
    log2, c2 = _changes(db)  # a second replica that has not seen the first append
    try:
        first = c1.apply(resources, actor="a", source="api", request_id="req-1")
        again = c2.apply(resources, actor="a", source="api", request_id="req-1")
        assert [e.event_id for e in first.plan.events] == [e.event_id for e in again.plan.events]
        assert not any(a.duplicate for a in first.appended)
        assert all(a.duplicate for a in again.appended)
        other = c2.plan(resources, actor="a", source="api", request_id="req-2")
        assert {e.event_id for e in other}.isdisjoint(e.event_id for e in first.plan.events)
    finally:
        log1.close()
        log2.close()
    evs = events_of(db)
    assert len(evs) == len(first.plan.events)
    kinds = {type(e) for e in evs}
    assert {WorkloadJoined, MeshConfigChanged, ServiceAccountUpserted} <= kinds
