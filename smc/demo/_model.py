"""The demo's data: its options (:class:`DemoOptions`, :func:`parse_split`), the five workloads
(:data:`WORKLOADS`), the point-in-time view for the screen (:class:`DemoStatus`), what a
start has brought up so far (``_Started``) and the fixed names and ports of the bookstore mesh.

Concurrency: immutable values (``_Started`` is mutated only by its demo, on its loop).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from smc.demo._apps import BookApp, Flow
from smc.demo._errors import DemoError
from smc.testing.mesh import Sidecar

#: The demo's manifests (a string.Template; see the file's header).
DEFAULT_MANIFESTS = Path(__file__).resolve().parent / "bookstore.yaml"
ACTOR = "demo"
SERVICE_PORT = 14001
STORE_HOST = "bookstore.bookstore"
WAREHOUSE_HOST = "bookwarehouse.bookwarehouse"


def parse_split(text: str) -> tuple[int, int]:
    """``"90/10"`` -> ``(90, 10)``: two non-negative integer weights, not both zero."""
    left, sep, right = text.strip().partition("/")
    if not sep or not left.strip().isdigit() or not right.strip().isdigit():
        raise DemoError(f"--split {text!r}: expected V1/V2 weights such as 90/10 or 50/50")
    v1, v2 = int(left), int(right)
    if v1 + v2 == 0:
        raise DemoError(f"--split {text!r}: the weights must not both be 0")
    return v1, v2


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoOptions:
    """What to run: where, on which log and addresses, which split and request rates."""

    workdir: Path
    log_url: str | None = None  # None: a fresh SQLite log in ``workdir``
    net: str = "127.0.1"
    split: tuple[int, int] = (90, 10)
    buyer_rate: float = 20.0
    thief_rate: float = 10.0
    restock_rate: float = 2.0
    delta: bool = False
    manifests: Path = DEFAULT_MANIFESTS
    ready_timeout: float = 60.0
    #: Where the web console (and the API behind it) listens; None: no console.
    console: tuple[str, int] | None = ("127.0.0.1", 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Workload:
    namespace: str
    name: str
    role: str
    octet: int
    version: str = ""
    kind: str = "pod"  # or "vm"

    @property
    def service_account(self) -> str:
        return self.role

    @property
    def label(self) -> str:
        return self.name.removesuffix("-1").removesuffix("-vm")


WORKLOADS = (
    _Workload(namespace="bookbuyer", name="bookbuyer-1", role="bookbuyer", octet=1),
    _Workload(namespace="bookthief", name="bookthief-1", role="bookthief", octet=2),
    _Workload(
        namespace="bookstore", name="bookstore-v1-1", role="bookstore", octet=3, version="v1"
    ),
    _Workload(
        namespace="bookstore", name="bookstore-v2-1", role="bookstore", octet=4, version="v2"
    ),
    _Workload(
        namespace="bookwarehouse",
        name="bookwarehouse-vm-1",
        role="bookwarehouse",
        octet=5,
        kind="vm",
    ),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoStatus:
    """A point-in-time view of the demo for the screen."""

    uptime: float  # seconds since traffic started (0 before)
    flows: tuple[Flow, ...]
    split_target: tuple[int, int]
    split_counts: tuple[int, int]  # bookbuyer's 2xx answers from bookstore-v1 / -v2
    served: dict[str, int]  # application -> requests served
    log_events: int
    log_position: dict[str, int]
    proxies: int
    expected_proxies: int
    nacks: int
    envoys_running: int


@dataclass(slots=True)
class _Started:
    apps: dict[str, BookApp] = field(default_factory=dict)
    sidecars: dict[str, Sidecar] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None
    cp_started: bool = False
