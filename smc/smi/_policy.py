"""Policy semantics over the SMI model: who may reach whom, on what, and how traffic splits.

Role: ``evaluate`` folds TrafficTargets, route resources and TrafficSplits into a ``Policy`` that
answers the questions the policy projection and the xDS builder ask: the grants (source plus
HTTP routes / TCP / UDP ports) for a destination identity, the destinations an identity may
call, whether one request is allowed, and the split plan of a root service.

Semantics (deny by default; ``permissive`` allows everything):
- A grant comes from one TrafficTarget and one of its sources. Its rules resolve against route
  resources in the TrafficTarget's namespace; a rule whose resource or named match does not
  exist contributes nothing.
- HTTP traffic (``protocol`` http or grpc) is allowed when some HTTP match of the grant matches
  (method, path regex anchored at the start of the path, every header regex fully matching) and,
  if the grant also has TCPRoute rules, the port is one of theirs. A grant with TCPRoute rules
  only allows HTTP on those ports as opaque TCP.
- TCP traffic needs a TCPRoute rule covering the port, UDP a UDPRoute rule; a route with no
  ports covers every port. Access v1alpha1/v1alpha2 ``destination.port`` restricts every rule.
Identities are ``ns/sa`` strings; services are ``ns/name`` strings.
Concurrency: ``Policy`` is immutable after construction; safe to share between tasks/threads.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from smc.smi._model import (
    Backend,
    HTTPMatch,
    HTTPRouteGroup,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
    UDPRoute,
)
from smc.smi._render import resource_key

__all__ = [
    "ABRoute",
    "Grant",
    "Policy",
    "SplitPlan",
    "evaluate",
    "http_match_matches",
    "split_service_key",
]

TrafficProtocol = Literal["http", "grpc", "tcp", "udp"]


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def http_match_matches(
    match: HTTPMatch, *, method: str, path: str, headers: Mapping[str, str] | None = None
) -> bool:
    """Whether one request matches ``match`` (method, anchored path regex, header regexes)."""
    if match.methods != ("*",) and method.upper() not in match.methods:
        return False
    if match.path_regex is not None:
        bare = path.split("?", 1)[0]
        if _compiled(match.path_regex).match(bare) is None:
            return False
    if match.headers:
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        for name, rx in match.headers:
            value = lowered.get(name)
            if value is None or _compiled(rx).fullmatch(value) is None:
                return False
    return True


def _port_in(ports: tuple[int, ...], port: int | None) -> bool:
    return not ports or port is None or port in ports


@dataclass(frozen=True, kw_only=True, slots=True)
class Grant:
    """What one source may do towards one destination, from one TrafficTarget.

    ``http``: allowed HTTP matches (empty: no HTTP rule). ``tcp_ports``/``udp_ports``: ``None``
    when the target has no such rule, ``()`` for every port, else the allowed ports.
    ``port``: the destination port restriction of access v1alpha1/v1alpha2 (``None``: any).
    """

    source: str
    destination: str
    target: str
    port: int | None
    http: tuple[HTTPMatch, ...]
    tcp_ports: tuple[int, ...] | None
    udp_ports: tuple[int, ...] | None

    def allows(
        self,
        *,
        protocol: TrafficProtocol,
        port: int | None = None,
        method: str | None = None,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether this grant lets the described traffic through."""
        if self.port is not None and port is not None and port != self.port:
            return False
        if protocol == "udp":
            return self.udp_ports is not None and _port_in(self.udp_ports, port)
        if protocol == "tcp":
            return self.tcp_ports is not None and _port_in(self.tcp_ports, port)
        if self.http:
            if self.tcp_ports is not None and not _port_in(self.tcp_ports, port):
                return False
            return any(
                http_match_matches(m, method=method or "GET", path=path or "/", headers=headers)
                for m in self.http
            )
        return self.tcp_ports is not None and _port_in(self.tcp_ports, port)


@dataclass(frozen=True, kw_only=True, slots=True)
class ABRoute:
    """An A/B split: requests matching any of ``matches`` go to ``backends``."""

    split: str
    matches: tuple[HTTPMatch, ...]
    backends: tuple[Backend, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitPlan:
    """How traffic to a root service (``ns/name``) is spread.

    ``backends``: the weighted backends of the split without matches (empty: the root service
    itself serves it); ``ab_routes``: header/path-matched splits, tried in order before the
    weighted default; ``conflicts``: splits ignored because another one already splits the
    service without matches (the lowest key wins).
    """

    service: str
    default_split: str | None
    backends: tuple[Backend, ...]
    ab_routes: tuple[ABRoute, ...]
    conflicts: tuple[str, ...] = ()

    def backends_for(
        self, *, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[Backend, ...]:
        """The backends one request is spread over (empty: the root service)."""
        for route in self.ab_routes:
            if any(
                http_match_matches(m, method=method, path=path, headers=headers)
                for m in route.matches
            ):
                return route.backends
        return self.backends


def split_service_key(split: TrafficSplit) -> str:
    """``ns/name`` of a split's root service (``spec.service`` may be a name or an FQDN)."""
    parts = split.service.split(".")
    if len(parts) == 1:
        return f"{split.namespace}/{split.service}"
    if len(parts) == 2 or parts[2] == "svc":
        return f"{parts[1]}/{parts[0]}"
    return f"{split.namespace}/{split.service}"


class Policy:
    """The evaluated policy set; build it with :func:`evaluate`."""

    __slots__ = ("_by_destination", "_by_source", "_splits", "permissive")

    def __init__(
        self,
        *,
        permissive: bool,
        grants: Iterable[Grant],
        splits: Mapping[str, SplitPlan],
    ) -> None:
        self.permissive = permissive
        by_dest: dict[str, list[Grant]] = {}
        by_source: dict[str, set[str]] = {}
        for g in grants:
            by_dest.setdefault(g.destination, []).append(g)
            by_source.setdefault(g.source, set()).add(g.destination)
        self._by_destination = {
            d: tuple(sorted(gs, key=lambda g: (g.source, g.target))) for d, gs in by_dest.items()
        }
        self._by_source = {s: tuple(sorted(ds)) for s, ds in by_source.items()}
        self._splits = dict(splits)

    def allowed_sources(self, destination: str) -> tuple[Grant, ...]:
        """Grants towards ``destination`` (``ns/sa``), sorted by source then TrafficTarget.

        In permissive mode the grants are still reported (they say what strict mode would
        allow); callers must not restrict traffic then.
        """
        return self._by_destination.get(destination, ())

    def destinations(self) -> tuple[str, ...]:
        """Every destination identity named by a grant."""
        return tuple(sorted(self._by_destination))

    def outbound(self, identity: str) -> tuple[str, ...] | None:
        """Destination identities ``identity`` may reach; ``None`` means any (permissive mode)."""
        if self.permissive:
            return None
        return self._by_source.get(identity, ())

    def is_allowed(
        self,
        *,
        source: str,
        destination: str,
        method: str | None = None,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        port: int | None = None,
        protocol: TrafficProtocol | None = None,
    ) -> bool:
        """Whether ``source`` may send the described traffic to ``destination``.

        ``protocol`` defaults to http when a method or path is given, else tcp.
        """
        if self.permissive:
            return True
        proto: TrafficProtocol = protocol or ("http" if method or path else "tcp")
        return any(
            g.source == source
            and g.allows(protocol=proto, port=port, method=method, path=path, headers=headers)
            for g in self._by_destination.get(destination, ())
        )

    def split_for(self, service: str) -> SplitPlan | None:
        """The split plan of root service ``service`` (``ns/name``), if any split names it."""
        return self._splits.get(service)

    def split_services(self) -> tuple[str, ...]:
        """Every root service that has a split plan."""
        return tuple(sorted(self._splits))


def evaluate(
    *,
    targets: Iterable[TrafficTarget],
    route_groups: Iterable[HTTPRouteGroup],
    tcp_routes: Iterable[TCPRoute],
    splits: Iterable[TrafficSplit],
    permissive: bool,
    udp_routes: Iterable[UDPRoute] = (),
) -> Policy:
    """Evaluate a policy set (see the module docstring for the exact semantics)."""
    groups = {(g.namespace, g.name): g for g in route_groups}
    tcp = {(t.namespace, t.name): t for t in tcp_routes}
    udp = {(u.namespace, u.name): u for u in udp_routes}
    grants: list[Grant] = []
    for t in sorted(targets, key=resource_key):
        http: list[HTTPMatch] = []
        tcp_ports: set[int] | None = None
        tcp_all = False
        udp_ports: set[int] | None = None
        udp_all = False
        for rule in t.rules:
            key = (t.namespace, rule.name)
            if rule.kind == "HTTPRouteGroup":
                group = groups.get(key)
                if group is None:
                    continue
                chosen = (
                    group.matches
                    if not rule.matches
                    else tuple(m for m in group.matches if m.name in rule.matches)
                )
                http.extend(m for m in chosen if m not in http)
            else:
                route = (tcp if rule.kind == "TCPRoute" else udp).get(key)
                if route is None:
                    continue
                if rule.matches and route.match_name not in rule.matches:
                    continue
                if rule.kind == "TCPRoute":
                    tcp_ports = (tcp_ports or set()) | set(route.ports)
                    tcp_all = tcp_all or not route.ports
                else:
                    udp_ports = (udp_ports or set()) | set(route.ports)
                    udp_all = udp_all or not route.ports
        if not http and tcp_ports is None and udp_ports is None:
            continue
        tcp_t = None if tcp_ports is None else (() if tcp_all else tuple(sorted(tcp_ports)))
        udp_t = None if udp_ports is None else (() if udp_all else tuple(sorted(udp_ports)))
        key_str = resource_key(t)
        for src in t.sources:
            grants.append(
                Grant(
                    source=src.identity,
                    destination=t.destination.identity,
                    target=key_str,
                    port=t.port,
                    http=tuple(http),
                    tcp_ports=tcp_t,
                    udp_ports=udp_t,
                )
            )
    return Policy(permissive=permissive, grants=grants, splits=_split_plans(splits, groups))


def _split_plans(
    splits: Iterable[TrafficSplit], groups: Mapping[tuple[str, str], HTTPRouteGroup]
) -> dict[str, SplitPlan]:
    weighted: dict[str, list[TrafficSplit]] = {}
    ab: dict[str, list[ABRoute]] = {}
    for s in sorted(splits, key=resource_key):
        service = split_service_key(s)
        if not s.matches:
            weighted.setdefault(service, []).append(s)
            continue
        matches: list[HTTPMatch] = []
        for ref in s.matches:
            group = groups.get((s.namespace, ref.name))
            if group is not None:
                matches.extend(m for m in group.matches if m not in matches)
        if matches:  # an A/B split whose groups do not resolve matches nothing
            ab.setdefault(service, []).append(
                ABRoute(split=resource_key(s), matches=tuple(matches), backends=s.backends)
            )
    plans: dict[str, SplitPlan] = {}
    for service in sorted(set(weighted) | set(ab)):
        candidates = weighted.get(service, [])
        chosen = candidates[0] if candidates else None
        plans[service] = SplitPlan(
            service=service,
            default_split=resource_key(chosen) if chosen else None,
            backends=chosen.backends if chosen else (),
            ab_routes=tuple(ab.get(service, ())),
            conflicts=tuple(resource_key(c) for c in candidates[1:]),
        )
    return plans
