"""The typed asyncio client (src/imagesearch/client.py) against a real server."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from conftest import RunningServer, jpeg_bytes

from imagesearch.client import ImageSearchClient, Product
from imagesearch.errors import StoreUnavailable


def flaky(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, failures: int) -> list[int]:
    """Make `owner.name` raise StoreUnavailable `failures` times, then behave. Returns the call counter.
    (No Qdrant server can run here to take down for real; the failure is injected at the store interface.)"""
    calls = [0]
    original = getattr(owner, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= failures:
            raise StoreUnavailable("injected outage")
        return await original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


async def test_client_streams_images_and_round_trips_products(running: RunningServer) -> None:
    big = jpeg_bytes((200, 10, 10), size=(900, 900))  # several 64 KiB chunks
    async with ImageSearchClient(running.target) as client:
        assert await client.health() == "SERVING"
        response = await client.index_product(Product(id="big", category="mugs"), big)
        assert response.created
        hits = (await client.search(image=big, categories=["mugs"])).hits
        assert [h.product.id for h in hits] == ["big"]
        results = [r async for r in client.index_products([(Product(id=f"b{i}"), jpeg_bytes()) for i in range(3)])]
        assert [r.id for r in results] == ["b0", "b1", "b2"]
        assert (await client.get_product("b1")).id == "b1"
        assert (await client.service_info()).store.product_count == 4


async def test_a_call_can_set_its_own_deadline(running: RunningServer) -> None:
    async with ImageSearchClient(running.target, timeout_s=60) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.search(text="red mug", timeout_s=1e-6)  # expires before the server can answer
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await client.search(text="red mug", timeout_s=None)).query_kind  # no deadline at all
        assert await client.health(timeout_s=5) == "SERVING"


async def test_client_retries_idempotent_calls_on_unavailable(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ImageSearchClient(running.target) as client:
        await client.index_product(Product(id="p"), jpeg_bytes())
        calls = flaky(monkeypatch, running.components.store, "get", failures=2)
        assert (await client.get_product("p")).id == "p"
        assert calls[0] == 3


async def test_client_does_not_retry_delete(running: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async with ImageSearchClient(running.target) as client:
        await client.index_product(Product(id="p"), jpeg_bytes())
        calls = flaky(monkeypatch, running.components.store, "delete", failures=1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.delete_product("p")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert calls[0] == 1
