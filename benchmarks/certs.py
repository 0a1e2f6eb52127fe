"""Benchmark: certificates per second for each issuer (LocalIssuer, VaultIssuer).

Role: issues N workload certificates with each issuer, sequentially and (for Vault)
with a few concurrent threads, prints certs/s against the targets (local >= 2,000/s,
Vault >= 250/s) and writes ``benchmarks/results/certs.json``. Starts its own OpenBao
dev server (``smc.testing.vault``) unless ``--vault-url``/``--vault-token`` are given.
Every figure counts the whole ``issue()`` call: workload key generation, CSR (Vault),
signing, PEM encoding of certificate and key.
Concurrency: one process; Vault runs use a thread pool sharing one keep-alive session.

Usage: python benchmarks/certs.py [--local-n 5000] [--vault-n 1000] [--threads 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smc.ca import Issuer, LocalIssuer, VaultIssuer, verify_certificate
from smc.testing.vault import OpenBaoServer, setup_pki

TD = "bench.local"
TARGETS = {"local": 2000.0, "vault": 250.0}
LIFETIME = timedelta(hours=24)


def _identities(n: int) -> list[str]:
    return [f"spiffe://{TD}/ns/ns{i % 50}/sa/sa{i}" for i in range(n)]


def _proc_cpu_s(pid: int | None) -> float:
    """utime + stime of another process (the OpenBao server), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run(issuer: Issuer, *, n: int, threads: int, server_pid: int | None = None) -> dict[str, Any]:
    ids = _identities(n)
    issuer.issue(identity=ids[0], lifetime=LIFETIME)  # warm up (connections, caches)
    cpu0, srv0 = time.process_time(), _proc_cpu_s(server_pid)
    start = time.perf_counter()
    if threads <= 1:
        certs = [issuer.issue(identity=i, lifetime=LIFETIME) for i in ids]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            certs = list(pool.map(lambda i: issuer.issue(identity=i, lifetime=LIFETIME), ids))
    elapsed = time.perf_counter() - start
    client_cpu, server_cpu = time.process_time() - cpu0, _proc_cpu_s(server_pid) - srv0
    bundle = issuer.trust_bundle()
    chain = certs[-1].chain_pem
    for c in certs[:: max(1, n // 20)]:  # spot-check: results really are valid
        verify_certificate(cert_pem=c.cert_pem, trust_bundle=bundle, intermediates_pem=chain)
    assert len({c.serial for c in certs}) == n
    rate = n / elapsed
    return {
        "n": n,
        "threads": threads,
        "seconds": round(elapsed, 4),
        "certs_per_s": round(rate, 1),
        "mean_latency_ms": round(elapsed / n * 1000 * max(1, threads), 3),
        # CPU per certificate: independent of other load on a shared machine
        "client_cpu_ms_per_cert": round(client_cpu / n * 1000, 4),
        "server_cpu_ms_per_cert": round(server_cpu / n * 1000, 4) if server_pid else None,
    }


def _report(issuer_kind: str, result: dict[str, Any]) -> None:
    target = TARGETS[issuer_kind]
    ratio = result["certs_per_s"] / target
    result["target_certs_per_s"] = target
    result["ratio_to_target"] = round(ratio, 2)
    verdict = "OK" if ratio >= 1 else "BELOW TARGET"
    cpu = f"client cpu {result['client_cpu_ms_per_cert']:.3f} ms/cert"
    if result["server_cpu_ms_per_cert"] is not None:
        cpu += f", server cpu {result['server_cpu_ms_per_cert']:.3f} ms/cert"
    print(
        f"{issuer_kind:6s} threads={result['threads']:<2d} n={result['n']:<6d}"
        f" {result['certs_per_s']:9.1f} certs/s  ({ratio:5.2f}x target {target:.0f}/s)"
        f" {verdict}  [{cpu}]"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local-n", type=int, default=5000)
    ap.add_argument("--vault-n", type=int, default=1000)
    ap.add_argument("--threads", default="1,4,8", help="thread counts for the Vault runs")
    ap.add_argument("--local-threads", default="1,2", help="thread counts for the local runs")
    ap.add_argument("--vault-url", default=os.environ.get("SMC_BENCH_VAULT_URL"))
    ap.add_argument("--vault-token", default=os.environ.get("SMC_BENCH_VAULT_TOKEN"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "certs.json"))
    args = ap.parse_args()

    results: dict[str, Any] = {
        "benchmark": "certs",
        "when": datetime.now(UTC).isoformat(),
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "lifetime_s": LIFETIME.total_seconds(),
        "local": [],
        "vault": [],
    }

    with tempfile.TemporaryDirectory() as tmp:
        local = LocalIssuer(directory=Path(tmp) / "ca", trust_domain=TD)
        for t in (int(x) for x in args.local_threads.split(",")):
            r = run(local, n=args.local_n, threads=t)
            _report("local", r)
            results["local"].append(r)

    server: OpenBaoServer | None = None
    try:
        if args.vault_url and args.vault_token:
            url, token = args.vault_url, args.vault_token
            import hvac

            pki = setup_pki(hvac.Client(url=url, token=token), mount="pki-bench", trust_domain=TD)
        else:
            server = OpenBaoServer().start()
            url, token = server.url, server.token
            pki = setup_pki(server.client(), mount="pki-bench", trust_domain=TD)
        threads = [int(x) for x in args.threads.split(",")]
        vault = VaultIssuer(
            url=url,
            token=token,
            mount=pki.mount,
            role=pki.role,
            trust_domain=TD,
            pool_size=max(threads) + 2,
        )
        pid = server.pid if server is not None else None
        for t in threads:
            r = run(vault, n=args.vault_n, threads=t, server_pid=pid)
            _report("vault", r)
            results["vault"].append(r)
        vault.close()
    finally:
        if server is not None:
            server.stop()

    results["load_average"] = os.getloadavg()
    results["best"] = {
        kind: max((r["certs_per_s"] for r in results[kind]), default=0.0) for kind in TARGETS
    }
    results["meets_targets"] = {kind: results["best"][kind] >= TARGETS[kind] for kind in TARGETS}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"best: local {results['best']['local']:.0f}/s, vault {results['best']['vault']:.0f}/s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
