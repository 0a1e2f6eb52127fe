"""The injector with SMC agents (``--credentials agent``): no credential in a pod, ever.

The patch adds an ``smc-agent`` native sidecar before Envoy (the key is made in the pod; the pod
proves itself with a projected, audience-bound service-account token mounted in the agent only),
and Envoy's bootstrap takes its certificate from the file the agent writes in the shared
in-memory volume (file-based SDS). Checked: the patch,
the mutated pod and its env hold no key, no token and no certificate but the public mesh roots;
the agent's command line parses with the real agent CLI; the bootstrap validates with a real
Envoy; a forged AdmissionReview sent over HTTPS to the running webhook, for any namespace and
service account, gets nothing secret and makes the CA issue nothing.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch  # type: ignore[import-untyped]
import pytest

from smc.agent import agent_sds_config
from smc.agent.__main__ import parser as agent_parser
from smc.ca import LocalIssuer
from smc.injector import (
    AGENT_CONTAINER,
    AGENT_SECRET,
    INIT_CONTAINER,
    PROXY_CONTAINER,
    PROXY_DIR,
    PROXY_VOLUME,
    TOKEN_VOLUME,
    AgentSidecar,
    InjectorConfig,
    WebhookServer,
    mutate,
    parse_ads_address,
)
from smc.injector.__main__ import _parser as injector_parser
from smc.injector._tls import issue_serving_certificate, server_ssl_context
from smc.testing.envoy import envoy_binary, write_validate_secret
from smc.testing.ports import free_port
from tests.test_injector import ThreadedWebhook

TD = "cluster.local"
ENABLED = {"smc.dev/inject": "enabled"}


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> LocalIssuer:
    return LocalIssuer(directory=tmp_path_factory.mktemp("ca"), trust_domain=TD)


@pytest.fixture(scope="module")
def config(issuer: LocalIssuer) -> InjectorConfig:
    return InjectorConfig(
        ads=parse_ads_address("smc.smc-system.svc:15010"),
        trust_domain=TD,
        ads_server_name="smc.smc-system.svc",
        agent=AgentSidecar(
            image="smc:test",
            ca_address="smc.smc-system.svc:15012",
            ca_pem="".join(issuer.trust_bundle()),
            audience="smc",
        ),
    )


def pod(name: str = "web-0", ns: str = "shop", sa: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "example.invalid/web:1"}],
        },
    }


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def _only_public_pem(text: str, issuer: LocalIssuer) -> None:
    assert "PRIVATE KEY" not in text
    roots = "".join(issuer.trust_bundle())
    # every certificate in it is a mesh root (public)
    for block in text.replace("\\n", "\n").split("-----BEGIN CERTIFICATE-----")[1:]:
        pem = "-----BEGIN CERTIFICATE-----" + block.split("-----END CERTIFICATE-----")[0]
        assert pem.strip() in roots, "a certificate that is not a mesh root"


def test_agent_patch_holds_no_credential_and_validates_with_envoy(
    issuer: LocalIssuer, config: InjectorConfig, tmp_path: Path
) -> None:
    p = pod()
    ops = mutate(p, namespace_labels=ENABLED, config=config)
    _only_public_pem(json.dumps(ops), issuer)
    out = jsonpatch.apply_patch(copy.deepcopy(p), ops)
    names = [c["name"] for c in out["spec"]["containers"]]
    assert names == ["app", PROXY_CONTAINER]
    inits = [c["name"] for c in out["spec"]["initContainers"]]
    assert inits == [INIT_CONTAINER, AGENT_CONTAINER]  # iptables first, then the agent
    assert "smc.dev/bootstrap-secret" not in out["metadata"]["annotations"]
    proxy, agent = out["spec"]["containers"][1], out["spec"]["initContainers"][1]
    # a native sidecar whose startup probe holds Envoy back until the first certificate
    assert agent["restartPolicy"] == "Always"
    assert agent["startupProbe"]["exec"]["command"] == ["test", "-s", AGENT_SECRET]
    # the agent's memory limit is the 30 MiB tests/test_agent_process.py runs it under
    assert agent["resources"]["limits"]["memory"] == "30Mi"
    assert proxy["workingDir"] == PROXY_DIR
    assert f"{PROXY_DIR}/smc-sds/default.json" == AGENT_SECRET
    # the key's volume is in memory (tmpfs): it never touches a disk
    (run_vol,) = [v for v in out["spec"]["volumes"] if v["name"] == PROXY_VOLUME]
    assert run_vol["emptyDir"]["medium"] == "Memory"
    # the token is projected, audience-bound, expiring, and mounted in the agent only
    (token_vol,) = [v for v in out["spec"]["volumes"] if v["name"] == TOKEN_VOLUME]
    sat = token_vol["projected"]["sources"][0]["serviceAccountToken"]
    assert sat["audience"] == "smc" and sat["expirationSeconds"] == 3600
    assert TOKEN_VOLUME in {m["name"] for m in agent["volumeMounts"]}
    assert TOKEN_VOLUME not in {m["name"] for m in proxy["volumeMounts"]}
    assert not any("secret" in v for v in out["spec"]["volumes"])
    # agent and Envoy share the proxy dir and run as the same (proxy) user: Envoy reads the
    # agent's 0600 file
    assert agent["securityContext"]["runAsUser"] == proxy["securityContext"]["runAsUser"]
    assert {m["mountPath"] for m in agent["volumeMounts"] if m["name"] == PROXY_VOLUME} == {
        PROXY_DIR
    }
    boot = json.loads(env_of(proxy)["SMC_ENVOY_BOOTSTRAP"])
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    assert set(clusters) == {"smc_xds"}  # no agent server to reach: Envoy reads the file
    tls = clusters["smc_xds"]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificate_sds_secret_configs"][0]["name"] == "default"
    assert tls["tls_certificate_sds_secret_configs"][0]["sds_config"] == agent_sds_config()
    # the agent's command line, as the kubelet expands it, parses with the real agent CLI
    env = {"POD_NAME": "web-0", "POD_NAMESPACE": "shop"}
    args = [
        a.replace("$(POD_NAMESPACE)", "shop").replace("$(POD_NAME)", "web-0") for a in agent["args"]
    ]
    assert agent["command"] == ["python", "-m", "smc.agent"]
    parsed = agent_parser().parse_args(args)
    assert parsed.node_id == "shop/web-0" and parsed.token_file.endswith("/token")
    assert parsed.ca_bundle == "env:SMC_PROXY_CA" and parsed.proxy_dir == PROXY_DIR
    del env
    # Envoy accepts the bootstrap (its environment holds the public roots only)
    penv = dict(os.environ, **env_of(proxy))
    argv = [
        str(envoy_binary()),
        "--mode",
        "validate",
        *[a.replace("$(SMC_ENVOY_BOOTSTRAP)", penv["SMC_ENVOY_BOOTSTRAP"]) for a in proxy["args"]],
    ]
    # in its working directory, where the agent wrote the secret file (Envoy checks it exists)
    workdir = tmp_path / "run"
    write_validate_secret(workdir)
    done = subprocess.run(
        argv, env=penv, capture_output=True, text=True, timeout=60, check=False, cwd=workdir
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def hook(issuer: LocalIssuer, config: InjectorConfig) -> Iterator[ThreadedWebhook]:
    serving = issue_serving_certificate(issuer, ip_addresses=["127.0.0.1"])
    server = WebhookServer(config=config, credentials=None, ssl_context=server_ssl_context(serving))
    with ThreadedWebhook(server) as h:
        yield h


def _forge_reviews(port: int, issuer: LocalIssuer) -> list[dict[str, Any]]:
    """What an attacker with network access does: curl a review for any namespace/account.
    Checks that each answer holds nothing secret; returns the mutated pods."""
    ctx = ssl.create_default_context(cadata="".join(issuer.trust_bundle()))
    out = []
    for ns, sa in (("kube-system", "admin"), ("shop", "web"), ("payments", "ledger")):
        body = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": f"forged-{ns}",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": ns,
                "object": pod("evil", ns, sa),
            },
        }
        req = urllib.request.Request(
            f"https://127.0.0.1:{port}/mutate",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            answer = json.loads(resp.read())
        patch = base64.b64decode(answer["response"]["patch"]).decode()
        _only_public_pem(patch, issuer)
        mutated = jsonpatch.apply_patch(body["request"]["object"], json.loads(patch))
        values = [
            e.get("value", "") for c in mutated["spec"]["containers"] for e in c.get("env", [])
        ]
        assert not any("eyJ" in v for v in values)  # no bearer token (JWT) either
        assert not any("secret" in v for v in mutated["spec"]["volumes"])
        assert "smc.dev/bootstrap-secret" not in mutated["metadata"].get("annotations", {})
        out.append(mutated)
    return out


def test_forged_admission_review_gets_nothing_secret(
    hook: ThreadedWebhook, issuer: LocalIssuer
) -> None:
    """What an attacker with network access does: curl a review for any namespace/account."""
    assert len(_forge_reviews(hook.server.port, issuer)) == 3
    assert hook.server.injected == 3


@pytest.mark.timeout(300)
def test_default_injector_process_hands_out_nothing_secret(
    issuer: LocalIssuer, tmp_path: Path
) -> None:
    """``python -m smc.injector`` started as an operator would, without ``--credentials``:
    the default is the agent mode. Forged reviews get an agent container and nothing secret,
    and the webhook needs no apiserver access to Secrets (no kubeconfig: it never asks)."""
    assert injector_parser().parse_args(["--ca", "local:/x"]).credentials == "agent"
    port = free_port()
    log_file = tmp_path / "injector.log"
    with log_file.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smc.injector",
                "--listen",
                f"127.0.0.1:{port}",
                "--ca",
                f"local:{issuer.directory}",
                "--trust-domain",
                TD,
                "--ip",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        ctx = ssl.create_default_context(cadata="".join(issuer.trust_bundle()))
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_file.read_text()
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2
                ) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "injector did not come up: " + log_file.read_text()
            time.sleep(0.1)
        for mutated in _forge_reviews(port, issuer):
            names = [c["name"] for c in mutated["spec"]["containers"]]
            assert names == ["app", PROXY_CONTAINER]
            assert AGENT_CONTAINER in {c["name"] for c in mutated["spec"]["initContainers"]}
            assert TOKEN_VOLUME in {v["name"] for v in mutated["spec"]["volumes"]}
        assert proc.poll() is None, log_file.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert "PRIVATE KEY" not in log_file.read_text()


@pytest.mark.parametrize("mode", ["secret", "env"])
def test_former_credential_modes_are_refused(issuer: LocalIssuer, mode: str) -> None:
    """The modes in which the webhook made a pod's key (in a Secret, or inline in the pod
    spec) are gone: asking for one stops the injector before it serves, naming the option."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smc.injector",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--ca",
            f"local:{issuer.directory}",
            "--credentials",
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"--credentials {mode!r} was removed" in proc.stderr
    assert "docs/identity.md" in proc.stderr
