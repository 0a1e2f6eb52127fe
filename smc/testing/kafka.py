"""A real single-node Apache Kafka (KRaft) broker on 127.0.0.1, for tests and benchmarks.

Role: :func:`ensure_kafka_libs` fetches the broker's jars from Maven Central once (through
``deploy/kafka/pom.xml`` and ``mvn dependency:copy-dependencies``) into a cache outside the
repository; :class:`KafkaBroker` formats a KRaft storage directory in a temporary folder,
starts ``kafka.Kafka`` as a child process on free ports, waits until an AdminClient sees the
broker, and stops it (SIGTERM, then SIGKILL), also when the interpreter exits.
:func:`kafka_broker_fixture` is the generator a pytest fixture wraps.
Concurrency: a broker object is driven from one thread (start/stop/restart/kill9 block); the
jar cache is guarded by a file lock so several processes may fetch it at once.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from smc.errors import SMCError
from smc.testing.ports import free_port

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaHarnessError",
    "ensure_kafka_libs",
    "kafka_broker_fixture",
]

#: The Apache Kafka release the harness runs; keep in step with ``deploy/kafka/pom.xml``.
KAFKA_VERSION = "4.4.0"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_POM = _REPO_ROOT / "deploy" / "kafka" / "pom.xml"
_MARKER = ".smc-complete"


class KafkaHarnessError(SMCError):
    """The test broker could not be fetched, formatted, started or stopped."""


def _default_cache_dir() -> Path:
    env = os.environ.get("SMC_KAFKA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "smc" / f"kafka-{KAFKA_VERSION}" / "libs"


def ensure_kafka_libs(*, cache_dir: Path | None = None, pom: Path = _POM) -> Path:
    """Return a directory holding the broker's jars, fetching them with Maven if needed.

    The directory is ``$SMC_KAFKA_CACHE`` if set, else ``~/.cache/smc/kafka-<version>/libs``.
    It is reused while the pom is unchanged (a marker file holds the pom's hash).
    """
    libs = cache_dir if cache_dir is not None else _default_cache_dir()
    if not pom.is_file():
        raise KafkaHarnessError(f"{pom}: the Kafka broker pom is missing")
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    marker = libs / _MARKER
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == digest:
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    lock_path = libs.parent / f".{libs.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text(encoding="utf-8").strip() == digest:
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaHarnessError("mvn is not on PATH: it is needed to fetch the Kafka jars")
        staging = Path(tempfile.mkdtemp(prefix=f".{libs.name}-", dir=libs.parent))
        try:
            proc = subprocess.run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(pom),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={staging}",
                ],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if proc.returncode != 0:
                raise KafkaHarnessError(
                    f"mvn dependency:copy-dependencies failed (exit {proc.returncode}) "
                    f"for {pom}:\n{_head_and_tail(proc.stdout + proc.stderr)}"
                )
            if not any(staging.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
                raise KafkaHarnessError(
                    f"mvn ran but kafka_2.13-{KAFKA_VERSION}.jar is not in {staging}: "
                    f"is {pom} in step with KAFKA_VERSION?"
                )
            (staging / _MARKER).write_text(digest + "\n", encoding="utf-8")
            if libs.exists():
                shutil.rmtree(libs)
            staging.rename(libs)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return libs


def _new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            return cid


def _head_and_tail(text: str, *, limit: int = 2000) -> str:
    """Both ends of a tool's output: Java puts the exception first and the cause last."""
    if len(text) <= 2 * limit:
        return text
    return f"{text[:limit]}\n[...]\n{text[-limit:]}"


def _tail(path: Path, *, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no output)"


_LOG4J2 = """\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="{log}" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="INFO"/>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Root level="INFO">
      <AppenderRef ref="file"/>
    </Root>
  </Loggers>
</Configuration>
"""


class KafkaBroker:
    """One single-node KRaft broker (broker and controller in one JVM) on 127.0.0.1.

    Use as a context manager or call :meth:`start` / :meth:`stop`. :attr:`bootstrap` is
    ``"127.0.0.1:PORT"``. :meth:`restart` and :meth:`kill9` keep the data directory and ports,
    so acknowledged records survive them. :meth:`stop` also deletes the data directory unless
    ``keep_data`` is true.
    """

    def __init__(
        self,
        *,
        heap: str = "512m",
        startup_timeout: float = 90.0,
        stop_timeout: float = 30.0,
        keep_data: bool = False,
        libs_dir: Path | None = None,
        extra_properties: Mapping[str, str] | None = None,
        sasl_users: Mapping[str, str] | None = None,
    ) -> None:
        """``sasl_users`` (name -> password): the client listener takes SASL/SCRAM-SHA-512
        only, those users exist from the start, the StandardAuthorizer is on and ``admin``
        (which must be one of them) is the only super user: without an ACL nobody else may
        do anything."""
        if sasl_users is not None and "admin" not in sasl_users:
            raise KafkaHarnessError("sasl_users needs an 'admin' user (the super user)")
        self.sasl_users = dict(sasl_users) if sasl_users is not None else None
        self._heap = heap
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._keep_data = keep_data
        self._libs_dir = libs_dir
        self._extra = dict(extra_properties or {})
        self._workdir: Path | None = None
        self._port: int | None = None
        self._controller_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: Any = None
        self._classpath = ""
        #: Seconds the last start took (JVM launch to a broker visible in metadata).
        self.last_startup_seconds: float | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` of the PLAINTEXT listener."""
        if self._port is None:
            raise KafkaHarnessError("the broker has not been started")
        return f"127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        if self._port is None:
            raise KafkaHarnessError("the broker has not been started")
        return self._port

    @property
    def workdir(self) -> Path:
        """Temporary folder with ``server.properties``, ``data/`` and ``broker.log``."""
        if self._workdir is None:
            raise KafkaHarnessError("the broker has not been started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def client_config(self, user: str = "admin") -> dict[str, str]:
        """librdkafka settings to connect as ``user`` (empty without SASL)."""
        if self.sasl_users is None:
            return {}
        return {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user,
            "sasl.password": self.sasl_users[user],
        }

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> KafkaBroker:
        """Fetch jars if needed, format storage, start the broker and wait until it serves."""
        if self.is_running():
            raise KafkaHarnessError(f"the broker is already running at {self.bootstrap}")
        libs = ensure_kafka_libs(cache_dir=self._libs_dir)
        self._classpath = str(libs / "*")
        self._workdir = Path(tempfile.mkdtemp(prefix="smc-kafka-"))
        self._port = free_port()
        self._controller_port = free_port()
        while self._controller_port == self._port:
            self._controller_port = free_port()
        atexit.register(self._atexit)
        try:
            self._write_config()
            self._format()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``stop_timeout``); remove its data."""
        self._terminate()
        atexit.unregister(self._atexit)
        if self._workdir is not None and not self._keep_data:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def restart(self) -> None:
        """Stop the broker cleanly (if it runs) and start it again on the same data and ports."""
        if self._workdir is None:
            raise KafkaHarnessError("restart(): the broker has never been started")
        self._terminate()
        self._launch()

    def kill9(self) -> None:
        """Kill the broker with SIGKILL, as a crash would; :meth:`restart` brings it back."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise KafkaHarnessError("kill9(): the broker is not running")
        proc.kill()
        proc.wait()
        self._close_stdout()

    def create_topics(
        self,
        *,
        definitions: Mapping[str, Any] | None = None,
        definitions_path: str | Path | None = None,
    ) -> list[str]:
        """Create SMC's topics (or the given definitions) on this broker; see ``ensure_topics``."""
        from smc.events._kafka_topics import ensure_topics, load_definitions

        if definitions_path is not None:
            definitions = load_definitions(definitions_path)
        return ensure_topics(
            bootstrap=self.bootstrap,
            definitions=definitions,
            replication_factor=1,
            config=self.client_config(),
        )

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------

    def _write_config(self) -> None:
        wd = self.workdir
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self._controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self._port},CONTROLLER://127.0.0.1:{self._controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self._port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(wd / "data"),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After kill9() the controller keeps the dead incarnation registered until its
            # session expires (9 s by default); a short session lets restart() be quick.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.retention.hours": "-1",
        }
        if self.sasl_users is not None:
            admin = self.sasl_users["admin"]
            props.update(
                {
                    "listener.security.protocol.map": (
                        "CONTROLLER:PLAINTEXT,PLAINTEXT:SASL_PLAINTEXT"
                    ),
                    "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                    "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
                    "listener.name.plaintext.scram-sha-512.sasl.jaas.config": (
                        "org.apache.kafka.common.security.scram.ScramLoginModule required "
                        f'username="admin" password="{admin}";'
                    ),
                    "authorizer.class.name": (
                        "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
                    ),
                    # the controller listener (this JVM talking to itself) is PLAINTEXT
                    "super.users": "User:admin;User:ANONYMOUS",
                    "allow.everyone.if.no.acl.found": "false",
                }
            )
        props.update(self._extra)
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        (wd / "server.properties").write_text(text, encoding="utf-8")
        (wd / "log4j2.xml").write_text(_LOG4J2.format(log=wd / "broker.log"), encoding="utf-8")

    def _java(self) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaHarnessError("java is not on PATH: Kafka needs Java 17 or newer")
        wd = self.workdir
        return [
            java,
            f"-Xmx{self._heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={wd / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={wd}",
            "-cp",
            self._classpath,
        ]

    def _format(self) -> None:
        wd = self.workdir
        cmd = [
            *self._java(),
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            _new_cluster_id(),
            "--config",
            str(wd / "server.properties"),
            "--standalone",
        ]
        for user, password in (self.sasl_users or {}).items():
            cmd += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise KafkaHarnessError(
                f"kafka StorageTool format failed (exit {proc.returncode}) in {wd}:\n"
                f"{_head_and_tail(proc.stdout + proc.stderr)}"
            )

    def _launch(self) -> None:
        wd = self.workdir
        self._stdout = open(wd / "stdout.log", "ab")  # noqa: SIM115 - closed in _close_stdout
        began = time.monotonic()
        self._proc = subprocess.Popen(
            [*self._java(), "kafka.Kafka", str(wd / "server.properties")],
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=subprocess.STDOUT,
            cwd=wd,
            start_new_session=True,
        )
        try:
            self._wait_ready(began)
        except BaseException:
            self._terminate()
            raise
        self.last_startup_seconds = time.monotonic() - began

    def _wait_ready(self, began: float) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        deadline = began + self._startup_timeout
        proc = self._proc
        assert proc is not None
        # First the TCP listener (no librdkafka connection-refused noise), then metadata.
        while True:
            self._check_alive(proc)
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                break
            if time.monotonic() > deadline:
                raise self._startup_error("the PLAINTEXT listener never accepted connections")
            time.sleep(0.05)
        admin = AdminClient({"bootstrap.servers": self.bootstrap, **self.client_config()})
        last: str = "no answer"
        while True:
            self._check_alive(proc)
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
                last = "metadata lists no broker yet"
            except KafkaException as exc:
                last = str(exc.args[0])
            if time.monotonic() > deadline:
                raise self._startup_error(f"the broker never answered metadata requests ({last})")
            time.sleep(0.1)

    def _check_alive(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.poll()
        if code is not None:
            raise self._startup_error(f"the broker process exited with code {code}")

    def _startup_error(self, reason: str) -> KafkaHarnessError:
        wd = self.workdir
        return KafkaHarnessError(
            f"Kafka broker at {self.bootstrap} did not start "
            f"(startup timeout {self._startup_timeout:.0f}s): {reason}.\n"
            f"--- tail of {wd / 'broker.log'} ---\n{_tail(wd / 'broker.log')}\n"
            f"--- tail of {wd / 'stdout.log'} ---\n{_tail(wd / 'stdout.log')}"
        )

    def _terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_stdout()

    def _close_stdout(self) -> None:
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


def kafka_broker_fixture(*, create_topics: bool = True, **kwargs: Any) -> Iterator[KafkaBroker]:
    """Start a broker (with SMC's topics unless ``create_topics`` is false), yield it, stop it.

    Wrap it in a pytest fixture of the scope you need, e.g.::

        @pytest.fixture(scope="session")
        def kafka_broker() -> Iterator[KafkaBroker]:
            yield from kafka_broker_fixture()

    Keyword arguments go to :class:`KafkaBroker`.
    """
    broker = KafkaBroker(**kwargs)
    broker.start()
    try:
        if create_topics:
            broker.create_topics()
        yield broker
    finally:
        broker.stop()
