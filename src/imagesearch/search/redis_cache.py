"""Redis cache backend. Redis is an accelerator, never a dependency: every error becomes a miss.

After a failure the backend stays "down" for a short back-off, during which calls miss at once instead of each
waiting for a timeout; the first call after the back-off probes Redis again, so the cache recovers by itself.
State changes (up -> down, down -> up) are logged once, not per request.
"""

from __future__ import annotations

import time

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)


class RedisCache:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.25,
        retry_after_s: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        # Short timeouts: a cache that answers slower than the work it saves is worse than none.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=max_connections,
            retry_on_timeout=False,
        )
        self._url_for_logs = _redact(url)
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._up = True
        # Counters whose bump failed while Redis was unreachable; bumped before the next counter read, so
        # results cached before a write that happened during an outage are never served after it.
        self._pending_incr: set[str] = set()

    @property
    def available(self) -> bool:
        return self._up or time.monotonic() >= self._down_until

    async def get(self, key: str) -> bytes | None:
        if not self.available:
            return None
        try:
            value = await self._client.get(key)
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return None
        self._mark_up()
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if not self.available:
            return
        try:
            await self._client.set(key, value, ex=ttl_s or None)
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return
        self._mark_up()

    async def get_counter(self, key: str) -> int | None:
        if not self.available:
            return None
        try:
            for pending in sorted(self._pending_incr):
                await self._client.incr(pending)
                self._pending_incr.discard(pending)
            raw = await self._client.get(key)
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return None
        self._mark_up()
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            return None  # a corrupted counter: serve no cached results rather than wrong ones

    async def incr(self, key: str) -> None:
        # Attempted even while marked down: a missed bump is the one failure that could serve stale results,
        # so each write gets its own chance to reach Redis.
        try:
            await self._client.incr(key)
        except (RedisError, OSError) as exc:
            self._pending_incr.add(key)
            self._mark_down(exc)
            return
        self._mark_up()

    async def close(self) -> None:
        await self._client.aclose()

    def _mark_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_after_s
        if self._up:
            self._up = False
            log.warning("redis unavailable; caching bypassed", url=self._url_for_logs, error=str(exc))

    def _mark_up(self) -> None:
        if not self._up:
            self._up = True
            log.info("redis available again; caching resumed", url=self._url_for_logs)


def _redact(url: str) -> str:
    # redis://user:password@host -> redis://***@host: never log credentials.
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
