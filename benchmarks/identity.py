"""Benchmark: per-proxy identities (CSR signing, renewals end to end, agent start and size).

Role: measures, and prints against the targets,
- CSR signing/s of each issuer's ``sign_csr`` (the control plane's work per proxy
  certificate; the CSRs are made beforehand, as agents make them): local >= 2,000/s, Vault
  (OpenBao, ``pki/sign``) >= 250/s;
- renewals/s end to end through the certificate service of a running control plane (HTTPS, proof with the current certificate, signature, ``ProxyCertificateIssued``
  appended to the SQLite log and applied), with the headroom over what 10,000 proxies with
  24 h certificates need (~0.12/s renewals at 2/3 of the lifetime);
- a new proxy's first certificate: ``python -m smc.agent`` started as a process with a
  one-time join token, time from spawn until it serves its certificate (< 1 s), and the
  time inside the agent from start to certificate;
- the agent's memory (< 30 MB): VmRSS of the agent process, sampled every 50 ms while a
  real Envoy beside each agent uses its certificate (ADS over mTLS, file-based SDS) and the
  agents renew (short certificates), its peak (VmHWM), and, where the machine has a cgroup v1
  memory hierarchy and root, what the kernel charged each agent's own memory cgroup (limit
  30 MB, as a pod's) at its peak.
Writes ``benchmarks/results/identity.json``. Starts its own OpenBao dev server.
Concurrency: one process (asyncio loop for the control plane; worker threads for Vault);
the agents are child processes.

Usage: python benchmarks/identity.py [--local-n 5000] [--vault-n 1000] [--renew-n 2000]
       [--agents 5] [--agent-lifetime 8] [--agent-renewals 2]
       [--only local,vault,renewals,agents]   (a partial run updates those parts of the JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.agent import CertificateClient, SignRequest, renewal_message
from smc.ca import LocalIssuer, SpiffeId, VaultIssuer
from smc.testing import cgroup
from smc.testing.mesh import ControlPlane
from smc.testing.vault import OpenBaoServer, setup_pki

TD = "bench.local"
TARGETS = {"local": 2000.0, "vault": 250.0, "first_cert_s": 1.0, "agent_rss_mb": 30.0}
LIFETIME = timedelta(hours=24)
#: renewals/s 10,000 proxies with 24 h certificates need (one renewal per 2/3 of a lifetime)
NEEDED_RENEWALS = 10_000 / (LIFETIME.total_seconds() * 2 / 3)


def _csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )


def _csrs(n: int) -> list[str]:
    key = ec.generate_private_key(ec.SECP256R1())  # signing cost does not depend on the key
    pem = _csr(key).public_bytes(serialization.Encoding.PEM).decode()
    return [pem] * n


def sign_rate(signer: LocalIssuer | VaultIssuer, *, n: int, threads: int) -> dict[str, Any]:
    csrs = _csrs(n)
    ids = [
        SpiffeId.of(trust_domain=TD, namespace=f"ns{i % 50}", service_account=f"sa{i}")
        for i in range(n)
    ]
    signer.sign_csr(csr_pem=csrs[0], identity=ids[0], lifetime=LIFETIME)  # warm up
    cpu0 = time.process_time()
    start = time.perf_counter()

    def one(i: int) -> str:
        return signer.sign_csr(csr_pem=csrs[i], identity=ids[i], lifetime=LIFETIME).serial

    if threads <= 1:
        serials = [one(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            serials = list(pool.map(one, range(n)))
    elapsed = time.perf_counter() - start
    assert len(set(serials)) == n
    return {
        "n": n,
        "threads": threads,
        "seconds": round(elapsed, 4),
        "csrs_per_s": round(n / elapsed, 1),
        "client_cpu_ms_per_csr": round((time.process_time() - cpu0) / n * 1000, 4),
        # what one core sustains, from the CPU each CSR took: independent of other load on a
        # shared machine (the wall rate above is not)
        "cpu_capacity_csrs_per_s_per_core": round(n / max(time.process_time() - cpu0, 1e-9), 1),
    }


def _report(what: str, value: float, target: float, unit: str, *, at_most: bool = False) -> None:
    ok = value <= target if at_most else value >= target
    ratio = (target / value if at_most else value / target) if value else 0.0
    print(
        f"{what:55s} {value:10.3f} {unit:9s} (target {'<=' if at_most else '>='} {target:g};"
        f" {ratio:5.2f}x) {'OK' if ok else 'BELOW TARGET'}"
    )


async def _service_runs(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cp = ControlPlane(workdir=workdir, agents=True, revoke_grace=3600.0)
    await cp.start()
    out: dict[str, Any] = {}
    try:
        m = args.proxies
        vms = "\n---\n".join(
            "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
            f"metadata: {{name: vm-{i}, namespace: bench}}\n"
            f"spec: {{address: 10.9.{i // 250}.{i % 250 + 1}, serviceAccount: sa{i % 20}}}\n"
            for i in range(m + args.agents)
        )
        await cp.apply(vms)
        client = CertificateClient(address=f"127.0.0.1:{cp.ca_port}", ca_pem=cp.ca_bundle())
        # m proxies get a first certificate (join tokens), then renew with it, concurrently
        current: dict[str, tuple[ec.EllipticCurvePrivateKey, str]] = {}
        for i in range(m):
            token = await cp.join_token(
                namespace="bench", name=f"vm-{i}", service_account=f"sa{i % 20}"
            )
            key = ec.generate_private_key(ec.SECP256R1())
            csr = _csr(key).public_bytes(serialization.Encoding.PEM).decode()
            resp = await client.sign(
                SignRequest(proxy=f"bench/vm-{i}", csr_pem=csr, join_token=token)
            )
            current[f"bench/vm-{i}"] = (key, resp.certificate_pem)
        requests: list[SignRequest] = []
        for r in range(args.renew_n):
            proxy = f"bench/vm-{r % m}"
            old_key, cert = current[proxy]
            key = ec.generate_private_key(ec.SECP256R1())
            csr = _csr(key)
            sig = old_key.sign(
                renewal_message(proxy=proxy, csr_der=csr.public_bytes(serialization.Encoding.DER)),
                ec.ECDSA(hashes.SHA256()),
            )
            requests.append(
                SignRequest(
                    proxy=proxy,
                    csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
                    certificate_pem=cert,
                    signature=base64.b64encode(sig).decode(),
                )
            )
            if r >= m - 1 and (r + 1) % m == 0:
                break  # one renewal per proxy per round: a proof is used once
        queue = list(requests)
        done = 0

        async def worker() -> None:
            nonlocal done
            while queue:
                req = queue.pop()
                await client.sign(req)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        rate = done / elapsed
        out["renewals"] = {
            "n": done,
            "concurrency": args.concurrency,
            "seconds": round(elapsed, 3),
            "renewals_per_s": round(rate, 1),
            "needed_for_10000_proxies_per_s": round(NEEDED_RENEWALS, 3),
            "headroom": round(rate / NEEDED_RENEWALS, 1),
        }
        await client.close()
    finally:
        await cp.stop()
        cp.close()
    return out


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def _agent_runs(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Agent processes (``python -m smc.agent``) beside real Envoys that use their
    certificates (ADS over mTLS with them; file-based SDS): time to the first certificate,
    and the resident agent's memory in steady state and across renewals (short proxy
    certificates, so that several renewals happen within the run)."""
    from smc.agent import ads_tls_transport_socket
    from smc.testing.envoy import EnvoyProcess, ads_bootstrap
    from smc.testing.ports import free_port

    cp = ControlPlane(
        workdir=workdir,
        agents=True,
        revoke_grace=3600.0,
        proxy_cert_lifetime=timedelta(seconds=args.agent_lifetime),
    )
    await cp.start()
    procs: list[tuple[asyncio.subprocess.Process, Path, EnvoyProcess | None]] = []
    groups: list[cgroup.MemoryCgroup] = []
    out: dict[str, Any] = {}
    try:
        n = args.agents
        await cp.apply(
            "\n---\n".join(
                "apiVersion: smc.dev/v1alpha1\nkind: VirtualMachine\n"
                f"metadata: {{name: agent-{i}, namespace: bench}}\n"
                f"spec: {{address: 127.0.91.{i + 1}, serviceAccount: sa{i}}}\n"
                for i in range(n)
            )
        )
        firsts, inside = [], []
        for a in range(n):
            token = await cp.join_token(
                namespace="bench", name=f"agent-{a}", service_account=f"sa{a}"
            )
            d = Path(tempfile.mkdtemp(prefix="smc-bagent-"))
            (d / "token").write_text(token)
            (d / "ca.pem").write_text(cp.ca_bundle())
            ready = d / "ready.json"
            argv = [
                sys.executable, "-m", "smc.agent", "--node-id", f"bench/agent-{a}",
                "--ca-address", f"127.0.0.1:{cp.ca_port}", "--ca-bundle", str(d / "ca.pem"),
                "--proxy-dir", str(d), "--join-token-file", str(d / "token"),
                "--ready-file", str(ready), "--log-level", "WARNING",
            ]  # fmt: skip
            if cgroup.available():  # as a pod's container: its own memory cgroup, 30 MB limit
                groups.append(
                    cgroup.MemoryCgroup(
                        f"smc-bench-{os.getpid()}-{a}",
                        limit_bytes=int(TARGETS["agent_rss_mb"] * 1024 * 1024),
                    )
                )
                argv = groups[-1].wrap(argv)
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            procs.append((proc, d, None))
            while not ready.exists():
                if proc.returncode is not None:
                    err = await proc.stderr.read() if proc.stderr else b""
                    raise RuntimeError(f"agent exited: {err.decode()[-2000:]}")
                await asyncio.sleep(0.002)
            firsts.append(time.perf_counter() - t0)
            inside.append(json.loads(ready.read_text())["first_certificate_seconds"])
        # each agent's Envoy: ADS over mTLS with the agent's certificate, read from its file
        for i, (proc, d, _) in enumerate(procs):
            boot = ads_bootstrap(
                node_id=f"bench/agent-{i}",
                cluster=f"agent-{i}",
                ads_host="127.0.0.1",
                ads_port=cp.port,
                delta=False,
                admin_port=free_port(),
                transport_socket=ads_tls_transport_socket(
                    ca_pem=cp.ca_bundle(), server_san="127.0.0.1"
                ),
            )
            envoy = EnvoyProcess(bootstrap=boot, workdir=d / "envoy", log_level="warning", cwd=d)
            await asyncio.to_thread(envoy.start)
            procs[i] = (proc, d, envoy)
        for _proc, d, envoy in procs:
            assert envoy is not None
            deadline = time.monotonic() + 60
            while envoy.stats().get("control_plane.connected_state", 0) != 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Envoy in {d} never connected to ADS over mTLS")
                await asyncio.sleep(0.05)
        # steady state and renewals: sample the resident agents until each renewed
        samples: list[float] = []
        deadline = time.monotonic() + args.agent_lifetime * (args.agent_renewals + 2) + 30
        while True:
            counts = [
                json.loads((d / "ready.json").read_text())["certificates"] for _, d, _ in procs
            ]
            if min(counts) > args.agent_renewals:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"agents did not renew {args.agent_renewals} times: {counts}")
            for proc, _, _ in procs:
                samples.append(_proc_kb(proc.pid, "VmRSS") / 1024)
            await asyncio.sleep(0.05)
        hwm = [_proc_kb(proc.pid, "VmHWM") / 1024 for proc, _, _ in procs]
        children = [
            Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            for proc, _, _ in procs
        ]
        charged = [g.figures() for g in groups]
        envoy_updates = [
            envoy.stats().get("sds.default.update_success", 0) for _, _, envoy in procs if envoy
        ]
        rejected = [
            envoy.stats().get("sds.default.update_rejected", 0) for _, _, envoy in procs if envoy
        ]
        out["first_certificate"] = {
            "agents": n,
            "spawn_to_serving_s": [round(x, 3) for x in firsts],
            "median_spawn_to_serving_s": round(statistics.median(firsts), 3),
            "median_inside_agent_s": round(statistics.median(inside), 3),
        }
        out["agent_rss_mb"] = {
            "what": "the agent process (python -m smc.agent: stdlib only, keys through "
            "OpenSSL's links in Python's ssl, CSR over HTTPS; no child process); VmHWM counts "
            "every page it mapped, shared or not (upper bound of a pod's charge); the cgroup "
            "figures are what the kernel charged each agent's own memory cgroup (limit 30 MB): "
            "max_usage = anonymous + page cache it brought in + kernel memory, rss = "
            "anonymous, mapped_file = mapped file pages charged to it (pages another group "
            "cached first, e.g. the Python binary, are charged there)",
            "samples": len(samples),
            "steady_median": round(statistics.median(samples), 1),
            "max": round(max(samples), 1),
            "peak_vmhwm": round(max(hwm), 1),
            "child_processes": sum(len(c) for c in children),
            "cgroup": [{k: round(v, 2) for k, v in c.items()} for c in charged],
            "cgroup_max_usage_mb": round(max((c["max_usage_mb"] for c in charged), default=0), 2),
            "cgroup_oom_kills": sum(int(c["oom_kills"]) for c in charged),
            "renewals_per_agent": args.agent_renewals,
            "certificate_lifetime_s": args.agent_lifetime,
            "envoy_sds_updates": envoy_updates,
            "envoy_sds_rejected": rejected,
        }
    finally:
        for proc, _d, envoy in procs:
            if envoy is not None:
                await asyncio.to_thread(envoy.stop)
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        await cp.stop()
        cp.close()
        for g in groups:
            g.remove()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local-n", type=int, default=5000)
    ap.add_argument("--local-repeat", type=int, default=5, help="local runs (best, median)")
    ap.add_argument("--vault-n", type=int, default=1000)
    ap.add_argument("--vault-threads", default="1,4,8")
    ap.add_argument("--proxies", type=int, default=500, help="proxies renewing end to end")
    ap.add_argument("--renew-n", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--agents", type=int, default=5, help="agent processes started")
    ap.add_argument("--agent-lifetime", type=float, default=8.0, help="their certificates' (s)")
    ap.add_argument("--agent-renewals", type=int, default=2, help="renewals each agent waits for")
    ap.add_argument("--only", default="", help="comma list of: local, vault, renewals, agents")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "identity.json"))
    args = ap.parse_args()
    parts = set(args.only.split(",")) if args.only else {"local", "vault", "renewals", "agents"}
    out = Path(args.out)
    # a partial run (--only) updates its parts of the previous results
    results: dict[str, Any] = json.loads(out.read_text()) if args.only and out.exists() else {}
    results.update(
        {
            "benchmark": "identity",
            "when": datetime.now(UTC).isoformat(),
            "python": platform.python_version(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "targets": TARGETS,
        }
    )
    loads: dict[str, list[float]] = results.setdefault("load_average_by_part", {})
    if "local" in parts:
        results["local"] = []
        loads["local_before"] = list(os.getloadavg())
        with tempfile.TemporaryDirectory() as tmp:
            local = LocalIssuer(directory=Path(tmp) / "ca", trust_domain=TD)
            for _ in range(args.local_repeat):  # the machine is shared: best and median
                r = sign_rate(local, n=args.local_n, threads=1)
                r["load_average"] = list(os.getloadavg())
                results["local"].append(r)
        rates = sorted(r["csrs_per_s"] for r in results["local"])
        results["local_summary"] = {
            "runs": len(rates),
            "best_csrs_per_s": rates[-1],
            "median_csrs_per_s": statistics.median(rates),
            "median_cpu_capacity_csrs_per_s_per_core": statistics.median(
                r["cpu_capacity_csrs_per_s_per_core"] for r in results["local"]
            ),
        }
        loads["local"] = list(os.getloadavg())
        # every session is kept: the wall-clock rate depends on what else the shared machine
        # runs at that moment, the CPU per CSR does not
        results.setdefault("local_history", []).append(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "load_average_1m": sorted(
                    {round(r["load_average"][0], 1) for r in results["local"]}
                ),
                **results["local_summary"],
            }
        )
    if "vault" in parts:
        results["vault"] = []
        server = OpenBaoServer().start()
        try:
            pki = setup_pki(server.client(), mount="pki-bench", trust_domain=TD)
            threads = [int(x) for x in args.vault_threads.split(",")]
            vault = VaultIssuer(
                url=server.url,
                token=server.token,
                mount=pki.mount,
                role=pki.role,
                trust_domain=TD,
                pool_size=max(threads) + 2,
            )
            for th in threads:
                results["vault"].append(sign_rate(vault, n=args.vault_n, threads=th))
            vault.close()
        finally:
            server.stop()
        loads["vault"] = list(os.getloadavg())
    if "renewals" in parts:
        with tempfile.TemporaryDirectory(prefix="smc-bench-id-") as tmp:
            results.update(asyncio.run(_service_runs(args, Path(tmp))))
        loads["renewals"] = list(os.getloadavg())
    if "agents" in parts:
        with tempfile.TemporaryDirectory(prefix="smc-bench-ag-") as tmp:
            results.update(asyncio.run(_agent_runs(args, Path(tmp))))
        loads["agents"] = list(os.getloadavg())
    for r in results.get("local", []):
        _report(
            f"CSR signing, local issuer (load {r.get('load_average', ['?'])[0]:.1f})"
            if isinstance(r.get("load_average", [None])[0], float)
            else "CSR signing, local issuer",
            r["csrs_per_s"],
            TARGETS["local"],
            "CSRs/s",
        )
        _report(
            "  local issuer, from its CPU per CSR (one core)",
            r["cpu_capacity_csrs_per_s_per_core"],
            TARGETS["local"],
            "CSRs/s",
        )
    summary = results.get("local_summary")
    if summary:
        _report(
            "CSR signing, local issuer, best run",
            summary["best_csrs_per_s"],
            TARGETS["local"],
            "CSRs/s",
        )
        _report(
            "CSR signing, local issuer, median run",
            summary["median_csrs_per_s"],
            TARGETS["local"],
            "CSRs/s",
        )
    for r in results.get("vault", []):
        _report(
            f"CSR signing, Vault pki/sign, {r['threads']} threads",
            r["csrs_per_s"],
            TARGETS["vault"],
            "CSRs/s",
        )
    ren = results.get("renewals")
    if ren:
        print(
            f"{'renewals end to end (HTTPS, proof, log, applied)':55s} "
            f"{ren['renewals_per_s']:10.1f} /s        ({ren['headroom']:.0f}x what 10,000 "
            f"proxies with 24 h certificates need: {NEEDED_RENEWALS:.2f}/s)"
        )
    first = results.get("first_certificate")
    if first:
        _report(
            "first certificate, agent process spawn -> serving",
            first["median_spawn_to_serving_s"],
            TARGETS["first_cert_s"],
            "s",
            at_most=True,
        )
        print(
            f"{'  of which inside the agent (start -> certificate)':55s} "
            f"{first['median_inside_agent_s']:10.3f} s"
        )
    mem = results.get("agent_rss_mb")
    if mem and "steady_median" in mem:
        _report(
            "agent memory, resident (VmRSS, max over the run)",
            mem["max"],
            TARGETS["agent_rss_mb"],
            "MB",
            at_most=True,
        )
        print(f"{'  resident, steady state (median VmRSS)':55s} {mem['steady_median']:10.1f} MB")
        _report(
            "agent memory, peak through renewals (VmHWM)",
            mem["peak_vmhwm"],
            TARGETS["agent_rss_mb"],
            "MB",
            at_most=True,
        )
        if mem.get("cgroup"):
            print(
                f"{'  kernel charge, own cgroup (limit 30 MB): peak':55s} "
                f"{mem['cgroup_max_usage_mb']:10.2f} MB, OOM kills {mem['cgroup_oom_kills']}"
            )
    results["load_average"] = os.getloadavg()
    print(f"load average at the end: {results['load_average']} on {os.cpu_count()} CPUs")
    for part, la in loads.items():
        print(f"  load average after {part}: {la}")
    results["best"] = {
        k: max(r["csrs_per_s"] for r in results[k]) for k in ("local", "vault") if results.get(k)
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
