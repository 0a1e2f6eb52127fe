"""The HTTP API over real HTTPS: an aiohttp server on a free port behind the real guard (the
local admin token, grants on the log), a real SQLite log, the real projection runner in the
same loop, and an aiohttp client carrying the admin token."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from smc.api import (
    MAX_BODY_BYTES,
    ApiContext,
    LiveMeshChanges,
    MeshChanges,
    create_app,
    start_http,
)
from smc.auth import (
    ApiTLS,
    Authenticator,
    ClientCredentials,
    GrantAuthorizer,
    Guard,
    LocalCredential,
    server_context,
    server_dir,
)
from smc.events import Position, default_codec
from smc.events._sqlite import SqliteLog
from smc.projections import (
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
)
from smc.testing.ports import free_port

DATA = Path(__file__).parent / "data" / "smi"
HYBRID = (DATA / "hybrid-mesh.yaml").read_text()
ACCESS = (DATA / "access-v1alpha3.yaml").read_text()

GROUP = {
    "apiVersion": "specs.smi-spec.io/v1alpha4",
    "kind": "HTTPRouteGroup",
    "metadata": {"name": "routes", "namespace": "shop"},
    "spec": {"matches": [{"name": "read", "pathRegex": "/items", "methods": ["GET"]}]},
}
BAD_SPLIT = """\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: broken, namespace: shop}
spec:
  service: api
  backends:
  - service: api-v1
    weight: "ten"
"""
YAML_BOMB = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: bomb, namespace: default}
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


@dataclass
class Api:
    url: str
    log: SqliteLog
    runner: ProjectionRunner
    app: web.Application
    session: aiohttp.ClientSession
    stop: asyncio.Event

    async def post(self, path: str, body: str | bytes, **headers: str) -> tuple[int, Any]:
        async with self.session.post(self.url + path, data=body, headers=headers) as r:
            return r.status, await r.json()

    async def get(self, route: str, **params: str) -> tuple[int, Any]:
        async with self.session.get(self.url + route, params=params) as r:
            return r.status, await r.json()

    def records(self) -> list[Any]:
        codec = default_codec()
        return [codec.decode(r.value, where=r.where) for r in self.log.read(start=Position())]


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path, *, start_runner: bool = True, serving: asyncio.Event | None = None
) -> AsyncIterator[Api]:
    log = SqliteLog(tmp_path / "smc.db")
    runner = ProjectionRunner(log=log, projections=all_projections())
    registry = next(p for p in runner.projections if isinstance(p, RegistryProjection))
    policy = next(p for p in runner.projections if isinstance(p, PolicyProjection))
    live = LiveMeshChanges(
        changes=MeshChanges(log=log, registry=registry, policy=policy), runner=runner
    )
    local = LocalCredential(tmp_path / "auth")
    token = local.ensure()
    guard = Guard(authenticator=Authenticator(local=local), authorizer=GrantAuthorizer(policy))
    app = create_app(
        ApiContext(live=live, runner=runner, registry=registry, policy=policy, serving=serving),
        guard=guard,
    )
    material = ApiTLS(tmp_path / "auth", hosts=["127.0.0.1"]).ensure()
    server_ssl, _ = server_context(material)
    port = free_port()
    site = await start_http(app, host="127.0.0.1", port=port, ssl_context=server_ssl)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop=stop)) if start_runner else None
    creds = ClientCredentials(
        server=f"https://127.0.0.1:{port}", ca_pem=material.ca_pem, token=token
    )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=creds.ssl_context()), headers=creds.headers()
    )
    api = Api(creds.server, log, runner, app, session, stop)
    try:
        if task is not None:
            await asyncio.wait_for(runner.caught_up.wait(), 10)
        yield api
    finally:
        await session.close()
        stop.set()
        if task is not None:
            await task
        await site.cleanup()
        log.close()


async def test_readyz_until_caught_up_and_healthz(tmp_path: Path) -> None:
    async with serve(tmp_path, start_runner=False) as api:
        assert await api.get("/healthz") == (200, {"status": "ok"})
        status, body = await api.get("/readyz")
        assert status == 503 and body["status"] == "catching up"
        status, body = await api.post("/v1/apply", HYBRID)
        assert status == 503 and body["errors"][0]["reason"].startswith("projections are still")
        task = asyncio.create_task(api.runner.run(stop=api.stop))
        await asyncio.wait_for(api.runner.caught_up.wait(), 10)
        status, body = await api.get("/readyz")
        assert status == 200 and body["status"] == "ready"
        api.stop.set()
        await task


async def test_readyz_waits_for_the_proxies_doors(tmp_path: Path) -> None:
    """Caught up is not enough while ADS does not listen yet (serve binds it after the runner
    caught up): a readiness probe must not send proxies to a replica that refuses them."""
    listening = asyncio.Event()
    async with serve(tmp_path, serving=listening) as api:
        status, body = await api.get("/readyz")
        assert status == 503 and body["status"] == "starting xDS"
        listening.set()
        status, body = await api.get("/readyz")
        assert status == 200 and body["status"] == "ready"


async def test_hybrid_apply_then_get_sees_it_at_once(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        status, body = await api.post("/v1/apply", HYBRID)
        assert status == 200, body
        assert [r["status"] for r in body["results"]] == ["created"] * 5
        assert body["actor"] == "local:admin" and body["events"] == 6
        status, services = await api.get("/v1/services")  # no wait: the POST waited
        assert status == 200
        backing = {s["name"]: s["backing"] for s in services["items"]}
        assert backing == {"bookstore": "kubernetes", "bookwarehouse": "vm"}
        _, workloads = await api.get("/v1/workloads")
        assert sorted(w["name"] for w in workloads["items"]) == [
            "warehouse-vm-1",
            "warehouse-vm-2",
        ]
        _, cfg = await api.get("/v1/meshconfig")
        assert cfg["resource"] == "smc-system/mesh"
        # again: unchanged, nothing appended
        status, body = await api.post("/v1/apply", HYBRID)
        assert status == 200 and body["events"] == 0
        assert {r["status"] for r in body["results"]} == {"unchanged"}
        recs = api.records()
        assert len(recs) == 6 and {e.envelope.actor for e in recs} == {"local:admin"}
        assert {e.envelope.source for e in recs} == {"api"}


async def test_actor_is_the_principal_and_request_id_header(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        status, body = await api.post("/v1/apply", json.dumps(GROUP), **{"X-Request-Id": "req-42"})
        assert status == 200 and body["requestId"] == "req-42"
        (ev,) = api.records()
        assert ev.envelope.actor == "local:admin"
        assert ev.envelope.correlation_id == "req-42"
        status, body = await api.post("/v1/apply", json.dumps(GROUP), **{"X-SMC-Actor": " "})
        assert status == 400 and body["errors"][0]["field"] == "X-SMC-Actor"


async def test_invalid_and_valid_documents_in_one_body(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        body_text = "\n---\n".join([json.dumps(GROUP), BAD_SPLIT])
        status, body = await api.post("/v1/apply", body_text)
        assert status == 422
        statuses = {r["document"]: r["status"] for r in body["results"]}
        assert statuses == {"HTTPRouteGroup/shop/routes": "created", "request#2": "error"}
        (err,) = body["errors"]
        assert err["document"] == "request#2"
        assert err["field"] == "spec.backends[0].weight"
        assert err["reason"]
        _, pols = await api.get("/v1/policies")
        assert [p["name"] for p in pols["items"]] == ["routes"]


async def test_json_envelope_and_bad_bodies(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        envelope = json.dumps({"documents": [GROUP]})
        status, body = await api.post("/v1/apply", envelope, **{"Content-Type": "application/json"})
        assert status == 200 and body["results"][0]["status"] == "created"
        for raw, field in [
            (json.dumps({"documents": {"kind": "x"}}), "documents"),
            (json.dumps({"documents": [], "extra": 1}), "extra"),
        ]:
            status, body = await api.post("/v1/apply", raw)
            assert status == 400 and body["errors"][0]["field"] == field
        status, body = await api.post("/v1/apply", b"\xff\xfe garbage")
        assert status == 400 and "UTF-8" in body["errors"][0]["reason"]
        status, body = await api.post("/v1/apply", b"   ")
        assert status == 400 and "empty" in body["errors"][0]["reason"]
        status, body = await api.post("/v1/apply", "{not json: [")
        assert status == 422 and body["errors"][0]["reason"].startswith("invalid YAML")
        status, body = await api.post("/v1/apply", "# only a comment\n")
        assert status == 400
        status, body = await api.post("/v1/apply?dryRun=maybe", json.dumps(GROUP))
        assert status == 400 and "dryRun" in body["errors"][0]["reason"]


async def test_yaml_bomb_and_huge_body_then_server_still_answers(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        status, body = await api.post("/v1/apply", YAML_BOMB)
        assert 400 <= status < 500
        assert "nodes" in body["errors"][0]["reason"]
        huge = "# " + "x" * (MAX_BODY_BYTES + 10)
        status, body = await api.post("/v1/apply", huge)
        assert status == 413 and str(MAX_BODY_BYTES) in body["errors"][0]["reason"]
        deep = "[" * 5000 + "]" * 5000
        status, body = await api.post("/v1/apply", deep)
        assert 400 <= status < 500
        # scalars PyYAML cannot convert: refused documents naming the value, never a 500
        for bad, named in (
            ("name: !!int x", "'x' is not a valid int"),
            ("when: 2001-13-45", "month"),
        ):
            status, body = await api.post("/v1/apply", f"kind: MeshService\n{bad}\n")
            assert status == 422 and named in body["errors"][0]["reason"], body
        assert await api.get("/healthz") == (200, {"status": "ok"})
        status, _ = await api.post("/v1/apply", json.dumps(GROUP))
        assert status == 200
        assert len(api.records()) == 1


async def test_delete_and_reference_errors(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        status, _ = await api.post("/v1/apply", ACCESS)
        assert status == 200
        group = ACCESS.split("---")[1]  # the HTTPRouteGroup the TrafficTargets use
        status, body = await api.post("/v1/delete", group)
        assert status == 200, body
        assert body["results"][0]["status"] == "deleted"
        assert body["warnings"] and all(
            "TrafficTarget/default/" in w["warning"] and "is now pending" in w["warning"]
            for w in body["warnings"]
        )
        warned = {w["warning"].split(" ", 1)[0] for w in body["warnings"]}
        _, targets = await api.get("/v1/policies", kind="TrafficTarget")
        status_of = {f"TrafficTarget/default/{t['name']}": t["status"] for t in targets["items"]}
        assert warned and {status_of[k] for k in warned} == {"pending"}
        assert {v for k, v in status_of.items() if k not in warned} <= {"ready"}
        status, _ = await api.post("/v1/apply", group)  # resolves them again
        assert status == 200
        _, targets = await api.get("/v1/policies", kind="TrafficTarget")
        assert {t["status"] for t in targets["items"]} == {"ready"}
        grant = {
            "apiVersion": "smc.dev/v1alpha1",
            "kind": "AccessGrant",
            "metadata": {"name": "bob-deletes"},
            "spec": {"subjects": ["bob"], "verbs": ["delete"], "resources": ["*"],
                     "namespaces": ["*"]},
        }  # fmt: skip
        async with api.session.put(api.url + "/v1/grants/bob-deletes", json=grant) as r:
            assert r.status == 200, await r.text()
        status, body = await api.post("/v1/delete", ACCESS, **{"X-SMC-Actor": "bob"})
        assert status == 200 and {r["status"] for r in body["results"]} == {"deleted"}
        _, pols = await api.get("/v1/policies")
        assert pols["items"] == []
        status, body = await api.post("/v1/delete", ACCESS)
        assert status == 422 and body["results"][0]["status"] == "not found"
        status, body = await api.post("/v1/delete?ignoreNotFound=true", ACCESS)
        assert status == 200
        deleted = [e for e in api.records() if e.envelope.actor == "local:admin as bob"]
        assert len(deleted) == 7


async def test_policy_check_endpoint(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        assert (await api.post("/v1/apply", ACCESS))[0] == 200
        q = {"from": "default/prometheus", "to": "default/api-service"}
        status, body = await api.get(
            "/v1/policy/check", **q, path="/metrics", method="GET", port="8080"
        )
        assert status == 200 and body["decision"] == "allow"
        assert body["sourceSpiffeId"] == "spiffe://cluster.local/ns/default/sa/prometheus"
        _, body = await api.get("/v1/policy/check", **q, path="/metrics", method="DELETE")
        assert body["decision"] == "deny"
        status, body = await api.get("/v1/policy/check", to="x/y", port="99999")
        assert status == 400
        assert {e["field"] for e in body["errors"]} == {"from", "port"}


async def test_unknown_route_is_json_404(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        status, body = await api.get("/v1/nothing")
        assert status == 404 and body["errors"][0]["reason"] == "Not Found"
        async with api.session.get(api.url + "/v1/apply") as r:
            assert r.status == 405 and "errors" in await r.json()


async def test_openapi_document_lists_every_route(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        async with api.session.get(api.url + "/openapi.json") as r:
            assert r.status == 200
            doc = json.loads(await r.text())
        assert doc["openapi"] == "3.1.0"
        routes = {
            (res.method.lower(), res.resource.canonical)
            for res in api.app.router.routes()
            if res.resource is not None and res.method != "HEAD"
        }
        described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
        assert routes == described
        schemas = doc["components"]["schemas"]

        def refs(node: Any) -> list[str]:
            if isinstance(node, dict):
                out = [node["$ref"]] if "$ref" in node else []
                return out + [x for v in node.values() for x in refs(v)]
            if isinstance(node, list):
                return [x for v in node for x in refs(v)]
            return []

        for ref in refs(doc):
            assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas
        for ops in doc["paths"].values():
            for op in ops.values():
                assert op["responses"] and op["operationId"]


async def test_smc_serve_hosts_api_and_inventory(tmp_path: Path) -> None:
    """``smc serve --http ... --inventory ...`` as a real process."""
    import os
    import signal
    import sys

    inv = tmp_path / "inventory"
    inv.mkdir()
    (inv / "vms.yaml").write_text(HYBRID.split("---", 1)[1])  # services and VMs, no MeshConfig
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent.parent),
        "SMC_CONFIG_DIR": str(tmp_path / "cfg"),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from smc.cli import main; main()",
        "--log",
        f"sqlite:///{tmp_path / 'smc.db'}",
        "serve",
        "--http",
        f"127.0.0.1:{port}",
        "--inventory",
        str(inv),
        "--inventory-interval",
        "0.1",
        "--xds",
        "off",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    url = f"https://127.0.0.1:{port}"
    creds_file = server_dir("127.0.0.1", port, root=tmp_path / "cfg") / "credentials.json"
    try:
        while not creds_file.is_file():
            assert proc.returncode is None, "serve exited"
            await asyncio.sleep(0.05)
        creds = ClientCredentials.load(creds_file)
        assert creds.server == url
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=creds.ssl_context()), headers=creds.headers()
        ) as s:
            deadline = asyncio.get_running_loop().time() + 30
            workloads: list[Any] = []
            while len(workloads) < 2:
                assert asyncio.get_running_loop().time() < deadline, "serve did not come up"
                await asyncio.sleep(0.1)
                try:
                    async with s.get(url + "/v1/workloads") as r:
                        workloads = (await r.json())["items"]
                except aiohttp.ClientError:
                    continue
            assert {w["managedBy"] for w in workloads} == {"vm-provider.inventory"}
            async with s.post(url + "/v1/apply", data=ACCESS) as r:
                assert r.status == 200
            async with s.get(url + "/v1/policies", params={"kind": "TrafficTarget"}) as r:
                assert len((await r.json())["items"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert b"HTTP API on" in err
    # the port is taken now by another listener: a clear error, exit code 1
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from smc.cli import main; main()",
            "--log",
            f"sqlite:///{tmp_path / 'smc.db'}",
            "serve",
            "--http",
            f"127.0.0.1:{port}",
            "--xds",
            "off",
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert proc.returncode == 1 and b"cannot serve the HTTP API" in err, err.decode()
