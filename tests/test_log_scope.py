"""Who may write what, from the attacker's side, on SQLite and on a real Kafka broker:
an informer only changes what belongs to its own cluster, a policy record the API sealed on
behalf of a principal counts only if that principal's AccessGrants (on the log, as of that
point) allow it, the order of different writer sessions' batches in a Kafka partition is
signed (links), and a truncated log is reported against a former report's seals.
Refused records never change state, on every replica alike (from zero or a checkpoint)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_log_integrity import Backend, Rows, same_aggregate

from smc.audit import issue_writer, load_trust, verify_log
from smc.auth import Grant
from smc.ca import LocalIssuer
from smc.events import (
    ChainVerifier,
    EventLog,
    MeshConfigChanged,
    Signer,
    SmiResourceApplied,
    SmiResourceDeleted,
    WorkloadJoined,
    WorkloadLeft,
    WorkloadPort,
    make_event,
)
from smc.projections import (
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
    canonical_json,
)
from smc.smi import parse_manifest, to_manifest

TD = "example.org"


@pytest.fixture(scope="module")
def writers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("writers")
    ca = LocalIssuer(directory=base / "ca", trust_domain=TD)
    out = {}
    for key, role, name in (
        ("east", "informer", "east"),
        ("west", "informer", "west"),
        ("operator", "operator", "alice"),
        ("api", "api", "replica-0"),
    ):
        out[key] = base / key
        issue_writer(ca, trust_domain=TD, role=role, name=name, directory=out[key])
    return out


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    b = Backend(request.param, tmp_path, request)
    yield b
    b.close()


def verifier(writers: dict[str, Path]) -> ChainVerifier:
    return ChainVerifier(trust=load_trust(writers["operator"] / "trust.pem"))


def rebuild(log: EventLog, writers: dict[str, Path]) -> ProjectionRunner:
    runner = ProjectionRunner(log=log, projections=all_projections(), verifier=verifier(writers))
    runner.catch_up()
    return runner


def same_from_a_checkpoint(log: EventLog, writers: dict[str, Path], full: ProjectionRunner) -> None:
    """A replica that restores a checkpoint taken half-way skips the same records."""
    end = log.end_position()
    half = type(end)({tp: off // 2 for tp, off in end.items()})
    first = ProjectionRunner(log=log, projections=all_projections(), verifier=verifier(writers))
    first.catch_up(until=half)
    cp = first.checkpoint()
    second = ProjectionRunner(log=log, projections=all_projections(), verifier=verifier(writers))
    second.restore(cp)
    second.catch_up()
    assert second.digests() == full.digests()
    assert second.skipped == full.skipped


def workload(name: str, ns: str, *, actor: str, kind: str = "pod", leave: bool = False) -> Any:
    common = {"source": "k8s", "actor": actor, "event_id": str(uuid.uuid4())}
    if leave:
        return make_event(WorkloadLeft, **common, kind=kind, namespace=ns, name=name)
    return make_event(
        WorkloadJoined, **common, kind=kind, namespace=ns, name=name,
        address="10.1.2.3", service_account="web", labels={"app": "web"},
        ports=(WorkloadPort(name="http", port=8080, protocol="http"),),
    )  # fmt: skip


def test_informers_only_change_their_own_cluster(
    backend: Backend, writers: dict[str, Path]
) -> None:
    log = backend.log()
    east, west = Signer.from_dir(writers["east"]), Signer.from_dir(writers["west"])
    operator = Signer.from_dir(writers["operator"])
    log.append([workload("web-1", "shop", actor="east")], signer=east)
    log.append([workload("api-1", "billing", actor="west")], signer=west)
    log.append([workload("vm-1", "vms", actor="alice", kind="vm")], signer=operator)
    # cluster west's informer key, stolen or misconfigured: it moves east's pod, adds a pod
    # of its own to east's namespace and removes the operator's VM
    log.append([workload("web-1", "shop", actor="west")], signer=west)
    log.append([workload("evil-1", "shop", actor="west")], signer=west)
    log.append([workload("vm-1", "vms", actor="west", kind="vm", leave=True)], signer=west)
    # each cluster goes on with its own
    log.append([workload("web-1", "shop", actor="east", leave=True)], signer=east)
    log.append([workload("api-2", "billing", actor="west")], signer=west)
    report = verify_log(log, load_trust(writers["operator"] / "trust.pem"))
    refused = [(f.kind, f.detail) for f in report.findings]
    assert [k for k, _ in refused] == ["not-entitled"] * 3, refused
    details = " | ".join(d for _, d in refused)
    assert "informer.west (cluster west) may not change workload/pod/shop/web-1" in details
    assert "namespace ns:shop belongs to cluster:east" in details
    assert "workload/vm/vms/vm-1 belongs to operator" in details
    assert report.verified == 5
    runner = rebuild(log, writers)
    registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
    assert {w[2] for w in registry.workloads} == {"api-1", "api-2", "vm-1"}
    assert runner.skipped == 3
    same_from_a_checkpoint(log, writers, runner)


def traffic_target(ns: str, *, actor: str) -> Any:
    doc = {
        "apiVersion": "access.smi-spec.io/v1alpha3",
        "kind": "TrafficTarget",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": "web", "namespace": ns},
            "rules": [{"kind": "TCPRoute", "name": "tcp"}],
            "sources": [{"kind": "ServiceAccount", "name": "client", "namespace": ns}],
        },
    }
    manifest = to_manifest(parse_manifest(doc, document="test"))
    return make_event(
        SmiResourceApplied, source="api", actor=actor, event_id=str(uuid.uuid4()),
        kind="TrafficTarget", api_version=str(manifest["apiVersion"]), namespace=ns,
        name=f"web-{uuid.uuid4().hex[:6]}", manifest_json=canonical_json(manifest),
    )  # fmt: skip


def grant(name: str, subject: str, namespace: str, *, actor: str = "local:admin") -> Any:
    g = Grant(
        name=name, subjects=(subject,), verbs=("apply",), resources=("traffictargets",),
        namespaces=(namespace,),
    )  # fmt: skip
    return make_event(
        SmiResourceApplied, source="api", actor=actor, event_id=str(uuid.uuid4()),
        kind="AccessGrant", api_version="smc.dev/v1alpha1", namespace="", name=name,
        manifest_json=g.manifest_json(),
    )  # fmt: skip


def revoke(name: str) -> Any:
    return make_event(
        SmiResourceDeleted, source="api", actor="local:admin", event_id=str(uuid.uuid4()),
        kind="AccessGrant", namespace="", name=name,
    )  # fmt: skip


def test_policy_counts_only_when_the_principals_grants_allow_it(
    backend: Backend, writers: dict[str, Path]
) -> None:
    log = backend.log()
    api = Signer.from_dir(writers["api"])  # the API replica's writer
    api.vouch("local:admin", ["smc:admins", "system:authenticated"])
    api.vouch("alice", ["system:authenticated"])
    api.vouch("local:admin as bob", ["system:authenticated"])
    allowed = traffic_target("shop", actor="alice")
    log.append([grant("alice-shop", "alice", "shop")], signer=api)
    log.append([allowed], signer=api)
    # what a compromised or buggy API replica might append on behalf of principals
    log.append([traffic_target("bank", actor="alice")], signer=api)  # no grant there
    log.append([traffic_target("shop", actor="local:admin as bob")], signer=api)  # bob: none
    log.append([grant("mallory-all", "mallory", "*", actor="mallory")], signer=api)
    log.append(
        [make_event(MeshConfigChanged, source="api", actor="mallory", permissive=True,
                    trust_domain=TD, cert_lifetime_seconds=3600)],
        signer=api,
    )  # fmt: skip
    # the grant is revoked: alice's next change no longer counts, the earlier one stays
    log.append([revoke("alice-shop")], signer=api)
    log.append([traffic_target("shop", actor="alice")], signer=api)
    report = verify_log(log, load_trust(writers["operator"] / "trust.pem"))
    kinds = [f.kind for f in report.findings]
    assert kinds == ["not-authorized"] * 5, report.findings
    details = " | ".join(f.detail for f in report.findings)
    assert "'alice'" in details and "'local:admin as bob'" in details and "'mallory'" in details
    assert report.verified == 3
    runner = rebuild(log, writers)
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    names = {(s.kind, s.namespace, s.name) for s in policy.of_kind("TrafficTarget")}
    assert names == {("TrafficTarget", "shop", allowed.name)}
    assert not policy.of_kind("AccessGrant")  # granted, then revoked; mallory's never counted
    assert runner.skipped == 5
    same_from_a_checkpoint(log, writers, runner)


def test_impersonation_rights_are_rechecked_on_the_log(
    backend: Backend, writers: dict[str, Path]
) -> None:
    """Under version-3 seals a policy record the API wrote for ``REAL as TARGET`` counts
    only when REAL may impersonate (an admin, or an AccessGrant allowing ``impersonate`` on
    ``users`` recorded before) as well as TARGET's grants allowing the change; a seal that
    does not vouch for REAL does not count either."""
    log = backend.log()
    api = Signer.from_dir(writers["api"])
    api.vouch("local:admin", ["smc:admins", "system:authenticated"])
    api.vouch("carol", ["system:authenticated"])
    for real in ("carol", "local:admin", "erin"):  # erin herself is not vouched for
        api.vouch(f"{real} as dave", ["system:authenticated"])
    may_impersonate = make_event(
        SmiResourceApplied, source="api", actor="local:admin", event_id=str(uuid.uuid4()),
        kind="AccessGrant", api_version="smc.dev/v1alpha1", namespace="", name="carol-as",
        manifest_json=Grant(
            name="carol-as", subjects=("carol",), verbs=("impersonate",), resources=("users",),
            namespaces=("*",),
        ).manifest_json(),
    )  # fmt: skip
    log.append([grant("dave-shop", "dave", "shop")], signer=api)
    log.append([traffic_target("shop", actor="carol as dave")], signer=api)  # no right yet
    log.append([traffic_target("shop", actor="local:admin as dave")], signer=api)
    log.append([traffic_target("shop", actor="erin as dave")], signer=api)
    log.append([may_impersonate], signer=api)
    log.append([traffic_target("shop", actor="carol as dave")], signer=api)
    report = verify_log(log, load_trust(writers["operator"] / "trust.pem"))
    assert [(f.kind, f.offset) for f in report.findings] == [
        ("not-authorized", 1),
        ("not-authorized", 3),
    ], report.findings
    assert "'carol'" in report.findings[0].detail and "impersonate" in report.findings[0].detail
    assert "does not vouch for 'erin'" in report.findings[1].detail
    assert report.verified == 4
    runner = rebuild(log, writers)
    assert runner.skipped == 2
    same_from_a_checkpoint(log, writers, runner)


class _Version2Signer(Signer):
    """The attacker's modified SMC with a stolen writer key: seals with version 2, under
    which impersonation was not re-checked."""

    def seal(self, **kw: Any) -> Any:  # type: ignore[override]
        return super().seal(**{**kw, "version": 2})


def test_a_writer_key_issued_since_version_3_cannot_seal_version_2(
    backend: Backend, writers: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stolen API writer key whose certificate was issued after version-3 seals existed
    cannot fall back to version 2 (which skips the re-check of the impersonating caller):
    its version-2 batch is refused (bad-seal, a downgrade) and never applied, from zero and
    from a checkpoint; a writer certificate issued before keeps verifying the version-2
    seals it made (then only the target's grants are checked, as before)."""
    import smc.events._verify as verify_module

    log = backend.log()
    # dave's grant, by an operator: the API key never sealed version 3 in this partition
    log.append([grant("dave-shop", "dave", "shop")], signer=Signer.from_dir(writers["operator"]))
    stolen = _Version2Signer.from_dir(writers["api"])
    stolen.vouch("carol as dave", ["system:authenticated"])  # carol may not impersonate
    log.append([traffic_target("shop", actor="carol as dave")], signer=stolen)
    trust = load_trust(writers["operator"] / "trust.pem")
    report = verify_log(log, trust)
    assert [(f.kind, f.offset) for f in report.findings] == [("bad-seal", 1)], report.findings
    assert "version-2 seal by api.replica-0" in report.findings[0].detail
    assert "downgrade" in report.findings[0].detail
    runner = rebuild(log, writers)
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    assert runner.skipped == 1 and not policy.of_kind("TrafficTarget")
    same_from_a_checkpoint(log, writers, runner)
    # the same key, had its certificate been issued before version 3 existed: its
    # version-2 seals verify as they always did (dave's grant allows the change)
    monkeypatch.setattr(
        verify_module, "SEAL_V3_SINCE", datetime.now(UTC) + timedelta(days=1)
    )
    assert verify_log(log, trust).ok


def test_operators_write_policy_on_their_credential(
    backend: Backend, writers: dict[str, Path]
) -> None:
    """An operator credential (the CLI writing directly) is an admin's: no grant needed."""
    log = backend.log()
    log.append(
        [traffic_target("bank", actor="unix:root")], signer=Signer.from_dir(writers["operator"])
    )
    report = verify_log(log, load_trust(writers["operator"] / "trust.pem"))
    assert report.ok and report.verified == 1, report.findings


def interleaved(backend: Backend, writers: dict[str, Path]) -> EventLog:
    """Two writer sessions appending to one partition in turn: s1 (0-3), s2 (4-7), s1 (8-11)."""
    log = backend.log()
    s1, s2 = Signer.from_dir(writers["operator"]), Signer.from_dir(writers["operator"])
    log.append(same_aggregate(4, "a"), signer=s1)
    log.append(same_aggregate(4, "b"), signer=s2)
    log.append(same_aggregate(4, "c"), signer=s1)
    return log


def swap_sessions(rows: Rows) -> Rows:
    return rows[4:8] + rows[0:4] + rows[8:12]


def drop_other_session(rows: Rows) -> Rows:
    return rows[0:4] + rows[8:12]


@pytest.mark.parametrize(
    ("change", "offset"), [(swap_sessions, 0), (drop_other_session, 4)], ids=["swap", "drop"]
)
def test_order_between_writer_sessions_is_signed(
    backend: Backend, writers: dict[str, Path], change: Any, offset: int
) -> None:
    interleaved(backend, writers)
    assert verify_log(backend.logs[0], load_trust(writers["operator"] / "trust.pem")).ok
    report = verify_log(backend.tampered(change), load_trust(writers["operator"] / "trust.pem"))
    first = report.findings[0]
    assert (first.kind, first.offset) == ("chain-break", offset), report.findings
    # SQLite's partition chain breaks at every batch after the change; on Kafka, each
    # batch whose link (the seal it followed when appended) is no longer before it
    assert {f.kind for f in report.findings} == {"chain-break"}


def test_truncation_is_reported_against_a_former_report(
    backend: Backend, writers: dict[str, Path]
) -> None:
    log = interleaved(backend, writers)
    trust = load_trust(writers["operator"] / "trust.pem")
    before = verify_log(log, trust)
    assert before.ok and before.seals
    # a log that only grew since is fine
    log.append(same_aggregate(2, "d"), signer=Signer.from_dir(writers["operator"]))
    assert verify_log(log, trust, previous=before.seals).ok
    cut = backend.tampered(lambda rows: rows[:8])  # the last two batches removed
    assert verify_log(cut, trust).ok  # from the log alone: a shorter, valid log
    report = verify_log(cut, trust, previous=before.seals)
    assert [(f.kind, f.offset) for f in report.findings] == [("truncated", 8)], report.findings


@pytest.mark.kafka
@pytest.mark.parametrize("read_size", [7, 5000])
def test_kafka_fast_verification_decides_as_the_general_path(
    kafka_broker: Any, writers: dict[str, Path], tmp_path: Path, read_size: int
) -> None:
    """The verified catch-up on Kafka takes whole sealed batches straight from the consumed
    messages; on a log mixing sessions, interleaved batches, an edited record, an unsigned
    insertion, another cluster's forgery and a batch cut by every read size, it skips and
    applies exactly what the record-by-record path does."""
    from test_log_integrity import kafka_copy, kafka_rows

    from smc.events import KafkaLog

    b = Backend("kafka", tmp_path, _Request(kafka_broker))
    try:
        log = b.log()
        s1, s2 = Signer.from_dir(writers["operator"]), Signer.from_dir(writers["operator"])
        for k in range(6):
            log.append([*same_aggregate(5, f"a{k}"), service_n(k)], signer=(s1, s2)[k % 2])
        log.append(
            [workload("web-1", "shop", actor="east")], signer=Signer.from_dir(writers["east"])
        )
        log.append(
            [workload("web-1", "shop", actor="west")], signer=Signer.from_dir(writers["west"])
        )
        rows = kafka_rows(log)  # type: ignore[arg-type]
        for recs in rows.values():
            if len(recs) > 12:
                key, value, w, seal = recs[8]
                recs[8] = (key, value.replace(b"svc1", b"svc7"), w, seal)  # edited
                recs.insert(14, (recs[1][0], recs[1][1], b"", b""))  # unsigned
        tampered: KafkaLog = kafka_copy(kafka_broker, rows)
        b.logs.append(tampered)

        def rebuild_with(compact: bool) -> ProjectionRunner:
            runner = ProjectionRunner(
                log=KafkaLog(kafka_broker.bootstrap, topic_prefix=tampered.prefix),
                projections=all_projections(), verifier=verifier(writers), batch=read_size,
            )  # fmt: skip
            runner.catch_up(compact=compact)
            return runner

        fast, general = rebuild_with(True), rebuild_with(False)
        assert fast.verifier is not None and general.verifier is not None
        assert fast.verifier.fast_released > 0 and general.verifier.fast_released == 0
        assert fast.skipped == general.skipped > 0
        assert fast.digests() == general.digests()
        assert fast.verifier is not None and general.verifier is not None
        found = sorted((f.where, f.kind) for f in fast.verifier.findings)
        assert found == sorted((f.where, f.kind) for f in general.verifier.findings)
        assert {k for _, k in found} >= {"bad-signature", "not-entitled"}
        # the unsigned record is held (reported when a range ends): held alike
        state = fast.verifier.state()
        assert state == general.verifier.state() and state["pending"]
    finally:
        b.close()


@pytest.mark.kafka
@pytest.mark.parametrize("read_size", [7, 5000])
def test_kafka_batch_sizes_are_hints_only(
    kafka_broker: Any, writers: dict[str, Path], tmp_path: Path, read_size: int
) -> None:
    """Seal version 3: the size a batch's first record announces (``smc.batch``) is not
    signed and decides nothing but how the batch is gathered. A size too large or too small,
    a size removed, a stray seal or another session's writer header on a record inside a
    batch: every batch is still applied (the head covers the records between first and
    last); an edit is still refused; the fast path and the record-by-record path agree."""
    import struct

    from test_log_integrity import Row, kafka_copy, kafka_rows

    from smc.events import KafkaLog

    b = Backend("kafka", tmp_path, _Request(kafka_broker))
    try:
        log = b.log()
        s1, s2 = Signer.from_dir(writers["operator"]), Signer.from_dir(writers["operator"])
        for k in range(8):
            log.append(same_aggregate(4, f"b{k}"), signer=(s1, s2)[k % 2])
        rows = kafka_rows(log)  # type: ignore[arg-type]
        ((stream, part), recs), *_ = [(tp, r) for tp, r in rows.items() if r]
        starts = [i for i, r in enumerate(recs) if getattr(r, "batch", b"")]
        assert starts == list(range(0, 32, 4))

        def size(i: int, n: int) -> None:
            row = Row(recs[i])
            row.batch = struct.pack(">I", n)
            recs[i] = row

        size(starts[1], 6)  # too large: takes the next batch's first two records
        key, value, w, _ = recs[starts[3] + 1]
        recs[starts[3] + 1] = (key, value, w, recs[3][3])  # a stray seal (batch 0's)
        key, value, _, seal = recs[starts[4] + 2]
        recs[starts[4] + 2] = (key, value, b"\x07" * 24, seal)  # another session's header
        recs[starts[5]] = tuple(recs[starts[5]])  # size removed
        key, value, w, seal = recs[starts[6] + 1]
        recs[starts[6] + 1] = (key, value.replace(b"svc1", b"svc7"), w, seal)  # edited
        size(starts[7], 2)  # too small
        tampered: KafkaLog = kafka_copy(kafka_broker, rows)
        b.logs.append(tampered)

        def rebuild_with(compact: bool) -> ProjectionRunner:
            runner = ProjectionRunner(
                log=KafkaLog(kafka_broker.bootstrap, topic_prefix=tampered.prefix),
                projections=all_projections(), verifier=verifier(writers), batch=read_size,
            )  # fmt: skip
            runner.catch_up(compact=compact)
            return runner

        fast, general = rebuild_with(True), rebuild_with(False)
        assert fast.verifier is not None and general.verifier is not None
        assert fast.verifier.fast_released > 0 and general.verifier.fast_released == 0
        found = sorted((f.where, f.kind) for f in fast.verifier.findings)
        assert found == sorted((f.where, f.kind) for f in general.verifier.findings)
        # the edited batch is refused; the batch after it followed its seal (a link to a
        # seal that did not verify); nothing else is found
        where = f"{stream}[{part}]@"
        assert found == [(f"{where}{starts[6]}", "bad-signature"),
                         (f"{where}{starts[7]}", "chain-break")], found  # fmt: skip
        assert fast.verifier.verified == general.verifier.verified == 32 - 4
        assert fast.digests() == general.digests()
        assert fast.verifier.state() == general.verifier.state()
    finally:
        b.close()


class _Request:
    """What Backend asks of pytest's request: the broker fixture."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    def getfixturevalue(self, name: str) -> Any:
        assert name == "kafka_broker"
        return self.broker


def service_n(i: int) -> Any:
    from eventgen import service

    return service(100 + i, event_id=str(uuid.uuid4()))


def test_version_1_seals_still_verify(
    writers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logs sealed before seal version 2 (a sha256 per record, no link, no principals) keep
    verifying; an edit under such a seal is still found. (The writer certificate of such a
    log was issued before version 3 existed: the test's, issued now, is taken as one.)"""
    import dataclasses
    import sqlite3
    import time

    import smc.events._verify as verify_module

    monkeypatch.setattr(verify_module, "SEAL_V3_SINCE", datetime.now(UTC) + timedelta(days=1))

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from smc.events import PARTITION, Position, Seal, SqliteLog, batch_head, genesis
    from smc.events import record_digest as digest

    db = tmp_path / "v1.db"
    log = SqliteLog(db)
    log.append(same_aggregate(3, "v1"))  # unsealed, then sealed the version-1 way
    recs = log.read(start=Position(), max_records=10)
    signer = Signer.from_dir(writers["operator"])
    prev = genesis("smc.registry", 0)
    head = batch_head(prev, [digest(r.key.encode(), r.value) for r in recs])
    seal = Seal(
        PARTITION, signer.key_id, bytes(8), 3, prev, int(time.time() * 1000), b"",
        signer.certs, 1,
    )  # fmt: skip
    sig = signer._key.sign(  # the writer's own key, as an older SMC signed
        seal.signed_bytes("smc.registry", 0, head), ec.ECDSA(hashes.SHA256())
    )
    conn = sqlite3.connect(db)
    conn.execute(
        "UPDATE events SET seal = ? WHERE seq = 2",
        (dataclasses.replace(seal, signature=sig).encode(),),
    )
    conn.commit()
    trust = load_trust(writers["operator"] / "trust.pem")
    report = verify_log(log, trust)
    assert report.ok and report.verified == 3, report.findings
    (v,) = conn.execute("SELECT value FROM events WHERE seq = 1").fetchone()
    conn.execute("UPDATE events SET value = ? WHERE seq = 1", (v.replace(b"svc1", b"svc8"),))
    conn.commit()
    conn.close()
    assert [f.kind for f in verify_log(log, trust).findings] == ["bad-signature"]
    log.close()


def test_seal_versions_are_not_interchangeable(writers: dict[str, Path]) -> None:
    """Version 2 and 3 seals sign the same fields under distinct domains: a seal relabelled
    as the other version no longer verifies (on SQLite, version 2 is what is written)."""
    import dataclasses

    from smc.events import WRITER, Seal, genesis

    signer = Signer.from_dir(writers["operator"])
    prev = genesis("smc.registry", 0, signer.session_id)
    keys, values = [b"service/ns/a"], [b"\xc3\x01payload"]
    for version, other in ((3, 2), (2, 3)):
        seal, head = signer.seal(
            stream="smc.registry", partition=0, mode=WRITER, prev=prev, keys=keys,
            values=values, version=version,
        )  # fmt: skip
        again = Seal.decode(seal.encode())
        assert again.version == version
        pub = Signer.from_dir(writers["operator"])._key.public_key()
        assert again.verify(pub, again.signed_bytes("smc.registry", 0, head))
        relabelled = Seal.decode(dataclasses.replace(again, version=other).encode())
        assert not relabelled.verify(pub, relabelled.signed_bytes("smc.registry", 0, head))
