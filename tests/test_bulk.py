"""Bulk import over the bidirectional IndexProducts stream."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc
import pytest
from conftest import RunningServer, jpeg_bytes, start_server, stop_server
from google.rpc import code_pb2, error_details_pb2
from rpc import chunks, product, stream

from imagesearch.config import Settings
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
