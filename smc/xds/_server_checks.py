"""Stream checks of the ADS server: client identity, node placement, refusals.

Role: :class:`StreamChecks`, a mixin of :class:`~smc.xds.AdsServer`: whether a stream's client
certificate may speak for its node id (the ``authorize`` hook), whether its node id names a
workload (the ``placement`` hook, with a grace period), and recording, counting and ending a
refused stream. Concurrency: the server's event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import grpc

from smc.xds._identity import InvalidNodeId, parse_node_id
from smc.xds._server_records import (
    Authorize,
    Placement,
    RefusalReason,
    RefusalRecord,
    XdsMetrics,
)
from smc.xds._server_stream import _Stream

__all__ = ["StreamChecks"]

_log = logging.getLogger("smc.xds.server")


class StreamChecks:
    """Identity and placement checks (mixed into :class:`~smc.xds.AdsServer`)."""

    metrics: XdsMetrics
    _authorize: Authorize | None
    _placement: Placement | None
    _unplaced_grace: float
    _refusals: deque[RefusalRecord]

    async def _refuse(
        self,
        stream: _Stream,
        context: grpc.aio.ServicerContext,
        reason: RefusalReason,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """Record and count a refusal, then end the stream with ``code`` (raises)."""
        record = RefusalRecord(
            node_id=stream.node_id,
            peer_identity=stream.identity.uri if stream.identity is not None else "",
            peer=stream.peer,
            reason=reason,
            message=message,
            at=time.time(),
        )
        self._refusals.append(record)
        self.metrics.refused.labels(reason).inc()
        _log.warning("refused ADS stream from %s: %s", stream.peer, message)
        await context.abort(code, message)

    async def _check_identity(self, stream: _Stream, context: grpc.aio.ServicerContext) -> None:
        """Ask the authorize hook whether the stream's certificate may speak for its node id;
        refuse the stream (raises) if not."""
        identity = stream.identity
        assert identity is not None and self._authorize is not None
        try:
            allowed = bool(self._authorize(stream.node_id, identity))
        except Exception:
            _log.exception("authorize hook failed for node %s", stream.node_id)
            allowed = False
        if allowed:
            stream.authorized = True
            return
        await self._refuse(
            stream,
            context,
            "identity_mismatch",
            grpc.StatusCode.PERMISSION_DENIED,
            f"node id {stream.node_id!r} does not run as the identity of the client "
            f"certificate ({identity.uri}): a proxy is only served the config of its own "
            "identity",
        )

    async def _check_placement(self, stream: _Stream, context: grpc.aio.ServicerContext) -> None:
        """A ready server has no snapshot for the stream's node: end the stream (raises) when
        the node id is malformed, or names no workload for longer than the grace period."""
        assert self._placement is not None
        problem = self._placement(stream.node_id)
        if problem is None:
            stream.unplaced_since = None
            return
        try:
            parse_node_id(stream.node_id)
        except InvalidNodeId as exc:
            await self._refuse(
                stream,
                context,
                "invalid_node_id",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{exc}: SMC serves node ids naming a registry workload",
            )
        now = time.monotonic()
        if stream.unplaced_since is None:
            stream.unplaced_since = now
            asyncio.get_running_loop().call_later(self._unplaced_grace, stream.wake)
            return
        if now - stream.unplaced_since < self._unplaced_grace:
            return
        await self._refuse(
            stream,
            context,
            "unplaced",
            grpc.StatusCode.NOT_FOUND,
            f"node id {stream.node_id!r}: {problem} (register the workload, or use the node id "
            "<namespace>/<workload> of a registered one)",
        )
