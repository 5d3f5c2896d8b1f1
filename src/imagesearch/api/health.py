"""Health reporting that follows the vector store: NOT_SERVING while the store fails, SERVING again once a probe
succeeds, without a restart. Load balancers then route around a replica whose store is unreachable."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from grpc_health.v1 import health, health_pb2

from imagesearch.errors import StoreUnavailable
from imagesearch.store.base import VectorStore

log = structlog.get_logger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StoreHealth:
    # How often a failed store is probed until it answers again (tests shorten it on the instance).
    _probe_interval_s = 1.0

    def __init__(self, servicer: health.aio.HealthServicer, store: VectorStore, service_names: tuple[str, ...]) -> None:
        self.servicer = servicer
        self._store = store
        self._names = service_names
        self._probe: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        return self._probe is not None and not self._probe.done()

    async def serving(self) -> None:
        for name in self._names:
            await self.servicer.set(name, SERVING)

    async def store_failed(self, error: BaseException) -> None:
        """Called when a store call failed: report NOT_SERVING and probe until the store answers again."""
        if self.degraded:
            return
        log.warning("store unavailable; health NOT_SERVING until it answers again", error=str(error))
        for name in self._names:
            await self.servicer.set(name, NOT_SERVING)
        self._probe = asyncio.create_task(self._probe_until_back())

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def _probe_until_back(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                await self._store.ping()
            except StoreUnavailable:
                continue
            log.info("store available again; health SERVING")
            await self.serving()
            return
