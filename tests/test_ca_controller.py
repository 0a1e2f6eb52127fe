"""The certificate controller and key store on a real SQLite log, a LocalIssuer in tmp
dirs and a real OpenBao dev server (``bao server -dev``) for the Vault cases."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smc.ca import (
    Backoff,
    CAStateError,
    CertificateController,
    IssueAction,
    IssuedCertificate,
    Issuer,
    KeyStore,
    LocalIssuer,
    RenewAction,
    RevokeAction,
    issuer_factory_from_options,
    issuer_from_options,
    plan_certificates,
    renewal_instant,
    retrying,
    verify_certificate,
)
from smc.events import (
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    Event,
    MeshConfigChanged,
    Position,
    ServiceAccountRemoved,
    ServiceAccountUpserted,
    SqliteLog,
    TrustBundleChanged,
    WorkloadJoined,
    default_codec,
    deterministic_id,
    make_event,
)
from smc.projections import CertRecord, CertsProjection, ProjectionRunner, all_projections
from smc.testing.vault import OpenBaoServer, PkiSetup, setup_pki

TD = "mesh.test"


def uri(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


# ---------------------------------------------------------------------- helpers
def sa_event(ns: str, name: str, *, removed: bool = False) -> Event:
    cls = ServiceAccountRemoved if removed else ServiceAccountUpserted
    return make_event(
        cls,
        source="test",
        actor="tester",
        event_id=deterministic_id("test", cls.TYPE, ns, name, str(os.urandom(4).hex())),
        namespace=ns,
        name=name,
    )


def mesh_event(lifetime: int, trust_domain: str = TD) -> Event:
    return make_event(
        MeshConfigChanged,
        source="test",
        actor="tester",
        permissive=False,
        trust_domain=trust_domain,
        cert_lifetime_seconds=lifetime,
        settings={},
    )


class RecordingIssuer:
    """A pass-through Issuer that keeps what the real inner issuer returned (for the
    key-bytes scan)."""

    def __init__(self, inner: Issuer) -> None:
        self.inner = inner
        self.issued: list[IssuedCertificate] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def issue(self, *, identity: Any, lifetime: timedelta) -> IssuedCertificate:
        cert = self.inner.issue(identity=identity, lifetime=lifetime)
        self.issued.append(cert)
        return cert

    def revoke(self, *, serial: str) -> None:
        self.inner.revoke(serial=serial)

    def revoked_serials(self) -> frozenset[str]:
        return self.inner.revoked_serials()

    def trust_bundle(self) -> list[str]:
        return self.inner.trust_bundle()


class Plane:
    """A control plane: a real SqliteLog, a running ProjectionRunner and the controller."""

    def __init__(self, path: Path, *, issuer: Any, keys: Path | None, **options: Any) -> None:
        self.log = SqliteLog(path)
        self.runner = ProjectionRunner(log=self.log, projections=all_projections())
        self.keystore = KeyStore(directory=keys)
        options.setdefault("trust_interval", 0.0)
        self.controller = CertificateController(
            runner=self.runner, log=self.log, issuer=issuer, keystore=self.keystore, **options
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Plane:
        self.task = asyncio.create_task(self.runner.run(stop=self.stop))
        await asyncio.wait_for(self.runner.caught_up.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)
        self.log.close()

    @property
    def certs(self) -> CertsProjection:
        return self.controller.certs

    async def append(self, *events: Event) -> None:
        self.log.append(list(events))
        await self.settle()

    async def settle(self) -> None:
        end = self.log.end_position()
        for _ in range(1000):
            if self.runner.position.covers(end):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("runner did not catch up")

    def events(self) -> list[Event]:
        codec = default_codec()
        return [
            codec.decode(r.value, where=r.where)
            for r in self.log.read(start=Position(), max_records=100_000)
        ]

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events() if isinstance(e, cls)]


@pytest.fixture
def local_ca(tmp_path: Path) -> LocalIssuer:
    return LocalIssuer(directory=tmp_path / "ca", trust_domain=TD)


# ---------------------------------------------------------------------- the pure plan
def _rec(
    identity: str, serial: str, nb: datetime, na: datetime, fp: str = "f", issuer: str = "local"
) -> CertRecord:
    return CertRecord(
        serial=serial, identity=identity, not_before=nb, not_after=na, issuer=issuer, fingerprint=fp
    )


def test_plan_is_a_pure_function_of_projections_and_now() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    life = timedelta(hours=24)
    current = {
        uri("shop", "keep"): _rec(uri("shop", "keep"), "01", t0, t0 + life, fp="k"),
        uri("shop", "gone"): _rec(uri("shop", "gone"), "02", t0, t0 + life, fp="g"),
        uri("shop", "nokey"): _rec(uri("shop", "nokey"), "03", t0, t0 + life, fp="n"),
        uri("shop", "other"): _rec(
            uri("shop", "other"), "04", t0, t0 + life, fp="o", issuer="vault"
        ),
    }
    kwargs: dict[str, Any] = {
        "identities": {"shop/keep", "shop/new", "shop/nokey", "shop/other", "Bad/NS"},
        "trust_domain": TD,
        "lifetime": life,
        "current": current,
        "held": {"k", "g", "o"},
        "issuer": "local",
    }
    plan = plan_certificates(now=t0 + timedelta(hours=1), **kwargs)
    assert plan == plan_certificates(now=t0 + timedelta(hours=1), **kwargs)  # deterministic
    assert set(plan.actions) == {
        IssueAction(identity=uri("shop", "new")),
        RenewAction(identity=uri("shop", "nokey"), previous_serial="03", reason="key-missing"),
        RenewAction(identity=uri("shop", "other"), previous_serial="04", reason="issuer-changed"),
        RevokeAction(identity=uri("shop", "gone"), serial="02"),
    }
    assert [s for s, _ in plan.skipped] == ["Bad/NS"]
    keep = current[uri("shop", "keep")]
    assert plan.next_due == renewal_instant(keep, lifetime=life)
    # renewal at 2/3 of the lifetime, +-5% jitter fixed by identity|serial
    due = renewal_instant(keep, lifetime=life)
    assert t0 + life * 0.6 < due < t0 + life * 0.72
    before = plan_certificates(now=due - timedelta(seconds=1), **kwargs)
    after = plan_certificates(now=due, **kwargs)
    assert (
        RenewAction(identity=keep.identity, previous_serial="01", reason="due")
        not in before.actions
    )
    assert RenewAction(identity=keep.identity, previous_serial="01", reason="due") in after.actions
    expired = plan_certificates(now=t0 + life, **kwargs)
    assert (
        RenewAction(identity=keep.identity, previous_serial="01", reason="expired")
        in expired.actions
    )
    # identities spread: different seeds give different instants
    instants = {
        renewal_instant(_rec(uri("ns", f"sa{i}"), "01", t0, t0 + life), lifetime=life)
        for i in range(20)
    }
    assert len(instants) == 20


def test_backdated_not_before_does_not_make_short_certs_due_at_once() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    # a 6 s certificate whose issuer back-dated not_before by 30 s
    rec = _rec(uri("a", "b"), "0a", now - timedelta(seconds=30), now + timedelta(seconds=6))
    due = renewal_instant(rec, lifetime=timedelta(seconds=6))
    assert now + timedelta(seconds=3.5) < due < now + timedelta(seconds=4.5)


# ---------------------------------------------------------------------- local issuer
async def test_new_service_account_gets_a_certificate(
    tmp_path: Path, local_ca: LocalIssuer
) -> None:
    async with Plane(tmp_path / "log.db", issuer=local_ca, keys=tmp_path / "keys") as p:
        await p.append(mesh_event(3600), sa_event("shop", "cart"))
        result = await p.controller.reconcile()
        assert (result.issued, result.renewed, result.revoked) == (1, 0, 0)
        issued = p.of(CertificateIssued)
        assert [e.identity for e in issued] == [uri("shop", "cart")]
        ev = issued[0]
        assert ev.event_id == deterministic_id("ca", ev.identity, ev.serial)
        assert ev.issuer == "local"
        cur = p.certs.current_cert(uri("shop", "cart"))
        assert cur is not None and cur.serial == ev.serial and cur.status == "active"
        assert (
            timedelta(seconds=3590) < cur.not_after - datetime.now(UTC) <= timedelta(seconds=3600)
        )
        # the trust bundle went on the log, PEM roots only
        (tb,) = p.of(TrustBundleChanged)
        assert list(tb.roots_pem) == local_ca.trust_bundle()
        # SDS accessor: by SPIFFE URI and by ns/sa
        material = p.keystore.get(uri("shop", "cart"))
        assert material is not None and material == p.keystore.get("shop/cart")
        cert_pem, chain_pem, key_pem = material
        assert "PRIVATE KEY" in key_pem and "PRIVATE KEY" not in repr(material)
        sid = verify_certificate(
            cert_pem=cert_pem,
            intermediates_pem=chain_pem,
            trust_bundle=p.keystore.trust_bundle(),
            trust_domain=TD,
        )
        assert sid.uri == uri("shop", "cart")
        # key file 0600 in a 0700 directory, named by fingerprint
        key_file = tmp_path / "keys" / f"{cur.fingerprint}.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
        # a workload's identity counts too; a second pass with nothing new does nothing
        await p.append(
            make_event(
                WorkloadJoined,
                source="test",
                actor="tester",
                kind="vm",
                namespace="shop",
                name="vm-1",
                address="10.0.0.7",
                service_account="billing",
                labels={},
                ports=(),
            )
        )
        result = await p.controller.reconcile()
        assert result.issued == 1 and p.certs.current_cert(uri("shop", "billing")) is not None
        result = await p.controller.reconcile()
        assert result.changed == 0 and not result.trust_changed


async def test_removed_identity_is_revoked(tmp_path: Path, local_ca: LocalIssuer) -> None:
    async with Plane(tmp_path / "log.db", issuer=local_ca, keys=tmp_path / "keys") as p:
        await p.append(mesh_event(3600), sa_event("shop", "cart"), sa_event("shop", "web"))
        await p.controller.reconcile()
        serial = p.certs.current[uri("shop", "cart")]
        fingerprint = p.certs.current_cert(uri("shop", "cart")).fingerprint  # type: ignore[union-attr]
        await p.append(sa_event("shop", "cart", removed=True))
        result = await p.controller.reconcile()
        assert result.revoked == 1 and result.issued == 0
        (rev,) = p.of(CertificateRevoked)
        assert (rev.identity, rev.serial, rev.reason) == (
            uri("shop", "cart"),
            serial,
            "identity-removed",
        )
        assert rev.event_id == deterministic_id("ca", "revoke", rev.identity, rev.serial)
        assert p.certs.certs[uri("shop", "cart")][serial].status == "revoked"
        assert uri("shop", "cart") not in p.certs.current
        assert serial in local_ca.revoked_serials()
        assert p.keystore.get(uri("shop", "cart")) is None
        assert not (tmp_path / "keys" / f"{fingerprint}.key").exists()  # pruned
        assert p.keystore.get(uri("shop", "web")) is not None


async def test_renewal_when_due_with_a_controllable_clock(
    tmp_path: Path, local_ca: LocalIssuer
) -> None:
    async with Plane(tmp_path / "log.db", issuer=local_ca, keys=tmp_path / "keys") as p:
        await p.append(mesh_event(6), sa_event("shop", "cart"))
        t0 = datetime.now(UTC)
        assert (await p.controller.reconcile(now=t0)).issued == 1
        first = p.certs.current_cert(uri("shop", "cart"))
        assert first is not None
        assert (await p.controller.reconcile(now=t0 + timedelta(seconds=1))).changed == 0
        due = renewal_instant(first, lifetime=timedelta(seconds=6))
        assert (await p.controller.reconcile(now=due - timedelta(milliseconds=200))).changed == 0
        result = await p.controller.reconcile(now=due)
        assert result.renewed == 1
        (ren,) = p.of(CertificateRenewed)
        assert ren.previous_serial == first.serial and ren.identity == first.identity
        second = p.certs.current_cert(uri("shop", "cart"))
        assert second is not None and second.serial == ren.serial != first.serial
        assert p.certs.certs[uri("shop", "cart")][first.serial].status == "superseded"
        material = p.keystore.get("shop/cart")
        assert material is not None
        assert second.fingerprint in p.keystore.current().values()


async def test_run_loop_renews_in_real_time_and_reacts_to_registry(
    tmp_path: Path, local_ca: LocalIssuer
) -> None:
    async with Plane(tmp_path / "log.db", issuer=local_ca, keys=tmp_path / "keys") as p:
        await p.append(mesh_event(6))
        task = asyncio.create_task(p.controller.run(stop=p.stop))
        await p.append(sa_event("shop", "cart"))
        for _ in range(300):
            if p.certs.current_cert(uri("shop", "cart")) is not None:
                break
            await asyncio.sleep(0.02)
        first = p.certs.current_cert(uri("shop", "cart"))
        assert first is not None, "the controller did not react to the new service account"
        for _ in range(500):
            cur = p.certs.current_cert(uri("shop", "cart"))
            if cur is not None and cur.serial != first.serial:
                break
            await asyncio.sleep(0.02)
        renewed = p.of(CertificateRenewed)
        assert renewed and renewed[0].previous_serial == first.serial
        # renewed around 2/3 of 6 s, not immediately and not after expiry
        assert first.not_after - timedelta(seconds=3) < renewed[0].envelope.occurred_at
        assert renewed[0].envelope.occurred_at < first.not_after
        p.stop.set()
        await asyncio.wait_for(task, 5)


async def test_restart_rebuilds_state_and_issues_nothing(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    async with Plane(
        tmp_path / "log.db",
        issuer=LocalIssuer(directory=tmp_path / "ca", trust_domain=TD),
        keys=keys,
    ) as p:
        await p.append(mesh_event(3600), *(sa_event("shop", f"sa{i}") for i in range(3)))
        assert (await p.controller.reconcile()).issued == 3
        digest = p.certs.digest()
        end = p.log.end_position()
        served = {i: p.keystore.get(i) for i in p.certs.current}
    # restart: a new log handle, runner, key store and issuer over the same files
    async with Plane(
        tmp_path / "log.db",
        issuer=LocalIssuer(directory=tmp_path / "ca", trust_domain=TD),
        keys=keys,
    ) as p2:
        assert p2.certs.digest() == digest
        result = await p2.controller.reconcile()
        assert result.changed == 0 and not result.trust_changed
        assert p2.log.end_position() == end  # nothing appended
        assert {i: p2.keystore.get(i) for i in p2.certs.current} == served
    # restart with the keys lost: each identity gets a fresh certificate (a renewal)
    async with Plane(
        tmp_path / "log.db",
        issuer=LocalIssuer(directory=tmp_path / "ca", trust_domain=TD),
        keys=tmp_path / "other-keys",
    ) as p3:
        result = await p3.controller.reconcile()
        assert (result.issued, result.renewed) == (0, 3)
        assert all(p3.keystore.get(i) is not None for i in p3.certs.current)
        assert len(p3.of(CertificateRenewed)) == 3


async def test_trust_bundle_follows_root_rotation(tmp_path: Path, local_ca: LocalIssuer) -> None:
    async with Plane(tmp_path / "log.db", issuer=local_ca, keys=None) as p:
        await p.append(mesh_event(3600), sa_event("shop", "cart"))
        await p.controller.reconcile()
        old = local_ca.active_root_serial
        local_ca.rotate_root()
        assert (await p.controller.reconcile()).trust_changed
        assert len(p.keystore.trust_bundle()) == 2 == len(p.certs.trust["local"])
        local_ca.retire_root(old)
        assert (await p.controller.reconcile()).trust_changed
        assert p.keystore.trust_bundle() == local_ca.trust_bundle()
        assert len(p.of(TrustBundleChanged)) == 3


def _key_secrets(cert: IssuedCertificate) -> list[bytes]:
    key = serialization.load_pem_private_key(cert.private_key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    body = "".join(
        ln for ln in cert.private_key_pem.splitlines() if ln and not ln.startswith("-----")
    )
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    raw = key.private_numbers().private_value.to_bytes(32, "big")
    return [body.encode(), body[:64].encode(), der, raw]


async def test_no_key_bytes_on_the_log(tmp_path: Path, local_ca: LocalIssuer) -> None:
    recording = RecordingIssuer(local_ca)
    async with Plane(tmp_path / "log.db", issuer=recording, keys=tmp_path / "keys") as p:
        await p.append(mesh_event(6), *(sa_event("ns", f"sa{i}") for i in range(4)))
        await p.controller.reconcile()
        await p.controller.reconcile(now=datetime.now(UTC) + timedelta(seconds=5))  # renew all
        await p.append(sa_event("ns", "sa0", removed=True))
        await p.controller.reconcile()
        assert len(recording.issued) == 8
        records = p.log.read(start=Position(), max_records=100_000)
        assert len(records) >= 8 + 1 + 6
        secrets = [s for c in recording.issued for s in _key_secrets(c)]
        for rec in records:
            for s in secrets:
                assert s not in rec.value, f"key material in {rec.where}"
        db = (tmp_path / "log.db").read_bytes()
        assert not any(s in db for s in secrets)
        # the scan does find key material where it is: the 0600 key files
        held = recording.issued[-1]
        key_file = (tmp_path / "keys" / f"{held.fingerprint}.key").read_bytes()
        assert _key_secrets(held)[0] in key_file.replace(b"\n", b"")


# ---------------------------------------------------------------------- issuer options
def test_issuer_options_are_checked_up_front(tmp_path: Path) -> None:
    with pytest.raises(CAStateError, match="expected local:DIR or vault:URL"):
        issuer_factory_from_options(ca="local")
    with pytest.raises(CAStateError, match="unknown kind 'kms'"):
        issuer_factory_from_options(ca="kms:foo")
    with pytest.raises(CAStateError, match="VAULT_TOKEN"):
        issuer_factory_from_options(ca="vault:http://127.0.0.1:1", env={})
    with pytest.raises(CAStateError, match="http:// or https://"):
        issuer_factory_from_options(ca="vault:127.0.0.1:8200", env={"VAULT_TOKEN": "x"})
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(CAStateError, match="file is empty"):
        issuer_factory_from_options(ca="vault:http://127.0.0.1:1", vault_token_file=str(empty))
    issuer = issuer_from_options(ca=f"local:{tmp_path / 'ca'}", trust_domain=TD)
    assert issuer.name == "local"
    assert issuer.issue(identity=uri("a", "b"), lifetime=timedelta(minutes=5)).identity == uri(
        "a", "b"
    )


async def test_issuer_factory_follows_the_mesh_trust_domain(tmp_path: Path) -> None:
    factory = issuer_factory_from_options(ca=f"local:{tmp_path / 'ca'}")
    async with Plane(tmp_path / "log.db", issuer=factory, keys=None) as p:
        await p.append(mesh_event(3600, trust_domain="one.test"), sa_event("shop", "cart"))
        await p.controller.reconcile()
        assert list(p.certs.current) == ["spiffe://one.test/ns/shop/sa/cart"]
        await p.append(mesh_event(3600, trust_domain="two.test"))
        result = await p.controller.reconcile()
        assert (result.issued, result.revoked) == (1, 1)
        assert list(p.certs.current) == ["spiffe://two.test/ns/shop/sa/cart"]


# ---------------------------------------------------------------------- Vault (OpenBao)
@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with OpenBaoServer() as server:
        yield server


@pytest.fixture(scope="module")
def pki(bao: OpenBaoServer) -> PkiSetup:
    return setup_pki(bao.client(), mount="pki", trust_domain=TD)


@pytest.mark.vault
async def test_vault_issue_renew_revoke(tmp_path: Path, bao: OpenBaoServer, pki: PkiSetup) -> None:
    factory = issuer_factory_from_options(
        ca=f"vault:{bao.url}",
        vault_role=pki.role,
        vault_mount=pki.mount,
        env={"VAULT_TOKEN": bao.token},
    )
    recording = RecordingIssuer(factory(TD))
    async with Plane(tmp_path / "log.db", issuer=recording, keys=tmp_path / "keys") as p:
        await p.append(mesh_event(600), sa_event("shop", "cart"), sa_event("shop", "web"))
        assert (await p.controller.reconcile()).issued == 2
        assert all(e.issuer == "vault" for e in p.of(CertificateIssued))
        cert_pem, chain_pem, _ = p.keystore.get("shop/cart")  # type: ignore[misc]
        sid = verify_certificate(
            cert_pem=cert_pem, intermediates_pem=chain_pem, trust_bundle=p.keystore.trust_bundle()
        )
        assert sid.uri == uri("shop", "cart")
        (root,) = p.keystore.trust_bundle()
        assert x509.load_pem_x509_certificate(root.encode()) == x509.load_pem_x509_certificate(
            pki.root_pem.encode()
        )
        result = await p.controller.reconcile(now=datetime.now(UTC) + timedelta(seconds=500))
        assert result.renewed == 2
        await p.append(sa_event("shop", "cart", removed=True))
        assert (await p.controller.reconcile()).revoked == 1
        (rev,) = p.of(CertificateRevoked)
        assert rev.serial in recording.revoked_serials()
        records = p.log.read(start=Position(), max_records=100_000)
        secrets = [s for c in recording.issued for s in _key_secrets(c)]
        assert len(recording.issued) == 4
        assert not any(s in r.value for r in records for s in secrets)
        assert bao.token.encode() not in (tmp_path / "log.db").read_bytes()


@pytest.mark.vault
async def test_vault_down_keeps_certs_and_recovers(
    tmp_path: Path, bao: OpenBaoServer, pki: PkiSetup
) -> None:
    fast = Backoff(attempts=2, initial=0.05, maximum=0.1, deadline=1.0)
    factory = issuer_factory_from_options(
        ca=f"vault:{bao.url}",
        vault_role=pki.role,
        vault_mount=pki.mount,
        env={"VAULT_TOKEN": bao.token},
        backoff=fast,
    )
    async with Plane(
        tmp_path / "log.db",
        issuer=factory,
        keys=tmp_path / "keys",
        retry_initial=0.2,
        retry_max=0.5,
    ) as p:
        await p.append(mesh_event(600), sa_event("shop", "cart"))
        task = asyncio.create_task(p.controller.run(stop=p.stop))
        for _ in range(500):
            if p.keystore.get("shop/cart") is not None:
                break
            await asyncio.sleep(0.02)
        served = p.keystore.get("shop/cart")
        assert served is not None
        bao.seal()
        try:
            await p.append(sa_event("shop", "web"))
            for _ in range(500):
                if p.controller.last_error is not None:
                    break
                await asyncio.sleep(0.02)
            assert p.controller.last_error is not None and "unavailable" in p.controller.last_error
            await asyncio.sleep(1.0)  # a few failed passes
            assert not task.done(), "the controller crashed while Vault was down"
            assert p.keystore.get("shop/cart") == served  # existing cert kept
            assert p.certs.current_cert(uri("shop", "web")) is None
        finally:
            bao.unseal()
        for _ in range(500):
            if p.keystore.get("shop/web") is not None and p.controller.last_error is None:
                break
            await asyncio.sleep(0.02)
        assert p.keystore.get("shop/web") is not None, "no recovery after Vault came back"
        assert p.controller.last_error is None
        assert p.keystore.get("shop/cart") == served
        p.stop.set()
        await asyncio.wait_for(task, 5)


async def test_unreachable_issuer_never_crashes_the_loop(tmp_path: Path) -> None:
    from smc.testing.ports import free_port

    dead = issuer_factory_from_options(
        ca=f"vault:http://127.0.0.1:{free_port()}",
        env={"VAULT_TOKEN": "t"},
        backoff=Backoff(attempts=2, initial=0.01, maximum=0.02, deadline=0.5),
    )
    async with Plane(
        tmp_path / "log.db", issuer=dead, keys=None, retry_initial=0.05, retry_max=0.1
    ) as p:
        await p.append(mesh_event(600), sa_event("shop", "cart"))
        task = asyncio.create_task(p.controller.run(stop=p.stop))
        await asyncio.sleep(1.0)
        assert not task.done()
        assert p.controller.passes >= 3  # retried with backoff
        assert p.controller.last_error is not None and "cannot connect" in p.controller.last_error
        assert p.of(CertificateIssued) == []
        p.stop.set()
        await asyncio.wait_for(task, 5)


def test_retrying_wrapper_is_what_options_build(tmp_path: Path) -> None:
    issuer = issuer_from_options(ca=f"local:{tmp_path / 'ca'}", trust_domain=TD)
    assert type(issuer) is type(retrying(LocalIssuer(directory=tmp_path / "ca2", trust_domain=TD)))


async def test_run_ca_as_serve_calls_it(tmp_path: Path) -> None:
    """The entry point ``smc serve`` uses: a runner task plus ``run_ca`` on one loop, the
    SDS accessor and its change notifications."""
    from smc.ca import run_ca

    log = SqliteLog(tmp_path / "log.db")
    runner = ProjectionRunner(log=log, projections=all_projections())
    keystore = KeyStore(directory=tmp_path / "keys")
    heard: list[tuple[frozenset[str], bool]] = []
    keystore.add_listener(lambda ids, trust: heard.append((ids, trust)))
    stop = asyncio.Event()
    factory = issuer_factory_from_options(ca=f"local:{tmp_path / 'ca'}")
    tasks = [
        asyncio.create_task(runner.run(stop=stop)),
        asyncio.create_task(
            run_ca(runner=runner, log=log, issuer=factory, keystore=keystore, stop=stop)
        ),
    ]
    try:
        log.append([mesh_event(3600), sa_event("shop", "cart")])
        for _ in range(500):
            if keystore.get("shop/cart") is not None:
                break
            await asyncio.sleep(0.02)
        assert keystore.get("shop/cart") is not None
        assert keystore.trust_bundle()
        assert (frozenset({uri("shop", "cart")}), False) in heard
        assert (frozenset(), True) in heard
        log.append([sa_event("shop", "cart", removed=True)])
        for _ in range(500):
            if keystore.get("shop/cart") is None:
                break
            await asyncio.sleep(0.02)
        assert keystore.get("shop/cart") is None
        assert heard[-1] == (frozenset({uri("shop", "cart")}), False)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        log.close()
