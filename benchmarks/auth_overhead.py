"""Benchmark: what authentication and authorization add to an apply, and TokenReview caching.

Role: one process builds the real HTTPS API (the projection runner on a SQLite log in a
temporary folder, ``LiveMeshChanges``, ``create_app`` behind the real :class:`smc.auth.Guard`)
and times sequential ``POST /v1/apply`` requests (one MeshService each, every one a real
change) over one keep-alive HTTPS connection, in interleaved rounds, for:

- ``baseline``: the same app with the guard taken out (a fixed principal is set instead), the
  cost the others are compared with;
- ``admin``: the local admin token;
- ``grant``: a client certificate whose principal is allowed by an AccessGrant on the log;
- ``kube`` (unless ``--skip-kube``): a service-account token checked by TokenReview and
  authorized by SubjectAccessReview on a real kube-apiserver (cached answers).

Then a burst of ``--burst`` (default 1,000) concurrent authenticated reads with one
service-account token, counting the apiserver calls (TokenReview and SubjectAccessReview) it
caused. Prints p50/mean latency per mode against the baseline and, robust to a loaded
machine's noise, the time the guard itself spent per request (its ``smc_api_auth_seconds``
histogram) as a share of an apply against the target (< 10 %), the calls per burst, and writes ``benchmarks/results/auth_overhead.json``.
Concurrency: one asyncio loop in one process; kube-apiserver and etcd are child processes.

Usage: python benchmarks/auth_overhead.py [--applies 300] [--rounds 3] [--burst 1000]
       [--skip-kube] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smc.api import ApiContext, LiveMeshChanges, MeshChanges, create_app, start_http
from smc.auth import (
    GUARD,
    PRINCIPAL,
    AccessReviewer,
    ApiTLS,
    Authenticator,
    ClientCredentials,
    GrantAuthorizer,
    Guard,
    LocalCredential,
    Principal,
    TokenReviewer,
    server_context,
)
from smc.events._sqlite import SqliteLog
from smc.projections import (
    CertsProjection,
    PolicyProjection,
    ProjectionRunner,
    RegistryProjection,
    all_projections,
)
from smc.testing.ports import free_port

TARGET_OVERHEAD = 0.10
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _doc(mode: str, i: int) -> bytes:
    return (
        "apiVersion: smc.dev/v1alpha1\nkind: MeshService\n"
        f"metadata: {{name: {mode}-{i}, namespace: bench}}\n"
        "spec: {ports: [{name: http, port: 80, protocol: http}], selector: {app: x}}\n"
    ).encode()


def _client_ca(folder: Path) -> tuple[str, tuple[str, str]]:
    """A CA (PEM) and a client certificate + key file it signed for ``CN=bench``."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    crt, kf = folder / "bench.crt", folder / "bench.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca.public_bytes(serialization.Encoding.PEM).decode(), (str(crt), str(kf))


class Bench:
    """One API (guarded or not) on a free port; see the module docstring."""

    def __init__(self, tmp: Path, *, guarded: bool, kube: Any = None) -> None:
        self.tmp = tmp
        self.guarded = guarded
        self.kube = kube

    async def start(self, client_ca: str) -> None:
        self.log = SqliteLog(self.tmp / "log.db")
        self.runner = ProjectionRunner(log=self.log, projections=all_projections())
        registry = next(p for p in self.runner.projections if isinstance(p, RegistryProjection))
        policy = next(p for p in self.runner.projections if isinstance(p, PolicyProjection))
        certs = next(p for p in self.runner.projections if isinstance(p, CertsProjection))
        live = LiveMeshChanges(
            changes=MeshChanges(log=self.log, registry=registry, policy=policy), runner=self.runner
        )
        self.local = LocalCredential(self.tmp / "auth")
        self.token = self.local.ensure()
        self.tokens: TokenReviewer | None = None
        self.sar: AccessReviewer | None = None
        authorizer: Any = GrantAuthorizer(policy)
        if self.kube is not None:
            from smc.informers import KubeEndpoint

            endpoint = KubeEndpoint.from_kubeconfig(self.kube.kubeconfig_path)
            self.tokens = TokenReviewer(endpoint, audiences=("smc",))
            self.sar = AccessReviewer(endpoint)
            authorizer = self.sar
        guard = Guard(
            authenticator=Authenticator(local=self.local, tokens=self.tokens),
            authorizer=authorizer,
        )
        self.guard = guard
        app = create_app(
            ApiContext(
                live=live, runner=self.runner, registry=registry, policy=policy, certs=certs
            ),
            guard=guard,
        )
        if not self.guarded:  # the baseline: the same app without the guard
            app.middlewares.remove(guard.middleware)
            fixed = Principal(name="baseline", method="none")

            @web.middleware
            async def as_fixed(request: web.Request, handler: Handler) -> web.StreamResponse:
                request[PRINCIPAL] = fixed
                return await handler(request)

            async def allow(principal: Principal, access: Any) -> None:
                return None

            app.middlewares.insert(0, as_fixed)
            app[GUARD].authorize = allow  # type: ignore[method-assign]
        material = ApiTLS(self.tmp / "auth", hosts=["127.0.0.1"]).ensure()
        ssl_ctx, _ = server_context(material, client_cas=[client_ca])
        self.port = free_port()
        self.site = await start_http(app, host="127.0.0.1", port=self.port, ssl_context=ssl_ctx)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.runner.run(stop=self.stop))
        await asyncio.wait_for(self.runner.caught_up.wait(), 30)
        self.ca_pem = material.ca_pem
        self.url = f"https://127.0.0.1:{self.port}"

    def creds(self, *, token: str | None = None, cert: tuple[str, str] | None = None) -> Any:
        c = ClientCredentials(
            server=self.url,
            ca_pem=self.ca_pem,
            token=token,
            cert_file=cert[0] if cert else None,
            key_file=cert[1] if cert else None,
        )
        return c

    async def close(self) -> None:
        self.stop.set()
        await self.task
        await self.site.cleanup()
        if self.tokens is not None:
            await self.tokens.close()
        if self.sar is not None:
            await self.sar.close()
        self.log.close()


async def _applies(
    bench: Bench, creds: ClientCredentials, mode: str, start: int, n: int
) -> list[float]:
    out = []
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=creds.ssl_context()), headers=creds.headers()
    ) as s:
        for i in range(start, start + n):
            t0 = time.perf_counter()
            async with s.post(bench.url + "/v1/apply", data=_doc(mode, i)) as r:
                body = await r.json()
            out.append(time.perf_counter() - t0)
            if r.status != 200:
                raise SystemExit(f"{mode}: HTTP {r.status}: {body}")
    return out


def _auth_seconds(guard: Guard) -> float:
    """Seconds the guard spent authenticating and authorizing, from its histogram."""
    total = 0.0
    for metric in guard.registry.collect():
        for sample in metric.samples:
            if sample.name == "smc_api_auth_seconds_sum":
                total += sample.value
    return total


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "n": len(xs),
        "p50_ms": round(statistics.median(xs) * 1000, 3),
        "mean_ms": round(statistics.fmean(xs) * 1000, 3),
        "p90_ms": round(xs[int(len(xs) * 0.9) - 1] * 1000, 3),
    }


def _kube_setup(kube: Any) -> str:
    """A namespace ``bench`` with service account ``writer`` allowed to apply meshservices and
    get services (RBAC on smc.dev); returns a token for the audience ``smc``."""
    from kubernetes import client

    with kube.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "bench"}})
        core.create_namespaced_service_account("bench", {"metadata": {"name": "writer"}})
        rbac = client.RbacAuthorizationV1Api(api)
        rbac.create_cluster_role(
            {
                "metadata": {"name": "smc-bench"},
                "rules": [
                    {
                        "apiGroups": ["smc.dev"],
                        "resources": ["meshservices", "services"],
                        "verbs": ["apply", "get"],
                    }
                ],
            }
        )
        rbac.create_cluster_role_binding(
            {
                "metadata": {"name": "smc-bench"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "smc-bench",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "writer", "namespace": "bench"}],
            }
        )
        req = core.create_namespaced_service_account_token(
            "writer", "bench", {"spec": {"audiences": ["smc"], "expirationSeconds": 3600}}
        )
        return str(req.status.token)


async def _run(
    args: argparse.Namespace, tmp: Path, kube: Any, sa_token: str | None
) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    client_ca, cert = _client_ca(tmp)
    # one API (and one log) per mode, so every mode applies into a log of the same size
    base = Bench(tmp / "baseline", guarded=False)
    admin_b = Bench(tmp / "admin", guarded=True, kube=kube)
    third = Bench(tmp / ("kube" if kube is not None else "grant"), guarded=True, kube=kube)
    benches = [base, admin_b, third]
    for b in benches:
        await b.start(client_ca)
    guarded = third
    results: dict[str, Any] = {}
    try:
        if kube is None:  # grants on the log: CN=bench may apply meshservices
            grant = {
                "apiVersion": "smc.dev/v1alpha1",
                "kind": "AccessGrant",
                "metadata": {"name": "bench"},
                "spec": {"subjects": ["CN=bench"], "verbs": ["apply"],
                         "resources": ["meshservices"], "namespaces": ["bench"]},
            }  # fmt: skip
            admin = third.creds(token=third.token)
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=admin.ssl_context()), headers=admin.headers()
                ) as s,
                s.put(third.url + "/v1/grants/bench", json=grant) as r,
            ):
                assert r.status == 200, await r.text()
        modes: dict[str, tuple[Bench, ClientCredentials]] = {
            "baseline": (base, base.creds(token="unused")),
            "admin": (admin_b, admin_b.creds(token=admin_b.token)),
        }
        if kube is None:
            modes["grant"] = (third, third.creds(cert=cert))
        else:
            assert sa_token is not None
            modes["kube"] = (third, third.creds(token=sa_token))
        times: dict[str, list[float]] = {m: [] for m in modes}
        per_round = max(1, args.applies // args.rounds)
        for rnd in range(args.rounds):
            for mode, (b, c) in modes.items():
                times[mode] += await _applies(b, c, mode, rnd * per_round, per_round)
        for mode in modes:
            results[mode] = _stats(times[mode])
        # the guard's own clock (smc_api_auth_seconds): robust to a loaded machine's noise
        for mode, (b, _) in modes.items():
            if b.guarded:
                spent = _auth_seconds(b.guard)
                results[mode]["guard_ms_per_request"] = round(spent / len(times[mode]) * 1000, 4)
                results[mode]["guard_share_of_mean"] = round(
                    spent / len(times[mode]) / (results[mode]["mean_ms"] / 1000), 4
                )
        base_p50 = results["baseline"]["p50_ms"]
        for mode in modes:
            if mode != "baseline":
                results[mode]["overhead_vs_baseline"] = round(
                    results[mode]["p50_ms"] / base_p50 - 1, 4
                )
        if kube is not None and guarded.tokens is not None and guarded.sar is not None:
            assert sa_token is not None
            # a burst of concurrent authenticated reads, answers cached: apiserver calls
            tr0, sar0 = guarded.tokens.calls, guarded.sar.calls
            guarded.tokens.cache._data.clear()  # start cold: the burst pays its own reviews
            guarded.sar.cache._data.clear()
            c = guarded.creds(token=sa_token)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=c.ssl_context(), limit=100),
                headers=c.headers(),
            ) as s:

                async def one() -> int:
                    async with s.get(guarded.url + "/v1/services") as r:
                        await r.read()
                        return r.status

                t0 = time.perf_counter()
                statuses = await asyncio.gather(*(one() for _ in range(args.burst)))
                took = time.perf_counter() - t0
            results["burst"] = {
                "requests": args.burst,
                "ok": sum(1 for x in statuses if x == 200),
                "seconds": round(took, 3),
                "tokenreview_calls": guarded.tokens.calls - tr0,
                "subjectaccessreview_calls": guarded.sar.calls - sar0,
                "tokenreview_cache_hits": guarded.tokens.cache.hits,
                "sar_cache_hits": guarded.sar.cache.hits,
            }
    finally:
        for b in benches:
            await b.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--applies", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--skip-kube", action="store_true")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "auth_overhead.json",
    )
    args = ap.parse_args()
    out: dict[str, Any] = {
        "benchmark": "auth_overhead",
        "machine": {"python": platform.python_version(), "arch": platform.machine()},
        "target_overhead": TARGET_OVERHEAD,
    }
    with tempfile.TemporaryDirectory(prefix="smc-bench-auth-") as d:
        tmp = Path(d)
        out["grants"] = asyncio.run(_run(args, tmp / "grants", None, None))
        if not args.skip_kube:
            from smc.testing.kube import KubeAPIServer

            with KubeAPIServer(watch_cache=False) as kube:
                token = _kube_setup(kube)
                out["kube"] = asyncio.run(_run(args, tmp / "kube", kube, token))
    for section in ("grants", "kube"):
        r = out.get(section)
        if not r:
            continue
        print(f"{section}: baseline p50 {r['baseline']['p50_ms']:.2f} ms (no guard)")
        for mode, s in r.items():
            if mode in ("baseline", "burst"):
                continue
            ratio = s["overhead_vs_baseline"]
            share = s["guard_share_of_mean"]
            print(
                f"  {mode:6s} p50 {s['p50_ms']:.2f} ms, mean {s['mean_ms']:.2f} ms: "
                f"p50 vs baseline {ratio * 100:+.1f}%; the guard's own time "
                f"{s['guard_ms_per_request']:.3f} ms/request = {share * 100:.2f}% of an apply "
                f"(target < {TARGET_OVERHEAD * 100:.0f}%, ratio {share / TARGET_OVERHEAD:.2f})"
            )
        b = r.get("burst")
        if b:
            print(
                f"  burst of {b['requests']} authenticated requests ({b['ok']} ok) in "
                f"{b['seconds']:.2f}s: {b['tokenreview_calls']} TokenReview and "
                f"{b['subjectaccessreview_calls']} SubjectAccessReview calls to the apiserver"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
