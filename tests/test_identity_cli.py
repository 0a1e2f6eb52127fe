"""``smc serve`` options of per-proxy identities: agents mean ADS over mTLS and a certificate
service; plaintext ADS is only an explicit choice, with no key served on it; the control
plane's own keys (``--workload-keys control-plane``) were removed and are refused, whatever
flags are given, with an error naming the option and docs/identity.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from smc.cli import cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload-keys", "agent", "--ca-listen", "off"], "--ca-listen"),
        # the control plane's own keys were removed: refused whatever else is given, naming the
        # option and where to read why
        (["--workload-keys", "control-plane"], "--workload-keys"),
        (["--workload-keys", "control-plane"], "docs/identity.md"),
        (["--workload-keys", "control-plane", "--xds-tls"], "'control-plane' was removed"),
        (["--workload-keys", "control-plane", "--xds-plaintext"], "'control-plane' was removed"),
        (["--ca-listen", "nope", "--workload-keys", "agent"], "--ca-listen"),
        (
            ["--ca-listen", "127.0.0.1:1", "--ca", "follow", "--keys", "k", "--xds-plaintext"],
            "cannot sign",
        ),
        # a follower with agents serves ADS over mTLS too: it needs the issuer's certificate
        (["--ca", "follow", "--keys", "k"], "--xds-cert"),
    ],
)
def test_serve_refuses_unsafe_identity_options(
    tmp_path: Path, args: list[str], message: str
) -> None:
    res = CliRunner().invoke(
        cli, ["--log", f"sqlite:///{tmp_path / 'log.db'}", "serve", "--http", "off", *args]
    )
    assert res.exit_code != 0
    assert message in res.output, res.output


def test_agent_cli_refuses_a_missing_proof_and_an_unusable_bundle(tmp_path: Path) -> None:
    from smc.agent.__main__ import main

    base = ["--node-id", "ns/p", "--ca-address", "127.0.0.1:1", "--proxy-dir", str(tmp_path / "s")]
    with pytest.raises(SystemExit):  # argparse: one proof is required
        main([*base, "--ca-bundle", str(tmp_path / "ca.pem")])
    assert main([*base, "--ca-bundle", "env:SMC_NO_SUCH_VAR", "--token-file", "t"]) == 1
    assert main([*base, "--ca-bundle", str(tmp_path / "missing.pem"), "--token-file", "t"]) == 1


def test_certs_proxies_lists_each_proxys_certificates(tmp_path: Path) -> None:
    """issue, renew and revoke per proxy, as the log records them (never a key)."""
    import json
    from datetime import UTC, datetime, timedelta

    from smc.events import (
        ProxyCertificateIssued,
        ProxyCertificateRevoked,
        SqliteLog,
        deterministic_id,
        make_event,
    )

    now = datetime.now(UTC).replace(microsecond=0)
    sid = "spiffe://cluster.local/ns/shop/sa/web"

    def issued(proxy: str, serial: str, proof: str, previous: str = "") -> ProxyCertificateIssued:
        return make_event(
            ProxyCertificateIssued,
            source="test",
            actor="ca",
            event_id=deterministic_id("t", proxy, serial),
            proxy=proxy,
            serial=serial,
            previous_serial=previous,
            identity=sid,
            not_before=now,
            not_after=now + timedelta(hours=1),
            issuer="local",
            fingerprint="ab" * 32,
            proof=proof,
        )

    log = SqliteLog(tmp_path / "log.db")
    log.append(
        [
            issued("pod/shop/web-1", "01", "service-account-token"),
            issued("pod/shop/web-1", "02", "certificate:01", "01"),
            issued("pod/shop/web-2", "03", "service-account-token"),
            make_event(
                ProxyCertificateRevoked,
                source="test",
                actor="ca",
                event_id=deterministic_id("t", "revoke", "03"),
                proxy="pod/shop/web-2",
                serial="03",
                identity=sid,
                reason="pod-left",
            ),
        ]
    )
    log.close()
    run = CliRunner().invoke(
        cli, ["--log", f"sqlite:///{tmp_path / 'log.db'}", "certs", "proxies", "-o", "json"]
    )
    assert run.exit_code == 0, run.output
    rows = {r["serial"]: r for r in json.loads(run.output)}
    assert rows["01"]["status"] == "superseded" and rows["02"]["status"] == "active"
    assert rows["02"]["proof"] == "certificate" and rows["01"]["proof"] == "service-account-token"
    assert rows["03"]["status"] == "revoked" and rows["03"]["reason"] == "pod-left"
    assert {r["proxy"] for r in rows.values()} == {"pod/shop/web-1", "pod/shop/web-2"}
    current = CliRunner().invoke(
        cli,
        ["--log", f"sqlite:///{tmp_path / 'log.db'}", "certs", "proxies", "--current"],
    )
    assert (
        current.exit_code == 0 and "02" in current.output and "pod/shop/web-2" not in current.output
    )
