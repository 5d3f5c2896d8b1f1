"""The core RPCs end to end through a real grpc.aio server and the generated stubs."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import math

import grpc
import numpy as np
import pytest
from conftest import RunningServer, jpeg_bytes, start_server, stop_server
from grpc_health.v1 import health_pb2
from rpc import index, product, search, stream, violated_fields

from imagesearch.api import service
from imagesearch.config import Settings
from imagesearch.model.encoder import ClipEncoder
from imagesearch.server import SERVICE_NAME
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import products_pb2

RED = jpeg_bytes((220, 20, 20))
BLUE = jpeg_bytes((20, 40, 220))


async def test_index_product_reports_created_then_updated(running: RunningServer) -> None:
    first = await index(running.stub, product("sku-1", name="Red mug", price=9.5), RED)
    second = await index(running.stub, product("sku-1", name="Red mug v2", price=11.0), RED)
    assert (first.created, second.created) == (True, False)
    stored = (await running.stub.GetProduct(pb.GetProductRequest(id="sku-1"))).product
    assert (stored.name, stored.price) == ("Red mug v2", 11.0)


async def test_get_product_round_trips_every_field(running: RunningServer) -> None:
    item = product(
        "sku-ü/ß 1",
        name="Shoe",
        description="line one\nline two",
        category="shoes",
        price=59.99,
        currency="USD",
        attributes={"colour": "blue", "size": "42"},
        image_url="https://example.test/shoe.jpg",
    )
    response = await index(running.stub, item, BLUE)
    stored = (await running.stub.GetProduct(pb.GetProductRequest(id=item.id))).product
    # As stored, a product sent with one image describes it: its URL (image_url) and the hash of its bytes.
    image = products_pb2.ProductImage(url=item.image_url, sha256=hashlib.sha256(BLUE).hexdigest())
    item.images.append(image)
    assert stored == item == response.product


async def test_search_by_same_image_ranks_that_product_first(running: RunningServer) -> None:
    await index(running.stub, product("red"), RED)
    await index(running.stub, product("blue"), BLUE)
    response = await search(running.stub, image=BLUE)
    assert response.hits[0].product.id == "blue"
    assert response.hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert response.query_kind == pb.QUERY_KIND_IMAGE


async def test_search_by_text_returns_indexed_products(running: RunningServer) -> None:
    await index(running.stub, product("red"), RED)
    await index(running.stub, product("blue"), BLUE)
    response = await search(running.stub, text="a red mug", top_k=1)
    assert len(response.hits) == 1
    assert response.query_kind == pb.QUERY_KIND_TEXT
    assert -1.0 <= response.hits[0].score <= 1.0
    assert response.server_time_ms > 0


GREEN = jpeg_bytes((30, 200, 40))


def scores(response: pb.SearchResponse) -> dict[str, float]:
    return {h.product.id: h.score for h in response.hits}


async def index_three_colours(running: RunningServer) -> None:
    for name, image in (("red", RED), ("blue", BLUE), ("green", GREEN)):
        await index(running.stub, product(name), image)


async def test_search_with_text_and_image_mixes_them_by_text_weight(running: RunningServer) -> None:
    await index_three_colours(running)
    # The reference: each product's cosine to normalize(w * text + (1 - w) * image), from the stored vectors and
    # the model's text embedding (BLUE is indexed as "blue", so its stored vector is the query image's).
    stored = await running.components.store.vectors(["red", "blue", "green"])
    text = await running.components.encoder.encode_text("a red mug")

    def expected(weight: float) -> dict[str, float]:
        mixed = weight * text + (1 - weight) * stored["blue"]
        mixed /= np.linalg.norm(mixed)
        return {pid: float(vector @ mixed) for pid, vector in stored.items()}

    for weight in (0.0, 0.3, 0.8, 1.0):
        response = await search(running.stub, text="a red mug", image=BLUE, text_weight=weight)
        assert response.query_kind == pb.QUERY_KIND_MULTIMODAL
        assert scores(response) == pytest.approx(expected(weight), abs=1e-4), weight
    assert expected(0.3) != pytest.approx(expected(0.8), abs=1e-2)  # the weights do make a difference here


async def test_search_without_text_weight_weighs_text_and_image_equally(
    settings: Settings, encoder: ClipEncoder
) -> None:
    # No result cache: each search is ranked afresh, so equal answers come from equal query vectors.
    running = await start_server(dataclasses.replace(settings, cache="none"), encoder)
    try:
        await index_three_colours(running)
        default = scores(await search(running.stub, text="a red mug", image=BLUE))
        half = scores(await search(running.stub, text="a red mug", image=BLUE, text_weight=0.5))
        other = scores(await search(running.stub, text="a red mug", image=BLUE, text_weight=0.2))
        assert default == pytest.approx(half, abs=1e-5)
        assert default != pytest.approx(other, abs=1e-3)
    finally:
        await stop_server(running)


async def test_search_filters_restrict_results(running: RunningServer) -> None:
    await index(running.stub, product("cheap-mug", category="mugs", price=5, attributes={"colour": "red"}), RED)
    await index(running.stub, product("dear-mug", category="mugs", price=50, attributes={"colour": "red"}), RED)
    await index(running.stub, product("shoe", category="shoes", price=30, attributes={"colour": "blue"}), BLUE)

    async def ids(**kwargs: object) -> set[str]:
        return {h.product.id for h in (await search(running.stub, text="something", **kwargs)).hits}  # type: ignore[arg-type]

    assert await ids(categories=["mugs"]) == {"cheap-mug", "dear-mug"}
    assert await ids(categories=["mugs", "shoes"]) == {"cheap-mug", "dear-mug", "shoe"}
    assert await ids(price_min=5, price_max=30) == {"cheap-mug", "shoe"}  # bounds are inclusive
    assert await ids(price_min=31) == {"dear-mug"}
    assert await ids(attributes={"colour": "blue"}) == {"shoe"}
    assert await ids(categories=["mugs"], price_max=10, attributes={"colour": "red"}) == {"cheap-mug"}
    assert await ids(attributes={"colour": "green"}) == set()


async def test_search_respects_top_k_and_score_threshold(running: RunningServer) -> None:
    for i in range(5):
        await index(running.stub, product(f"p{i}"), jpeg_bytes((40 * i, 30, 200 - 40 * i)))
    assert len((await search(running.stub, image=RED, top_k=3)).hits) == 3
    assert len((await search(running.stub, image=RED)).hits) == 5  # default top_k 10
    above = (await search(running.stub, image=RED, score_threshold=0.999)).hits
    assert all(h.score >= 0.999 for h in above)
    assert len(above) < 5


async def test_delete_product_then_get_is_not_found(running: RunningServer) -> None:
    await index(running.stub, product("gone"), RED)
    await running.stub.DeleteProduct(pb.DeleteProductRequest(id="gone"))
    for call in (
        running.stub.GetProduct(pb.GetProductRequest(id="gone")),
        running.stub.DeleteProduct(pb.DeleteProductRequest(id="gone")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await search(running.stub, image=RED)).hits == []


async def test_service_info_describes_model_store_cache_and_limits(running: RunningServer, settings: Settings) -> None:
    await index(running.stub, product("a"), RED)
    info = await running.stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert info.model.name == "synthetic-clip"
    assert info.model.embedding_dimension == running.components.encoder.encoder.dimension
    assert info.model.device == "cpu"
    # The test encoder's defaults: the runtime and precision it measured on this CPU, reported as chosen, and why.
    model = running.components.encoder.describe()
    assert (info.model.image_tower_runtime, info.model.image_tower_precision) == (
        model.image_runtime,
        model.image_precision,
    )
    assert (info.model.text_tower_runtime, info.model.text_tower_precision) == (
        model.text_runtime,
        model.text_precision,
    )
    assert model.runtime_reason and model.cpu
    assert (info.model.runtime_reason, info.model.cpu) == (model.runtime_reason, model.cpu)
    assert info.limits.max_images_per_product == settings.max_images_per_product
    assert info.model.torch_threads >= 1
    # The micro-batching settings reach the batchers (the one path by which every server builds its encoder).
    images = running.components.encoder.images
    assert (images.max_batch, images.max_wait_s) == (settings.batch_max_size, settings.batch_max_wait_ms / 1000)
    assert (info.store.backend, info.store.product_count) == ("embedded", 1)
    assert info.cache.backend == "memory"
    assert info.limits.max_image_bytes == settings.max_image_bytes
    assert info.limits.max_top_k == settings.max_top_k
    assert info.server_version == importlib.metadata.version("imagesearch")


def test_server_version_falls_back_when_the_package_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Run from a source tree without installing: no package metadata.
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(service, "version", not_installed)
    assert service.server_version() == "0+unknown"


async def test_health_reports_serving_for_server_and_service(running: RunningServer) -> None:
    for name in ("", SERVICE_NAME):
        response = await running.health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_catalogue_survives_restart(settings: Settings, encoder: ClipEncoder) -> None:
    first = await start_server(settings, encoder)
    try:
        await index(first.stub, product("kept", category="mugs", attributes={"colour": "red"}), RED)
    finally:
        await stop_server(first)
    second = await start_server(settings, encoder)
    try:
        stored = (await second.stub.GetProduct(pb.GetProductRequest(id="kept"))).product
        assert stored.attributes["colour"] == "red"
        assert [h.product.id for h in (await search(second.stub, image=RED, categories=["mugs"])).hits] == ["kept"]
    finally:
        await stop_server(second)


async def test_response_echoes_caller_request_id(running: RunningServer) -> None:
    call = running.stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=(("x-request-id", "trace-123"),))
    await call
    assert ("x-request-id", "trace-123") in tuple(await call.initial_metadata())


# --- bad input: precise status, named fields, server keeps serving -------------------------------------------


@pytest.mark.parametrize(
    ("query", "image", "field"),
    [
        pytest.param(pb.SearchQuery(), None, "query.text", id="no-text-no-image"),
        pytest.param(pb.SearchQuery(text="x" * 1001), None, "query.text", id="text-too-long"),
        pytest.param(pb.SearchQuery(text="a\x00b"), None, "query.text", id="control-char"),
        pytest.param(pb.SearchQuery(text="mug", top_k=101), None, "query.top_k", id="top-k-huge"),
        pytest.param(pb.SearchQuery(text="mug", top_k=-1), None, "query.top_k", id="top-k-negative"),
        pytest.param(pb.SearchQuery(text="mug", score_threshold=1.5), None, "query.score_threshold", id="threshold"),
        pytest.param(pb.SearchQuery(text="mug", text_weight=-0.1), None, "query.text_weight", id="weight"),
        pytest.param(
            pb.SearchQuery(text="mug", filter=pb.SearchFilter(price_min=10, price_max=5)),
            None,
            "query.filter.price_min",
            id="price-min-above-max",
        ),
        pytest.param(
            pb.SearchQuery(text="mug", filter=pb.SearchFilter(price_max=math.nan)),
            None,
            "query.filter.price_max",
            id="price-nan",
        ),
        pytest.param(
            pb.SearchQuery(text="mug", filter=pb.SearchFilter(price_min=-1)),
            None,
            "query.filter.price_min",
            id="price-negative",
        ),
        pytest.param(pb.SearchQuery(), b"not an image at all", "image_chunk", id="undecodable-image"),
        pytest.param(pb.SearchQuery(), RED[: len(RED) // 3], "image_chunk", id="truncated-image"),
        pytest.param(pb.SearchQuery(), b"", "image_chunk", id="empty-image"),
    ],
)
async def test_search_rejects_bad_query(
    running: RunningServer, query: pb.SearchQuery, image: bytes | None, field: str
) -> None:
    messages: list[object] = [pb.SearchRequest(query=query)]
    if image is not None:
        messages.append(pb.SearchRequest(image_chunk=image))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.Search(stream(*messages))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(err.value)
    # The server keeps serving.
    assert (
        await running.health.Check(health_pb2.HealthCheckRequest())
    ).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        pytest.param([pb.SearchRequest(image_chunk=RED)], "image_chunk", id="chunk-before-query"),
        pytest.param(
            [pb.SearchRequest(query=pb.SearchQuery(text="a")), pb.SearchRequest(query=pb.SearchQuery(text="b"))],
            "query",
            id="query-twice",
        ),
        pytest.param([], "query", id="empty-stream"),
        pytest.param([pb.SearchRequest()], "content", id="empty-message"),
    ],
)
async def test_search_rejects_malformed_stream(running: RunningServer, messages: list[object], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.Search(stream(*messages))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(err.value)


@pytest.mark.parametrize(
    ("item", "field"),
    [
        pytest.param(product(""), "product.id", id="missing-id"),
        pytest.param(product("x" * 257), "product.id", id="id-too-long"),
        pytest.param(product("a\nb"), "product.id", id="id-control-char"),
        pytest.param(product(" padded"), "product.id", id="id-whitespace"),
        pytest.param(product("p", price=-1), "product.price", id="negative-price"),
        pytest.param(product("p", price=math.inf), "product.price", id="infinite-price"),
        pytest.param(product("p", currency="euro"), "product.currency", id="bad-currency"),
        pytest.param(product("p", attributes={"a=b": "c"}), "product.attributes[a=b]", id="attr-key-with-equals"),
    ],
)
async def test_index_rejects_bad_product(running: RunningServer, item: object, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await index(running.stub, item, RED)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(err.value)
    info = await running.stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert info.store.product_count == 0


async def test_index_rejects_missing_or_bad_image_and_keeps_existing_product(running: RunningServer) -> None:
    await index(running.stub, product("keep", name="original"), RED)
    for image in (None, b"garbage"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await index(running.stub, product("keep", name="replacement"), image)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image_chunk" in violated_fields(err.value)
    stored = (await running.stub.GetProduct(pb.GetProductRequest(id="keep"))).product
    assert stored.name == "original"


async def test_oversized_image_is_refused(settings: Settings, encoder: ClipEncoder) -> None:
    small = dataclasses.replace(settings, max_image_bytes=10_000)
    server = await start_server(small, encoder)
    try:
        big = jpeg_bytes((1, 2, 3), size=(1500, 1500)) + b"\0" * 20_000
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await search(server.stub, image=big)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image_chunk" in violated_fields(err.value)
    finally:
        await stop_server(server)


async def test_get_product_rejects_empty_id(running: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.GetProduct(pb.GetProductRequest(id=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err.value) == ["id"]


async def test_errors_carry_the_request_id_in_trailing_metadata(running: RunningServer) -> None:
    call = running.stub.GetProduct(pb.GetProductRequest(id="missing"), metadata=(("x-request-id", "trace-404"),))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert ("x-request-id", "trace-404") in tuple(err.value.trailing_metadata() or ())


async def test_rpc_log_line_carries_method_status_cache_outcome_and_no_image_bytes(
    running: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    await index(running.stub, product("logged"), RED)
    await search(running.stub, image=RED)
    lines = [line for line in capsys.readouterr().out.splitlines() if "rpc" in line and "Search" in line]
    assert lines, "no log line for the Search RPC"
    assert "code=OK" in lines[-1] and "result_cache=miss" in lines[-1] and "request_id=" in lines[-1]
    assert "\\xff\\xd8" not in lines[-1] and "image_chunk" not in lines[-1]
