"""Pod networks for tests: Linux network namespaces on a bridge, where real iptables run.

Role: :class:`PodNetwork` makes what a node's CNI plugin would: a bridge in the root network
namespace (``smcbr<id>``, address ``10.X.Y.1/24``, the pods' gateway) and, per
:meth:`PodNetwork.add_pod`, a network namespace with loopback up, a veth ``eth0`` on the bridge
at ``10.X.Y.N/24`` and a default route through the gateway. A :class:`Pod` runs commands inside
its namespace (``ip netns exec``), optionally as another user and group (``setpriv``), which is
how a test runs a sidecar injector's init-container script (iptables rules, nat table) and the
proxy as its own UID, exactly as the pod spec says. Processes started here die with the test
process; namespaces and the bridge are removed on :meth:`PodNetwork.close` and at exit, and
stale ones left by a killed test process (their names carry its pid) on the next start.
Needs root, ``ip`` (iproute2) and ``iptables`` (installed from Debian when missing).

Concurrency: a network belongs to one thread; different test processes use distinct names and
subnets (picked at random among free ones).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smc.errors import SMCError
from smc.testing._apt import PackageError, ensure_commands
from smc.testing._proc import die_with_parent

__all__ = ["NetnsError", "Pod", "PodNetwork", "world_readable_copy"]

_PREFIX = "smcp"


class NetnsError(SMCError):
    """A network namespace, veth, bridge or command in one could not be set up."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale() -> None:
    """Remove namespaces, bridges and FORWARD rules of test processes that no longer run."""
    names = _run(["ip", "netns", "list"], check=False).stdout.split()
    links = _run(["ip", "-o", "link", "show", "type", "bridge"], check=False).stdout
    bridges = [line.split(":")[1].strip() for line in links.splitlines() if ":" in line]
    for name in names + bridges:
        base = name.removeprefix("smcbr") if name.startswith("smcbr") else None
        if base is None and name.startswith(_PREFIX):
            base = name.removeprefix(_PREFIX)
        if base is None:
            continue
        pid_text = base.split("x", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if name.startswith("smcbr"):
            rule = ["FORWARD", "-i", name, "-o", name, "-j", "ACCEPT"]
            _run(["iptables", "-D", *rule], check=False)
            _run(["ip", "link", "del", name], check=False)
        else:
            _run(["ip", "netns", "del", name], check=False)


def world_readable_copy(binary: Path, folder: Path) -> Path:
    """``binary`` copied into ``folder`` (made 0755) so a non-root UID can run it (the cache
    under ``/root`` is not reachable for other users)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    target = folder / binary.name
    if not target.exists():
        shutil.copy2(binary, target)
    target.chmod(0o755)
    return target


@dataclass(frozen=True, kw_only=True)
class Pod:
    """One pod's network namespace: its name, address and the gateway (the node)."""

    name: str
    netns: str
    address: str
    gateway: str
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False, compare=False)

    def argv(
        self, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None
    ) -> list[str]:
        """``argv`` as run inside the namespace (as ``uid``/``gid`` when given)."""
        inner = list(argv)
        if uid is not None or gid is not None:
            ids = []
            if uid is not None:
                ids += ["--reuid", str(uid)]
            if gid is not None:
                ids += ["--regid", str(gid)]
            inner = ["setpriv", *ids, "--clear-groups", "--", *inner]
        return ["ip", "netns", "exec", self.netns, *inner]

    def run(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        input: str | None = None,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace to completion; output captured, never raises for a
        non-zero exit (the caller checks ``returncode``)."""
        return subprocess.run(
            self.argv(argv, uid=uid, gid=gid),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
        )

    def start(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        uid: int | None = None,
        gid: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the namespace in the background (output to ``log``); it dies
        with the test process and is stopped by :meth:`PodNetwork.close`."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                die_with_parent(self.argv(argv, uid=uid, gid=gid)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        self._procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


class PodNetwork:
    """A bridge and pod network namespaces on it (see the module docstring)."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise NetnsError("pod networks need root (network namespaces, iptables)")
        try:
            ensure_commands({"ip": "iproute2", "iptables": "iptables", "setpriv": "util-linux"})
        except PackageError as exc:
            raise NetnsError(str(exc)) from exc
        _clean_stale()
        self._id = f"{os.getpid()}x{random.randrange(36**3):03x}"[:10]
        self.bridge = f"smcbr{self._id}"
        self.subnet = self._free_subnet()
        self.gateway = f"{self.subnet}.1"
        self.pods: dict[str, Pod] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="smc-pods-"))
        self.workdir.chmod(0o755)
        self._closed = False
        self._forward = False
        atexit.register(self.close)
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            # With br_netfilter, traffic between two pods crosses the root namespace's FORWARD
            # chain, whose policy is DROP where Docker runs: let our bridge's own traffic pass.
            _run(self._forward_rule("-I"))
            self._forward = True
        except NetnsError:
            self.close()
            raise

    def _forward_rule(self, op: str) -> list[str]:
        return ["iptables", op, "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]

    @staticmethod
    def _free_subnet() -> str:
        used = _run(["ip", "-4", "-o", "addr"], check=False).stdout
        routes = _run(["ip", "-4", "route"], check=False).stdout
        for _ in range(200):
            subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
            if f" {subnet}." not in used and f"{subnet}." not in routes:
                return subnet
        raise NetnsError("no free 10.x.y.0/24 subnet for the pod network")

    def add_pod(self, name: str) -> Pod:
        """A new pod namespace ``name`` with the next address on the bridge."""
        if name in self.pods:
            raise NetnsError(f"pod {name!r} exists")
        index = len(self.pods) + 2
        netns = f"{_PREFIX}{self._id}-{name}"[:40]
        host_if, pod_if = f"smh{self._id[-4:]}{index}", f"smp{self._id[-4:]}{index}"
        address = f"{self.subnet}.{index}"
        _run(["ip", "netns", "add", netns])
        pod = Pod(name=name, netns=netns, address=address, gateway=self.gateway)
        self.pods[name] = pod
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if])
        _run(["ip", "link", "set", pod_if, "netns", netns])
        _run(["ip", "link", "set", host_if, "master", self.bridge])
        _run(["ip", "link", "set", host_if, "up"])
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "set", pod_if, "name", "eth0"],
            ["ip", "addr", "add", f"{address}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "route", "add", "default", "via", self.gateway],
        ):
            _run(pod.argv(argv))
        return pod

    def add_address(self, index: int) -> str:
        """Give the node (the bridge) one more address ``<subnet>.<index>``, e.g. a caller
        outside the mesh with an address of its own; returns it (gone with the bridge)."""
        address = f"{self.subnet}.{index}"
        _run(["ip", "addr", "add", f"{address}/32", "dev", self.bridge])
        return address

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pod in self.pods.values():
            pod.stop_all()
            _run(["ip", "netns", "del", pod.netns], check=False)
        if self._forward:
            _run(self._forward_rule("-D"), check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.workdir)

    def __enter__(self) -> PodNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
