"""Injected pods on real network namespaces: iptables interception, transparent Envoy, mTLS, RBAC.

The path a pod takes in a cluster, with every part real except the kubelet and the CNI plugin,
which the test plays: a real kube-apiserver; ``smc serve --kube --workload-keys agent`` watching
it, ADS over mTLS and the certificate service on the pod network's gateway; two pods (``client``, ``server``) whose manifests go through the sidecar
injector's :func:`~smc.injector.mutate` and are created mutated in the apiserver (the webhook
round trip itself is tested in ``test_injector``); then, as a kubelet would, each pod gets a
network namespace on a bridge (:class:`~smc.testing.netns.PodNetwork`), its IP in the pod
status, the init container's own script (the injector's iptables rules, real ``iptables``, nat
table) run inside, and the proxy container's command run inside as the UID/GID of its security
context, with its environment and ``$(VAR)`` arguments expanded; before it, the injected SMC
agent container, with a projected service-account token the apiserver issued bound to the pod
(the kubelet's projected volume), which makes the proxy's key in the pod, proves the pod with a
TokenReview and writes the certificate and key where Envoy reads them (file-based SDS in the
shared proxy dir, Envoy's working directory; Envoy starts once that file exists, as the
agent's startup probe makes the kubelet do) (the volumes the kubelet would mount, the proxy
dir and the token's, are per-pod directories here; the agent runs with the proxy's group,
which the iptables rules let out and which may read its 0640 file, as root: the interpreter
lives under ``/root``). The applications are plain
HTTP servers and clients that know nothing of the mesh: the client calls the Service's
ClusterIP. The test checks that

1. the informers carry the injector's ``smc.dev/interception=iptables`` label into the
   registry, so both proxies get the transparent ``inbound``/``outbound`` listeners;
2. with an SMI TrafficTarget (``GET /books``), the client's plain request to the ClusterIP is
   intercepted, routed by Host to the server pod over mTLS and reaches the server application,
   which sees the client's SPIFFE id in ``x-forwarded-client-cert``; ``POST`` is denied (403);
3. a port no Service names passes through both sidecars untouched;
4. a caller outside the mesh (the node, no sidecar) cannot reach the server's mesh port in
   plaintext: the redirected connection meets the mTLS-only inbound chain;
5. a TCP Service is unreachable until a TCPRoute TrafficTarget allows it, then proxied by
   destination port over mTLS into the server's TCP chain;
6. deleting the HTTP TrafficTarget gets the client 403 from the server's RBAC (the TCP grant
   keeps the server reachable); deleting the TCP one too takes the server's services out of
   the client's outbound routes: its calls are passed through like any call leaving the mesh
   and get no answer (here no kube-proxy serves the ClusterIP; to the server pod directly, the
   plaintext call meets the mTLS-only inbound chain); no Envoy rejected an update;
7. deleting the client pod revokes its proxy's certificate (recorded on the log).
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch  # type: ignore[import-untyped]
import pytest

from smc.ca import LocalIssuer
from smc.events import SqliteLog
from smc.injector import (
    AGENT_CONTAINER,
    AGENT_SECRET,
    INIT_CONTAINER,
    PROXY_CONTAINER,
    PROXY_DIR,
    AdsAddress,
    AgentSidecar,
    InjectorConfig,
    mutate,
)
from smc.projections import CertsProjection, ProjectionRunner
from smc.testing.envoy import EnvoyError, envoy_binary, write_validate_secret
from smc.testing.kube import KubeAPIServer, create_http_traffic_target, kube_apiserver_fixture
from smc.testing.netns import NetnsError, Pod, PodNetwork, world_readable_copy
from smc.testing.ports import free_port
from smc.testing.serve import ServeProcess, eventually

pytestmark = [pytest.mark.kube, pytest.mark.envoy, pytest.mark.timeout(240)]

WAIT = 30.0

APP = r"""
import http.server, json, socketserver, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def _reply(self):
        body = json.dumps({
            "port": self.server.server_address[1], "method": self.command, "path": self.path,
            "xfcc": self.headers.get("x-forwarded-client-cert", ""),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = _reply
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
class Upper(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(self.request.recv(1024).upper())
class T(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
servers = [
    T(("0.0.0.0", int(p[4:])), Upper) if p.startswith("tcp:") else S(("0.0.0.0", int(p)), H)
    for p in sys.argv[1:]
]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""

TCP_CLIENT = r"""
import json, socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        c.sendall(b"hello over tcp")
        print(json.dumps({"reply": c.recv(1024).decode(errors="replace")}))
except Exception as e:
    print(json.dumps({"reply": None, "error": f"{type(e).__name__}: {e}"}))
"""

CLIENT = r"""
import http.client, json, sys
host, port, hostname, method, path = sys.argv[1:6]
try:
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    c.request(method, path, headers={} if hostname == "-" else {"Host": hostname})
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": r.read().decode(errors="replace")}))
except Exception as e:
    print(json.dumps({"status": 0, "error": f"{type(e).__name__}: {e}"}))
"""

ADMIN = r"""
import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:15000" + sys.argv[1], timeout=5).read().decode())
"""


@pytest.fixture
def kube() -> Iterator[KubeAPIServer]:
    yield from kube_apiserver_fixture(watch_cache=False)


@pytest.fixture
def net() -> Iterator[PodNetwork]:
    try:
        network = PodNetwork()
    except NetnsError as exc:
        pytest.skip(f"no pod networks here: {exc}")
    with network:
        yield network


def pod_manifest(name: str, ports: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "serviceAccountName": name,
            "containers": [
                {
                    "name": "app",
                    "image": "example.invalid/app:1",
                    "ports": [{"containerPort": p} for p in ports],
                }
            ],
        },
    }


def container(spec: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    return next(c for c in spec[key] if c["name"] == name)


def kubelet_env(c: dict[str, Any], *, pod_name: str, ns: str) -> dict[str, str]:
    """The container's environment as a kubelet resolves it (values and pod fieldRefs)."""
    fields = {"metadata.name": pod_name, "metadata.namespace": ns}
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def request(pod: Pod, host: str, port: int, hostname: str, method: str, path: str) -> Any:
    """An HTTP request made by a plain application inside ``pod`` (root, so intercepted)."""
    out = pod.run([sys.executable, "-c", CLIENT, host, str(port), hostname, method, path])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def listeners(pod: Pod) -> set[str]:
    out = pod.run([sys.executable, "-c", ADMIN, "/listeners?format=json"])
    if out.returncode != 0:
        return set()
    return {s["name"] for s in json.loads(out.stdout).get("listener_statuses", [])}


def rejected_updates(pod: Pod) -> dict[str, str]:
    out = pod.run([sys.executable, "-c", ADMIN, "/stats"])
    assert out.returncode == 0, out.stderr
    found = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(": ")
        if key.endswith("update_rejected") and value.strip() != "0":
            found[key] = value
    return found


def test_injected_pods_are_intercepted_and_secured(
    tmp_path: Path, kube: KubeAPIServer, net: PodNetwork
) -> None:
    from kubernetes import client as k8s

    try:
        envoy = world_readable_copy(envoy_binary(), net.workdir / "bin")
    except EnvoyError as exc:
        pytest.skip(f"no Envoy binary: {exc}")
    ns = f"tp-{uuid.uuid4().hex[:8]}"
    pods = {"client": net.add_pod("client"), "server": net.add_pod("server")}
    # the CA serve will use (its root made now, so the injector can hand out the public roots)
    roots = "".join(
        LocalIssuer(directory=tmp_path / "ca", trust_domain="cluster.local").trust_bundle()
    )
    ca_port = free_port()
    serve = ServeProcess(
        tmp_path,
        args=[
            "--kube",
            str(kube.kubeconfig_path),
            "--workload-keys",
            "agent",
            "--ca-listen",
            f"{net.gateway}:{ca_port}",
        ],
        xds_host=net.gateway,
    )
    config = InjectorConfig(
        ads=AdsAddress(host=net.gateway, port=serve.xds_port),
        tls=True,
        init_install="",
        agent=AgentSidecar(
            image="smc:test", ca_address=f"{net.gateway}:{ca_port}", ca_pem=roots, audience="smc"
        ),
    )
    uids: dict[str, str] = {}
    spiffe = f"spiffe://cluster.local/ns/{ns}/sa/client"

    def diag() -> str:
        names = {n: sorted(listeners(p)) for n, p in pods.items()}
        logs = {
            n: (net.workdir / n / "envoy.log").read_text(errors="replace")[-1500:]
            for n in pods
            if (net.workdir / n / "envoy.log").exists()
        }
        return f"--- listeners: {names}\n--- envoy logs: {logs}\n--- serve:\n{serve.tail()}"

    with kube.api_client() as api:
        core = k8s.CoreV1Api(api)
        custom = k8s.CustomObjectsApi(api)
        core.create_namespace(
            {
                "metadata": {
                    "name": ns,
                    "labels": {"smc.dev/monitored": "true", "smc.dev/inject": "enabled"},
                }
            }
        )
        for name, ports in (("client", [8080]), ("server", [8080, 9000, 7000])):
            core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
            manifest = pod_manifest(name, ports)
            ops = mutate(
                manifest,
                namespace_labels={"smc.dev/inject": "enabled", "smc.dev/monitored": "true"},
                config=config,
                namespace=ns,
            )
            created = core.create_namespaced_pod(
                ns, jsonpatch.apply_patch(copy.deepcopy(manifest), ops)
            )
            assert created.metadata.labels["smc.dev/interception"] == "iptables"
            uids[name] = created.metadata.uid
            core.patch_namespaced_pod_status(
                name,
                ns,
                {
                    "status": {
                        "phase": "Running",
                        "podIP": pods[name].address,
                        "podIPs": [{"ip": pods[name].address}],
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                },
            )

        def expose(name: str, port_name: str, port: int, target: int) -> Any:
            """A Service selecting the server pod, and the EndpointSlice a controller-manager
            would write for it (none runs here); returns the Service."""
            svc = core.create_namespaced_service(
                ns,
                {
                    "metadata": {"name": name},
                    "spec": {
                        "selector": {"app": "server"},
                        "ports": [{"name": port_name, "port": port, "targetPort": target}],
                    },
                },
            )
            k8s.DiscoveryV1Api(api).create_namespaced_endpoint_slice(
                ns,
                {
                    "metadata": {
                        "name": f"{name}-a1",
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": port_name, "port": target, "protocol": "TCP"}],
                    "endpoints": [
                        {
                            "addresses": [pods["server"].address],
                            "conditions": {"ready": True},
                            "targetRef": {"kind": "Pod", "name": "server", "namespace": ns},
                        }
                    ],
                },
            )
            return svc

        cluster_ip = expose("server", "http", 80, 8080).spec.cluster_ip
        echo = expose("echo", "tcp-echo", 7000, 7000)
        try:
            serve.wait_ready()
            # The kubelet's part: init container, proxy container, application.
            app_file = net.workdir / "app.py"
            app_file.write_text(APP)
            pods["server"].start(
                [sys.executable, str(app_file), "8080", "9000", "tcp:7000"],
                log=net.workdir / "app.log",
            )
            for name, pod in pods.items():
                spec = api.sanitize_for_serialization(core.read_namespaced_pod(name, ns))["spec"]
                init = container(spec, "initContainers", INIT_CONTAINER)
                done = pod.run(init["command"])
                assert done.returncode == 0, done.stderr
                proxy = container(spec, "containers", PROXY_CONTAINER)
                ctx = proxy["securityContext"]
                workdir = net.workdir / name
                workdir.mkdir()
                os.chown(workdir, ctx["runAsUser"], ctx["runAsGroup"])
                # the kubelet's volumes: the shared proxy dir (/var/run/smc: the agent writes
                # the key's file there, Envoy runs in it) and the projected token
                secret = str(workdir / "smc-sds" / "default.json")
                token = core.create_namespaced_service_account_token(
                    name,
                    ns,
                    {
                        "spec": {
                            "audiences": ["smc"],
                            "expirationSeconds": 3600,
                            "boundObjectRef": {
                                "kind": "Pod",
                                "apiVersion": "v1",
                                "name": name,
                                "uid": uids[name],
                            },
                        }
                    },
                ).status.token
                token_file = workdir / "token"
                token_file.write_text(token)
                token_file.chmod(0o600)
                # a native sidecar: the kubelet starts it after the iptables init container and
                # starts Envoy once its startup probe (the secret file exists) passes
                agent = container(spec, "initContainers", AGENT_CONTAINER)
                assert agent["restartPolicy"] == "Always"
                assert agent["startupProbe"]["exec"]["command"] == ["test", "-s", AGENT_SECRET]
                aenv = kubelet_env(agent, pod_name=name, ns=ns)
                aargs = [
                    expand(a, aenv)
                    .replace(PROXY_DIR, str(workdir))
                    .replace("/var/run/secrets/smc/token", str(token_file))
                    for a in agent["args"]
                ]
                assert agent["command"] == ["python", "-m", "smc.agent"]
                pod.start(
                    [sys.executable, "-m", "smc.agent", *aargs],
                    log=workdir / "agent.log",
                    uid=0,
                    gid=agent["securityContext"]["runAsGroup"],
                    env={
                        "PATH": "/usr/bin:/bin",
                        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                        **aenv,
                    },
                    cwd=workdir,
                )
                agent_log = workdir / "agent.log"
                eventually(
                    lambda s=secret, log=agent_log: (
                        os.path.exists(s)
                        and "serving certificate" in log.read_text(errors="replace")
                    ),
                    what=f"the {name} agent's first certificate",
                    diag=lambda log=agent_log: (
                        log.read_text(errors="replace")[-3000:] + "\n--- serve:\n" + serve.tail()
                    ),
                    wait=WAIT,
                )
                env = kubelet_env(proxy, pod_name=name, ns=ns)
                assert proxy["workingDir"] == PROXY_DIR  # here: workdir (cwd below)
                args = [expand(a, env) for a in proxy.get("args", [])]
                pod.start(
                    [
                        str(envoy),
                        *args,
                        "--base-id",
                        str(random.randint(1000, 60000)),
                        "--log-path",
                        str(workdir / "envoy.log"),
                    ],
                    log=workdir / "envoy.out",
                    uid=ctx["runAsUser"],
                    gid=ctx["runAsGroup"],
                    env={"PATH": "/usr/bin:/bin", **env},
                    cwd=workdir,
                )

            # ADS is mTLS with the agents' certificates; the control plane made no key
            assert "over mTLS" in serve.tail(None)
            assert not any((tmp_path / "keys").glob("*.key"))
            # 1. Transparent listeners on both proxies.
            for name, pod in pods.items():
                eventually(
                    lambda pod=pod: {"inbound", "outbound"} <= listeners(pod),
                    what=f"the {name} proxy's transparent listeners",
                    diag=diag,
                    wait=WAIT,
                )

            # 2. Policy through the apiserver; the client calls the ClusterIP.
            create_http_traffic_target(
                custom,
                ns,
                name="client-to-server",
                source="client",
                destination="server",
                matches=[{"name": "get", "pathRegex": "/books", "methods": ["GET"]}],
            )
            host = f"server.{ns}.svc.cluster.local"
            client = pods["client"]
            ok = eventually(
                lambda: (
                    (r := request(client, cluster_ip, 80, host, "GET", "/books"))["status"] == 200
                    and r
                ),
                what="GET /books from the client to reach the server",
                diag=diag,
                wait=WAIT,
            )
            body = json.loads(ok["body"])
            assert body["port"] == 8080 and body["path"] == "/books"
            assert spiffe in body["xfcc"], body
            denied = request(client, cluster_ip, 80, host, "POST", "/books")
            assert denied["status"] == 403, denied

            # 2b. A TCP service: unreachable until a TCPRoute TrafficTarget allows it, then
            #     proxied by destination port over mTLS to the server's TCP chain.
            def tcp_reply() -> Any:
                out = client.run([sys.executable, "-c", TCP_CLIENT, echo.spec.cluster_ip, "7000"])
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)["reply"]

            assert not tcp_reply()  # accepted by the pass-through, closed: no upstream
            custom.create_namespaced_custom_object(
                "specs.smi-spec.io",
                "v1alpha4",
                ns,
                "tcproutes",
                {
                    "apiVersion": "specs.smi-spec.io/v1alpha4",
                    "kind": "TCPRoute",
                    "metadata": {"name": "echo"},
                    "spec": {"matches": {"ports": [7000]}},
                },
            )
            custom.create_namespaced_custom_object(
                "access.smi-spec.io",
                "v1alpha3",
                ns,
                "traffictargets",
                {
                    "apiVersion": "access.smi-spec.io/v1alpha3",
                    "kind": "TrafficTarget",
                    "metadata": {"name": "client-to-echo"},
                    "spec": {
                        "destination": {
                            "kind": "ServiceAccount",
                            "name": "server",
                            "namespace": ns,
                        },
                        "sources": [{"kind": "ServiceAccount", "name": "client", "namespace": ns}],
                        "rules": [{"kind": "TCPRoute", "name": "echo"}],
                    },
                },
            )
            eventually(
                lambda: tcp_reply() == "HELLO OVER TCP",
                what="the TCP echo through both sidecars",
                diag=diag,
                wait=WAIT,
            )

            # 3. A port no Service names passes through both sidecars.
            plain = request(client, pods["server"].address, 9000, "-", "GET", "/direct")
            assert plain["status"] == 200, plain
            assert json.loads(plain["body"]) == {
                "port": 9000,
                "method": "GET",
                "path": "/direct",
                "xfcc": "",
            }

            # 3b. Egress (OSM's kind, through the apiserver): with enableEgress off, only what
            #     an Egress allows leaves the mesh (here: by destination IP range, matched by
            #     the transparent outbound listener on the original destination).
            status, body = serve.request(
                "/v1/apply",
                method="POST",
                body=b"apiVersion: smc.dev/v1alpha1\nkind: MeshConfig\n"
                b"metadata: {name: mesh, namespace: smc-system}\nspec: {enableEgress: false}\n",
                headers={"Content-Type": "application/yaml"},
            )
            assert status == 200, body

            def off_mesh() -> int:
                return int(
                    request(client, pods["server"].address, 9000, "-", "GET", "/x")["status"]
                )

            eventually(lambda: off_mesh() == 0, what="egress off", diag=diag, wait=WAIT)
            custom.create_namespaced_custom_object(
                "policy.openservicemesh.io",
                "v1alpha1",
                ns,
                "egresses",
                {
                    "apiVersion": "policy.openservicemesh.io/v1alpha1",
                    "kind": "Egress",
                    "metadata": {"name": "client-direct"},
                    "spec": {
                        "sources": [{"kind": "ServiceAccount", "name": "client", "namespace": ns}],
                        "ipAddresses": [f"{pods['server'].address}/32"],
                        "ports": [{"number": 9000, "protocol": "tcp"}],
                    },
                },
            )
            eventually(lambda: off_mesh() == 200, what="egress by IP range", diag=diag, wait=WAIT)
            assert (
                int(request(client, pods["server"].address, 9001, "-", "GET", "/")["status"]) == 0
            )
            custom.delete_namespaced_custom_object(
                "policy.openservicemesh.io", "v1alpha1", ns, "egresses", "client-direct"
            )
            eventually(lambda: off_mesh() == 0, what="egress removed", diag=diag, wait=WAIT)
            status, body = serve.request(
                "/v1/apply",
                method="POST",
                body=b"apiVersion: smc.dev/v1alpha1\nkind: MeshConfig\n"
                b"metadata: {name: mesh, namespace: smc-system}\nspec: {enableEgress: true}\n",
                headers={"Content-Type": "application/yaml"},
            )
            assert status == 200, body
            eventually(lambda: off_mesh() == 200, what="egress on again", diag=diag, wait=WAIT)

            # 4. Outside the mesh (the node), plaintext to the mesh port fails.
            outside = json.loads(
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CLIENT,
                        pods["server"].address,
                        "8080",
                        "-",
                        "GET",
                        "/books",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout
            )
            assert outside["status"] != 200, outside

            # 5. Revoking the policy denies the client again: first the HTTP grant (the server
            #    identity stays reachable through the TCP grant, so its RBAC answers 403), then
            #    the TCP grant (nothing of the server is routed any more: no answer at all).
            def books() -> int:
                return int(request(client, cluster_ip, 80, host, "GET", "/books")["status"])

            for target, status in (("client-to-server", 403), ("client-to-echo", 0)):
                custom.delete_namespaced_custom_object(
                    "access.smi-spec.io", "v1alpha3", ns, "traffictargets", target
                )
                eventually(
                    lambda status=status: books() == status,  # type: ignore[misc]
                    what=f"GET /books to get {status} once {target} is deleted",
                    diag=diag,
                    wait=WAIT,
                )
            assert not tcp_reply()
            direct = request(client, pods["server"].address, 8080, host, "GET", "/books")
            assert direct["status"] == 0, direct
            for pod in pods.values():
                assert not rejected_updates(pod), diag()

            # 7. Deleting the client pod revokes its proxy's own certificate (the informer's
            #    WorkloadLeft), on the log; the server pod's certificate stays current.
            core.delete_namespaced_pod("client", ns, grace_period_seconds=0)

            def certs_now() -> CertsProjection:
                projection = CertsProjection()
                ProjectionRunner(
                    log=SqliteLog(tmp_path / "log.db"), projections=[projection]
                ).catch_up()
                return projection

            eventually(
                lambda: any(
                    r.status == "revoked" and r.reason == "pod-left"
                    for r in certs_now().proxy_certs.get(f"pod/{ns}/client", {}).values()
                ),
                what="the deleted client pod's proxy certificate revoked",
                diag=diag,
                wait=WAIT,
            )
            after = certs_now()
            assert after.proxy_cert(f"pod/{ns}/client") is None
            server_cert = after.proxy_cert(f"pod/{ns}/server")
            assert server_cert is not None and server_cert.proof == "service-account-token"
        finally:
            for pod in pods.values():
                pod.stop_all()
            code = serve.stop()
        assert code == 0, serve.tail()


PROBED_APP = r"""
import http.server, os, socketserver, sys, threading
from concurrent import futures
import grpc
flag = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/healthz" and os.path.exists(flag)
        body = ("ok " if ok else "sick ") + self.headers.get("X-Probe", "")
        self.send_response(200 if ok else 503)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
def check(request, context):
    # grpc.health.v1.HealthCheckRequest{service="app"} -> HealthCheckResponse{status}
    if request != b"\n\x03app":
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
    return b"\x08\x01" if os.path.exists(flag) else b"\x08\x02"
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
    "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)})])
server.add_insecure_port("0.0.0.0:9090")
server.start()
if len(sys.argv) > 3:  # the same health over HTTPS, with the app's own certificate
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[2], sys.argv[3])
    secure = S(("0.0.0.0", 8443), H)
    secure.socket = tls.wrap_socket(secure.socket, server_side=True)
    threading.Thread(target=secure.serve_forever, daemon=True).start()
S(("0.0.0.0", 8080), H).serve_forever()
"""

TCP_APP = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen(16)
while True:
    s.accept()[0].close()
"""


def test_kubelet_probes_reach_the_app_through_the_sidecar(
    tmp_path: Path, kube: KubeAPIServer, net: PodNetwork
) -> None:
    """HTTP, HTTPS, TCP and gRPC probes on mesh ports of an injected pod, sent as a kubelet
    sends them (from the node, plaintext or kubelet's unverified TLS, the mutated pod spec's
    port, path and headers), follow the application's real health through the sidecar; the
    original mesh port refuses them. An HTTPS probe reaches the proxy in plaintext and the
    proxy asks the application over TLS (the app serves only TLS there). From the attacker's
    side: a probe port forwards its probe only; any other path, method or gRPC call is the
    proxy's own 404 and never reaches the application."""
    import ssl
    import urllib.error
    import urllib.request

    import grpc
    from kubernetes import client as k8s

    from smc.testing.apps import tls_server_context

    try:
        envoy = world_readable_copy(envoy_binary(), net.workdir / "bin")
    except EnvoyError as exc:
        pytest.skip(f"no Envoy binary: {exc}")
    ns = f"pr-{uuid.uuid4().hex[:8]}"
    pod = net.add_pod("prober")
    serve = ServeProcess(tmp_path, args=["--kube", str(kube.kubeconfig_path)], xds_host=net.gateway)
    config = InjectorConfig(
        ads=AdsAddress(host=net.gateway, port=serve.xds_port), tls=False, init_install=""
    )
    manifest = pod_manifest("prober", [8080, 7000, 9090])
    app_spec = manifest["spec"]["containers"][0]
    app_spec["livenessProbe"] = {
        "httpGet": {
            "path": "/healthz",
            "port": 8080,
            "httpHeaders": [{"name": "X-Probe", "value": "liveness"}],
        }
    }
    app_spec["readinessProbe"] = {"tcpSocket": {"port": 7000}}
    app_spec["startupProbe"] = {"grpc": {"port": 9090, "service": "app"}}
    manifest["spec"]["containers"].append(
        {
            "name": "tls-app",
            "image": "example.invalid/app:1",
            "ports": [{"containerPort": 8443, "name": "https"}],
            "livenessProbe": {
                "httpGet": {
                    "path": "/healthz",
                    "port": "https",
                    "scheme": "HTTPS",
                    "httpHeaders": [{"name": "X-Probe", "value": "https"}],
                }
            },
        }
    )
    tls_server_context(net.workdir / "app-tls", "prober.app")  # the app's own certificate
    app_cert = net.workdir / "app-tls" / "prober.app.crt"
    app_key = net.workdir / "app-tls" / "prober.app.key"
    flag = net.workdir / "healthy"
    flag.touch()

    def diag() -> str:
        log = net.workdir / "prober" / "envoy.log"
        text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        return f"--- listeners: {sorted(listeners(pod))}\n--- envoy: {text}\n--- serve:\n{serve.tail()}"

    with kube.api_client() as api:
        core = k8s.CoreV1Api(api)
        core.create_namespace(
            {
                "metadata": {
                    "name": ns,
                    "labels": {"smc.dev/monitored": "true", "smc.dev/inject": "enabled"},
                }
            }
        )
        core.create_namespaced_service_account(ns, {"metadata": {"name": "prober"}})
        ops = mutate(
            manifest,
            namespace_labels={"smc.dev/inject": "enabled", "smc.dev/monitored": "true"},
            config=config,
            namespace=ns,
        )
        core.create_namespaced_pod(ns, jsonpatch.apply_patch(copy.deepcopy(manifest), ops))
        core.patch_namespaced_pod_status(
            "prober",
            ns,
            {"status": {"phase": "Running", "podIP": pod.address, "podIPs": [{"ip": pod.address}]}},
        )
        # every probed port is a port of a Service: its inbound chain requires mTLS
        ports = [("http", 8080), ("tcp-probe", 7000), ("grpc", 9090), ("https", 8443)]
        core.create_namespaced_service(
            ns,
            {
                "metadata": {"name": "prober"},
                "spec": {
                    "selector": {"app": "prober"},
                    "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports],
                },
            },
        )
        k8s.DiscoveryV1Api(api).create_namespaced_endpoint_slice(
            ns,
            {
                "metadata": {
                    "name": "prober-a1",
                    "labels": {"kubernetes.io/service-name": "prober"},
                },
                "addressType": "IPv4",
                "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
                "endpoints": [
                    {
                        "addresses": [pod.address],
                        "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": "prober", "namespace": ns},
                    }
                ],
            },
        )
        try:
            serve.wait_ready()
            spec = api.sanitize_for_serialization(core.read_namespaced_pod("prober", ns))["spec"]
            app_file, tcp_file = net.workdir / "probed.py", net.workdir / "tcp.py"
            app_file.write_text(PROBED_APP)
            tcp_file.write_text(TCP_APP)
            pod.start(
                [sys.executable, str(app_file), str(flag), str(app_cert), str(app_key)],
                log=net.workdir / "app.log",
            )
            tcp = pod.start([sys.executable, str(tcp_file)], log=net.workdir / "tcp.log")
            done = pod.run(container(spec, "initContainers", INIT_CONTAINER)["command"])
            assert done.returncode == 0, done.stderr
            proxy = container(spec, "containers", PROXY_CONTAINER)
            env = kubelet_env(proxy, pod_name="prober", ns=ns)
            ctx = proxy["securityContext"]
            workdir = net.workdir / "prober"
            workdir.mkdir()
            # no agent here (the probes are plaintext from the node): the test, as the pod's
            # host, puts a throwaway key of its own where the agent would (serve made none)
            write_validate_secret(workdir)
            for path in (workdir, workdir / "smc-sds", workdir / "smc-sds" / "default.json"):
                os.chown(path, ctx["runAsUser"], ctx["runAsGroup"])
            pod.start(
                [
                    str(envoy),
                    *(expand(a, env) for a in proxy.get("args", [])),
                    "--base-id",
                    str(random.randint(1000, 60000)),
                    "--log-path",
                    str(workdir / "envoy.log"),
                ],
                log=workdir / "envoy.out",
                uid=ctx["runAsUser"],
                gid=ctx["runAsGroup"],
                env={"PATH": "/usr/bin:/bin", **env},
                cwd=workdir,
            )
            eventually(
                lambda: "inbound" in listeners(pod),
                what="the prober's transparent listeners",
                diag=diag,
                wait=WAIT,
            )
            app = container(spec, "containers", "app")
            live, ready, start = app["livenessProbe"], app["readinessProbe"], app["startupProbe"]
            secure = container(spec, "containers", "tls-app")["livenessProbe"]
            assert secure["httpGet"]["scheme"] == "HTTP" and secure["httpGet"]["port"] != 8443

            def http_probe(probe: dict[str, Any]) -> tuple[int, str]:
                """kubelet's HTTP probe: GET scheme://podIP:port/path with the spec's headers."""
                get = probe["httpGet"]
                req = urllib.request.Request(
                    f"http://{pod.address}:{get['port']}{get['path']}",
                    headers={h["name"]: h["value"] for h in get.get("httpHeaders", [])},
                )
                try:
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        return int(resp.status), resp.read().decode()
                except urllib.error.HTTPError as err:
                    return int(err.code), err.read().decode()
                except OSError as err:
                    return 0, str(err)

            def https_direct(port: int) -> tuple[int, str]:
                """kubelet's HTTPS probe as it was before the rewrite: unverified TLS."""
                tls = ssl.create_default_context()
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
                try:
                    url = f"https://{pod.address}:{port}/healthz"
                    with urllib.request.urlopen(url, timeout=5, context=tls) as resp:
                        return int(resp.status), resp.read().decode()
                except urllib.error.HTTPError as err:
                    return int(err.code), err.read().decode()
                except OSError as err:
                    return 0, str(err)

            def grpc_probe(
                probe: dict[str, Any], method: str = "/grpc.health.v1.Health/Check"
            ) -> bytes | str:
                """kubelet's gRPC probe: grpc.health.v1.Health/Check with the spec's service."""
                target = f"{pod.address}:{probe['grpc']['port']}"
                with grpc.insecure_channel(target) as channel:
                    check = channel.unary_unary(method)
                    try:
                        return bytes(
                            check(b"\n\x03" + probe["grpc"]["service"].encode(), timeout=5)
                        )
                    except grpc.RpcError as err:
                        return f"{err.code()}: {err.details()}"  # type: ignore[attr-defined]

            # healthy app: every probe passes, the HTTP probe carries the spec's header
            assert eventually(
                lambda: http_probe(live)[0] == 200, what="HTTP probe 200", diag=diag, wait=WAIT
            )
            assert http_probe(live)[1] == "ok liveness"
            eventually(
                lambda: http_probe(ready)[0] == 200, what="TCP probe up", diag=diag, wait=WAIT
            )
            eventually(
                lambda: grpc_probe(start) == b"\x08\x01", what="gRPC SERVING", diag=diag, wait=WAIT
            )
            eventually(
                lambda: http_probe(secure)[0] == 200, what="HTTPS probe 200", diag=diag, wait=WAIT
            )
            assert http_probe(secure) == (200, "ok https")  # the app speaks only TLS there
            # the attacker's side: a probe port is a door past mTLS for the probe only
            for probe in (live, secure, ready):
                other = dict(probe, httpGet=dict(probe["httpGet"], path="/admin"))
                assert http_probe(other) == (404, "not a probe\n"), probe
            port = live["httpGet"]["port"]
            post = urllib.request.Request(
                f"http://{pod.address}:{port}/healthz", data=b"x", method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(post, timeout=5)
            assert refused.value.code == 404
            watch = str(grpc_probe(start, "/grpc.health.v1.Health/Watch"))
            assert watch == "StatusCode.UNIMPLEMENTED: not a probe\n", (
                watch
            )  # the proxy, not the app
            # without the rewrite kubelet would meet the mTLS-only inbound chain
            direct = dict(live, httpGet=dict(live["httpGet"], port=8080))
            assert http_probe(direct)[0] != 200
            assert https_direct(8443)[0] != 200
            # failing app: the HTTP and gRPC probes report it, the TCP probe follows the port
            flag.unlink()
            assert http_probe(live) == (503, "sick liveness")
            assert http_probe(secure) == (503, "sick https")
            assert grpc_probe(start) == b"\x08\x02"
            tcp.terminate()
            tcp.wait(timeout=10)
            eventually(
                lambda: http_probe(ready)[0] == 503, what="TCP probe down", diag=diag, wait=WAIT
            )
            # and healthy again
            flag.touch()
            pod.start([sys.executable, str(tcp_file)], log=net.workdir / "tcp.log")
            eventually(
                lambda: http_probe(ready)[0] == 200, what="TCP probe back", diag=diag, wait=WAIT
            )
            assert http_probe(live)[0] == 200 and grpc_probe(start) == b"\x08\x01"
            assert http_probe(secure) == (200, "ok https")
        finally:
            pod.stop_all()
            code = serve.stop()
        assert code == 0, serve.tail()
