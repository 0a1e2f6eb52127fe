"""The CA side of a replica that does not issue (``smc serve --ca follow``).

Role: :class:`CertificateFollower` serves exactly the certificates the log records as
current, with keys read from the key directory it shares with the issuing replica, and the
trust bundle the log records, ordered as the issuer orders it; so every replica at the same
offset serves the same SDS secrets. It never signs nor appends.
Concurrency: one asyncio task on the loop that runs the
:class:`~smc.projections.ProjectionRunner`; key files are read through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from smc.ca._errors import CAStateError
from smc.ca._keystore import KeyStore
from smc.ca._plan import _current_records, _projection, active_issuer_name, served_bundle
from smc.events import (
    CERTS,
    Event,
)
from smc.projections import (
    CertsProjection,
    ProjectionRunner,
)

log = logging.getLogger("smc.ca.controller")


@contextlib.asynccontextmanager
async def following_runner(
    runner: ProjectionRunner,
    listener: Callable[[list[Event]], None],
    *,
    stop: asyncio.Event,
    wake: asyncio.Event,
) -> AsyncIterator[None]:
    """Listen to ``runner`` with ``listener`` and enter once it has caught up (or ``stop``
    is set); while inside, ``stop`` also sets ``wake``. Leaving removes the listener."""
    runner.listeners.append(listener)

    async def stopper() -> None:
        await stop.wait()
        wake.set()

    watcher = asyncio.create_task(stopper())
    try:
        caught = asyncio.create_task(runner.caught_up.wait())
        await asyncio.wait({caught, watcher}, return_when=asyncio.FIRST_COMPLETED)
        caught.cancel()
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(ValueError):
            runner.listeners.remove(listener)


class CertificateFollower:
    """The CA side of a replica that does not issue (``smc serve --ca follow``).

    It never signs nor appends: after each batch of ``smc.certs`` events (and every
    ``interval`` seconds) it makes the log's current certificates what ``keystore``
    serves, loading their keys from the key directory shared with the issuing replica,
    and sets the trust bundle the log records (:func:`served_bundle`, ordered by
    :func:`active_issuer_name`). A certificate whose key is not in the directory yet is
    not served and is looked for again every ``retry_interval`` seconds (warned about
    once). It does not prune the directory: the issuing replica owns it.
    """

    def __init__(
        self,
        *,
        runner: ProjectionRunner,
        keystore: KeyStore,
        interval: float = 30.0,
        retry_interval: float = 0.5,
    ) -> None:
        if keystore.directory is None:
            raise CAStateError(
                "a replica that follows the CA needs the key directory the issuing replica "
                "writes (--keys DIR)"
            )
        self.runner = runner
        self.keystore = keystore
        self.interval = interval
        self.retry_interval = retry_interval
        self.certs = _projection(runner, CertsProjection)
        self.missing: frozenset[str] = frozenset()
        self.passes = 0
        self._warned: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _plan(self) -> tuple[dict[str, str], list[str]]:
        """On the loop: (identity -> fingerprint, trust bundle) as the log says now."""
        current = _current_records(self.certs)
        name = active_issuer_name(self.certs) or ""
        bundle = served_bundle(trust=self.certs.trust, current=current, issuer_name=name)
        return {i: r.fingerprint for i, r in current.items()}, bundle

    def _apply(self, current: Mapping[str, str], bundle: Sequence[str]) -> frozenset[str]:
        """Blocking (reads key files): serve ``current`` and ``bundle``; returns missing."""
        missing = self.keystore.sync(current)
        self.keystore.set_trust_bundle(bundle)
        return missing

    async def sync(self) -> frozenset[str]:
        """One pass; returns the identities whose key is not in the directory (yet)."""
        self.passes += 1
        current, bundle = self._plan()
        missing = await asyncio.to_thread(self._apply, current, bundle)
        for identity in sorted(missing - self._warned):
            log.warning(
                "certificate %s of %s is on the log but its key is not in %s (yet); "
                "is --keys the directory of the issuing replica?",
                current.get(identity),
                identity,
                self.keystore.directory,
            )
        self._warned = set(missing)
        self.missing = missing
        return missing

    def _on_events(self, events: list[Event]) -> None:
        wake, owner = self._wake, self._loop
        if wake is None or owner is None:
            return
        if not any(e.STREAM == CERTS for e in events):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is owner:
            wake.set()
        else:
            owner.call_soon_threadsafe(wake.set)

    async def run(self, *, stop: asyncio.Event) -> None:
        """Wait until the runner caught up, then sync on every change until ``stop``."""
        self._loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        try:
            async with following_runner(self.runner, self._on_events, stop=stop, wake=wake):
                while not stop.is_set():
                    wake.clear()
                    try:
                        retry = bool(await self.sync())
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # never take `smc serve` down
                        log.exception("following the certificates on the log failed")
                        retry = True
                    delay = self.retry_interval if retry else self.interval
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout=delay)
                    await asyncio.sleep(0.02)  # gather a burst of events into one pass
        finally:
            self._wake = None


async def follow_ca(
    *,
    runner: ProjectionRunner,
    keystore: KeyStore,
    stop: asyncio.Event,
    interval: float = 30.0,
    retry_interval: float = 0.5,
) -> None:
    """Run a :class:`CertificateFollower` until ``stop`` is set (``smc serve --ca follow``):
    serve the certificates the log records, keys from ``keystore``'s shared directory."""
    follower = CertificateFollower(
        runner=runner, keystore=keystore, interval=interval, retry_interval=retry_interval
    )
    await follower.run(stop=stop)
