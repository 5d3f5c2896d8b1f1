"""Bulk import over the bidirectional IndexProducts stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from conftest import RunningServer, jpeg_bytes, start_server, stop_server
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2
from helpers import rpc_codes, until
from rpc import chunks, product, search, stream

from imagesearch.config import Settings
from imagesearch.errors import StoreUnavailable
from imagesearch.model.encoder import ClipEncoder
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import products_pb2


def bulk_messages(items: Sequence[tuple[products_pb2.Product, bytes | None]]) -> list[pb.IndexProductsRequest]:
    messages: list[pb.IndexProductsRequest] = []
    for item, image in items:
        messages.append(pb.IndexProductsRequest(product=item))
        messages += [pb.IndexProductsRequest(image_chunk=c) for c in chunks(image or b"", 4096)]
    return messages


async def run_bulk(running: RunningServer, messages: list[pb.IndexProductsRequest]) -> list[pb.IndexProductsResponse]:
    return [response async for response in running.stub.IndexProducts(stream(*messages))]


def bad_fields(status: object) -> list[str]:
    fields: list[str] = []
    for detail in status.details:  # type: ignore[attr-defined]
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_bulk_import_answers_every_product_in_order(settings: Settings, encoder: ClipEncoder) -> None:
    running = await start_server(dataclasses.replace(settings, max_image_bytes=20_000), encoder)
    try:
        good = [(product(f"p{i}", price=i), jpeg_bytes((i * 5 % 256, 80, 200 - i))) for i in range(40)]
        items: list[tuple[products_pb2.Product, bytes | None]] = list(good)
        items.insert(3, (product(""), jpeg_bytes()))  # no id
        items.insert(10, (product("broken"), b"not an image"))
        items.insert(20, (product("no-image"), None))
        items.insert(30, (product("huge"), jpeg_bytes(size=(2000, 2000)) + b"\0" * 30_000))

        responses = await run_bulk(running, bulk_messages(items))

        assert [r.position for r in responses] == list(range(len(items)))
        assert [r.id for r in responses] == [item.id for item, _ in items]
        failed = {r.id: r.error for r in responses if r.HasField("error")}
        assert set(failed) == {"", "broken", "no-image", "huge"}
        assert all(e.code == code_pb2.INVALID_ARGUMENT for e in failed.values())
        assert "product.id" in bad_fields(failed[""])
        assert "image_chunk" in bad_fields(failed["huge"])
        assert all(r.created for r in responses if not r.HasField("error"))

        info = await running.stub.GetServiceInfo(pb.GetServiceInfoRequest())
        assert info.store.product_count == len(good)
        stored = await running.stub.GetProduct(pb.GetProductRequest(id="p7"))
        assert stored.product.price == 7

        again = await run_bulk(running, bulk_messages(good[:5]))
        assert [r.created for r in again] == [False] * 5
    finally:
        await stop_server(running)


async def test_bulk_import_batches_encodes(running: RunningServer) -> None:
    batcher = running.components.encoder.images
    batcher.batch_sizes.clear()
    items = [(product(f"b{i}"), jpeg_bytes((i * 3, i, 255 - i))) for i in range(48)]
    responses = await run_bulk(running, bulk_messages(items))
    assert not any(r.HasField("error") for r in responses)
    assert sum(batcher.batch_sizes) == 48
    assert max(batcher.batch_sizes) > 1, f"no batching happened: {batcher.batch_sizes}"


async def test_bulk_import_rejects_chunk_before_first_product(running: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run_bulk(running, [pb.IndexProductsRequest(image_chunk=b"x")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bulk_import_of_empty_stream_answers_nothing(running: RunningServer) -> None:
    assert await run_bulk(running, []) == []


# --- streams that break, stores that fail -------------------------------------------------------------------------


async def stored_ids(running: RunningServer) -> set[str]:
    listed = await running.stub.ListProducts(pb.ListProductsRequest(page_size=1000))
    return {p.id for p in listed.products}


async def assert_serving_and_importing(running: RunningServer, prefix: str) -> None:
    """The server still answers health, searches and a new import."""
    health = await running.health.Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert (await search(running.stub, text="anything")).hits
    again = await run_bulk(running, bulk_messages([(product(f"{prefix}-after"), jpeg_bytes((1, 2, 3)))]))
    assert [(r.id, r.created, r.HasField("error")) for r in again] == [(f"{prefix}-after", True, False)]


@pytest.mark.parametrize("how", ["client-cancels", "client-stream-fails"])
async def test_bulk_stream_broken_after_n_products_keeps_what_was_acknowledged(
    settings: Settings, encoder: ClipEncoder, how: str
) -> None:
    # One encoding RPC at a time: the broken stream must give its admission slot back.
    running = await start_server(dataclasses.replace(settings, max_concurrent_requests=1), encoder)
    try:
        acknowledged: list[str] = []
        sent: list[str] = []
        ten_acknowledged = asyncio.Event()

        async def requests() -> AsyncIterator[pb.IndexProductsRequest]:
            for i in range(30):
                sent.append(f"b{i}")
                yield pb.IndexProductsRequest(product=product(f"b{i}"))
                yield pb.IndexProductsRequest(image_chunk=jpeg_bytes((i * 4 % 256, 90, 40)))
                if i == 14:
                    await ten_acknowledged.wait()
                    if how == "client-stream-fails":
                        raise RuntimeError("the client's product source broke")
            await asyncio.Event().wait()  # a client that keeps the stream open, sending nothing more

        call = running.stub.IndexProducts(requests())
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for response in call:
                assert not response.HasField("error")
                acknowledged.append(response.id)
                if len(acknowledged) == 10:
                    ten_acknowledged.set()
                    if how == "client-cancels":
                        call.cancel()
        assert len(acknowledged) >= 10

        async def ended() -> bool:
            return bool(rpc_codes(running, "IndexProducts"))

        await until(ended, "the server to end the broken IndexProducts stream")
        assert rpc_codes(running, "IndexProducts") == {"CANCELLED": 1}
        stored = await stored_ids(running)
        # Everything acknowledged is stored; anything else stored was sent in full (no half-written product:
        # listed and searchable alike, as one point holds both).
        assert set(acknowledged) <= stored <= set(sent)
        assert set(await running.components.store.vectors(sorted(sent))) == stored
        await assert_serving_and_importing(running, how)
    finally:
        await stop_server(running)


async def test_store_failure_mid_import_fails_that_batch_only(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client sends three groups, each after the previous one was answered (all but its last product, which
    # is complete only when the next product message arrives), so the writes come in several batches; the second
    # write fails as an unreachable store does.
    store = running.components.store
    real_upsert = store.upsert
    writes: list[list[str]] = []

    async def second_write_fails(items: list[tuple[Any, Any]]) -> list[bool]:
        writes.append([p.id for p, _ in items])
        if len(writes) == 2:
            raise StoreUnavailable("qdrant at http://10.0.0.1:6334 is unreachable (injected)")
        created: list[bool] = await real_upsert(items)
        return created

    monkeypatch.setattr(store, "upsert", second_write_fails)
    groups = [[(product(f"g{g}-{i}"), jpeg_bytes((g * 80, i * 20, 60))) for i in range(8)] for g in range(3)]
    answered: asyncio.Queue[None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.IndexProductsRequest]:
        for group in groups:
            for message in bulk_messages(group):
                yield message
            for _ in group[1:]:
                await answered.get()

    responses = []
    async for response in running.stub.IndexProducts(requests()):
        responses.append(response)
        answered.put_nowait(None)

    everything = [item.id for group in groups for item, _ in group]
    assert [r.id for r in responses] == everything and [r.position for r in responses] == list(range(24))
    failed = {r.id: r.error for r in responses if r.HasField("error")}
    assert set(failed) == set(writes[1])  # exactly the failed write's products, each told so
    assert all(e.code == code_pb2.UNAVAILABLE for e in failed.values())
    assert all(r.created for r in responses if not r.HasField("error"))
    assert await stored_ids(running) == set(everything) - set(failed)  # nothing of the failed write is stored

    async def serving() -> bool:
        health = await running.health.Check(health_pb2.HealthCheckRequest())
        return bool(health.status == health_pb2.HealthCheckResponse.SERVING)

    await until(serving, "health to follow the store back to SERVING")
    monkeypatch.setattr(store, "upsert", real_upsert)
    retried = await run_bulk(
        running, bulk_messages([item for group in groups for item in group if item[0].id in failed])
    )
    assert all(r.created and not r.HasField("error") for r in retried)
    assert await stored_ids(running) == set(everything)
    await assert_serving_and_importing(running, "store")
