"""Metrics operators alert on, scraped from a real ``smc serve`` (SQLite log, local CA, ADS,
agents: the certificate figures come from a real VM agent's certificate), and
deploy/monitoring/ checked by a real promtool (built from the Prometheus Go module)."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smc.testing.promtool import ensure_promtool
from smc.testing.serve import ServeProcess, eventually

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
MESH = Path(__file__).resolve().parent / "data" / "smi" / "hybrid-mesh.yaml"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def _scrape(serve: ServeProcess) -> dict[str, float]:
    status, text = serve.request("/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in str(text).splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    s = ServeProcess(tmp_path_factory.mktemp("monitoring"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_series_exist_before_any_proxy_and_follow_the_log(serve: ServeProcess) -> None:
    before = _scrape(serve)
    # ADS per-type series at zero before the first stream: alerts have data to match
    for kind in ("sotw", "delta"):
        assert before[f'smc_xds_connected_proxies{{kind="{kind}"}}'] == 0
    for t in ("Listener", "Cluster", "RouteConfiguration", "ClusterLoadAssignment", "Secret"):
        assert before[f'smc_xds_nacks_total{{type="{t}"}}'] == 0
        assert f'smc_xds_pushes_total{{kind="sotw",type="{t}"}}' in before
    for reason in ("unavailable", "full", "corrupt", "other"):
        assert before[f'smc_log_append_errors_total{{reason="{reason}"}}'] == 0
    assert before["smc_log_caught_up"] == 1 and before["smc_log_available"] == 1
    assert before["smc_log_fatal"] == 0
    assert before["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in before
    status, body = serve.request("/v1/apply", method="POST", body=MESH.read_bytes())
    assert status == 200, body
    # a VM's agent (its key made here, the test being its host) gets its certificate
    home = Path(tempfile.mkdtemp(prefix="smc-vm-"))
    agent = serve.start_vm_agent(namespace="bookwarehouse", name="warehouse-vm-1", folder=home)
    agent.terminate()
    agent.wait(timeout=30)

    def settled() -> dict[str, float] | None:
        m = _scrape(serve)
        lags = [v for k, v in m.items() if k.startswith("smc_log_lag{")]
        reg = 'partition="0",stream="smc.registry"'
        if m.get(f"smc_log_end_offset{{{reg}}}", 0) < 5:  # the probe saw the apply
            return None
        return (
            m if m.get("smc_certificates_issued_total", 0) > 0 and lags and max(lags) == 0 else None
        )

    after = eventually(settled, what="certificates issued and lag 0", diag=serve.tail)
    reg = 'partition="0",stream="smc.registry"'
    assert after[f"smc_log_position{{{reg}}}"] == after[f"smc_log_end_offset{{{reg}}}"] > 0
    assert after["smc_log_append_seconds_count"] >= 1
    assert after["smc_log_applied_events"] > before["smc_log_applied_events"]
    # issued certificates live ~24 h by default: the earliest expiry is hours away
    assert 3600 < after["smc_certificate_earliest_expiry_seconds"] <= 48 * 3600
    assert after['smc_http_requests_total{method="POST",route="/v1/apply",status="200"}'] >= 1
    serve.request("/v1/nothing-here")
    serve.request("/v1/policy/check?from=bad")
    m = _scrape(serve)
    assert m['smc_http_requests_total{method="GET",route="unmatched",status="404"}'] >= 1
    assert m['smc_http_requests_total{method="GET",route="/v1/policy/check",status="400"}'] >= 1
    assert 'smc_http_request_duration_seconds_count{method="POST",route="/v1/apply"}' in m
    # no label value is a raw path or an identity
    assert not any("nothing-here" in k or "spiffe://" in k for k in m)


def test_dashboard_and_alerts_use_only_real_series(serve: ServeProcess) -> None:
    scraped = {k.split("{")[0] for k in _scrape(serve)}
    exprs = [
        t["expr"]
        for p in json.loads((MONITORING / "dashboard.json").read_text())["panels"]
        for t in p["targets"]
    ]
    exprs += re.findall(r"expr: (.+)", (MONITORING / "alerts.yaml").read_text())
    names = {n for e in exprs for n in re.findall(r"\b((?:smc|process)_[a-z0-9_]+)", e)}
    assert names, exprs
    missing = sorted(n for n in names if n not in scraped)
    assert not missing, f"series used by deploy/monitoring but not served: {missing}"


def test_promtool_checks_and_unit_tests_the_alert_rules(tmp_path: Path) -> None:
    promtool = ensure_promtool()
    check = subprocess.run(
        [str(promtool), "check", "rules", "alerts.yaml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 11 rules found" in check.stdout, check.stdout
    tests = subprocess.run(
        [str(promtool), "test", "rules", "alerts.test.yaml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    # the checker is real: a broken expression is refused
    bad = tmp_path / "bad-rules.yaml"
    bad.write_text("groups: [{name: x, rules: [{alert: X, expr: 'sum(rate(x[5m]) >'}]}]\n")
    refused = subprocess.run(
        [str(promtool), "check", "rules", str(bad)], capture_output=True, text=True
    )
    assert refused.returncode != 0
