"""``smc serve`` as a child process, for end-to-end tests against real parts.

Role: :class:`ServeProcess` starts ``python -m smc.cli serve`` on a SQLite log in a work
folder (or ``log_url``) with the HTTPS API on 127.0.0.1 and, unless told otherwise, a local
CA and ADS on ``xds_host`` (free ports), plus any extra arguments (``--kube KUBECONFIG``,
...). Workload keys are made by agents (serve's only mode; the control plane never makes one):
ADS is cleartext unless ``args`` asks for ``--xds-tls`` (no key is on it), and the certificate
service listens on :attr:`ServeProcess.ca_port`. Output goes to ``serve-<http port>.log`` for diagnostics. Its SMC config folder
(``$SMC_CONFIG_DIR``) is ``<work folder>/smc-config``, where serve writes the admin credential
file; :attr:`ServeProcess.credentials` reads it (the server's CA and the admin token), and
:meth:`ServeProcess.env` is the environment a CLI child needs to find it. :func:`http_json`
(optionally with those credentials) and :func:`eventually` are the small request and polling
helpers those tests share.

Concurrency: used from one thread; the child dies with the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smc.auth import ClientCredentials, server_dir
from smc.testing._proc import die_with_parent
from smc.testing.ports import free_port

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "ServeProcess",
    "admin_credentials",
    "admin_session",
    "eventually",
    "http_json",
    "start_vm_agent",
]


def admin_credentials(
    config_dir: Path, port: int, *, host: str = "127.0.0.1", wait: float = 60.0
) -> ClientCredentials:
    """The admin credentials a ``smc serve --http HOST:PORT`` run with
    ``SMC_CONFIG_DIR=config_dir`` wrote (waits up to ``wait`` seconds for the file)."""
    path = server_dir(host, port, root=config_dir) / "credentials.json"
    deadline = time.monotonic() + wait
    while not path.is_file():
        if time.monotonic() > deadline:
            raise AssertionError(f"no credentials at {path} after {wait}s")
        time.sleep(0.05)
    return ClientCredentials.load(path)


async def admin_session(config_dir: Path, port: int, **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session to that server as its local admin (verifies the server's
    certificate, carries the admin token); ``kwargs`` go to the session."""
    import asyncio

    import aiohttp

    creds = await asyncio.to_thread(admin_credentials, config_dir, port)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=creds.ssl_context()),
        headers=creds.headers(),
        **kwargs,
    )


def http_json(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    creds: ClientCredentials | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """One blocking request: the status and the body (parsed JSON when it is JSON, else
    text); an HTTP error status is returned, not raised. ``creds`` verify the server and
    authenticate (its token); ``context`` alone only verifies the server (or presents a
    client certificate)."""
    all_headers = {**(creds.headers() if creds is not None else {}), **dict(headers or {})}
    if context is None and creds is not None:
        context = creds.ssl_context()
    req = urllib.request.Request(url, data=body, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            raw, status = resp.read(), int(resp.status)
    except urllib.error.HTTPError as err:
        raw, status = err.read(), int(err.code)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def eventually(
    check: Callable[[], Any], *, what: str, diag: Callable[[], str], wait: float = 20.0
) -> Any:
    """Poll ``check`` until it returns something truthy (at most ``wait`` seconds); raises
    AssertionError naming ``what``, the last result and ``diag()``."""
    deadline = time.monotonic() + wait
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {wait}s waiting for {what} (last: {last!r})\n{diag()}"
            )
        time.sleep(0.1)


def start_vm_agent(
    *,
    log_url: str,
    env: Mapping[str, str],
    ads: str,
    ca_address: str,
    namespace: str,
    name: str,
    folder: Path,
    timeout: float = 60.0,
) -> subprocess.Popen[bytes]:
    """The test as a VM's host: ``smc vm bootstrap`` for VirtualMachine ``namespace/name`` on
    the log ``log_url`` (a one-time join token on the log, the mesh roots) into ``folder``,
    then that VM's SMC agent (``python -m smc.agent``: its key made here, a CSR to the
    certificate service at ``ca_address``); returns the agent once it holds its first
    certificate (``folder/ready.json``; ``smc.agent._files.read_secret(folder)`` is its
    chain and key, ``folder`` the working directory of its Envoy). Stop it with
    ``terminate()``."""
    done = subprocess.run(
        [
            sys.executable, "-m", "smc.cli", "--log", log_url, "vm", "bootstrap", name,
            "-n", namespace, "--out", str(folder), "--ads", ads, "--ca-address", ca_address,
        ],
        capture_output=True, text=True, timeout=60, check=False, env=dict(env),
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"smc vm bootstrap failed: {done.stderr}")
    ready = folder / "ready.json"
    with (folder / "agent.log").open("wb") as out:
        agent = subprocess.Popen(
            die_with_parent(
                [
                    sys.executable, "-m", "smc.agent", "--node-id", f"{namespace}/{name}",
                    "--ca-address", ca_address,
                    "--ca-bundle", str(folder / "ca.pem"), "--proxy-dir", str(folder),
                    "--join-token-file", str(folder / "join-token"),
                    "--ready-file", str(ready), "--retry-initial", "0.1",
                ]
            ),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if agent.poll() is not None or time.monotonic() > deadline:
            agent.kill()
            raise AssertionError(
                "the agent got no certificate:\n"
                + (folder / "agent.log").read_text(errors="replace")[-3000:]
            )
        time.sleep(0.05)
    return agent


class ServeProcess:
    """``smc serve`` as a subprocess (see the module docstring)."""

    def __init__(
        self,
        tmp: Path,
        *,
        args: Sequence[str] = (),
        xds_host: str | None = "127.0.0.1",
        log_url: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``xds_host`` None: no ``--xds``/``--ca``/``--keys`` of its own (``args`` says; without
        an ``--xds`` there, ``--xds off``: serve's default port 15010 is not free for sure)."""
        self.http_port = free_port()
        self.log_url = log_url or f"sqlite:///{tmp / 'log.db'}"
        self.xds_port = free_port()
        self.ca_port = free_port()  # the certificate service agents send CSRs to
        self.xds_host = xds_host
        self.base = f"https://127.0.0.1:{self.http_port}"
        self.out = tmp / f"serve-{self.http_port}.log"
        self.config_dir = tmp / "smc-config"
        self._creds: ClientCredentials | None = None
        self._ctx: ssl.SSLContext | None = None
        own = (
            ([] if "--xds" in args else ["--xds", "off"])
            if xds_host is None
            else [
                "--xds",
                f"{xds_host}:{self.xds_port}",
                "--ca",
                f"local:{tmp / 'ca'}",
                "--keys",
                str(tmp / "keys"),
            ]
        )
        # serve's only mode, agents (the control plane makes no workload key). Its ADS is
        # cleartext unless the test asks for TLS (``--xds-tls``; no key travels on it: raw ADS
        # clients and Envoys whose key the test or a real agent makes, the test being their
        # host); the certificate service on a free port of its own
        mode: list[str] = []
        given = list(args)
        xds_on = (
            given[given.index("--xds") + 1] != "off" if "--xds" in given else xds_host is not None
        )
        if xds_on:
            if "--xds-tls" not in args and "--workload-keys" not in args:
                mode.append("--xds-plaintext")
            if "--ca-listen" not in args and "follow" not in args:  # a follower cannot sign
                mode += ["--ca-listen", f"{xds_host or '127.0.0.1'}:{self.ca_port}"]
        argv = [
            sys.executable,
            "-m",
            "smc.cli",
            "--log",
            self.log_url,
            "serve",
            "--http",
            f"127.0.0.1:{self.http_port}",
            *own,
            *mode,
            *args,
        ]
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                die_with_parent(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env(), **dict(env or {})},
            )

    def env(self) -> dict[str, str]:
        """The environment of a child (``smc`` CLI) that should find this server's
        credentials: ``SMC_CONFIG_DIR`` is this server's config folder."""
        return {**os.environ, "SMC_CONFIG_DIR": str(self.config_dir)}

    @property
    def credentials_path(self) -> Path:
        return server_dir("127.0.0.1", self.http_port, root=self.config_dir) / "credentials.json"

    @property
    def credentials(self) -> ClientCredentials:
        """The admin credentials serve wrote (its CA and admin token); waits for the file."""
        if self._creds is None:
            deadline = time.monotonic() + 60.0
            while not self.credentials_path.is_file():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"serve wrote no credentials:\n{self.tail()}")
                time.sleep(0.05)
            self._creds = ClientCredentials.load(self.credentials_path)
        return self._creds

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """:func:`http_json` on ``base + path`` as the local admin."""
        creds = self.credentials
        if self._ctx is None:
            self._ctx = creds.ssl_context()  # made once: loading the CA costs milliseconds
        return http_json(
            self.base + path,
            method=method,
            body=body,
            headers={**creds.headers(), **dict(headers or {})},
            timeout=timeout,
            context=self._ctx,
        )

    def tail(self, n: int | None = 4000) -> str:
        """The last ``n`` characters of its output (all of it with None)."""
        text = self.out.read_text(errors="replace")
        return text if n is None else text[-n:]

    def grant(
        self,
        name: str,
        subjects: Sequence[str],
        verbs: Sequence[str] = ("*",),
        *,
        resources: Sequence[str] = ("*",),
        namespaces: Sequence[str] = ("*",),
    ) -> None:
        """Record an AccessGrant as the local admin (``PUT /v1/grants/NAME``)."""
        doc = {
            "apiVersion": "smc.dev/v1alpha1",
            "kind": "AccessGrant",
            "metadata": {"name": name},
            "spec": {
                "subjects": list(subjects),
                "verbs": list(verbs),
                "resources": list(resources),
                "namespaces": list(namespaces),
            },
        }
        status, body = self.request(
            f"/v1/grants/{name}", method="PUT", body=json.dumps(doc).encode()
        )
        if status != 200:
            raise AssertionError(f"grant {name}: HTTP {status}: {body}")

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError, AssertionError):
                if self.request("/readyz")[0] == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"serve not ready in {timeout:.0f}s:\n{self.tail()}")

    def dump(self, node: str) -> dict[str, Any] | None:
        """The control plane's snapshot of ``node`` (``/debug/config_dump``), None if none."""
        status, body = self.request(f"/debug/config_dump?node={node}")
        return body if status == 200 and isinstance(body, dict) else None

    def start_vm_agent(
        self, *, namespace: str, name: str, folder: Path, timeout: float = 60.0
    ) -> subprocess.Popen[bytes]:
        """The test as a VM's host: :func:`start_vm_agent` against this serve (its log, its
        ADS port and its certificate service). Stop it with ``terminate()``."""
        return start_vm_agent(
            log_url=self.log_url,
            env=self.env(),
            ads=f"127.0.0.1:{self.xds_port}",
            ca_address=f"127.0.0.1:{self.ca_port}",
            namespace=namespace,
            name=name,
            folder=folder,
            timeout=timeout,
        )

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed after 20 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
