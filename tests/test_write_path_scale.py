"""The write path costs what the change costs, not what the mesh holds.

A plan reads the current state through :class:`smc.api.CurrentResources` (one key when asked
for) and checks only what a change can affect: the set-level kinds (``SET_LEVEL_KINDS``) and
the resources a changed one names (``references_of``). These tests hold the facts that makes
exact (same results as checking the whole set), the lazy mapping's dict behaviour, and that
planning one document against thousands of resources reads a handful of them."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from smc.api import CurrentResources, MeshChanges, current_resources
from smc.events import Position
from smc.events._sqlite import SqliteLog
from smc.projections import PolicyProjection, RegistryProjection
from smc.smi import (
    SET_LEVEL_KINDS,
    Resource,
    TrafficSplit,
    check_references,
    load_documents,
    references_of,
    resource_key,
    unresolved_references,
)


def _res(text: str) -> list[Resource]:
    loaded = load_documents(text, source="test")
    assert not loaded.errors, loaded.errors
    return list(loaded.resources)


def _random_mesh(rng: random.Random, n: int) -> list[Resource]:
    """``n`` documents of every referencing kind, names drawn from a small pool so that
    references resolve or not, splits with zero weight, and several MeshConfigs."""
    docs: list[str] = []
    names = [f"n{i}" for i in range(6)]
    for i in range(n):
        ns = rng.choice(["a", "b"])
        name = rng.choice(names) + f"-{i % 7}"
        ref = rng.choice(names) + f"-{rng.randrange(7)}"
        kind = rng.randrange(7)
        if kind == 0:
            docs.append(
                "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
                f"metadata: {{name: {name}, namespace: {ns}}}\n"
                "spec: {ports: [{name: http, port: 80, protocol: http}], selector: {app: x}}\n"
            )
        elif kind == 1:
            docs.append(
                "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\n"
                f"metadata: {{name: {name}, namespace: {ns}}}\n"
                f"spec: {{matches: [{{name: {rng.choice(['read', 'write'])}, pathRegex: /x}}]}}\n"
            )
        elif kind == 2:
            docs.append(
                "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\n"
                f"metadata: {{name: {name}, namespace: {ns}}}\n"
                "spec:\n  destination: {kind: ServiceAccount, name: api, namespace: " + ns + "}\n"
                f"  rules: [{{kind: HTTPRouteGroup, name: {ref}, matches: [read]}}]\n"
                "  sources: [{kind: ServiceAccount, name: web, namespace: " + ns + "}]\n"
            )
        elif kind == 3:
            docs.append(
                "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\n"
                f"metadata: {{name: {name}, namespace: {ns}}}\n"
                f"spec: {{service: {name}, backends: [{{service: {ref}, weight: 50}}],"
                f" matches: [{{kind: HTTPRouteGroup, name: {ref}}}]}}\n"
            )
        elif kind == 4:
            docs.append(
                "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
                f"metadata: {{name: {name}, namespace: {ns}}}\n"
                f"spec: {{address: 10.0.0.{i % 250 + 1}, serviceAccount: vm,"
                f" ports: [{{name: http, port: 80, protocol: http}}], services: [{ref}]}}\n"
            )
        elif kind == 5:
            docs.append(
                "apiVersion: smc.dev/v1alpha1\nkind: MeshConfig\n"
                f"metadata: {{name: {name}, namespace: {ns}}}\nspec: {{}}\n"
            )
        else:
            docs.append(
                "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\n"
                f"metadata: {{name: {name}, namespace: {ns}}}\nspec: {{matches: {{ports: [80]}}}}\n"
            )
    unique: dict[str, Resource] = {}
    for r in _res("---\n".join(docs)):
        if isinstance(r, TrafficSplit) and rng.random() < 0.5:
            # the parser refuses a zero-weight split; the set check must still catch one
            zero = tuple(dataclasses.replace(b, weight=0) for b in r.backends)
            r = dataclasses.replace(r, backends=zero)
        unique[resource_key(r)] = r
    out = list(unique.values())
    rng.shuffle(out)
    return out


def test_set_level_errors_come_from_the_set_level_kinds_only() -> None:
    rng = random.Random(15)
    seen = 0
    for _ in range(40):
        mesh = _random_mesh(rng, 60)
        full = check_references(mesh, unresolved=False)
        only = [r for r in mesh if isinstance(r, SET_LEVEL_KINDS)]
        assert set(full) == set(check_references(only, unresolved=False))
        seen += len(full)
    assert seen > 40  # zero-weight splits and second MeshConfigs were drawn


def test_unresolved_references_depend_on_the_named_resources_only() -> None:
    rng = random.Random(16)
    seen_pending = 0
    for _ in range(40):
        mesh = _random_mesh(rng, 60)
        by_key = {resource_key(r): r for r in mesh}
        full = unresolved_references(mesh)
        for r in mesh:
            key = resource_key(r)
            subset = {key: r}
            subset.update((k, by_key[k]) for k in references_of(r) if k in by_key)
            mine = [e for e in unresolved_references(subset.values()) if e.document == key]
            assert mine == [e for e in full if e.document == key]
            seen_pending += len(mine)
    assert seen_pending > 50  # the draw exercises both resolved and unresolved references


def _filled(tmp_path: Path, resources: list[Resource]) -> tuple[MeshChanges, Any, Any]:
    """Projections holding ``resources`` (applied through the real planner's events)."""
    registry, policy = RegistryProjection(), PolicyProjection()
    log = SqliteLog(tmp_path / "log.db")
    changes = MeshChanges(log=log, registry=registry, policy=policy)
    plan = changes.plan_apply(resources, actor="t", source="t", request_id="fill")
    for ev in plan.events:
        registry.apply(ev)
        policy.apply(ev)
    return changes, registry, policy


def test_lazy_state_equals_the_full_read_and_behaves_as_a_dict(tmp_path: Path) -> None:
    rng = random.Random(17)
    mesh = [r for r in _random_mesh(rng, 120) if r.KIND != "MeshConfig"]
    _, registry, policy = _filled(tmp_path, mesh)
    full = current_resources(registry=registry, policy=policy)
    assert len(full) > 50
    lazy = CurrentResources(registry=registry, policy=policy)
    assert list(lazy.items()) == list(full.items())
    assert "MeshService/a/nope-1" not in lazy and lazy.get("Bogus") is None
    # random writes, deletes and re-adds: the same answers and order as a dict
    model = dict(full)
    keys = [*full, "MeshService/c/new-1", "MeshService/c/new-2"]
    for _ in range(300):
        k = rng.choice(keys)
        if rng.random() < 0.4 and k in model:
            del model[k]
            del lazy[k]
        else:
            v = rng.choice(list(full.values()))
            model[k] = v
            lazy[k] = v
        assert (k in lazy) == (k in model)
    assert list(lazy.items()) == list(model.items())
    assert len(lazy) == len(model)


def test_planning_one_change_reads_a_handful_of_resources(tmp_path: Path) -> None:
    services = "---\n".join(
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
        f"metadata: {{name: s{i}, namespace: big}}\n"
        "spec: {ports: [{name: http, port: 80, protocol: http}], selector: {app: x}}\n"
        for i in range(3000)
    )
    changes, registry, policy = _filled(tmp_path, _res(services))
    assert len(registry.services) == 3000

    class Counting(CurrentResources):
        reads = 0

        def _stored(self, key: str) -> Any:
            Counting.reads += 1
            return super()._stored(key)

    vm = _res(
        "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
        "metadata: {name: vm1, namespace: big}\n"
        "spec: {address: 10.1.1.1, serviceAccount: vm, ports: [{name: http, port: 80,"
        " protocol: http}], services: [s7, missing]}\n"
    )
    changed = _res(
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\nmetadata: {name: s9, namespace: big}\n"
        "spec: {ports: [{name: http, port: 81, protocol: http}], selector: {app: x}}\n"
    )
    current = Counting(registry=registry, policy=policy)
    plan = changes.plan_apply(
        [*vm, *changed], actor="t", source="t", request_id="r", current=current
    )
    by_doc = {d.document: d for d in plan.results}
    assert by_doc["MeshService/big/s9"].status == "configured"
    assert by_doc["VirtualMachine/big/vm1"].status == "created"
    # the VM's reference to a missing service is pending; the one to s7 resolves
    assert [w for w in by_doc["VirtualMachine/big/vm1"].warnings if "missing" in w]
    assert not [w for w in by_doc["VirtualMachine/big/vm1"].warnings if "s7" in w]
    assert Counting.reads <= 8, Counting.reads
    # deleting still answers which resources a deletion leaves pending (reads everything)
    plan = changes.plan_delete(
        _res(
            "apiVersion: smc.dev/v1alpha1\nkind: MeshService\nmetadata: {name: s1, namespace: big}\n"
            "spec: {ports: [{name: http, port: 80, protocol: http}], selector: {app: x}}\n"
        ),
        actor="t",
        source="t",
        request_id="d",
    )
    assert plan.results[0].status == "deleted"


def test_console_timeline_takes_late_records_without_resorting_the_log(tmp_path: Path) -> None:
    """serve's console indexes every record; on Kafka a batch often carries records older
    than the newest one indexed (another partition). Only the rows newer than the oldest late
    one move: the result equals a stable sort of everything (rows and per-aggregate index)."""
    from smc.console._timeline import Row, Timeline

    rng = random.Random(18)
    log = SqliteLog(tmp_path / "tl.db")
    timeline, model = Timeline(log), []
    offset = 0
    for _ in range(60):
        batch = []
        for _ in range(rng.randrange(1, 30)):
            offset += 1
            ts = 1000 + offset * 3 - rng.choice([0, 0, 0, 5, 40, 400])  # some arrive late
            agg = f"registry/svc-{rng.randrange(12)}"
            batch.append(Row(ts, "smc.registry", 0, offset, "T", agg, "a", "s", "ns", "k"))
        added = timeline.extend(batch, Position())
        model = sorted([*model, *sorted(batch, key=lambda r: r.ts_ms)], key=lambda r: r.ts_ms)
        assert timeline.rows == model
        assert added.stop == len(model) and len(added) >= len(batch)
        index: dict[str, list[int]] = {}
        for i, r in enumerate(model):
            index.setdefault(r.aggregate, []).append(i)
        assert timeline._by_aggregate == index
    log.close()


def test_one_pass_yaml_decoding_answers_as_the_general_path() -> None:
    """Alias-free documents are checked and built in one pass; every answer (value, or the
    rejection's reason) equals the general path's, on random documents with duplicate keys,
    merge keys, complex keys, tags and every scalar kind."""
    from smc.smi._load import MAX_DEPTH, MAX_NODES, _compose, _DocumentRejected

    rng = random.Random(19)
    scalars = ["1", "01", "0x1f", "1.5", "true", "no", "null", "~", "2001-12-14", "'q'", '"d"',
               "!!str 7", "!!binary aGk=", "!!int x", "!custom v", "2001-13-45t", "abc"]  # fmt: skip

    def value(depth: int) -> str:
        r = rng.random()
        if depth > 3 or r < 0.5:
            return rng.choice(scalars)
        if r < 0.75:
            return "[" + ", ".join(value(depth + 1) for _ in range(rng.randrange(4))) + "]"
        return mapping(depth + 1)

    def mapping(depth: int) -> str:
        keys = ["a", "b", "c", "1", "'1'", "<<", "[x]", "!!set {a}", "? complex"]
        items = [
            f"{rng.choice(keys[:4] if rng.random() < 0.9 else keys)}: {value(depth)}"
            for _ in range(rng.randrange(5))
        ]
        return "{" + ", ".join(items) + "}"

    outcomes: set[str] = set()
    for _ in range(1500):
        doc = mapping(0)

        def answer(plain: bool, doc: str = doc) -> object:
            try:
                return ("ok", _compose(doc, MAX_NODES, MAX_DEPTH, plain=plain))
            except _DocumentRejected as exc:
                return ("rejected", exc.reason)

        general = answer(False)
        assert answer(True) == general, doc
        reason = str(general[1])
        outcomes.add(
            str(general[0])
            + (":dup" if "duplicate" in reason else "")
            + (":scalar" if "is not a valid" in reason else "")
        )
    assert outcomes == {"ok", "rejected", "rejected:dup", "rejected:scalar"}


def test_a_scalar_yaml_cannot_convert_is_a_rejected_document_not_a_crash() -> None:
    """``!!int x`` or a 13th month made PyYAML raise ValueError out of load_documents (an
    HTTP 500 for the API); now the document is refused, the value and its place named."""
    bad = (
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\nmetadata: {name: !!int x, namespace: a}\n"
    )
    good = _svc_doc("fine")
    loaded = load_documents(f"{bad}---\n{good}---\nwhen: 2001-13-45\n", source="req")
    assert [r.name for r in loaded.resources] == ["fine"]
    reasons = {e.document: e.reason for e in loaded.errors}
    assert (
        reasons["req#1"].startswith("invalid YAML: 'x' is not a valid int")
        and "line 3" in reasons["req#1"]
    )
    assert "'2001-13-45' is not a valid timestamp" in reasons["req#3"]


def _svc_doc(name: str) -> str:
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
        f"metadata: {{name: {name}, namespace: a}}\n"
        "spec: {ports: [{name: http, port: 80, protocol: http}], selector: {app: x}}\n"
    )
