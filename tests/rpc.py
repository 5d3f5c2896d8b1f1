"""Test helpers that build request streams and read error details, the way a client would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagesearch.client import search_query
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from imagesearch.v1 import products_pb2

CHUNK = 64 * 1024


async def stream(*messages: Any) -> AsyncIterator[Any]:
    """A client request stream of the given messages (any request type: tests mix valid and invalid ones)."""
    for message in messages:
        yield message


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def product(
    product_id: str,
    *,
    name: str = "",
    category: str = "",
    price: float = 0.0,
    currency: str = "EUR",
    attributes: Mapping[str, str] | None = None,
    description: str = "",
    image_url: str = "",
) -> products_pb2.Product:
    return products_pb2.Product(
        id=product_id,
        name=name or product_id,
        category=category,
        price=price,
        currency=currency,
        attributes=dict(attributes or {}),
        description=description,
        image_url=image_url,
    )


async def index(
    stub: pb_grpc.ImageSearchServiceAsyncStub,
    item: products_pb2.Product,
    image: bytes | None,
    *,
    timeout: float | None = None,
) -> pb.IndexProductResponse:
    messages: list[object] = [pb.IndexProductRequest(product=item)]
    messages += [pb.IndexProductRequest(image_chunk=c) for c in chunks(image or b"")]
    response: pb.IndexProductResponse = await stub.IndexProduct(stream(*messages), timeout=timeout)
    return response


async def index_all(
    stub: pb_grpc.ImageSearchServiceAsyncStub, products: Sequence[tuple[products_pb2.Product, bytes]]
) -> None:
    """Index products with their images in one IndexProducts stream; every one must be stored."""
    messages: list[object] = []
    for item, image in products:
        messages += [pb.IndexProductsRequest(product=item), pb.IndexProductsRequest(image_chunk=image)]
    responses = [r async for r in stub.IndexProducts(stream(*messages))]
    assert not [r for r in responses if r.HasField("error")]


async def search(
    stub: pb_grpc.ImageSearchServiceAsyncStub, *, image: bytes | None = None, **query: Any
) -> pb.SearchResponse:
    """A search as the client sends it (imagesearch.client.search_query), over the given stub. An empty image is
    sent as one empty chunk, so tests can send it."""
    messages: list[object] = [pb.SearchRequest(query=search_query(**query))]
    if image is not None:
        messages += [pb.SearchRequest(image_chunk=c) for c in chunks(image)] or [pb.SearchRequest(image_chunk=b"")]
    response: pb.SearchResponse = await stub.Search(stream(*messages))
    return response


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """Field names from the google.rpc.BadRequest detail of an INVALID_ARGUMENT error."""
    status = rpc_status.from_call(error)
    assert status is not None, "INVALID_ARGUMENT without google.rpc.Status details"
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields
