"""Property-based fuzzing of the RPCs with hypothesis: random messages and random image bytes.

Properties: no call ends in UNKNOWN or INTERNAL, the server stays healthy, and the catalogue holds exactly the
products whose writes succeeded (a rejected write changes nothing).
"""

from __future__ import annotations

import io
import math

import grpc
from conftest import RunningServer
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from rpc import stream

from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import products_pb2

ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _tiny_jpeg(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour, 255 - colour, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


texts = st.text(max_size=300) | st.sampled_from(["", " ", "a\x00b", "👟", "שלום", "x" * 1100, "\u202e"])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e308, -1.0])
images = (
    st.binary(max_size=2048)
    | st.integers(0, 255).map(_tiny_jpeg)
    | st.integers(0, 255).map(lambda c: _tiny_jpeg(c)[: 20 + c])
    | st.none()
)
products = st.builds(
    products_pb2.Product,
    id=texts,
    name=texts,
    description=texts,
    category=texts,
    price=floats,
    currency=st.sampled_from(["", "EUR", "usd", "EURO"]) | texts,
    attributes=st.dictionaries(texts, texts, max_size=4)
    | st.dictionaries(st.text(max_size=3), st.just("v"), max_size=70),
    image_url=texts,
)
queries = st.builds(
    pb.SearchQuery,
    text=texts,
    top_k=st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 120),
    filter=st.builds(
        pb.SearchFilter,
        categories=st.lists(texts, max_size=3),
        price_min=st.none() | floats,
        price_max=st.none() | floats,
        attributes=st.dictionaries(texts, texts, max_size=3),
    ),
    score_threshold=st.none() | floats,
    text_weight=st.none() | floats,
)


async def _healthy(running: RunningServer) -> bool:
    response = await running.health.Check(health_pb2.HealthCheckRequest())
    return response.status == health_pb2.HealthCheckResponse.SERVING


async def _count(running: RunningServer) -> int:
    return (await running.stub.GetServiceInfo(pb.GetServiceInfoRequest())).store.product_count


@FUZZ
@given(item=products, image=images, chunked_first=st.booleans())
async def test_fuzzed_index_requests_never_fail_internally(
    running: RunningServer, item: products_pb2.Product, image: bytes | None, chunked_first: bool
) -> None:
    before = await _count(running)
    existed = True
    try:
        await running.stub.GetProduct(pb.GetProductRequest(id=item.id))
    except grpc.aio.AioRpcError:
        existed = False
    messages: list[object] = [pb.IndexProductRequest(product=item)]
    if image is not None:
        messages.append(pb.IndexProductRequest(image_chunk=image))
    if chunked_first:
        messages.reverse()
    try:
        response = await running.stub.IndexProduct(stream(*messages))
    except grpc.aio.AioRpcError as err:
        assert err.code() in ACCEPTABLE, (err.code(), err.details())
        assert await _count(running) == before, "a rejected write changed the catalogue"
    else:
        assert response.created == (not existed)
        assert await _count(running) == before + (0 if existed else 1)
        assert math.isfinite(response.product.price)
    assert await _healthy(running)


@FUZZ
@given(query=queries, image=images)
async def test_fuzzed_searches_never_fail_internally(
    running: RunningServer, query: pb.SearchQuery, image: bytes | None
) -> None:
    messages: list[object] = [pb.SearchRequest(query=query)]
    if image is not None:
        messages.append(pb.SearchRequest(image_chunk=image))
    try:
        response = await running.stub.Search(stream(*messages))
    except grpc.aio.AioRpcError as err:
        assert err.code() in ACCEPTABLE, (err.code(), err.details())
    else:
        assert all(-1.0001 <= hit.score <= 1.0001 for hit in response.hits)
    assert await _healthy(running)


@FUZZ
@given(product_id=texts)
async def test_fuzzed_ids_for_get_and_delete_never_fail_internally(running: RunningServer, product_id: str) -> None:
    for call in (running.stub.GetProduct(pb.GetProductRequest(id=product_id)),
                 running.stub.DeleteProduct(pb.DeleteProductRequest(id=product_id))):  # fmt: skip
        try:
            await call
        except grpc.aio.AioRpcError as err:
            assert err.code() in ACCEPTABLE, (err.code(), err.details())
