"""Faults and overload: store failures, deadlines, admission control."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import pytest
import torch
from conftest import RunningServer, jpeg_bytes, start_server, stop_server
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from helpers import rpc_codes, until
from rpc import index, product, search

from imagesearch.config import Settings
from imagesearch.errors import StoreUnavailable
from imagesearch.model.encoder import ClipEncoder
from imagesearch.server import SERVICE_NAME
from imagesearch.v1 import image_search_service_pb2 as pb

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(running: RunningServer, service: str = "") -> int:
    return (await running.health.Check(health_pb2.HealthCheckRequest(service=service))).status


def has_retry_info(error: grpc.aio.AioRpcError) -> bool:
    status = rpc_status.from_call(error)
    return status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


def slow_forward(monkeypatch: pytest.MonkeyPatch, encoder: ClipEncoder, delay_s: float) -> None:
    original = encoder.encode_pixels

    def slow(batch: torch.Tensor) -> Any:
        time.sleep(delay_s)
        return original(batch)

    monkeypatch.setattr(encoder, "encode_pixels", slow)


async def test_store_outage_gives_unavailable_and_health_follows_the_store(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No Qdrant server can run here, so the outage is injected at the store interface: its calls raise the
    # StoreUnavailable the backends raise on connection errors. Everything above the store is real.
    await index(running.stub, product("a"), jpeg_bytes())
    store = running.components.store
    running.store_health._probe_interval_s = 0.05

    failed_calls = [0]

    async def down(*args: Any, **kwargs: Any) -> Any:
        failed_calls[0] += 1
        raise StoreUnavailable("qdrant at http://10.0.0.1:6334 is unreachable (injected)")

    with monkeypatch.context() as outage:
        outage.setattr(store, "search", down)
        outage.setattr(store, "ping", down)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await search(running.stub, text="something new")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert has_retry_info(err.value)
        assert await health_status(running) == NOT_SERVING
        assert await health_status(running, SERVICE_NAME) == NOT_SERVING
        failed_so_far = failed_calls[0]
        await until(lambda: failed_calls[0] >= failed_so_far + 3, "three more failed health probes")
        assert await health_status(running) == NOT_SERVING  # probes keep failing while it is down

    deadline = time.monotonic() + 5
    while await health_status(running) != SERVING and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await health_status(running) == SERVING
    assert [h.product.id for h in (await search(running.stub, text="something new")).hits] == ["a"]


class HeldForward:
    """Model forwards that wait, in the model thread, until the test releases them: work the server has queued
    or started, held for as long as the test needs (no sleeps)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, encoder: ClipEncoder) -> None:
        self.release = threading.Event()
        self.finished = threading.Event()
        original = encoder.encode_pixels

        def held(batch: torch.Tensor) -> Any:
            self.release.wait(60)
            try:
                return original(batch)
            finally:
                self.finished.set()

        monkeypatch.setattr(encoder, "encode_pixels", held)

    async def release_and_wait(self) -> None:
        self.release.set()
        await asyncio.to_thread(self.finished.wait, 60)


@pytest.fixture
def held_forward(monkeypatch: pytest.MonkeyPatch, encoder: ClipEncoder) -> Iterator[HeldForward]:
    held = HeldForward(monkeypatch, encoder)
    try:
        yield held
    finally:
        held.release.set()  # never leave the model thread waiting


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


async def test_search_past_its_deadline_is_abandoned_and_answered_by_the_server(
    running: RunningServer, held_forward: HeldForward, monkeypatch: pytest.MonkeyPatch
) -> None:
    held_forward.release.set()
    await index(running.stub, product("a"), jpeg_bytes())
    held_forward.release.clear()
    store_searches = count_calls(monkeypatch, running.components.store, "search")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.Search(_one_image_search(jpeg_bytes((1, 2, 3))), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # The server's deadline wrapper stopped the handler and answered DEADLINE_EXCEEDED itself. (Without it, grpc
    # cancels the handler when the caller's timer fires, and the server records the RPC as CANCELLED.)
    await until(lambda: bool(rpc_codes(running, "Search")), "the server to finish the Search RPC")
    assert rpc_codes(running, "Search") == {"DEADLINE_EXCEEDED": 1}
    # The forward it started finishes, and nothing after it runs: the RPC has ended, so its store query, which
    # would come before the end, never comes.
    await held_forward.release_and_wait()
    assert store_searches == [0], "the store was queried after the deadline had passed"
    assert await health_status(running) == SERVING


async def test_index_past_its_deadline_stores_nothing(
    running: RunningServer, held_forward: HeldForward, monkeypatch: pytest.MonkeyPatch
) -> None:
    upserts = count_calls(monkeypatch, running.components.store, "upsert")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await index(running.stub, product("late"), jpeg_bytes((5, 6, 7)), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: bool(rpc_codes(running, "IndexProduct")), "the server to finish the IndexProduct RPC")
    assert rpc_codes(running, "IndexProduct") == {"DEADLINE_EXCEEDED": 1}
    await held_forward.release_and_wait()
    assert upserts == [0]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await running.stub.GetProduct(pb.GetProductRequest(id="late"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_queued_encode_of_an_abandoned_search_never_runs(
    running: RunningServer, held_forward: HeldForward
) -> None:
    # One search holds the model; a second one, queued behind it, runs out of time while it waits.
    held_forward.release.set()
    await index(running.stub, product("a"), jpeg_bytes())
    held_forward.release.clear()
    batcher = running.components.encoder.images
    batcher.batch_sizes.clear()
    first = asyncio.ensure_future(search(running.stub, image=jpeg_bytes((9, 9, 9))))
    await until(lambda: bool(batcher.batch_sizes), "the first search to reach the model")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.Search(_one_image_search(jpeg_bytes((1, 2, 3))), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    held_forward.release.set()
    assert (await first).hits
    # The batcher took its next batch when the first forward returned, before the first search could finish.
    assert list(batcher.batch_sizes) == [1]
    await until(lambda: sum(rpc_codes(running, "Search").values()) == 2, "both Search RPCs to finish")
    assert rpc_codes(running, "Search") == {"OK": 1, "DEADLINE_EXCEEDED": 1}


async def _lazy_image_search(image: bytes) -> AsyncIterator[Any]:
    from imagesearch.v1 import image_search_service_pb2 as pb

    yield pb.SearchRequest(query=pb.SearchQuery())
    for start in range(0, len(image), 64 * 1024):
        yield pb.SearchRequest(image_chunk=image[start : start + 64 * 1024])


async def _one_image_search(image: bytes) -> Any:
    from imagesearch.v1 import image_search_service_pb2 as pb

    yield pb.SearchRequest(query=pb.SearchQuery())
    yield pb.SearchRequest(image_chunk=image)


async def test_overload_is_refused_with_resource_exhausted(
    settings: Settings, encoder: ClipEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_server(dataclasses.replace(settings, max_concurrent_requests=2), encoder)
    try:
        await index(running.stub, product("a"), jpeg_bytes())
        slow_forward(monkeypatch, encoder, 0.3)
        images = [jpeg_bytes((i * 20, 0, 0)) for i in range(6)]
        results: Sequence[Any] = await asyncio.gather(
            *(search(running.stub, image=image) for image in images), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert len(served) >= 2
        assert refused, "no request was refused although 6 arrived with room for 2"
        assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and has_retry_info(r) for r in refused)
        # Cheap RPCs are never refused, and the server recovers as soon as the load is gone.
        assert await health_status(running) == SERVING
        assert (await search(running.stub, text="a")).hits
    finally:
        await stop_server(running)
