"""The encoding and result caches, through the gRPC surface, with a real redis-server and the in-process LRU."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as redis
from conftest import RedisProcess, RunningServer, free_port, jpeg_bytes, start_server, stop_server
from rpc import index, product, search

from imagesearch import server
from imagesearch.config import Settings
from imagesearch.model.encoder import ClipEncoder
from imagesearch.search.cache import KEY_VERSION, CacheBackend, LruCache
from imagesearch.search.redis_cache import RedisCache
from imagesearch.v1 import image_search_service_pb2 as pb

RED = jpeg_bytes((220, 20, 20))
BLUE = jpeg_bytes((20, 40, 220))
HIT, MISS, BYPASS = pb.CACHE_OUTCOME_HIT, pb.CACHE_OUTCOME_MISS, pb.CACHE_OUTCOME_BYPASS


class CallCounter:
    """Counts calls to a method of a live object (the real method still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.calls = 0
        original: Callable[..., Any] = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.fixture(params=["memory", "redis"])
async def cached(
    request: pytest.FixtureRequest, settings: Settings, encoder: ClipEncoder, redis_url: str, cache_namespace: str
) -> AsyncIterator[RunningServer]:
    if request.param == "redis":
        settings = dataclasses.replace(settings, cache="redis", redis_url=redis_url, cache_namespace=cache_namespace)
    running = await start_server(settings, encoder)
    try:
        yield running
    finally:
        await stop_server(running)


async def test_repeated_text_search_skips_encoder_and_store(
    cached: RunningServer, encoder: ClipEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    await index(cached.stub, product("red"), RED)
    texts = CallCounter(monkeypatch, encoder, "encode_texts")
    store_searches = CallCounter(monkeypatch, cached.components.store, "search")

    first = await search(cached.stub, text="a red mug")
    second = await search(cached.stub, text="  a   red mug ")  # same text after whitespace normalisation

    assert (first.embedding_cache, first.result_cache, first.cached) == (MISS, MISS, False)
    assert (second.embedding_cache, second.result_cache, second.cached) == (HIT, HIT, True)
    assert (texts.calls, store_searches.calls) == (1, 1)
    assert list(second.hits) == list(first.hits)


async def test_repeated_image_search_skips_decoding_and_model(
    cached: RunningServer, encoder: ClipEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    await index(cached.stub, product("red"), RED)
    forwards = CallCounter(monkeypatch, encoder, "encode_pixels")
    decodes = CallCounter(monkeypatch, encoder, "decode")

    await search(cached.stub, image=BLUE, top_k=1)
    again = await search(cached.stub, image=BLUE, top_k=2)  # new top_k: result miss, embedding hit

    assert (again.embedding_cache, again.result_cache) == (HIT, MISS)
    assert (forwards.calls, decodes.calls) == (1, 1)


async def test_index_and_delete_invalidate_cached_results(cached: RunningServer) -> None:
    await index(cached.stub, product("red"), RED)
    before = await search(cached.stub, image=BLUE)
    assert [h.product.id for h in before.hits] == ["red"]

    await index(cached.stub, product("blue"), BLUE)
    after_index = await search(cached.stub, image=BLUE)
    assert after_index.result_cache == MISS
    assert after_index.hits[0].product.id == "blue"

    await cached.stub.DeleteProduct(pb.DeleteProductRequest(id="blue"))
    after_delete = await search(cached.stub, image=BLUE)
    assert after_delete.result_cache == MISS
    assert [h.product.id for h in after_delete.hits] == ["red"]


async def test_updated_product_is_never_served_stale(cached: RunningServer) -> None:
    await index(cached.stub, product("p", name="old name", price=10), RED)
    assert (await search(cached.stub, image=RED)).hits[0].product.name == "old name"
    await index(cached.stub, product("p", name="new name", price=12), RED)
    hit = (await search(cached.stub, image=RED)).hits[0].product
    assert (hit.name, hit.price) == ("new name", 12)


async def test_different_filters_and_top_k_never_share_results(cached: RunningServer) -> None:
    await index(cached.stub, product("mug", category="mugs", price=5, attributes={"colour": "red"}), RED)
    await index(cached.stub, product("shoe", category="shoes", price=50, attributes={"colour": "blue"}), BLUE)

    queries: list[dict[str, Any]] = [
        {},
        {"top_k": 1},
        {"categories": ["mugs"]},
        {"categories": ["shoes"]},
        {"price_max": 10},
        {"price_min": 10},
        {"attributes": {"colour": "blue"}},
        {"score_threshold": 0.99},
    ]
    first = [await search(cached.stub, image=RED, **q) for q in queries]
    assert all(r.result_cache == MISS for r in first), "each distinct query must miss the first time"
    assert [h.product.id for h in first[2].hits] == ["mug"]
    assert [h.product.id for h in first[3].hits] == ["shoe"]
    repeat = [await search(cached.stub, image=RED, **q) for q in queries]
    assert all(r.result_cache == HIT for r in repeat)
    assert [[h.product.id for h in r.hits] for r in repeat] == [[h.product.id for h in r.hits] for r in first]


async def test_including_the_liked_product_or_not_never_shares_results(cached: RunningServer) -> None:
    # The toggle changes only which ids the ranking excludes: the result key must tell the two apart.
    await index(cached.stub, product("red"), RED)
    await index(cached.stub, product("blue"), BLUE)
    await index(cached.stub, product("dark-red"), jpeg_bytes((150, 10, 10)))
    liked: dict[str, Any] = {"like_product_ids": ["red"], "top_k": 3}
    without = await search(cached.stub, **liked)
    including = await search(cached.stub, **liked, include_liked_products=True)
    assert (without.result_cache, including.result_cache) == (MISS, MISS)
    assert "red" not in [h.product.id for h in without.hits]
    assert including.hits[0].product.id == "red"
    again = [await search(cached.stub, **liked), await search(cached.stub, **liked, include_liked_products=True)]
    assert [r.result_cache for r in again] == [HIT, HIT]
    assert [list(r.hits) for r in again] == [list(without.hits), list(including.hits)]


async def test_service_info_counts_hits_and_misses(cached: RunningServer) -> None:
    await index(cached.stub, product("red"), RED)
    await search(cached.stub, text="mug")
    await search(cached.stub, text="mug")
    info = (await cached.stub.GetServiceInfo(pb.GetServiceInfoRequest())).cache
    assert info.available
    assert (info.embedding_hits, info.embedding_misses, info.result_hits, info.result_misses) == (1, 1, 1, 1)


# Short enough to wait for: the tests wait for the real back-off to pass, never skip it.
RETRY_AFTER_S = 0.3


@pytest.fixture
def short_redis_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers started by the test build their RedisCache with a short retry interval (a constructor argument)."""

    def open_cache_backend(settings: Settings) -> CacheBackend:
        assert settings.redis_url is not None
        return RedisCache(settings.redis_url, retry_after_s=RETRY_AFTER_S)

    monkeypatch.setattr(server, "open_cache_backend", open_cache_backend)


async def search_until_cached_again(running: RunningServer, **query: Any) -> pb.SearchResponse:
    """Search until the cache is consulted again: the back-off must end by itself (bounded, never asserted on)."""
    deadline = time.monotonic() + 60
    while True:
        response = await search(running.stub, **query)
        if response.result_cache != BYPASS or time.monotonic() > deadline:
            return response
        await asyncio.sleep(RETRY_AFTER_S / 3)


async def test_redis_outage_never_fails_searches_and_caching_resumes(
    settings: Settings, encoder: ClipEncoder, cache_namespace: str, short_redis_back_off: None
) -> None:
    own_redis = RedisProcess()  # this test stops and restarts it
    own_redis.start()
    running = await start_server(
        dataclasses.replace(settings, cache="redis", redis_url=own_redis.url, cache_namespace=cache_namespace),
        encoder,
    )
    try:
        await index(running.stub, product("red"), RED)
        await search(running.stub, text="mug")
        assert (await search(running.stub, text="mug")).cached

        own_redis.stop()
        during = [await search(running.stub, text="mug") for _ in range(3)]
        assert all(r.result_cache == BYPASS and [h.product.id for h in r.hits] == ["red"] for r in during)
        await index(running.stub, product("blue"), BLUE)  # a write during the outage
        info = (await running.stub.GetServiceInfo(pb.GetServiceInfoRequest())).cache
        assert not info.available

        own_redis.start()  # empty again: nothing survived the restart
        resumed = await search_until_cached_again(running, image=BLUE)
        assert resumed.result_cache == MISS
        assert resumed.hits[0].product.id == "blue"
        assert (await search(running.stub, image=BLUE)).result_cache == HIT
        assert (await running.stub.GetServiceInfo(pb.GetServiceInfoRequest())).cache.available
    finally:
        await stop_server(running)
        own_redis.stop()


class RedisLink:
    """A TCP relay between a server and a Redis that stays up: cutting it makes Redis unreachable for that server
    only (entries and generation survive); restoring it reconnects on the same port."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = free_port()
        self._listener: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def restore(self) -> None:
        self._listener = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        for writer in list(self._writers):
            writer.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers |= {client_writer, redis_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_reader, redis_writer), pipe(redis_reader, client_writer))
        self._writers -= {client_writer, redis_writer}


async def test_write_during_outage_invalidates_results_cached_before_it(
    settings: Settings,
    encoder: ClipEncoder,
    redis_process: RedisProcess,
    cache_namespace: str,
    short_redis_back_off: None,
) -> None:
    # Redis stays up, with the results cached before the write and the generation they were cached under, but
    # this server cannot reach it when it writes: the generation bump is missed. It must not serve them after.
    link = RedisLink(redis_process.port)
    await link.restore()
    running = await start_server(
        dataclasses.replace(settings, cache="redis", redis_url=link.url, cache_namespace=cache_namespace), encoder
    )
    try:
        await index(running.stub, product("red"), RED)
        await search(running.stub, image=BLUE)
        assert (await search(running.stub, image=BLUE)).cached
        await link.cut()
        await index(running.stub, product("blue"), BLUE)  # the generation bump fails
        await link.restore()
        after = await search_until_cached_again(running, image=BLUE)
        assert after.result_cache == MISS
        assert after.hits[0].product.id == "blue"
    finally:
        await stop_server(running)
        await link.cut()


async def test_corrupted_cache_values_are_misses(
    settings: Settings, encoder: ClipEncoder, redis_url: str, cache_namespace: str
) -> None:
    running = await start_server(
        dataclasses.replace(settings, cache="redis", redis_url=redis_url, cache_namespace=cache_namespace), encoder
    )
    client = redis.Redis.from_url(redis_url)
    try:
        await index(running.stub, product("red"), RED)
        await search(running.stub, text="mug")
        keys = [k async for k in client.scan_iter(match=f"imagesearch:{KEY_VERSION}:{cache_namespace}:*")]
        assert any(b":emb:" in k for k in keys) and any(b":res:" in k for k in keys)
        for key in keys:
            if not key.endswith(b"generation"):
                await client.set(key, b"\x00garbage")
        response = await search(running.stub, text="mug")
        assert (response.embedding_cache, response.result_cache) == (MISS, MISS)
        assert [h.product.id for h in response.hits] == ["red"]
    finally:
        await client.aclose()
        await stop_server(running)


async def test_cache_none_bypasses_both_tiers(settings: Settings, encoder: ClipEncoder) -> None:
    running = await start_server(dataclasses.replace(settings, cache="none"), encoder)
    try:
        await index(running.stub, product("red"), RED)
        for _ in range(2):
            response = await search(running.stub, text="mug")
            assert (response.embedding_cache, response.result_cache) == (BYPASS, BYPASS)
    finally:
        await stop_server(running)


async def test_lru_cache_honours_its_bound() -> None:
    cache = LruCache(max_entries=3)
    for i in range(5):
        await cache.set(f"k{i}", b"v", ttl_s=0)
    await cache.get("k2")  # touch: k2 becomes most recent
    await cache.set("k5", b"v", ttl_s=0)
    assert len(cache) == 3
    assert [await cache.get(k) is not None for k in ("k2", "k3", "k4", "k5")] == [True, False, True, True]
