"""OSM's bookstore SMI policy, in OSM's own manifest form, applied the way GitOps tools do.

The manifests below are written for this test in the form OSM's demo publishes (specs
v1alpha4 HTTPRouteGroups with list-form ``headers``, access v1alpha3 TrafficTargets per
bookstore version, a split v1alpha2 TrafficSplit), one resource per request in the reverse of
the dependency order: TrafficTargets before their HTTPRouteGroups, the split before its
services. Every request is accepted; the targets are pending (and grant nothing, checked with
real traffic) until their groups arrive. Then real Envoys carry OSM's documented behaviour:
bookbuyer may buy books and read the books bought (only with its headers), bookthief is
denied, bookstore v1/v2 may restock at bookwarehouse (POST only), and bookstore traffic splits
50/50 between v1 and v2. No Envoy NACKs anything. A second test folds every resource order
through the write path and checks the resulting policy is the same.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from smc.api import MeshChanges
from smc.api._views import policies_view
from smc.events import SqliteLog
from smc.projections import (
    PolicyProjection,
    PolicyView,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
)
from smc.smi import load_documents
from smc.testing.mesh import ControlPlane, Sidecar, vm_yaml

pytestmark = [pytest.mark.envoy]

ROUTE_GROUPS = [
    """
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata:
  name: bookstore-service-routes
  namespace: bookstore
spec:
  matches:
  - name: books-bought
    pathRegex: /books-bought
    methods:
    - GET
    headers:
    - "user-agent": ".*-http-client/*.*"
    - "client-app": "bookbuyer"
  - name: buy-a-book
    pathRegex: ".*a-book.*new"
    methods:
    - GET
  - name: update-books-bought
    pathRegex: /update-books-bought
    methods:
    - POST
""",
    """
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata:
  name: bookwarehouse-service-routes
  namespace: bookwarehouse
spec:
  matches:
    - name: restock-books
      methods:
      - POST
""",
]


def _target(version: str) -> str:
    return f"""
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha3
metadata:
  name: bookbuyer-access-bookstore-{version}
  namespace: "bookstore"
spec:
  destination:
    kind: ServiceAccount
    name: bookstore-{version}
    namespace: "bookstore"
  rules:
  - kind: HTTPRouteGroup
    name: bookstore-service-routes
    matches:
    - buy-a-book
    - books-bought
  sources:
  - kind: ServiceAccount
    name: bookbuyer
    namespace: "bookbuyer"

# bookthief is not a source: deny by default.
"""


TARGETS = [
    _target("v1"),
    _target("v2"),
    """
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha3
metadata:
  name: bookstore-access-bookwarehouse
  namespace: "bookwarehouse"
spec:
  destination:
    kind: ServiceAccount
    name: bookwarehouse
    namespace: "bookwarehouse"
  rules:
  - kind: HTTPRouteGroup
    name: bookwarehouse-service-routes
    matches:
    - restock-books
  sources:
  - kind: ServiceAccount
    name: bookstore-v1
    namespace: "bookstore"
  - kind: ServiceAccount
    name: bookstore-v2
    namespace: "bookstore"
""",
]

SPLIT = """
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: bookstore-split
  namespace: "bookstore"
spec:
  service: bookstore
  backends:

  - service: bookstore-v1
    weight: 50
  - service: bookstore-v2
    weight: 50
"""


def _service(ns: str, name: str, selector: str) -> str:
    return f"""
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {{name: {name}, namespace: {ns}}}
spec:
  backing: vm
  selector: {selector}
  ports: [{{name: http, port: 14001, protocol: http}}]
"""


SERVICES = [
    _service("bookstore", "bookstore", "{app: bookstore}"),
    _service("bookstore", "bookstore-v1", "{app: bookstore, version: v1}"),
    _service("bookstore", "bookstore-v2", "{app: bookstore, version: v2}"),
    _service("bookwarehouse", "bookwarehouse", "{app: bookwarehouse}"),
]

# (namespace, workload, service account, labels)
WORKLOADS = [
    ("bookbuyer", "bookbuyer-1", "bookbuyer", {"app": "bookbuyer"}),
    ("bookthief", "bookthief-1", "bookthief", {"app": "bookthief"}),
    ("bookstore", "bookstore-v1-1", "bookstore-v1", {"app": "bookstore", "version": "v1"}),
    ("bookstore", "bookstore-v2-1", "bookstore-v2", {"app": "bookstore", "version": "v2"}),
    ("bookwarehouse", "bookwarehouse-1", "bookwarehouse", {"app": "bookwarehouse"}),
]

BUYER_HEADERS = {"User-Agent": "Go-http-client/1.1", "client-app": "bookbuyer"}


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_osm_bookstore_in_reverse_order_with_real_envoys(tmp_path: Path) -> None:
    cp = ControlPlane(workdir=tmp_path)
    await cp.start()
    sidecars = {
        name: Sidecar(namespace=ns, name=name, address=f"127.0.31.{i + 1}", workdir=tmp_path)
        for i, (ns, name, _, _) in enumerate(WORKLOADS)
    }
    try:
        # GitOps order: policy first, one resource per request, each accepted.
        warnings: dict[str, list[str]] = {}
        for doc in [*TARGETS, SPLIT]:
            loaded = load_documents(doc, source="osm.yaml")
            assert loaded.errors == ()
            report = await cp.live.apply(
                loaded.resources, actor="gitops", source="test", request_id=str(uuid.uuid4())
            )
            assert report.ok, report.as_dict()
            for r in report.results:
                warnings[r.document] = list(r.warnings)
        assert all(
            warnings[f"TrafficTarget/{k}"]
            for k in (
                "bookstore/bookbuyer-access-bookstore-v1",
                "bookstore/bookbuyer-access-bookstore-v2",
                "bookwarehouse/bookstore-access-bookwarehouse",
            )
        )
        for doc in SERVICES:
            await cp.apply(doc)
        for s in sidecars.values():
            await s.start_app()
        for _ns, name, sa, labels in WORKLOADS:
            await cp.apply(vm_yaml(sidecars[name], service_account=sa, labels=labels))
        for i, s in enumerate(sidecars.values()):
            await cp.start_proxy(s, delta=bool(i % 2))  # both protocols
        for s in sidecars.values():
            assert s.envoy is not None
            await s.envoy.wait_live()

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as session:

            async def call(
                source: str,
                method: str,
                host: str,
                path: str,
                headers: dict[str, str] | None = None,
            ) -> tuple[int, Any]:
                url = sidecars[source].outbound + path
                hdrs = {"Host": host, **(headers or {})}
                async with session.request(method, url, headers=hdrs) as resp:
                    body = await resp.json() if resp.status == 200 else None
                    return resp.status, body

            store = "bookstore.bookstore"
            warehouse = "bookwarehouse.bookwarehouse"

            # Pending targets grant nothing: bookbuyer has no route to bookstore yet.
            async def no_route() -> bool:
                return (await call("bookbuyer-1", "GET", store, "/buy-a-book/new"))[0] == 404

            await _until(no_route, "bookbuyer's outbound without bookstore")

            for doc in ROUTE_GROUPS:
                await cp.apply(doc)
            targets = {
                f"{r.namespace}/{r.name}"
                for r in load_documents("\n---\n".join(TARGETS), source="t").resources
            }
            policy = next(p for p in cp.runner.projections if isinstance(p, PolicyProjection))
            rows = policies_view(policy, kind="TrafficTarget")
            assert {f"{r['namespace']}/{r['name']}": r["status"] for r in rows} == {
                t: "ready" for t in targets
            }

            async def buyer_allowed() -> bool:
                return (await call("bookbuyer-1", "GET", store, "/buy-a-book/new"))[0] == 200

            await _until(buyer_allowed, "bookbuyer allowed once the route groups exist")

            # OSM's documented behaviour, request by request.
            assert (await call("bookbuyer-1", "GET", store, "/books-bought", BUYER_HEADERS))[
                0
            ] == 200
            no_app = {"User-Agent": "Go-http-client/1.1"}
            assert (await call("bookbuyer-1", "GET", store, "/books-bought", no_app))[0] == 403
            wrong_agent = {"User-Agent": "curl/8.0", "client-app": "bookbuyer"}
            assert (await call("bookbuyer-1", "GET", store, "/books-bought", wrong_agent))[0] == 403
            # update-books-bought is in the group but not granted by the targets
            assert (await call("bookbuyer-1", "POST", store, "/update-books-bought"))[0] == 403
            assert (await call("bookbuyer-1", "POST", store, "/buy-a-book/new"))[0] == 403
            # bookthief: no TrafficTarget names it, so it has no route at all
            assert (await call("bookthief-1", "GET", store, "/buy-a-book/new"))[0] == 404
            for v in ("v1", "v2"):
                src = f"bookstore-{v}-1"
                status, body = await call(src, "POST", warehouse, "/restock-books")
                assert status == 200 and body["app"] == "bookwarehouse-1"
                assert (await call(src, "GET", warehouse, "/restock-books"))[0] == 403
            assert (await call("bookbuyer-1", "POST", warehouse, "/restock-books"))[0] == 404

            # The 50/50 split between bookstore v1 and v2.
            seen: Counter[str] = Counter()
            for _ in range(60):
                status, body = await call("bookbuyer-1", "GET", store, "/buy-a-book/new")
                assert status == 200
                seen[body["app"]] += 1
            # P(a count < 15 of 60 at p = 0.5) < 1e-4
            assert seen["bookstore-v1-1"] >= 15 and seen["bookstore-v2-1"] >= 15, seen
            assert set(seen) == {"bookstore-v1-1", "bookstore-v2-1"}

            # Deleting a route group GitOps-style leaves the targets pending: access stops.
            report = await cp.live.delete(
                load_documents(ROUTE_GROUPS[0], source="g").resources,
                actor="gitops",
                source="test",
                request_id=str(uuid.uuid4()),
            )
            assert report.ok and report.results[0].warnings

            async def buyer_denied() -> bool:
                status = (await call("bookbuyer-1", "GET", store, "/buy-a-book/new"))[0]
                return status in (403, 404)

            await _until(buyer_denied, "bookbuyer denied once its route group is gone")

        for name, s in sidecars.items():
            assert s.rejected() == {}, f"{name} rejected config"
        assert cp.server.nacks() == []
    finally:
        for s in sidecars.values():
            await s.stop()
        await cp.stop()
        cp.close()


def _decisions(view: PolicyView) -> dict[tuple[str, str, str, str], bool]:
    out = {}
    for src in ("bookbuyer/bookbuyer", "bookthief/bookthief", "bookstore/bookstore-v1"):
        for dst in (
            "bookstore/bookstore-v1",
            "bookstore/bookstore-v2",
            "bookwarehouse/bookwarehouse",
        ):
            for method, path in (("GET", "/buy-a-book/new"), ("POST", "/restock-books")):
                out[(src, dst, method, path)] = view.is_allowed(
                    source=src, destination=dst, method=method, path=path, port=14001
                )
    return out


async def test_every_order_gives_the_same_policy(tmp_path: Path) -> None:
    """Each resource applied by itself, in many orders (all rotations and random shuffles):
    every request is accepted and the resulting policy decisions are identical."""
    docs = [*ROUTE_GROUPS, *TARGETS, SPLIT, *SERVICES]
    rng = random.Random(14)
    orders = [docs[i:] + docs[:i] for i in range(len(docs))]
    orders += [rng.sample(docs, len(docs)) for _ in range(6)]
    orders.append(list(reversed(docs)))
    results = []
    for n, order in enumerate(orders):
        log = SqliteLog(tmp_path / f"log-{n}.db")
        runner = ProjectionRunner(log=log, projections=all_projections())
        registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
        policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
        changes = MeshChanges(log=log, registry=registry, policy=policy)
        for i, doc in enumerate(order):
            loaded = load_documents(doc, source=f"{n}-{i}.yaml")
            report = changes.apply(
                loaded.resources, actor="gitops", source="test", request_id=f"{n}-{i}"
            )
            assert report.ok, report.as_dict()
            runner.catch_up(until=log.end_position())
        results.append(_decisions(PolicyView(registry=registry, policy=policy)))
        log.close()
    assert all(r == results[0] for r in results[1:])
    allowed = {k for k, v in results[0].items() if v}
    assert allowed == {
        ("bookbuyer/bookbuyer", "bookstore/bookstore-v1", "GET", "/buy-a-book/new"),
        ("bookbuyer/bookbuyer", "bookstore/bookstore-v2", "GET", "/buy-a-book/new"),
        ("bookstore/bookstore-v1", "bookwarehouse/bookwarehouse", "POST", "/restock-books"),
    }
