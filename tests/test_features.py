"""Shop search features through the gRPC surface, on both store backends, with the bundled trained model.

More like this (example products), variants (group_by), paging (page tokens), facets, diversity and
ListProducts. Rankings are checked against a brute-force reference computed from the stored vectors (the test
catalogue is small, so both backends search it exactly), and against what the model knows (colour and kind).
The "qdrant" backend is qdrant-client's in-process `:memory:` mode: it runs the server store's code path.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from conftest import RunningServer, start_server, stop_server
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from qdrant_client import AsyncQdrantClient
from rpc import index_all, stream, violated_fields

from imagesearch.config import CacheBackendName, Settings
from imagesearch.model.encoder import ClipEncoder
from imagesearch.search.catalog import recommend_vector
from imagesearch.store import QdrantServerStore
from imagesearch.store.base import DIVERSITY_CANDIDATES
from imagesearch.synthetic import CatalogueItem, make_catalogue
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import products_pb2

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    # qdrant-client's local mode warns that it ignores payload indexes; the store creates them for real servers.
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
]

CATALOGUE = make_catalogue(160, seed=4321)
BY_ID = {item.product_id: item for item in CATALOGUE}
BACKENDS = ["embedded", "qdrant"]


def family(item: CatalogueItem) -> str | None:
    # A family is one kind in one colour; its patterns are the variants. Every 9th product has no family.
    return None if int(item.product_id[1:]) % 9 == 0 else f"{item.kind}/{item.colour}"


def as_product(item: CatalogueItem) -> products_pb2.Product:
    attributes = dict(item.attributes)
    if (group := family(item)) is not None:
        attributes["group_id"] = group
    return products_pb2.Product(
        id=item.product_id, name=item.name, category=item.category, price=item.price, attributes=attributes
    )


def label(product_id: str) -> tuple[str, str]:
    return BY_ID[product_id].colour, BY_ID[product_id].kind


def first_id(colour: str, kind: str, skip: int = 0) -> str:
    return [i.product_id for i in CATALOGUE if (i.colour, i.kind) == (colour, kind)][skip]


# --- servers ------------------------------------------------------------------------------------------------


async def start_backend(
    backend: str, settings: Settings, encoder: ClipEncoder, client: AsyncQdrantClient | None = None
) -> RunningServer:
    if backend == "embedded":
        return await start_server(settings, encoder)
    store = await QdrantServerStore.from_client(
        client or AsyncQdrantClient(location=":memory:"), encoder.dimension, encoder.model_id, where=":memory:"
    )
    return await start_server(settings, encoder, store=store)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=BACKENDS)
async def shop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, encoder: ClipEncoder
) -> AsyncIterator[RunningServer]:
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("shop"), model="synthetic-clip")
    running = await start_backend(request.param, settings, encoder)
    await index_all(running.stub, [(as_product(item), item.jpeg()) for item in CATALOGUE])
    yield running
    await stop_server(running)


# --- calls and the brute-force reference --------------------------------------------------------------------


async def search(running: RunningServer, **fields: Any) -> pb.SearchResponse:
    response: pb.SearchResponse = await running.stub.Search(stream(pb.SearchRequest(query=pb.SearchQuery(**fields))))
    return response


def ids(response: pb.SearchResponse) -> list[str]:
    return [hit.product.id for hit in response.hits]


async def all_pages(running: RunningServer, **fields: Any) -> list[pb.SearchResponse]:
    pages = [await search(running, **fields)]
    while pages[-1].next_page_token:
        pages.append(await search(running, **fields, page_token=pages[-1].next_page_token))
    return pages


async def search_error(running: RunningServer, **fields: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search(running, **fields)
    return err.value


async def stored_vectors(running: RunningServer) -> dict[str, np.ndarray]:
    return await running.components.store.vectors([item.product_id for item in CATALOGUE])


def reference_ranking(
    vectors: dict[str, np.ndarray], query: np.ndarray, exclude: Sequence[str] = ()
) -> list[tuple[str, float]]:
    scored = [(pid, float(v @ query)) for pid, v in vectors.items() if pid not in exclude]
    return sorted(scored, key=lambda ps: -ps[1])


def assert_ranked_like(
    hits: Sequence[pb.SearchHit], expected: list[tuple[str, float]], vectors: dict[str, np.ndarray], query: np.ndarray
) -> None:
    """Hit i has the i-th best reference score, and that score is its own similarity to the query: the same
    ranking whatever the order of exact ties."""
    assert 0 < len(hits) <= len(expected)
    for hit, (_, score) in zip(hits, expected[: len(hits)], strict=True):
        assert hit.score == pytest.approx(score, abs=2e-4)
        assert hit.score == pytest.approx(float(vectors[hit.product.id] @ query), abs=2e-4)


# --- more like this -----------------------------------------------------------------------------------------


async def test_more_like_this_finds_the_same_colour_and_kind_and_leaves_the_example_out(shop: RunningServer) -> None:
    liked = first_id("red", "mug")
    response = await search(shop, like_product_ids=[liked], top_k=5)
    assert response.query_kind == pb.QUERY_KIND_RECOMMEND
    assert liked not in ids(response)
    assert label(ids(response)[0]) == ("red", "mug")
    assert response.embedding_cache == pb.CACHE_OUTCOME_BYPASS  # nothing was encoded

    vectors = await stored_vectors(shop)
    assert_ranked_like(
        response.hits, reference_ranking(vectors, vectors[liked], exclude=[liked]), vectors, vectors[liked]
    )


async def test_more_like_this_includes_the_example_when_asked(shop: RunningServer) -> None:
    liked = first_id("blue", "shoe")
    response = await search(shop, like_product_ids=[liked], include_liked_products=True, top_k=3)
    assert ids(response)[0] == liked
    assert response.hits[0].score == pytest.approx(1.0, abs=1e-4)


async def test_more_like_this_with_negatives_and_text_follows_the_average_vector_rule(shop: RunningServer) -> None:
    likes = [first_id("green", "lamp"), first_id("green", "bottle")]
    unlike = first_id("green", "chair")
    response = await search(shop, like_product_ids=likes, unlike_product_ids=[unlike], text="yellow lamp", top_k=8)

    vectors = await stored_vectors(shop)
    text_vector = await shop.components.encoder.encode_text("yellow lamp")
    query = recommend_vector([vectors[likes[0]], vectors[likes[1]], text_vector], [vectors[unlike]])
    expected = reference_ranking(vectors, query, exclude=[*likes, unlike])
    assert response.query_kind == pb.QUERY_KIND_RECOMMEND
    assert_ranked_like(response.hits, expected, vectors, query)
    assert not {*likes, unlike} & set(ids(response))


async def test_more_like_this_names_unknown_products_in_not_found(shop: RunningServer) -> None:
    error = await search_error(shop, like_product_ids=[CATALOGUE[0].product_id, "nope"], unlike_product_ids=["nada"])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in (error.details() or "") and "'nada'" in (error.details() or "")
    status = rpc_status.from_call(error)
    assert status is not None
    names = set()
    for detail in status.details:
        info = error_details_pb2.ResourceInfo()
        assert detail.Unpack(info)
        assert info.resource_type == "imagesearch.v1.Product"
        names.add(info.resource_name)
    assert names == {"nope", "nada"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param(
            {"like_product_ids": ["a"], "unlike_product_ids": ["b", "a"]}, "query.unlike_product_ids[1]", id="both"
        ),
        pytest.param({"like_product_ids": [f"p{i}" for i in range(17)]}, "query.like_product_ids", id="too-many"),
        pytest.param({"like_product_ids": [" padded"]}, "query.like_product_ids[0]", id="bad-id"),
        pytest.param({"unlike_product_ids": ["a"]}, "query.text", id="only-negatives"),
        pytest.param({"text": "mug", "diversity": 1.5}, "query.diversity", id="diversity"),
        pytest.param({"text": "mug", "page_size": 101}, "query.page_size", id="page-size-huge"),
        pytest.param({"text": "mug", "page_size": -1}, "query.page_size", id="page-size-negative"),
        pytest.param({"text": "mug", "group_by": "a=b"}, "query.group_by", id="group-by"),
        pytest.param({"text": "mug", "page_token": "not-a-token"}, "query.page_token", id="token-garbage"),
        pytest.param(
            {"text": "mug", "facet_spec": pb.SearchQuery.FacetSpec(max_values=101)},
            "query.facet_spec.max_values",
            id="facet-values",
        ),
        pytest.param(
            {"text": "mug", "facet_spec": pb.SearchQuery.FacetSpec(attribute_keys=[""])},
            "query.facet_spec.attribute_keys[0]",
            id="facet-key",
        ),
    ],
)
async def test_search_rejects_bad_feature_fields(shop: RunningServer, fields: dict[str, Any], field: str) -> None:
    error = await search_error(shop, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(error)


# --- variants -----------------------------------------------------------------------------------------------


def family_key(product_id: str) -> str:
    return family(BY_ID[product_id]) or f"single:{product_id}"


def best_per_family(ranking: list[str]) -> list[str]:
    seen: set[str] = set()
    firsts = []
    for pid in ranking:
        if family_key(pid) not in seen:
            seen.add(family_key(pid))
            firsts.append(pid)
    return firsts


async def test_group_by_shows_each_family_once_as_its_best_variant(shop: RunningServer) -> None:
    ungrouped = ids(await search(shop, text="red mug", top_k=100))
    grouped = await search(shop, text="red mug", group_by="group_id", top_k=12)
    assert ids(grouped) == best_per_family(ungrouped)[:12]
    assert label(ids(grouped)[0]) == ("red", "mug")
    assert len({family_key(pid) for pid in ids(grouped)}) == 12
    assert any(family(BY_ID[pid]) is None for pid in ids(grouped))  # products without the attribute stand alone


async def test_group_by_pages_continue_the_family_list(shop: RunningServer) -> None:
    pages = [await search(shop, text="blue shoe", group_by="group_id", page_size=5)]
    for _ in range(2):
        pages.append(
            await search(shop, text="blue shoe", group_by="group_id", page_size=5, page_token=pages[-1].next_page_token)
        )
    single = await search(shop, text="blue shoe", group_by="group_id", top_k=15)
    assert [pid for page in pages for pid in ids(page)] == ids(single)


# --- paging -------------------------------------------------------------------------------------------------


async def test_pages_concatenate_to_one_ranking_of_the_filtered_catalogue(shop: RunningServer) -> None:
    flt = pb.SearchFilter(price_max=150.0)
    pages = await all_pages(shop, text="green lamp", filter=flt, page_size=9)
    flat = [pid for page in pages for pid in ids(page)]
    expected = {item.product_id for item in CATALOGUE if item.price <= 150.0}
    assert len(flat) == len(expected) and set(flat) == expected  # every match once
    assert all(len(ids(page)) == 9 for page in pages[:-1]) and pages[-1].next_page_token == ""
    scores = [hit.score for page in pages for hit in page.hits]
    assert scores == sorted(scores, reverse=True)
    assert flat[:100] == ids(await search(shop, text="green lamp", filter=flt, top_k=100))


async def test_page_size_takes_precedence_over_top_k(shop: RunningServer) -> None:
    response = await search(shop, text="white hat", top_k=7, page_size=3)
    assert len(response.hits) == 3 and response.next_page_token
    assert ids(response) == ids(await search(shop, text="white hat", top_k=7))[:3]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"text": "blue mug"}, id="text"),
        pytest.param({"page_size": 5}, id="page-size"),
        pytest.param({"filter": pb.SearchFilter(categories=["mug"])}, id="filter"),
        pytest.param({"group_by": "group_id"}, id="group-by"),
        pytest.param({"diversity": 0.5}, id="diversity"),
        pytest.param({"like_product_ids": ["p00001"]}, id="examples"),
    ],
)
async def test_page_token_is_refused_with_another_query(shop: RunningServer, change: dict[str, Any]) -> None:
    first = {"text": "red mug", "page_size": 4}
    token = (await search(shop, **first)).next_page_token
    error = await search_error(shop, **{**first, **change, "page_token": token})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(error) == ["query.page_token"]


async def test_facet_spec_may_differ_between_pages(shop: RunningServer) -> None:
    first = await search(shop, text="red mug", page_size=4, facet_spec=pb.SearchQuery.FacetSpec(categories=True))
    second = await search(shop, text="red mug", page_size=4, page_token=first.next_page_token)
    assert len(second.hits) == 4 and not second.category_facets


def with_cache(settings: Settings, cache: CacheBackendName, redis_url: str, namespace: str) -> Settings:
    if cache == "redis":
        return dataclasses.replace(settings, cache="redis", redis_url=redis_url, cache_namespace=namespace)
    return dataclasses.replace(settings, cache=cache)


def small_catalogue(n: int) -> list[tuple[products_pb2.Product, bytes]]:
    return [(as_product(item), item.jpeg()) for item in CATALOGUE[:n]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", ["memory", "none", "redis"])
async def test_page_token_expires_when_the_catalogue_changes(
    backend: str,
    cache: CacheBackendName,
    settings: Settings,
    encoder: ClipEncoder,
    redis_url: str,
    cache_namespace: str,
) -> None:
    running = await start_backend(backend, with_cache(settings, cache, redis_url, cache_namespace), encoder)
    try:
        await index_all(running.stub, small_catalogue(12))
        query = {"text": "red mug", "page_size": 3}
        token = (await search(running, **query)).next_page_token
        assert len((await search(running, **query, page_token=token)).hits) == 3  # unchanged: accepted, repeatedly
        assert len((await search(running, **query, page_token=token)).hits) == 3

        await index_all(running.stub, small_catalogue(13)[12:])
        error = await search_error(running, **query, page_token=token)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(error) == ["query.page_token"]

        token = (await search(running, **query)).next_page_token
        await running.stub.DeleteProduct(pb.DeleteProductRequest(id=CATALOGUE[0].product_id))
        assert (await search_error(running, **query, page_token=token)).code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await stop_server(running)


async def test_page_tokens_follow_the_shared_generation_across_replicas(
    settings: Settings, encoder: ClipEncoder, redis_url: str, cache_namespace: str
) -> None:
    # Two replicas over one Qdrant collection (one in-process client) and one Redis: a token from one works on
    # the other, and a write through either expires it everywhere.
    client = AsyncQdrantClient(location=":memory:")
    shared = with_cache(settings, "redis", redis_url, cache_namespace)
    first = await start_backend("qdrant", shared, encoder, client)
    second = await start_backend(
        "qdrant", dataclasses.replace(shared, data_dir=settings.data_dir / "b"), encoder, client
    )
    try:
        await index_all(first.stub, small_catalogue(12))
        query = {"text": "blue shoe", "page_size": 4}
        token = (await search(first, **query)).next_page_token
        assert ids(await search(second, **query, page_token=token)) == ids(
            await search(first, **query, page_token=token)
        )

        await index_all(second.stub, small_catalogue(13)[12:])
        error = await search_error(first, **query, page_token=token)
        assert (error.code(), violated_fields(error)) == (grpc.StatusCode.INVALID_ARGUMENT, ["query.page_token"])
    finally:
        await stop_server(second)
        await stop_server(first)


async def test_page_tokens_stay_with_their_replica_without_a_shared_cache(
    settings: Settings, encoder: ClipEncoder
) -> None:
    # Without Redis, a replica cannot see writes made through another, so it refuses the other's tokens rather
    # than risk serving a page of another catalogue state.
    client = AsyncQdrantClient(location=":memory:")
    first = await start_backend("qdrant", settings, encoder, client)
    second = await start_backend(
        "qdrant", dataclasses.replace(settings, data_dir=settings.data_dir / "b"), encoder, client
    )
    try:
        await index_all(first.stub, small_catalogue(8))
        token = (await search(first, text="blue shoe", page_size=2)).next_page_token
        assert len((await search(first, text="blue shoe", page_size=2, page_token=token)).hits) == 2
        error = await search_error(second, text="blue shoe", page_size=2, page_token=token)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await stop_server(second)
        await stop_server(first)


# --- facets -------------------------------------------------------------------------------------------------


def counts(items: Sequence[CatalogueItem], value: Callable[[CatalogueItem], str]) -> list[tuple[str, int]]:
    return sorted(Counter(value(item) for item in items).items(), key=lambda vc: (-vc[1], vc[0]))


def as_pairs(facet_counts: Sequence[pb.FacetCount]) -> list[tuple[str, int]]:
    return [(c.value, c.count) for c in facet_counts]


async def test_facets_count_every_product_the_filter_admits(shop: RunningServer) -> None:
    spec = pb.SearchQuery.FacetSpec(categories=True, attribute_keys=["colour", "pattern", "nothing"], max_values=100)
    flt = pb.SearchFilter(price_min=20.0, price_max=120.0)
    response = await search(shop, text="red mug", filter=flt, top_k=3, facet_spec=spec)

    admitted = [item for item in CATALOGUE if 20.0 <= item.price <= 120.0]
    assert as_pairs(response.category_facets) == counts(admitted, lambda item: item.category)
    assert [facet.key for facet in response.attribute_facets] == ["colour", "pattern", "nothing"]
    assert as_pairs(response.attribute_facets[0].values) == counts(admitted, lambda item: item.colour)
    assert as_pairs(response.attribute_facets[1].values) == counts(admitted, lambda item: item.pattern)
    assert list(response.attribute_facets[2].values) == []
    assert len(response.hits) == 3  # counts are over the filter, not the page


async def test_facets_leave_out_excluded_examples_and_honour_max_values(shop: RunningServer) -> None:
    liked = first_id("red", "mug")
    spec = pb.SearchQuery.FacetSpec(categories=True, max_values=2)
    response = await search(
        shop, like_product_ids=[liked], filter=pb.SearchFilter(categories=["mug", "hat"]), facet_spec=spec
    )
    admitted = [item for item in CATALOGUE if item.category in ("mug", "hat") and item.product_id != liked]
    assert as_pairs(response.category_facets) == counts(admitted, lambda item: item.category)[:2]


# --- diversity ----------------------------------------------------------------------------------------------


def mmr(vectors: dict[str, np.ndarray], query: np.ndarray, diversity: float, count: int) -> list[str]:
    candidates = [pid for pid, _ in reference_ranking(vectors, query)[:DIVERSITY_CANDIDATES]]
    chosen = [candidates.pop(0)]
    while candidates and len(chosen) < count:

        def score(pid: str) -> float:
            redundancy = max(float(vectors[pid] @ vectors[c]) for c in chosen)
            return (1 - diversity) * float(vectors[pid] @ query) - diversity * redundancy

        best = max(candidates, key=score)
        candidates.remove(best)
        chosen.append(best)
    return chosen


async def test_diversity_spreads_results_and_follows_mmr(shop: RunningServer) -> None:
    # Dense: MMR over similarities to the query vector (hybrid diversity is in test_hybrid.py).
    plain = await search(shop, text="red mug", top_k=10, mode=pb.SEARCH_MODE_DENSE)
    diverse = await search(shop, text="red mug", top_k=10, diversity=0.5, mode=pb.SEARCH_MODE_DENSE)

    vectors = await stored_vectors(shop)
    query = await shop.components.encoder.encode_text("red mug")
    assert ids(diverse) == mmr(vectors, query, 0.5, 10)
    assert ids(diverse)[0] == ids(plain)[0]
    assert len({label(pid) for pid in ids(diverse)}) > len({label(pid) for pid in ids(plain)})
    for hit in diverse.hits:  # scores stay similarities to the query
        assert hit.score == pytest.approx(float(vectors[hit.product.id] @ query), abs=2e-4)


async def test_diversified_pages_are_slices_of_one_list(shop: RunningServer) -> None:
    first = await search(shop, text="black chair", page_size=5, diversity=0.6)
    second = await search(shop, text="black chair", page_size=5, diversity=0.6, page_token=first.next_page_token)
    assert ids(first) + ids(second) == ids(await search(shop, text="black chair", top_k=10, diversity=0.6))


# --- ListProducts -------------------------------------------------------------------------------------------


async def list_pages(running: RunningServer, **fields: Any) -> list[pb.ListProductsResponse]:
    pages: list[pb.ListProductsResponse] = []
    token = ""
    while True:
        page = await running.stub.ListProducts(pb.ListProductsRequest(**fields, page_token=token))
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


async def test_list_products_pages_through_the_filtered_catalogue_once(shop: RunningServer) -> None:
    flt = pb.SearchFilter(categories=["mug", "shoe"], attributes={"pattern": "plain"})
    pages = await list_pages(shop, filter=flt, page_size=4)
    listed = [p.id for page in pages for p in page.products]
    expected = {i.product_id for i in CATALOGUE if i.category in ("mug", "shoe") and i.pattern == "plain"}
    assert len(listed) == len(expected) and set(listed) == expected
    assert all(len(page.products) == 4 for page in pages[:-1])
    assert [p.id for page in await list_pages(shop, filter=flt, page_size=3) for p in page.products] == listed
    # As stored, each product describes its one image by the hash of its bytes.
    first = as_product(BY_ID[listed[0]])
    first.images.append(products_pb2.ProductImage(sha256=hashlib.sha256(BY_ID[listed[0]].jpeg()).hexdigest()))
    assert pages[0].products[0] == first


async def test_list_products_defaults_to_50_and_coerces_huge_page_sizes(shop: RunningServer) -> None:
    default = await shop.stub.ListProducts(pb.ListProductsRequest())
    assert len(default.products) == 50 and default.next_page_token
    everything = await shop.stub.ListProducts(pb.ListProductsRequest(page_size=5000))
    assert len(everything.products) == len(CATALOGUE) and everything.next_page_token == ""


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        pytest.param({"page_size": -1}, "page_size", id="negative-page-size"),
        pytest.param({"filter": pb.SearchFilter(price_min=5, price_max=1)}, "filter.price_min", id="bad-filter"),
        pytest.param({"page_token": "garbage"}, "page_token", id="garbage-token"),
    ],
)
async def test_list_products_rejects_bad_requests(
    shop: RunningServer, request_fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shop.stub.ListProducts(pb.ListProductsRequest(**request_fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(err.value)


async def test_list_products_refuses_a_token_for_another_filter(shop: RunningServer) -> None:
    first = await shop.stub.ListProducts(pb.ListProductsRequest(page_size=3))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shop.stub.ListProducts(
            pb.ListProductsRequest(filter=pb.SearchFilter(categories=["mug"]), page_token=first.next_page_token)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err.value) == ["page_token"]


# --- result cache -------------------------------------------------------------------------------------------


async def test_result_cache_keeps_pages_and_options_apart(shop: RunningServer) -> None:
    base = {"text": "purple bag", "page_size": 4}
    first = await search(shop, **base)
    again = await search(shop, **base)
    assert again.result_cache == pb.CACHE_OUTCOME_HIT and ids(again) == ids(first)
    assert again.next_page_token == first.next_page_token

    second = await search(shop, **base, page_token=first.next_page_token)
    assert second.result_cache == pb.CACHE_OUTCOME_MISS and not set(ids(second)) & set(ids(first))
    for variant in ({"group_by": "group_id"}, {"diversity": 0.9}, {"like_product_ids": [ids(first)[0]]}):
        response = await search(shop, **base, **variant)
        assert response.result_cache == pb.CACHE_OUTCOME_MISS, variant

    liked = {"like_product_ids": [first_id("pink", "hat")], "top_k": 5}
    assert (await search(shop, **liked)).result_cache == pb.CACHE_OUTCOME_MISS
    assert (await search(shop, **liked)).result_cache == pb.CACHE_OUTCOME_HIT
    with_negative = await search(shop, **liked, unlike_product_ids=[first_id("pink", "hat", skip=1)])
    assert with_negative.result_cache == pb.CACHE_OUTCOME_MISS
