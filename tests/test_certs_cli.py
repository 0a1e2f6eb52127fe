"""``smc certs list|show|rotate|revoke`` against a real SQLite log, a LocalIssuer in a tmp
dir and a real OpenBao dev server."""

from __future__ import annotations

import json
import os
import pwd
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from smc.ca import (
    IssuedCertificate,
    Issuer,
    KeyStore,
    LocalIssuer,
    VaultIssuer,
    certificate_event,
    serial_to_colon_hex,
)
from smc.cli import cli
from smc.events import (
    CertificateRenewed,
    CertificateRevoked,
    Event,
    MeshConfigChanged,
    Position,
    SqliteLog,
    default_codec,
    make_event,
)
from smc.projections import CertsProjection, ProjectionRunner
from smc.testing.vault import OpenBaoServer, PkiSetup, setup_pki

TD = "mesh.test"
CART = f"spiffe://{TD}/ns/shop/sa/cart"
WEB = f"spiffe://{TD}/ns/shop/sa/web"


def run(log: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        cli, ["--log", f"sqlite:///{log}", *args], env=env or {}, catch_exceptions=False
    )


def seed(path: Path, issuer: Issuer) -> dict[str, IssuedCertificate]:
    """A log with a mesh config and one certificate per identity, as the controller writes."""
    log = SqliteLog(path)
    try:
        out = {i: issuer.issue(identity=i, lifetime=timedelta(hours=1)) for i in (CART, WEB)}
        events: list[Event] = [
            make_event(
                MeshConfigChanged,
                source="test",
                actor="tester",
                permissive=False,
                trust_domain=TD,
                cert_lifetime_seconds=3600,
                settings={},
            ),
            *(certificate_event(c) for c in out.values()),
        ]
        log.append(events)
    finally:
        log.close()
    return out


def events_of(path: Path, cls: type[Event]) -> list[Any]:
    log = SqliteLog(path)
    try:
        codec = default_codec()
        return [
            e
            for r in log.read(start=Position(), max_records=10_000)
            if isinstance(e := codec.decode(r.value, where=r.where), cls)
        ]
    finally:
        log.close()


def certs_of(path: Path) -> CertsProjection:
    log = SqliteLog(path)
    try:
        certs = CertsProjection()
        ProjectionRunner(log=log, projections=[certs]).catch_up()
        return certs
    finally:
        log.close()


@pytest.fixture
def local(tmp_path: Path) -> tuple[Path, Path, dict[str, IssuedCertificate]]:
    ca_dir = tmp_path / "ca"
    path = tmp_path / "log.db"
    return path, ca_dir, seed(path, LocalIssuer(directory=ca_dir, trust_domain=TD))


def test_list_table_and_json(local: tuple[Path, Path, dict[str, IssuedCertificate]]) -> None:
    path, _, issued = local
    res = run(path, "certs", "list", "-o", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {(r["identity"], r["serial"], r["status"], r["issuer"]) for r in rows} == {
        (CART, issued[CART].serial, "active", "local"),
        (WEB, issued[WEB].serial, "active", "local"),
    }
    assert all(r["not_after"] and r["fingerprint"] for r in rows)
    res = run(path, "certs", "list")
    assert res.exit_code == 0
    assert (
        CART in res.output and issued[WEB].serial in res.output and "2 certificates" in res.output
    )


def test_show_by_identity_and_serial(
    local: tuple[Path, Path, dict[str, IssuedCertificate]],
) -> None:
    path, _, issued = local
    for arg in (CART, "shop/cart"):
        res = run(path, "certs", "show", arg, "-o", "json")
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        assert data["identity"] == CART and data["current"]["serial"] == issued[CART].serial
    res = run(path, "certs", "show", serial_to_colon_hex(issued[WEB].serial))
    assert res.exit_code == 0
    assert f"identity:    {WEB}" in res.output and issued[WEB].fingerprint in res.output
    res = run(path, "certs", "show", "shop/nobody")
    assert res.exit_code == 1 and "no certificate recorded for identity" in res.output
    res = run(path, "certs", "show", "abcdef")
    assert res.exit_code == 1 and "no certificate with serial abcdef" in res.output
    res = run(path, "certs", "show", "not-a-thing")
    assert res.exit_code == 1 and "neither an identity" in res.output


def test_rotate_with_local_issuer(
    tmp_path: Path, local: tuple[Path, Path, dict[str, IssuedCertificate]]
) -> None:
    path, ca_dir, issued = local
    keys = tmp_path / "keys"
    res = run(
        path,
        "certs",
        "rotate",
        "shop/cart",
        "--ca",
        f"local:{ca_dir}",
        "--keys",
        str(keys),
        "--as",
        "alice",
    )
    assert res.exit_code == 0, res.output
    (ren,) = events_of(path, CertificateRenewed)
    assert ren.previous_serial == issued[CART].serial and ren.identity == CART
    me = f"unix:{pwd.getpwuid(os.getuid()).pw_name}"  # the operator, who acted as alice
    assert ren.envelope.actor == f"{me} as alice" and ren.serial != issued[CART].serial
    certs = certs_of(path)
    assert certs.current[CART] == ren.serial
    assert certs.certs[CART][issued[CART].serial].status == "superseded"
    # the key went to the key directory (0600), where `smc serve` finds it
    key_file = keys / f"{ren.fingerprint}.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    store = KeyStore(directory=keys)
    assert store.sync({CART: ren.fingerprint}) == frozenset()
    assert store.get("shop/cart") is not None
    assert key_file.read_bytes().strip().decode() not in (path.read_bytes().decode("latin-1"))
    # list shows the history
    rows = json.loads(run(path, "certs", "list", "-o", "json").output)
    assert sorted(r["status"] for r in rows if r["identity"] == CART) == ["active", "superseded"]


def test_rotate_and_revoke_need_the_issuer(
    local: tuple[Path, Path, dict[str, IssuedCertificate]],
) -> None:
    path, ca_dir, issued = local
    res = run(path, "certs", "rotate", "shop/cart")
    assert res.exit_code == 1 and "needs the issuer" in res.output
    res = run(path, "certs", "revoke", issued[CART].serial)
    assert res.exit_code == 1 and "needs the issuer" in res.output
    res = run(path, "certs", "rotate", "shop/cart", "--ca", "local")
    assert res.exit_code == 1 and "expected local:DIR or vault:URL" in res.output
    res = run(path, "certs", "rotate", "shop/cart", "--ca", "vault:http://127.0.0.1:1")
    assert res.exit_code == 1 and "VAULT_TOKEN" in res.output
    res = run(path, "certs", "rotate", "shop/nobody", "--ca", f"local:{ca_dir}")
    assert res.exit_code == 1 and "has no current certificate" in res.output
    res = run(path, "certs", "revoke", "zz:top", "--ca", f"local:{ca_dir}")
    assert res.exit_code == 1 and "not hexadecimal" in res.output
    assert events_of(path, CertificateRenewed) == [] == events_of(path, CertificateRevoked)


def test_revoke_with_local_issuer(local: tuple[Path, Path, dict[str, IssuedCertificate]]) -> None:
    path, ca_dir, issued = local
    serial = issued[WEB].serial
    res = run(
        path,
        "certs",
        "revoke",
        serial_to_colon_hex(serial),
        "--reason",
        "key compromise",
        "--ca",
        f"local:{ca_dir}",
    )
    assert res.exit_code == 0, res.output
    (rev,) = events_of(path, CertificateRevoked)
    assert (rev.serial, rev.identity, rev.reason) == (serial, WEB, "key compromise")
    assert serial in LocalIssuer(directory=ca_dir, trust_domain=TD).revoked_serials()
    certs = certs_of(path)
    assert WEB not in certs.current and certs.certs[WEB][serial].status == "revoked"
    res = run(path, "certs", "revoke", serial, "--ca", f"local:{ca_dir}")
    assert res.exit_code == 0 and "already revoked" in res.output
    assert len(events_of(path, CertificateRevoked)) == 1
    rows = json.loads(run(path, "certs", "list", "-o", "json").output)
    assert {r["serial"]: r["status"] for r in rows}[serial] == "revoked"


def test_rotate_and_revoke_print_in_every_format(
    local: tuple[Path, Path, dict[str, IssuedCertificate]],
) -> None:
    path, ca_dir, issued = local
    res = run(path, "certs", "rotate", "shop/cart", "--ca", f"local:{ca_dir}", "-o", "json")
    assert res.exit_code == 0, res.output
    done = json.loads(res.stdout)  # the --keys note goes to stderr
    assert done["identity"] == CART and done["previousSerial"] == issued[CART].serial
    res = run(path, "certs", "rotate", "shop/cart", "--ca", f"local:{ca_dir}", "-o", "name")
    assert res.exit_code == 0 and res.output.splitlines()[0].startswith("certificate/")
    serial = issued[WEB].serial
    res = run(path, "certs", "revoke", serial, "--ca", f"local:{ca_dir}", "-o", "yaml")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output) == {
        "serial": serial, "identity": WEB, "reason": "revoked by operator", "alreadyRevoked": False,
    }  # fmt: skip
    again = run(path, "certs", "revoke", serial, "--ca", f"local:{ca_dir}", "-o", "json")
    assert json.loads(again.output)["alreadyRevoked"] is True
    assert run(path, "certs", "revoke", serial, "--ca", f"local:{ca_dir}", "-o", "name").output == (
        f"certificate/{serial}\n"
    )


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with OpenBaoServer() as server:
        yield server


@pytest.fixture(scope="module")
def pki(bao: OpenBaoServer) -> PkiSetup:
    return setup_pki(bao.client(), mount="pki", trust_domain=TD)


@pytest.mark.vault
def test_rotate_and_revoke_with_vault(tmp_path: Path, bao: OpenBaoServer, pki: PkiSetup) -> None:
    path = tmp_path / "log.db"
    vault = VaultIssuer(
        url=bao.url, token=bao.token, role=pki.role, mount=pki.mount, trust_domain=TD
    )
    issued = seed(path, vault)
    env = {"VAULT_TOKEN": bao.token}
    ca = ["--ca", f"vault:{bao.url}", "--vault-role", pki.role, "--vault-mount", pki.mount]
    res = run(path, "certs", "rotate", CART, *ca, "--keys", str(tmp_path / "keys"), env=env)
    assert res.exit_code == 0, res.output
    (ren,) = events_of(path, CertificateRenewed)
    assert ren.issuer == "vault" and ren.previous_serial == issued[CART].serial
    res = run(path, "certs", "revoke", ren.serial, "--reason", "test", *ca, env=env)
    assert res.exit_code == 0, res.output
    assert ren.serial in vault.revoked_serials()
    (rev,) = events_of(path, CertificateRevoked)
    assert rev.serial == ren.serial and rev.reason == "test"
    # the token file option works too, and the token never reaches the log
    token_file = tmp_path / "token"
    token_file.write_text(bao.token + "\n")
    res = run(
        path, "certs", "revoke", issued[WEB].serial, *ca, "--vault-token-file", str(token_file)
    )
    assert res.exit_code == 0, res.output
    assert issued[WEB].serial in vault.revoked_serials()
    assert bao.token.encode() not in path.read_bytes()
    # a certificate from another issuer is refused, not revoked in the wrong place
    other = tmp_path / "other.db"
    seed(other, LocalIssuer(directory=tmp_path / "ca", trust_domain=TD))
    serial = certs_of(other).current[CART]
    res = run(other, "certs", "revoke", serial, *ca, env=env)
    assert res.exit_code == 1 and "was issued by 'local'" in res.output
    vault.close()
