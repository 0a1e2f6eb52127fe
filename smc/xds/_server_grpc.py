"""The gRPC side of the ADS server: its own grpc.aio server, TLS material and peer checks.

Role: :class:`ServerLifecycle`, a mixin of :class:`~smc.xds.AdsServer`: :meth:`start` (a
grpc.aio server with the connect-storm limits raised, SO_REUSEPORT on request, mTLS with
dynamic credentials), :meth:`stop`, rotating the TLS material (:meth:`update_tls`, fetched by
gRPC before each handshake) and :meth:`check_peer` for services mounted beside ADS.
Concurrency: the server's event loop, except :meth:`_fetch_tls`, which gRPC calls on its own
threads (guarded by a lock).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable

import grpc

from smc.ca import SpiffeId
from smc.xds._errors import XdsError
from smc.xds._gc import YOUNG_PER_STREAM, YOUNG_THRESHOLD, tune_gc
from smc.xds._grpc_threads import IoThreadsKeeper
from smc.xds._grpc_wakeups import coalesce_grpc_wakeups
from smc.xds._server_records import Authorize
from smc.xds._server_tls import ServerTLS, _peer_identity

__all__ = ["ADS_SERVICE", "ServerLifecycle"]

_log = logging.getLogger("smc.xds.server")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# How many new streams gRPC core may hold before the server's loop picks them up, and for how
# long (its defaults, 1,000 / 3,000 and 30 s, cancel streams in a connect storm).
_MAX_PENDING_STREAMS = 1_000_000
_MAX_PENDING_SECONDS = 86_400  # no time limit in practice: a stream waits, never cancelled


class ServerLifecycle:
    """Start, stop and TLS of the own grpc.aio server (mixed into :class:`~smc.xds.AdsServer`)."""

    _authorize: Authorize | None
    _trust_domain: str | None
    _tls: ServerTLS | None
    _tls_pending: ServerTLS | None
    _tls_lock: threading.Lock
    _server: grpc.aio.Server | None
    _port: int | None
    services: list[Callable[[grpc.aio.Server], None]]
    add_to: Callable[[grpc.aio.Server], None]
    #: Whether start() made gRPC's completions wake the loop once per batch (smc.xds._grpc_wakeups).
    wakeups_coalesced = False
    _io_keeper: IoThreadsKeeper | None = None
    #: Open streams at which the collector's young threshold is raised next (smc.xds._gc);
    #: never, until start() tuned the collector.
    _gc_mark = sys.maxsize

    async def start(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTLS | None = None,
        reuse_port: bool = False,
        batch_io_threads: bool = True,
    ) -> int:
        """Start an own grpc.aio server on ``host:port`` (0: any free port); returns the port.

        With ``tls`` the port speaks TLS only and requires a client certificate from
        ``tls.client_ca_pems``; the server must have an ``authorize`` hook. With ``reuse_port``
        the socket is bound with SO_REUSEPORT, so several server processes of the same user
        (replicas of the log) can share one port and the kernel spreads new connections over
        them (see docs/ads-scale.md); without it, a taken port is an error. With
        ``batch_io_threads`` (the default) gRPC core's I/O threads run as batch work, so they
        do not preempt the loop's thread on every message (see smc.xds._grpc_threads)."""
        if self._server is not None:
            raise RuntimeError("AdsServer already started")
        tune_gc()  # see smc.xds._gc: the default threshold costs 15-40% of a change's CPU
        self._gc_mark = YOUNG_THRESHOLD // YOUNG_PER_STREAM  # then raised with the streams
        if tls is not None and self._authorize is None:
            raise XdsError(
                "AdsServer.start(tls=...) needs an authorize hook: without it any mesh "
                "certificate could claim any node id"
            )
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                # A connect storm (every proxy of a restarted replica at once): gRPC core holds
                # the streams this loop has not picked up yet in a pending queue and, by
                # default, cancels those past 1,000 (3,000 hard) or 30 s old. They wait
                # instead: picking them up is fair (one queue, in arrival order) and each is
                # served as soon as the loop gets to it.
                ("grpc.server.max_pending_requests", _MAX_PENDING_STREAMS),
                ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_STREAMS),
                ("grpc.server_max_unrequested_time_in_server", _MAX_PENDING_SECONDS),
            ]
        )
        self.add_to(server)
        for mount in self.services:
            mount(server)
        try:
            if tls is None:
                bound: int = server.add_insecure_port(f"{host}:{port}")
            else:
                self._trust_domain = tls.trust_domain
                self._tls = tls
                creds = grpc.dynamic_ssl_server_credentials(
                    tls.certificate_configuration(),
                    self._fetch_tls,
                    require_client_authentication=True,
                )
                bound = server.add_secure_port(f"{host}:{port}", creds)
            if bound == 0:
                raise OSError(f"cannot bind the ADS server to {host}:{port}")
            await server.start()
            # one loop turn per batch of completions, not per completion (see the module)
            self.wakeups_coalesced = coalesce_grpc_wakeups(asyncio.get_running_loop())
            if batch_io_threads:
                self._io_keeper = IoThreadsKeeper()
                self._io_keeper.start()
        except BaseException:
            await server.stop(None)  # not left for the garbage collector to shut down
            raise
        self._server, self._port = server, bound
        return bound

    async def check_peer(self, node_id: str, context: grpc.aio.ServicerContext) -> str | None:
        """Why the TLS peer of ``context`` may not speak for ``node_id`` (None: it may), by the
        rule ADS streams follow; always None on a cleartext server. For services mounted
        beside ADS (:attr:`services`)."""
        if self._authorize is None:
            return None
        found = _peer_identity(context, trust_domain=self._trust_domain)
        if not isinstance(found, SpiffeId):
            return found[1]
        try:
            allowed = bool(self._authorize(node_id, found))
        except Exception:
            _log.exception("authorize hook failed for node %s", node_id)
            allowed = False
        if allowed:
            return None
        return (
            f"node id {node_id!r} does not run as the identity of the client certificate "
            f"({found.uri})"
        )

    def _fetch_tls(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each TLS handshake (on its own threads): the new material
        # once after update_tls, else None (keep the current one).
        with self._tls_lock:
            pending, self._tls_pending = self._tls_pending, None
        return None if pending is None else pending.certificate_configuration()

    @property
    def tls(self) -> ServerTLS | None:
        """The TLS material new connections get (None: cleartext)."""
        return self._tls

    def update_tls(self, tls: ServerTLS) -> bool:
        """Rotate the server certificate and/or the client CA bundle: connections made from
        now on use ``tls``; open streams keep theirs. Returns False when nothing changed.
        Raises :class:`XdsError` on a cleartext server or a different trust domain."""
        if self._tls is None:
            raise XdsError("update_tls: the ADS server does not serve TLS")
        if tls.trust_domain != self._trust_domain:
            raise XdsError(
                f"update_tls: trust domain {tls.trust_domain!r} differs from the served "
                f"{self._trust_domain!r}; restart to change it"
            )
        if tls == self._tls:
            return False
        with self._tls_lock:
            self._tls = self._tls_pending = tls
        _log.info("ADS server TLS material rotated")
        return True

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop the own server; open streams end (Envoy keeps its config and reconnects)."""
        server, self._server = self._server, None
        keeper, self._io_keeper = self._io_keeper, None
        if keeper is not None:
            await keeper.stop()
        if server is not None:
            await server.stop(grace)

    @property
    def io_threads_batched(self) -> int:
        """How many of gRPC core's I/O threads the running server put under SCHED_BATCH so
        far (smc.xds._grpc_threads); 0 when not started or started without it."""
        return self._io_keeper.batched if self._io_keeper is not None else 0

    @property
    def port(self) -> int | None:
        return self._port
