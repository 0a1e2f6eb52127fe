"""The console's JSON routes on a real ``smc serve`` (SQLite log, local CA, ADS): the map, the
timeline (pages, filters, details with diffs), time travel, "why", live updates and bad input."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from console_mesh import BUYER_POST_ONLY, MESH, STORE_TO_WAREHOUSE

from smc.console import backing_index, mesh_graph
from smc.events import Envelope, ServicePort, ServiceUpserted, WorkloadJoined, WorkloadPort
from smc.projections import PolicyProjection, RegistryProjection
from smc.projections._policyview import BACKS_LABEL_PREFIX, PolicyView
from smc.testing.serve import ServeProcess, eventually, http_json


def _apply(serve: ServeProcess, text: str, actor: str = "alice") -> Any:
    """Apply as the local admin impersonating ``actor`` (recorded as ``local:admin as ACTOR``)."""
    status, body = serve.request(
        "/v1/apply",
        method="POST",
        body=text.encode(),
        headers={"Content-Type": "application/yaml", "X-SMC-Actor": actor},
    )
    assert status == 200, body
    return body


def _get(serve: ServeProcess, path: str) -> Any:
    status, body = serve.request(path)
    assert status == 200, (path, body)
    return body


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("console")
    # serve with agents (no proxy runs here: the CA records the mesh's trust bundle only)
    proc = ServeProcess(tmp)
    try:
        proc.wait_ready()
        proc.grant("console-actors", ["alice", "bob", "carol", "dave"], ["apply"])
        _apply(proc, MESH)

        def settled() -> bool:  # the CA has recorded its trust bundle: no more events of its own
            items = _get(proc, "/v1/console/timeline?kind=TrustBundle&limit=100")["items"]
            return len(items) >= 1

        eventually(settled, what="the mesh's trust bundle", diag=proc.tail)
        yield proc
    finally:
        proc.stop()


def _seq_of(serve: ServeProcess, aggregate: str) -> list[int]:
    page = _get(serve, "/v1/console/timeline?limit=1000")
    return [r["seq"] for r in page["items"] if r["aggregate"] == aggregate]


def test_map_shows_services_identities_allowed_and_split_edges(serve: ServeProcess) -> None:
    g = _get(serve, "/v1/console/graph")
    ids = {n["id"]: n for n in g["nodes"]}
    assert {"svc:shop/bookstore", "svc:shop/bookstore-v1", "svc:shop/warehouse"} <= set(ids)
    # the buyer backs no service: it is drawn as its identity
    assert ids["id:shop/buyer"]["kind"] == "identity"
    assert ids["svc:shop/bookstore"]["vms"] == 2
    edges = {e["id"]: e for e in g["edges"]}
    allow = edges["allow:id:shop/buyer->svc:shop/bookstore"]
    assert [r["trafficTarget"] for r in allow["rules"]] == ["TrafficTarget/shop/buyer-to-store"]
    assert allow["rules"][0]["http"][0]["methods"] == ["GET"]
    split = edges["split:svc:shop/bookstore->svc:shop/bookstore-v1"]
    assert (split["weight"], split["percent"]) == (90, 90.0)
    assert edges["split:svc:shop/bookstore->svc:shop/bookstore-v2"]["percent"] == 10.0
    assert not any(e["target"] == "svc:shop/warehouse" for e in g["edges"])  # deny by default


def test_timeline_pages_filters_and_details(serve: ServeProcess) -> None:
    _apply(serve, STORE_TO_WAREHOUSE, actor="bob")
    first = _get(serve, "/v1/console/timeline?offset=0&limit=2")
    assert len(first["items"]) == 2 and first["total"] >= 12
    rest = _get(serve, f"/v1/console/timeline?offset=2&limit={first['total']}")
    seqs = [r["seq"] for r in first["items"] + rest["items"]]
    assert seqs == list(range(first["total"]))  # pages tile the timeline, in order
    by_bob = _get(serve, "/v1/console/timeline?actor=bob")["items"]
    assert [r["aggregate"] for r in by_bob] == ["TrafficTarget/shop/store-to-warehouse"]
    tts = _get(serve, "/v1/console/timeline?kind=TrafficTarget&namespace=shop")["items"]
    assert {r["aggregate"] for r in tts} == {
        "TrafficTarget/shop/buyer-to-store",
        "TrafficTarget/shop/store-to-warehouse",
    }
    facets = _get(serve, "/v1/console/timeline/facets")
    assert {"local:admin as alice", "local:admin as bob"} <= set(facets["actors"])
    assert {"TrafficTarget", "VirtualMachine", "Service"} <= set(facets["kinds"])
    # an edit shows what changed against the aggregate's previous event
    _apply(serve, BUYER_POST_ONLY, actor="carol")
    seqs = _seq_of(serve, "TrafficTarget/shop/buyer-to-store")
    assert len(seqs) == 2
    detail = _get(serve, f"/v1/console/events/{seqs[1]}")
    assert detail["actor"] == "local:admin as carol" and detail["previousSeq"] == seqs[0]
    changed = {d["path"]: d for d in detail["diff"]}
    assert changed["manifest.spec.rules"]["before"][0]["name"] == "store-routes"
    assert changed["manifest.spec.rules"]["after"][0]["name"] == "store-post"
    since = detail["ts"]
    recent = _get(serve, f"/v1/console/timeline?since={since}")["items"]
    assert recent and all(r["ts"] >= since for r in recent)


def test_time_travel_and_why(serve: ServeProcess) -> None:
    _apply(serve, STORE_TO_WAREHOUSE, actor="bob")
    _apply(serve, BUYER_POST_ONLY, actor="carol")
    grant = _seq_of(serve, "TrafficTarget/shop/buyer-to-store")
    before_edit, edit = grant[0], grant[1]
    # the map as it was after the first grant: the buyer could GET
    past = _get(serve, f"/v1/console/graph?at={before_edit}")
    assert past["timeTravel"]["seq"] == before_edit
    edge = next(e for e in past["edges"] if e["id"] == "allow:id:shop/buyer->svc:shop/bookstore")
    assert edge["rules"][0]["http"][0]["methods"] == ["GET"]
    now = _get(serve, "/v1/console/graph")
    edge = next(e for e in now["edges"] if e["id"] == "allow:id:shop/buyer->svc:shop/bookstore")
    assert edge["rules"][0]["http"][0]["methods"] == ["POST"]
    # before anything was applied, the mesh was empty
    assert _get(serve, "/v1/console/graph?at=0")["edges"] == []
    # why: allowed then, denied now, and the changes that decided it, in order
    q = "from=shop/buyer&to=shop/bookstore&path=/books&method=GET"
    then = _get(serve, f"/v1/console/why?{q}&at={before_edit}")
    assert then["allowed"] is True
    assert [(e["seq"], e["effect"]) for e in then["decidedBy"]] == [(before_edit, "granted")]
    now_why = _get(serve, f"/v1/console/why?{q}")
    assert now_why["allowed"] is False
    effects = [(e["seq"], e["effect"], e["actor"]) for e in now_why["decidedBy"]]
    assert effects == [
        (before_edit, "granted", "local:admin as alice"),
        (edit, "revoked", "local:admin as carol"),
    ]
    # the config the store's proxy was served just before the edit (its certificate issued by
    # then): its inbound RBAC let the buyer GET, not POST
    past = _get(serve, f"/v1/console/proxy?node=shop/store-v1&at={edit - 1}")
    assert past["timeTravel"]["seq"] == edit - 1 and past["past"]["identity"] == "shop/bookstore"
    assert past["past"]["reason"] == "", past["past"]
    assert "GET" in json.dumps(past["past"]["routes"]) and "POST" not in json.dumps(
        past["past"]["routes"]
    )
    assert all("privateKey" not in json.dumps(x) for x in past["past"]["secrets"])
    # a time travel by timestamp lands on the last change at or before it
    ts = _get(serve, f"/v1/console/events/{before_edit}")["ts"]
    by_time = _get(serve, f"/v1/console/graph?at={ts}")
    assert by_time["timeTravel"]["seq"] >= before_edit


def test_live_stream_sends_a_change_within_a_second(serve: ServeProcess) -> None:
    got: list[tuple[float, str, dict[str, Any]]] = []
    ready = threading.Event()

    def listen() -> None:
        creds = serve.credentials
        req = urllib.request.Request(serve.base + "/v1/console/stream", headers=creds.headers())
        with urllib.request.urlopen(req, timeout=20, context=creds.ssl_context()) as resp:
            kind = ""
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    if kind == "hello":
                        ready.set()
                    got.append((time.monotonic(), kind, json.loads(line[6:])))
                    if kind == "graph" and any(
                        r["aggregate"] == "TrafficTarget/shop/live-one"
                        for _, k, d in got
                        if k == "rows"
                        for r in d["items"]
                    ):
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(10)
    sent = time.monotonic()
    _apply(serve, STORE_TO_WAREHOUSE.replace("store-to-warehouse", "live-one"), actor="dave")
    t.join(10)
    rows = [(at, d) for at, kind, d in got if kind == "rows"]
    assert rows, got
    at, data = next(
        (at, d)
        for at, d in rows
        if any(r["aggregate"] == "TrafficTarget/shop/live-one" for r in d["items"])
    )
    assert any(r["actor"] == "local:admin as dave" for r in data["items"])
    assert at - sent < 1.0, f"the change reached the stream after {at - sent:.2f}s"
    assert any(kind == "graph" for _, kind, _ in got)


def test_bad_requests_name_the_field(serve: ServeProcess) -> None:
    for path, field in [
        ("/v1/console/why?from=nobody&to=shop/bookstore", "from"),
        ("/v1/console/why?from=shop/buyer", "to"),
        ("/v1/console/proxy", "node"),
    ]:
        status, body = serve.request(path)
        assert status == 400 and body["errors"][0]["field"] == field, (path, body)
    status, body = serve.request("/v1/console/events/99999999")
    assert status == 404 and body["errors"][0]["field"] == "seq"
    status, body = serve.request("/v1/console/graph?at=99999999")
    assert status == 400 and "at" in body["errors"][0]["reason"]
    status, body = serve.request("/v1/console/timeline?limit=0")
    assert status == 400 and "limit" in body["errors"][0]["reason"]
    status, body = serve.request("/v1/console/timeline?since=yesterday")
    assert status == 400 and "since" in body["errors"][0]["reason"]
    status, _ = serve.request("/console/static/..%2Fsmc.db")
    assert status == 404
    assert serve.request("/healthz")[0] == 200  # still serving


def test_console_data_needs_a_credential_and_the_shell_does_not(serve: ServeProcess) -> None:
    anonymous = serve.credentials.ssl_context()  # verifies the server, sends no token
    for path in ("/v1/console/graph", "/v1/console/timeline", "/v1/console/stream",
                 "/v1/console/events/1", "/v1/console/proxy?node=shop/store-1"):  # fmt: skip
        status, _ = http_json(serve.base + path, context=anonymous)
        assert status == 401, path
    assert http_json(serve.base + "/console/", context=anonymous)[0] == 200


def test_page_assets_are_served_with_a_strict_policy(serve: ServeProcess) -> None:
    ctx = serve.credentials.ssl_context()  # no token: the shell is public
    with urllib.request.urlopen(serve.base + "/console/", context=ctx) as resp:
        html = resp.read().decode()
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "/console/static/cytoscape.min.js" in html
    with urllib.request.urlopen(
        serve.base + "/console/static/cytoscape-license.txt", context=ctx
    ) as resp:
        assert "Cytoscape Consortium" in resp.read().decode()


def _env(i: int) -> Envelope:
    from datetime import UTC, datetime

    return Envelope(
        event_id=f"e{i}",
        aggregate="x",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        source="test",
        actor="test",
    )


def test_backing_index_agrees_with_policy_view() -> None:
    """The map's label index picks exactly the workloads PolicyView picks, on random meshes."""
    rnd = random.Random(7)
    for _ in range(30):
        reg = RegistryProjection()
        n = 0
        for s in range(rnd.randint(1, 8)):
            n += 1
            sel = {k: rnd.choice("ab") for k in rnd.sample(["app", "v", "tier"], rnd.randint(0, 2))}
            reg.apply(
                ServiceUpserted(
                    envelope=_env(n),
                    namespace=rnd.choice(["a", "b"]),
                    name=f"s{s}",
                    ports=(ServicePort(name="http", port=80, protocol="http", target_port=80),),
                    backing=rnd.choice(["vm", "kubernetes"]),
                    selector=sel,
                )
            )
        for w in range(rnd.randint(0, 20)):
            n += 1
            labels = {k: rnd.choice("ab") for k in rnd.sample(["app", "v", "tier"], 2)}
            if rnd.random() < 0.2:
                labels[BACKS_LABEL_PREFIX + f"s{rnd.randint(0, 7)}"] = "true"
            reg.apply(
                WorkloadJoined(
                    envelope=_env(n),
                    kind=rnd.choice(["vm", "pod"]),
                    namespace=rnd.choice(["a", "b"]),
                    name=f"w{w}",
                    address="10.0.0.1",
                    service_account=rnd.choice(["x", "y"]),
                    labels=labels,
                    ports=(WorkloadPort(name="http", port=80, protocol="http"),),
                )
            )
        view = PolicyView(registry=reg, policy=PolicyProjection())
        index = backing_index(view)
        for ns, name in reg.services:
            assert index[f"{ns}/{name}"] == view.workloads_of_service(f"{ns}/{name}")
        mesh_graph(view)  # and the whole map builds


def test_map_of_a_large_mesh_is_fast() -> None:
    """1,000 services and 10,000 workloads map in well under a second (the page's budget)."""
    reg = RegistryProjection()
    for s in range(1000):
        reg.apply(
            ServiceUpserted(
                envelope=_env(s),
                namespace=f"ns{s % 20}",
                name=f"svc{s}",
                ports=(ServicePort(name="http", port=80, protocol="http", target_port=80),),
                backing="vm",
                selector={"app": f"svc{s}"},
            )
        )
    for w in range(10000):
        s = w % 1000
        reg.apply(
            WorkloadJoined(
                envelope=_env(10000 + w),
                kind="vm",
                namespace=f"ns{s % 20}",
                name=f"w{w}",
                address="10.0.0.1",
                service_account=f"sa{s}",
                labels={"app": f"svc{s}"},
                ports=(WorkloadPort(name="http", port=80, protocol="http"),),
            )
        )
    view = PolicyView(registry=reg, policy=PolicyProjection())
    t0 = time.perf_counter()
    g = mesh_graph(view)
    took = time.perf_counter() - t0
    assert len(g["nodes"]) == 1000 and sum(n["vms"] for n in g["nodes"]) == 10000
    assert took < 0.5, f"mesh_graph took {took:.2f}s"
