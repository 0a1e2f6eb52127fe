"""The snapshot builder: mesh projections -> the Envoy resources of one sidecar proxy.

Role: turns the registry and policy projections (through :class:`~smc.projections.PolicyView`)
and a :class:`~smc.xds.CertSource` into one consistent :class:`~smc.xds.Snapshot` per proxy
node (see :mod:`smc.xds._identity` for the node-id scheme), plus the set of *dependency keys*
the build read, so the controller rebuilds only the proxies a change can affect.

Two sidecar models, chosen per workload by its label ``smc.dev/interception``:

- explicit (no label, or ``none``; VMs and hosts without iptables): a workload's registry
  ``address`` is where its sidecar listens; several sidecars share one host on distinct
  loopback addresses. Listeners as described below.
- transparent (``iptables``; set by the sidecar injector on every pod it injects, whose init
  container redirects inbound TCP to 15006 and outbound TCP to 15001): one listener
  ``inbound`` on ``0.0.0.0:15006`` and one ``outbound`` on ``0.0.0.0:15001``, both with the
  ``original_dst`` listener filter, so filter chains match on the connection's original
  destination port. ``inbound`` holds one filter chain ``inbound|<port>`` per inbound port
  (the same mTLS, RBAC and filters as the explicit listener of that port) and a default chain
  passing any other port through in plaintext to its original destination (cluster
  ``passthrough``, ORIGINAL_DST: ports no mesh service names, such as health probes, keep
  working). ``outbound`` holds one HTTP chain per HTTP port of the reachable services (RDS
  ``outbound``, routed by Host as below), one TCP chain per TCP service port (first service
  wins a shared port, with a warning), and a default chain passing every other destination
  through (traffic leaving the mesh). Calls to a mesh service the identity may not reach are
  passed through too and fail at the destination, whose inbound requires mTLS.

- Inbound: for every distinct target port of the services the workload backs, a listener
  ``inbound|<port>`` on ``<address>:<port>`` (``0.0.0.0`` when the address is empty), mTLS
  required (SDS secrets ``default`` and ``ROOTCA``). HTTP ports: an HTTP connection manager
  with an RBAC filter (deny by default) and RDS route config ``inbound|<port>`` whose
  per-route RBAC allows exactly the SMI sources (authenticated principal = the source's SPIFFE
  id) on their HTTPRouteGroup matches (path regex, methods, headers): policy changes are route
  updates, effective on open connections at once;
  TCP ports: a network RBAC filter then a TCP proxy. Permissive mode: no RBAC (mTLS still
  required). The local application is ``127.0.0.1:<target port>`` (cluster ``inbound|<port>``),
  unless the workload has the label ``smc.dev/app-port: "<port>"``, then ``127.0.0.1:<that
  port>`` for every inbound port (one application per workload).
- Outbound: one HTTP listener ``outbound`` on ``<address>:15001`` with RDS route config
  ``outbound``: a virtual host per (service, port) the identity may call, domains ``name.ns``,
  ``name.ns.svc``, ``name.ns.svc.cluster.local`` (plus bare ``name`` for services of the
  proxy's own namespace), each also with ``:port``; the bare forms go to the service's first
  port. Routes go to EDS clusters ``outbound|<ns>/<svc>|<port>`` (mTLS, the peer's URI SAN
  must be the SPIFFE id of an identity serving the service). A TrafficSplit becomes weighted
  clusters over the backends; its A/B matches become routes tried before the default split.
  Permissive mode: every service is reachable. A TCP service port gets an outbound listener
  ``outbound-tcp|<port>`` on ``<address>:<service port>`` proxying to its cluster (a port
  already taken on that proxy is skipped, with a warning).
- EDS: one ClusterLoadAssignment per outbound cluster from ``registry.endpoints_of`` (Kubernetes
  endpoints and VM workloads alike); endpoints whose port is not the service port's target port
  are left out when the service has several ports; not-ready endpoints are UNHEALTHY.
- SDS: ``default`` (this identity's certificate and key only) and ``ROOTCA`` (every root of
  the trust bundle). Without a certificate for the identity, no snapshot is built.

Dependency keys (strings): ``wl:<ns>/<name>`` (the proxy's own workload), ``svcns:<ns>``
(which services in its namespace it backs), ``svc:<ns>/<name>`` (a service read: ports,
endpoints, identities, split), ``dst:<ns>/<sa>`` (which services a reachable identity serves),
``svc-all`` (the set of services, permissive mode), ``id:<ns>/<sa>`` (its certificate).
Policy changes affect every proxy.

Concurrency: a :class:`BuildPass` reads the projections and must run on the thread that applies
events to them (the asyncio loop); it is meant for one batch of rebuilds and then dropped.
Built entries are immutable and interned, so proxies of one identity share them.

Layout: this module holds :class:`BuildPass` (the build of one node, its secrets) and
:class:`ProxyBuild`; :mod:`smc.xds._builder_inbound` and :mod:`smc.xds._builder_outbound` the
two sides it extends; :mod:`smc.xds._builder_common` the names, ports and shared pass state.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from smc.projections import Workload
from smc.xds._builder_common import (
    APP_PORT_LABEL,
    INBOUND_LISTENER,
    INBOUND_PORT,
    INTERCEPTION_LABEL,
    OUTBOUND_LISTENER,
    OUTBOUND_PORT,
    OUTBOUND_ROUTE,
    PASSTHROUGH_CLUSTER,
    ROOT_SECRET,
    WORKLOAD_SECRET,
    inbound_name,
    log,
    outbound_cluster_name,
)
from smc.xds._builder_common import _parse as _parse  # re-exported (smc.xds._grpc)
from smc.xds._builder_common import _sockaddr as _sockaddr  # re-exported (smc.xds._grpc)
from smc.xds._builder_inbound import InboundParts
from smc.xds._builder_outbound import OutboundParts, _free_tcp_ports
from smc.xds._builder_outbound import _domains as _domains  # re-exported (smc.xds._grpc)
from smc.xds._builder_outbound import _matching_port as _matching_port  # re-exported
from smc.xds._identity import InvalidNodeId, find_workload, parse_node_id
from smc.xds._snapshot import ResourceEntry, Snapshot, make_entry
from smc.xds._traffic import explicit_egress_listeners, rls_clusters, tracing_cluster
from smc.xds._types import SECRET

__all__ = [
    "APP_PORT_LABEL",
    "INBOUND_LISTENER",
    "INBOUND_PORT",
    "INTERCEPTION_LABEL",
    "OUTBOUND_LISTENER",
    "OUTBOUND_PORT",
    "OUTBOUND_ROUTE",
    "PASSTHROUGH_CLUSTER",
    "ROOT_SECRET",
    "WORKLOAD_SECRET",
    "BuildPass",
    "ProxyBuild",
    "inbound_name",
    "outbound_cluster_name",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class ProxyBuild:
    """The outcome of building one node: its snapshot (None with a ``reason`` when it cannot
    have one yet), the workload and identity it speaks for, and the dependency keys read."""

    node_id: str
    snapshot: Snapshot | None
    deps: frozenset[str]
    identity: str | None = None
    workload: Workload | None = None
    reason: str = ""


class BuildPass(InboundParts, OutboundParts):
    """Builds proxy snapshots against one state of the projections, memoising the parts
    shared between proxies (per identity and per service). Make a new pass per batch."""

    # ------------------------------------------------------------------ the build

    def build(self, node_id: str) -> ProxyBuild:
        """Build the snapshot of ``node_id`` (``ns/workload``); never raises for bad input:
        an unusable node id gives a build without snapshot and a reason."""
        try:
            ref = parse_node_id(node_id)
        except InvalidNodeId as exc:
            return ProxyBuild(node_id=node_id, snapshot=None, deps=frozenset(), reason=str(exc))
        if ref.proxyless:  # gRPC's own xDS client (same package, loaded on first use)
            from smc.xds._grpc import build_proxyless

            return build_proxyless(self, node_id, ref)
        deps: set[str] = {f"wl:{ref.key}"}
        workload = find_workload(ref, self.registry.workloads)
        if workload is None:
            return ProxyBuild(
                node_id=node_id,
                snapshot=None,
                deps=frozenset(deps),
                reason=f"no workload {ref.key!r} in the registry",
            )
        identity = workload.identity
        deps.add(f"id:{identity}")
        secret = None if self._agent else self._workload_secret(identity)
        if self._agent and not self.certs.trust_bundle():
            return ProxyBuild(
                node_id=node_id,
                snapshot=None,
                deps=frozenset(deps),
                identity=identity,
                workload=workload,
                reason="no mesh trust bundle yet",
            )
        if secret is None and not self._agent:
            return ProxyBuild(
                node_id=node_id,
                snapshot=None,
                deps=frozenset(deps),
                identity=identity,
                workload=workload,
                reason=f"no certificate for identity {identity!r} yet",
            )
        entries: list[ResourceEntry] = [self._root_secret()]
        if secret is not None:
            entries.insert(0, secret)
        deps.add(f"svcns:{workload.namespace}")
        transparent = _transparent(workload)
        entries.extend(self._inbound(workload, deps, transparent=transparent))
        outbound = self._outbound_of(identity)
        deps.update(outbound.deps)
        entries.extend(outbound.entries)
        if transparent:
            entries.append(self._passthrough_cluster())
            entries.append(self._transparent_outbound(node_id, outbound))
        else:
            entries.append(self._outbound_listener(workload))
            taken = {self.outbound_port} | {
                int(n.rsplit("|", 1)[1])
                for n in (e.name for e in entries)
                if n.startswith("inbound|")
            }
            for port, cluster in _free_tcp_ports(node_id, outbound.tcp, taken):
                entries.append(self._outbound_tcp_listener(workload, port, cluster))
                taken.add(port)
            entries.extend(
                explicit_egress_listeners(
                    self.traffic,
                    outbound.egress,
                    address=workload.address or "127.0.0.1",
                    taken=taken,
                    node=node_id,
                )
            )
        entries.extend(rls_clusters(self.traffic, self.services_backed_by(workload)))
        tracer = tracing_cluster(self.traffic)
        if tracer is not None:
            entries.append(tracer)
        snapshot = Snapshot.from_entries(entries)
        return ProxyBuild(
            node_id=node_id,
            snapshot=snapshot,
            deps=frozenset(deps),
            identity=identity,
            workload=workload,
        )

    # ------------------------------------------------------------------ secrets

    def _workload_secret(self, identity: str) -> ResourceEntry | None:
        if identity in self._secret:
            return self._secret[identity]
        material = self.certs.get(identity)
        entry = None
        if material is not None:
            cert_pem, chain_pem, key_pem = material[0], material[1], material[2]
            chain = cert_pem if cert_pem.endswith("\n") else cert_pem + "\n"
            chain += chain_pem
            entry = make_entry(
                _parse(
                    {
                        "name": WORKLOAD_SECRET,
                        "tls_certificate": {
                            "certificate_chain": {"inline_string": chain},
                            "private_key": {"inline_string": key_pem},
                        },
                    },
                    secret_pb2.Secret(),
                ),
                type_url=SECRET,
            )
        self._secret[identity] = entry
        return entry

    def _root_secret(self) -> ResourceEntry:
        if self._root is None:
            roots = [r if r.endswith("\n") else r + "\n" for r in self.certs.trust_bundle()]
            self._root = make_entry(
                _parse(
                    {
                        "name": ROOT_SECRET,
                        "validation_context": {"trusted_ca": {"inline_string": "".join(roots)}},
                    },
                    secret_pb2.Secret(),
                ),
                type_url=SECRET,
            )
        return self._root


# ---------------------------------------------------------------------- helpers


def _transparent(workload: Workload) -> bool:
    mode = dict(workload.labels).get(INTERCEPTION_LABEL, "none")
    if mode not in ("iptables", "none"):
        log.warning(
            "workload %s/%s: label %s=%r is neither 'iptables' nor 'none'; explicit listeners",
            workload.namespace,
            workload.name,
            INTERCEPTION_LABEL,
            mode,
        )
    return mode == "iptables"
