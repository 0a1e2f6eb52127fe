"""Kubernetes as the authority over the control plane, on a real kube-apiserver.

TokenReview (service-account tokens minted by TokenRequest for an audience; another audience,
a garbage token and the token of a deleted service account refused), its cache (1,000
concurrent reviews of one token make one apiserver call; answers expire), SubjectAccessReview
on the ``smc.dev`` group following the cluster's RBAC, and ``smc serve --kube`` end to end:
a service account's token authenticates, RBAC decides, the actor is the service account.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from smc.auth import (
    Access,
    AccessReviewer,
    Principal,
    TokenReviewer,
    Unauthenticated,
)
from smc.informers import KubeEndpoint
from smc.testing.kube import KubeAPIServer, kube_apiserver_fixture
from smc.testing.serve import ServeProcess, eventually, http_json

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

SERVICE = b"""
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: web, namespace: NS}
spec:
  backing: vm
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeAPIServer]:
    yield from kube_apiserver_fixture(smi_crds=False, watch_cache=False)


@pytest.fixture
def api(kube: KubeAPIServer) -> Iterator[Any]:
    with kube.api_client() as api_client:
        yield api_client


def endpoint(kube: KubeAPIServer) -> KubeEndpoint:
    return KubeEndpoint.from_kubeconfig(kube.kubeconfig_path)


def namespace_with_sa(api: Any, sa: str = "deployer") -> str:
    ns = f"a-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
    return ns


def token(api: Any, ns: str, sa: str = "deployer", *, audiences: list[str] | None = None) -> str:
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if audiences is not None:
        spec["audiences"] = audiences
    req = client.CoreV1Api(api).create_namespaced_service_account_token(sa, ns, {"spec": spec})
    return str(req.status.token)


def grant_rbac(api: Any, ns: str, sa: str, verbs: list[str], resources: list[str]) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": f"smc-{sa}"},
            "rules": [{"apiGroups": ["smc.dev"], "resources": resources, "verbs": verbs}],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": f"smc-{sa}"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": f"smc-{sa}",
            },
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
        },
    )


async def test_token_review_names_the_service_account_and_checks_the_audience(
    kube: KubeAPIServer, api: Any
) -> None:
    ns = namespace_with_sa(api)
    reviewer = TokenReviewer(endpoint(kube), audiences=("smc",))
    try:
        p = await reviewer.review(token(api, ns, audiences=["smc"]))
        assert p.name == f"system:serviceaccount:{ns}:deployer"
        assert "system:serviceaccounts" in p.groups and p.uid and p.method == "tokenreview"
        for bad in (
            token(api, ns, audiences=["another-service"]),
            token(api, ns),  # the apiserver's own audience, not SMC's
            "not-a-token",
            token(api, ns, audiences=["smc"])[:-4] + "AAAA",  # a forged signature
        ):
            with pytest.raises(Unauthenticated):
                await reviewer.review(bad)
    finally:
        await reviewer.close()


async def test_token_of_a_deleted_service_account_is_refused(kube: KubeAPIServer, api: Any) -> None:
    ns = namespace_with_sa(api)
    stolen = token(api, ns, audiences=["smc"])
    reviewer = TokenReviewer(endpoint(kube), audiences=("smc",), ttl=0.5)
    try:
        assert (await reviewer.review(stolen)).name.endswith(":deployer")
        client.CoreV1Api(api).delete_namespaced_service_account("deployer", ns)
        deadline = time.monotonic() + 20
        while True:  # the cached answer lives at most ttl seconds
            try:
                await reviewer.review(stolen)
            except Unauthenticated:
                break
            assert time.monotonic() < deadline, "the deleted account's token still works"
            await asyncio.sleep(0.1)
        # re-created with the same name: the old token (bound to the old uid) stays refused
        client.CoreV1Api(api).create_namespaced_service_account(
            ns, {"metadata": {"name": "deployer"}}
        )
        await asyncio.sleep(0.6)
        with pytest.raises(Unauthenticated):
            await reviewer.review(stolen)
    finally:
        await reviewer.close()


async def test_a_burst_of_reviews_makes_one_apiserver_call(kube: KubeAPIServer, api: Any) -> None:
    ns = namespace_with_sa(api)
    tok = token(api, ns, audiences=["smc"])
    reviewer = TokenReviewer(endpoint(kube), audiences=("smc",), ttl=2.0)
    try:
        answers = await asyncio.gather(*(reviewer.review(tok) for _ in range(1000)))
        assert {a.name for a in answers} == {f"system:serviceaccount:{ns}:deployer"}
        assert reviewer.calls == 1 and reviewer.cache.hits == 999
        for _ in range(1000):
            await reviewer.review(tok)
        assert reviewer.calls == 1
        await asyncio.sleep(2.1)  # expired: asked again
        await reviewer.review(tok)
        assert reviewer.calls == 2
    finally:
        await reviewer.close()


async def test_subject_access_review_follows_cluster_rbac(kube: KubeAPIServer, api: Any) -> None:
    ns = namespace_with_sa(api)
    other = namespace_with_sa(api)
    grant_rbac(api, ns, "deployer", ["apply", "get"], ["meshservices"])
    who = Principal(
        name=f"system:serviceaccount:{ns}:deployer",
        method="tokenreview",
        groups=("system:serviceaccounts", f"system:serviceaccounts:{ns}"),
    )
    sar = AccessReviewer(endpoint(kube))
    try:
        ok = await sar.allowed(who, Access(verb="apply", resource="meshservices", namespace=ns))
        assert ok[0], ok
        for denied in (
            Access(verb="apply", resource="meshservices", namespace=other),
            Access(verb="delete", resource="meshservices", namespace=ns),
            Access(verb="apply", resource="meshconfigs", namespace=ns),
            Access(verb="impersonate", resource="users", name="admin"),
        ):
            assert not (await sar.allowed(who, denied))[0], denied
        calls = sar.calls
        for _ in range(100):
            await sar.allowed(who, Access(verb="apply", resource="meshservices", namespace=ns))
        assert sar.calls == calls  # cached
    finally:
        await sar.close()


def test_serve_with_kube_authenticates_tokens_and_asks_rbac(
    kube: KubeAPIServer, api: Any, tmp_path: Path
) -> None:
    ns = namespace_with_sa(api)
    good = token(api, ns, audiences=["smc"])
    other_audience = token(api, ns, audiences=["vault"])
    serve = ServeProcess(
        tmp_path,
        xds_host=None,
        args=[
            "--xds",
            "off",
            "--kube",
            str(kube.kubeconfig_path),
            "--api-token-audience",
            "smc",
            "--auth-cache-ttl",
            "0.5",
        ],
    )
    try:
        serve.wait_ready()
        ctx = serve.credentials.ssl_context()

        def call(tok: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
            return http_json(
                serve.base + path,
                method="POST" if body else "GET",
                body=body,
                headers={"Authorization": f"Bearer {tok}"},
                context=ctx,
            )

        status, me = call(good, "/v1/whoami")
        assert status == 200 and me["name"] == f"system:serviceaccount:{ns}:deployer", me
        assert call(other_audience, "/v1/whoami")[0] == 401
        body = SERVICE.replace(b"NS", ns.encode())
        status, answer = call(good, "/v1/apply", body)
        assert status == 403, answer
        err = answer["errors"][0]
        assert (err["verb"], err["resource"], err["namespace"]) == ("apply", "meshservices", ns)
        grant_rbac(api, ns, "deployer", ["apply"], ["meshservices"])
        status, answer = eventually(
            lambda: (lambda r: r if r[0] == 200 else None)(call(good, "/v1/apply", body)),
            what="RBAC to allow the apply",
            diag=serve.tail,
        )
        assert answer["actor"] == f"system:serviceaccount:{ns}:deployer"
        # the admin credential still works beside Kubernetes tokens
        assert serve.request("/v1/services")[0] == 200
        # the service account is deleted: its token stops working
        client.CoreV1Api(api).delete_namespaced_service_account("deployer", ns)
        eventually(
            lambda: call(good, "/v1/whoami")[0] == 401,
            what="the deleted account's token refused",
            diag=serve.tail,
        )
        assert good not in serve.tail(None)
    finally:
        serve.stop()
