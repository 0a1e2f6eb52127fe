"""Kafka is a door too: a real broker with SASL/SCRAM and the StandardAuthorizer on.

The ACLs of ``deploy/kafka/set_acls.py`` let SMC's writer produce to and read ``smc.*``, an
integrator only read; the integrator's append, a client without credentials and one with a
wrong password are refused by Kafka itself. ``kafka://`` URL options carry the credentials (the
password from a file, never in the URL).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from smc.events import (
    LogError,
    Position,
    Record,
    ServicePort,
    ServiceUpserted,
    default_codec,
    make_event,
    open_log,
)
from smc.testing.kafka import KafkaBroker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KafkaBroker, Path]]:
    folder = tmp_path_factory.mktemp("kafka-acl")
    users = {u: secrets.token_urlsafe(16) for u in ("admin", "smc-writer", "integrator")}
    for user, password in users.items():
        (folder / f"{user}.password").write_text(password + "\n")
    broker = KafkaBroker(sasl_users=users)
    broker.start()
    try:
        broker.create_topics()
        admin = folder / "admin.properties"
        admin.write_text("".join(f"{k}={v}\n" for k, v in broker.client_config().items()))
        out = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "kafka" / "set_acls.py"),
             "--bootstrap", broker.bootstrap, "--command-config", str(admin),
             "--writer", "User:smc-writer", "--reader", "User:integrator"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        yield broker, folder
    finally:
        broker.stop()


def url(broker: KafkaBroker, folder: Path, user: str, password_file: str | None = None) -> str:
    pw = password_file or str(folder / f"{user}.password")
    return (
        f"kafka://{broker.bootstrap}?security_protocol=SASL_PLAINTEXT"
        f"&sasl_mechanism=SCRAM-SHA-512&sasl_username={user}&sasl_password_file={pw}"
    )


def ids(records: list[Record]) -> list[str]:
    codec = default_codec()
    return [codec.decode(r.value, where=r.where).envelope.event_id for r in records]


def service(name: str) -> ServiceUpserted:
    return make_event(
        ServiceUpserted,
        source="test",
        actor="test",
        namespace="acl",
        name=name,
        ports=(ServicePort(name="http", port=80, protocol="http", target_port=8080),),
        backing="vm",
        selector={},
    )


def test_writer_appends_integrator_reads_and_is_refused_by_kafka(
    secured: tuple[KafkaBroker, Path],
) -> None:
    broker, folder = secured
    writer = open_log(url(broker, folder, "smc-writer"))
    try:
        (done,) = writer.append([service("web")])
        assert done.stream == "smc.registry" and not done.duplicate
        # the log's URL opens it again and holds no secret
        assert "sasl_password_file" in writer.url
        assert (folder / "smc-writer.password").read_text().strip() not in writer.url
    finally:
        writer.close()
    reader = open_log(url(broker, folder, "integrator"))
    try:
        recs = reader.read(start=Position(), max_records=100, timeout=10)
        assert ids(recs) == [done.event_id]
        with pytest.raises(LogError) as refused:
            reader.append([service("forged")])
        assert "refused the append" in str(refused.value)
    finally:
        reader.close()
    # nothing of the integrator's reached the log
    again = open_log(url(broker, folder, "smc-writer"))
    try:
        recs = again.read(start=Position(), max_records=100, timeout=5)
        assert ids(recs) == [done.event_id]
    finally:
        again.close()


def test_a_refused_producer_fails_with_a_clear_error_during_the_flush_too(
    secured: tuple[KafkaBroker, Path],
) -> None:
    """The broker refuses the integrator's producer (its idempotent-write ACL) while the
    append already waits for acknowledgements: the append is refused with the cause, as when
    the refusal came first (confluent-kafka's long flush ended in SystemError here)."""
    broker, folder = secured
    for _ in range(3):
        log = open_log(url(broker, folder, "integrator"))
        try:
            with pytest.raises(LogError) as refused:
                log.append([service("forged-at-once")])
            assert "refused the append" in str(refused.value)
            assert "CLUSTER_AUTHORIZATION_FAILED" in str(refused.value)
        finally:
            log.close()
    again = open_log(url(broker, folder, "smc-writer"))
    try:
        names = [r.key for r in again.read(start=Position(), max_records=100, timeout=5)]
        assert "service/acl/forged-at-once" not in names
    finally:
        again.close()


def test_no_credentials_or_a_wrong_password_get_nothing(
    secured: tuple[KafkaBroker, Path], tmp_path: Path
) -> None:
    broker, folder = secured
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password")
    for target in (f"kafka://{broker.bootstrap}", url(broker, folder, "smc-writer", str(wrong))):
        log = open_log(target)
        try:
            log.timeout = 5.0
            with pytest.raises(LogError):
                log.append([service("intruder")])
            with pytest.raises(LogError):
                log.read(start=Position(), max_records=10, timeout=3)
        finally:
            log.close()


def test_url_options_are_checked(secured: tuple[KafkaBroker, Path], tmp_path: Path) -> None:
    broker, folder = secured
    with pytest.raises(LogError, match="sasl_password_file"):
        open_log(f"kafka://{broker.bootstrap}?sasl_username=x&sasl_password=secret")
    with pytest.raises(LogError, match="'sasl_user' is unknown"):
        open_log(f"kafka://{broker.bootstrap}?sasl_user=x")
    with pytest.raises(LogError, match="security_protocol"):
        open_log(f"kafka://{broker.bootstrap}?security_protocol=TLS9")
    # a client properties file works as well
    props = tmp_path / "client.properties"
    password = (folder / "integrator.password").read_text().strip()
    props.write_text(
        "# integrator\nsecurity.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\n"
        f"sasl.username=integrator\nsasl.password={password}\n"
    )
    log = open_log(f"kafka://{broker.bootstrap}?config={props}")
    try:
        assert log.read(start=Position(), max_records=100, timeout=10)
        assert password not in log.url
    finally:
        log.close()
