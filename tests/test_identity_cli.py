"""``smc serve`` options of per-proxy identities: agents mean ADS over mTLS and a certificate
service; plaintext ADS is only an explicit choice, and never with keys served on it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from smc.cli import cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload-keys", "agent"], "--ca-listen"),
        (["--xds-plaintext"], "plaintext ADS never carries keys"),
        (["--xds-plaintext", "--workload-keys", "control-plane"], "never carries keys"),
        (["--ca-listen", "nope", "--workload-keys", "agent"], "--ca-listen"),
        (["--ca-listen", "127.0.0.1:1", "--ca", "follow", "--keys", "k"], "cannot sign"),
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

    base = ["--node-id", "ns/p", "--ca-address", "127.0.0.1:1", "--sds-socket", str(tmp_path / "s")]
    with pytest.raises(SystemExit):  # argparse: one proof is required
        main([*base, "--ca-bundle", str(tmp_path / "ca.pem")])
    assert main([*base, "--ca-bundle", "env:SMC_NO_SUCH_VAR", "--token-file", "t"]) == 1
    assert main([*base, "--ca-bundle", str(tmp_path / "missing.pem"), "--token-file", "t"]) == 1
