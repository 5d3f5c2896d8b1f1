"""Faults and overload: store failures, deadlines, admission control."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
import torch
from conftest import RunningServer, jpeg_bytes, start_server, stop_server
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from rpc import index, product, search

from imagesearch.config import Settings
from imagesearch.errors import StoreUnavailable
from imagesearch.model.encoder import ClipEncoder
from imagesearch.server import SERVICE_NAME

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

    async def down(*args: Any, **kwargs: Any) -> Any:
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
        await asyncio.sleep(0.2)
        assert await health_status(running) == NOT_SERVING  # probes keep failing while it is down

    deadline = time.monotonic() + 5
    while await health_status(running) != SERVING and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await health_status(running) == SERVING
    assert [h.product.id for h in (await search(running.stub, text="something new")).hits] == ["a"]


async def test_search_past_its_deadline_is_abandoned(
    running: RunningServer, encoder: ClipEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    await index(running.stub, product("a"), jpeg_bytes())
    slow_forward(monkeypatch, encoder, 0.5)
    store_calls = 0
    original_search = running.components.store.search

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal store_calls
        store_calls += 1
        return await original_search(*args, **kwargs)

    monkeypatch.setattr(running.components.store, "search", counted)
    call = running.stub.Search(
        _one_image_search(jpeg_bytes((1, 2, 3))),
        timeout=0.2,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.6)  # let the slow forward finish
    assert store_calls == 0, "the store was queried after the deadline had passed"
    assert await health_status(running) == SERVING


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
