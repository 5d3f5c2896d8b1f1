"""Hybrid search (CLIP vectors fused with BM25 over each product's words) and lexical search, through the real
gRPC server with the bundled trained model (synthetic-clip).

- Relevance on the demo catalogue (960 products, model codes in every third name): the measurements of the
  issue, as thresholds.
- The contract: default modes, lexical search, errors, and what a score means under each fusion.
- Every search feature in hybrid mode, on both store backends ("qdrant" is qdrant-client's in-process local mode,
  which runs the server store's code path, prefetch and fusion included).
- Both cache tiers with the mode in their keys.
- The scores of each mode at the store (stores written before hybrid search: tests/test_store_migration.py).
"""

from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from conftest import RunningServer, start_server, stop_server
from qdrant_client import AsyncQdrantClient
from rpc import index_all, search, violated_fields
from stores import open_store, unit

from imagesearch.config import Settings
from imagesearch.domain import LexicalQuery, Product, SearchFilter
from imagesearch.model.encoder import ClipEncoder
from imagesearch.store import QdrantServerStore, VectorStore
from imagesearch.store.base import Vector
from imagesearch.synthetic import CatalogueItem, make_catalogue, render
from imagesearch.synthetic.renderer import COLOURS, KINDS
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import products_pb2

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    # qdrant-client's local mode warns that it ignores payload indexes; the store creates them for real servers.
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
]

DENSE, HYBRID, LEXICAL = pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_HYBRID, pb.SEARCH_MODE_LEXICAL
HIT, MISS, BYPASS = pb.CACHE_OUTCOME_HIT, pb.CACHE_OUTCOME_MISS, pb.CACHE_OUTCOME_BYPASS

# The demo's catalogue (imagesearch demo --products 960).
DEMO = make_catalogue(960, seed=7, model_codes=True)
DEMO_BY_ID = {item.product_id: item for item in DEMO}


def as_product(item: CatalogueItem, **attributes: str) -> products_pb2.Product:
    return products_pb2.Product(
        id=item.product_id,
        name=item.name,
        category=item.category,
        price=item.price,
        currency="EUR",
        attributes={**item.attributes, **attributes},
    )


def ids(response: pb.SearchResponse) -> list[str]:
    return [hit.product.id for hit in response.hits]


async def search_error(running: RunningServer, **query: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search(running.stub, **query)
    return err.value


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(tmp_path_factory: pytest.TempPathFactory, encoder: ClipEncoder) -> AsyncIterator[RunningServer]:
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("demo"), model="synthetic-clip")
    running = await start_server(settings, encoder)
    await index_all(running.stub, [(as_product(item), item.jpeg()) for item in DEMO])
    yield running
    await stop_server(running)


# --- relevance on the demo catalogue --------------------------------------------------------------------------


def relevant(pattern: str, colour: str, kind: str) -> set[str]:
    return {i.product_id for i in DEMO if (i.pattern, i.colour, i.kind) == (pattern, colour, kind)}


# The measurement: 39 queries "{striped|dotted} {colour} {kind}", drawn once (fixed seed) among the
# combinations the catalogue has.
PATTERN_QUERIES = random.Random(16).sample(
    [(p, c, k) for p in ("striped", "dotted") for c in COLOURS for k in KINDS if relevant(p, c, k)], 39
)


async def pattern_precision(running: RunningServer, **query: Any) -> float:
    """Precision over the first min(5, relevant) hits, averaged over PATTERN_QUERIES."""
    scores = []
    for pattern, colour, kind in PATTERN_QUERIES:
        wanted = relevant(pattern, colour, kind)
        n = min(5, len(wanted))
        response = await search(running.stub, text=f"{pattern} {colour} {kind}", top_k=n, **query)
        scores.append(len(set(ids(response)) & wanted) / n)
    return float(np.mean(scores))


async def colour_kind_precision(running: RunningServer, **query: Any) -> float:
    """Precision at 5 of "{colour} {kind}", averaged over all 80 pairs."""
    scores = []
    for colour in COLOURS:
        for kind in KINDS:
            response = await search(running.stub, text=f"{colour} {kind}", top_k=5, **query)
            found = [DEMO_BY_ID[pid] for pid in ids(response)]
            scores.append(sum(1 for item in found if (item.colour, item.kind) == (colour, kind)) / 5)
    return float(np.mean(scores))


async def test_hybrid_finds_the_pattern_the_model_cannot_see(demo: RunningServer) -> None:
    dense = await pattern_precision(demo, mode="dense")
    hybrid = await pattern_precision(demo)  # the default mode of a text-only search
    by_rank = await pattern_precision(demo, mode="hybrid", fusion="rank")
    assert hybrid >= 0.90, f"pattern + colour + kind precision: hybrid {hybrid:.3f}, dense {dense:.3f}"
    assert dense < by_rank <= hybrid, f"dense {dense:.3f}, rank fusion {by_rank:.3f}, weighted {hybrid:.3f}"


async def test_hybrid_keeps_colour_and_kind_precision(demo: RunningServer) -> None:
    hybrid = await colour_kind_precision(demo)
    assert hybrid >= 0.97, f"colour + kind precision@5 in hybrid mode: {hybrid:.3f}"


async def test_a_model_code_finds_its_product_first(demo: RunningServer) -> None:
    coded = [item for item in DEMO if item.model_code]
    assert len(coded) == 320 and len({item.model_code for item in coded}) == 320
    first = [ids(await search(demo.stub, text=item.model_code, top_k=1))[:1] == [item.product_id] for item in coded]
    assert np.mean(first) >= 0.95, f"{sum(first)} of {len(coded)} model codes find their product first"


# --- the contract: modes, lexical search, errors, scores -------------------------------------------------------


def unseen_jpeg(kind: str, colour: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    render(kind, colour, "plain", random.Random(seed), 128).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("query", "with_image", "mode"),
    [
        pytest.param({"text": "red mug"}, False, HYBRID, id="text"),
        pytest.param({"text": "red mug", "score_threshold": 0.2}, False, DENSE, id="text-with-cosine-threshold"),
        pytest.param({}, True, DENSE, id="image"),
        pytest.param({"text": "red mug"}, True, DENSE, id="multimodal"),
        pytest.param({"text": "red mug", "like_product_ids": ["p00001"]}, False, DENSE, id="examples-and-text"),
        pytest.param({"text": "red mug", "mode": "lexical"}, False, LEXICAL, id="asked"),
    ],
)
async def test_default_mode_is_hybrid_for_text_alone_and_dense_otherwise(
    demo: RunningServer, query: dict[str, Any], with_image: bool, mode: int
) -> None:
    image = unseen_jpeg("mug", "red", seed=5) if with_image else None
    assert (await search(demo.stub, image=image, **query)).mode == mode


async def test_lexical_search_matches_words_without_the_model(demo: RunningServer) -> None:
    wanted = relevant("striped", "red", "chair")
    response = await search(demo.stub, text="Stripes, red chairs", mode="lexical", top_k=20)  # stemmed words
    assert response.embedding_cache == BYPASS  # nothing was encoded
    assert set(ids(response)[: len(wanted)]) == wanted
    scores = [hit.score for hit in response.hits]
    assert scores[0] == pytest.approx(1.0) and scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert all(any(word in hit.product.name.lower() for word in ("stripe", "red", "chair")) for hit in response.hits)


async def test_lexical_search_of_stop_words_finds_nothing(demo: RunningServer) -> None:
    assert list((await search(demo.stub, text="the of and", mode="lexical")).hits) == []


@pytest.mark.parametrize(
    ("query", "with_image", "field"),
    [
        pytest.param({"mode": "hybrid"}, True, "query.mode", id="hybrid-without-text"),
        pytest.param({"like_product_ids": ["p00001"], "mode": "lexical"}, False, "query.mode", id="lexical-no-text"),
        pytest.param({"text": "red mug", "mode": "lexical"}, True, "query.mode", id="lexical-with-image"),
        pytest.param(
            {"text": "red mug", "like_product_ids": ["p00001"], "mode": "lexical"}, False, "query.mode", id="examples"
        ),
        pytest.param({"text": "red mug", "mode": 7}, False, "query.mode", id="unknown-mode"),
        pytest.param({"text": "red mug", "fusion": 9}, False, "query.hybrid_spec.fusion", id="unknown-fusion"),
        pytest.param(
            {"text": "red mug", "lexical_weight": 1.5}, False, "query.hybrid_spec.lexical_weight", id="weight"
        ),
        pytest.param(
            {"text": "red mug", "mode": "hybrid", "score_threshold": -0.2},
            False,
            "query.score_threshold",
            id="negative-threshold-in-hybrid",
        ),
        pytest.param(
            {"text": "red mug", "mode": "lexical", "score_threshold": 1.5},
            False,
            "query.score_threshold",
            id="threshold-above-1-in-lexical",
        ),
    ],
)
async def test_search_rejects_a_mode_it_cannot_serve(
    demo: RunningServer, query: dict[str, Any], with_image: bool, field: str
) -> None:
    error = await search_error(demo, image=unseen_jpeg("mug", "red", seed=5) if with_image else None, **query)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(error)


async def test_weighted_score_is_the_mean_of_the_mapped_cosine_and_the_relative_bm25(demo: RunningServer) -> None:
    text = "striped red chair"
    dense = {h.product.id: h.score for h in (await search(demo.stub, text=text, mode="dense", top_k=100)).hits}
    words = {h.product.id: h.score for h in (await search(demo.stub, text=text, mode="lexical", top_k=100)).hits}
    for weight in (0.5, 0.2):
        hybrid = await search(demo.stub, text=text, lexical_weight=weight, top_k=10)
        for hit in hybrid.hits:
            expected = (1 - weight) * (1 + dense[hit.product.id]) / 2 + weight * words.get(hit.product.id, 0.0)
            assert hit.score == pytest.approx(expected, abs=1e-4)


async def test_lexical_weight_moves_hybrid_from_the_model_to_the_words(demo: RunningServer) -> None:
    text, wanted = "dotted blue lamp", relevant("dotted", "blue", "lamp")
    dense = ids(await search(demo.stub, text=text, mode="dense", top_k=20))
    assert ids(await search(demo.stub, text=text, lexical_weight=0.0, top_k=20)) == dense
    words_only = ids(await search(demo.stub, text=text, lexical_weight=1.0, top_k=len(wanted)))
    assert set(words_only) == wanted


async def test_rank_fusion_scores_range_from_half_to_one(demo: RunningServer) -> None:
    response = await search(demo.stub, text="dotted green hat", mode="hybrid", fusion="rank", top_k=50)
    scores = [hit.score for hit in response.hits]
    # The first is first in one ranking at least (0.5) and at best in both (1).
    assert 0.5 <= scores[0] <= 1.0 + 1e-6 and scores == sorted(scores, reverse=True) and scores[-1] > 0


# --- search features in hybrid mode, both backends -------------------------------------------------------------

SHOP = make_catalogue(160, seed=4321, model_codes=True)
SHOP_BY_ID = {item.product_id: item for item in SHOP}


def family(item: CatalogueItem) -> str | None:
    return None if int(item.product_id[1:]) % 9 == 0 else f"{item.kind}/{item.colour}"


def family_key(product_id: str) -> str:
    return family(SHOP_BY_ID[product_id]) or f"single:{product_id}"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["embedded", "qdrant"])
async def shop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, encoder: ClipEncoder
) -> AsyncIterator[RunningServer]:
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("shop"), model="synthetic-clip")
    store = None
    if request.param == "qdrant":
        client = AsyncQdrantClient(location=":memory:")
        store = await QdrantServerStore.from_client(client, encoder.dimension, encoder.model_id, where=":memory:")
    running = await start_server(settings, encoder, store=store)
    products = []
    for item in SHOP:
        group = family(item)
        products.append((as_product(item, **({"group_id": group} if group else {})), item.jpeg()))
    await index_all(running.stub, products)
    yield running
    await stop_server(running)


async def all_pages(running: RunningServer, **query: Any) -> list[pb.SearchResponse]:
    pages = [await search(running.stub, **query)]
    while pages[-1].next_page_token:
        pages.append(await search(running.stub, **query, page_token=pages[-1].next_page_token))
    return pages


@pytest.mark.parametrize(
    ("flt", "keep"),
    [
        pytest.param({"categories": ["mug", "lamp"]}, lambda item: item.category in ("mug", "lamp"), id="category"),
        pytest.param({"price_min": 40.0, "price_max": 150.0}, lambda item: 40.0 <= item.price <= 150.0, id="price"),
        pytest.param({"attributes": {"colour": "red"}}, lambda item: item.colour == "red", id="attribute"),
    ],
)
async def test_hybrid_filters_restrict_results_without_reordering_them(
    shop: RunningServer, flt: dict[str, Any], keep: Any
) -> None:
    unfiltered = await search(shop.stub, text="striped red mug", top_k=100)
    filtered = await search(shop.stub, text="striped red mug", top_k=20, **flt)
    assert filtered.mode == HYBRID
    expected = [pid for pid in ids(unfiltered) if keep(SHOP_BY_ID[pid])]
    assert all(keep(SHOP_BY_ID[pid]) for pid in ids(filtered))
    common = min(len(ids(filtered)), len(expected))
    assert common >= 5 and ids(filtered)[:common] == expected[:common]
    # A score depends on the query and the product only.
    scores = {h.product.id: h.score for h in unfiltered.hits}
    assert all(h.score == pytest.approx(scores[h.product.id], abs=1e-5) for h in filtered.hits)


@pytest.mark.parametrize("fusion", ["weighted", "rank"])
async def test_hybrid_pages_concatenate_to_one_ranking(shop: RunningServer, fusion: str) -> None:
    flt: dict[str, Any] = {"price_max": 150.0}
    pages = await all_pages(shop, text="dotted green lamp", page_size=9, mode="hybrid", fusion=fusion, **flt)
    flat = [pid for page in pages for pid in ids(page)]
    expected = {item.product_id for item in SHOP if item.price <= 150.0}
    assert len(flat) == len(expected) and set(flat) == expected  # the fused ranking covers this small catalogue
    scores = [hit.score for page in pages for hit in page.hits]
    assert scores == sorted(scores, reverse=True)
    single = await search(shop.stub, text="dotted green lamp", top_k=100, mode="hybrid", fusion=fusion, **flt)
    assert flat[:100] == ids(single)


async def test_hybrid_group_by_shows_each_family_once(shop: RunningServer) -> None:
    ungrouped = ids(await search(shop.stub, text="striped blue shoe", top_k=100))
    grouped = ids(await search(shop.stub, text="striped blue shoe", group_by="group_id", top_k=12))
    firsts: list[str] = []
    for pid in ungrouped:
        if family_key(pid) not in {family_key(f) for f in firsts}:
            firsts.append(pid)
    assert grouped == firsts[:12]
    assert SHOP_BY_ID[grouped[0]].kind == "shoe"


def mmr_reference(
    ranking: list[tuple[str, float]], vectors: dict[str, Vector], diversity: float, count: int
) -> list[str]:
    """MMR by the book over the fused ranking: relevance is the fused score, similarity that of the images."""
    candidates = list(ranking)
    chosen = [candidates.pop(0)[0]]
    while candidates and len(chosen) < count:

        def gain(entry: tuple[str, float]) -> float:
            redundancy = max(float(vectors[entry[0]] @ vectors[c]) for c in chosen)
            return (1 - diversity) * entry[1] - diversity * redundancy

        best = max(candidates, key=gain)
        candidates.remove(best)
        chosen.append(best[0])
    return chosen


async def test_hybrid_diversity_follows_mmr_over_the_fused_scores(shop: RunningServer) -> None:
    text = "striped red mug"
    ranking = [(h.product.id, h.score) for page in await all_pages(shop, text=text, page_size=100) for h in page.hits]
    vectors = await shop.components.store.vectors([pid for pid, _ in ranking])
    diverse = await search(shop.stub, text=text, top_k=10, diversity=0.5)
    assert ids(diverse) == mmr_reference(ranking, vectors, 0.5, 10)
    scores = dict(ranking)
    assert all(hit.score == pytest.approx(scores[hit.product.id], abs=1e-5) for hit in diverse.hits)
    second = await search(shop.stub, text=text, page_size=5, diversity=0.5)
    rest = await search(shop.stub, text=text, page_size=5, diversity=0.5, page_token=second.next_page_token)
    assert ids(second) + ids(rest) == ids(diverse)


async def test_hybrid_score_threshold_keeps_the_hits_above_it(shop: RunningServer) -> None:
    everything = await search(shop.stub, text="dotted yellow bottle", top_k=100)
    above = await search(shop.stub, text="dotted yellow bottle", top_k=100, mode="hybrid", score_threshold=0.6)
    assert ids(above) == [h.product.id for h in everything.hits if h.score > 0.6 + 1e-6][: len(above.hits)]
    assert 0 < len(above.hits) < len(everything.hits)


async def test_multimodal_hybrid_adds_the_words_of_its_text(shop: RunningServer) -> None:
    photo = unseen_jpeg("shoe", "blue", seed=424242)
    dense = await search(shop.stub, image=photo, text="striped green shoe", top_k=5)
    hybrid = await search(shop.stub, image=photo, text="striped green shoe", top_k=5, mode="hybrid")
    assert (dense.mode, hybrid.mode) == (DENSE, HYBRID)
    assert hybrid.query_kind == pb.QUERY_KIND_MULTIMODAL
    top = SHOP_BY_ID[ids(hybrid)[0]]
    assert (top.pattern, top.colour, top.kind) == ("striped", "green", "shoe")  # the only one
    striped = [SHOP_BY_ID[pid].pattern == "striped" for pid in ids(hybrid)]
    assert sum(striped) > sum(SHOP_BY_ID[pid].pattern == "striped" for pid in ids(dense))


async def test_more_like_this_with_text_in_hybrid_mode(shop: RunningServer) -> None:
    liked = next(i.product_id for i in SHOP if (i.colour, i.kind, i.pattern) == ("blue", "mug", "plain"))
    response = await search(shop.stub, like_product_ids=[liked], text="striped", mode="hybrid", top_k=3)
    assert response.query_kind == pb.QUERY_KIND_RECOMMEND and response.mode == HYBRID
    assert liked not in ids(response)
    top = SHOP_BY_ID[ids(response)[0]]
    assert (top.pattern, top.colour, top.kind) == ("striped", "blue", "mug")  # the only one


async def test_facets_count_the_same_in_every_mode(shop: RunningServer) -> None:
    spec = pb.SearchQuery.FacetSpec(categories=True, attribute_keys=["colour"])
    flt: dict[str, Any] = {"price_max": 120.0}
    counted = [
        await search(shop.stub, text="red mug", facet_spec=spec, mode=mode, top_k=3, **flt)
        for mode in ("dense", "hybrid", "lexical")
    ]
    assert counted[0].category_facets == counted[1].category_facets == counted[2].category_facets
    assert counted[0].attribute_facets == counted[1].attribute_facets == counted[2].attribute_facets
    assert sum(c.count for c in counted[0].category_facets) == sum(1 for i in SHOP if i.price <= 120.0)


# --- caches ---------------------------------------------------------------------------------------------------


async def test_result_cache_keeps_modes_apart_and_the_encoding_cache_is_shared(demo: RunningServer) -> None:
    text = "a dotted purple bag for the caches"
    dense = await search(demo.stub, text=text, mode="dense")
    assert (dense.embedding_cache, dense.result_cache) == (MISS, MISS)
    hybrid = await search(demo.stub, text=text, mode="hybrid")
    assert (hybrid.embedding_cache, hybrid.result_cache) == (HIT, MISS)  # the same text, the same vector
    lexical = await search(demo.stub, text=text, mode="lexical")
    assert (lexical.embedding_cache, lexical.result_cache) == (BYPASS, MISS)
    for variant in ({"fusion": "rank"}, {"lexical_weight": 0.3}):
        assert (await search(demo.stub, text=text, mode="hybrid", **variant)).result_cache == MISS
    for mode, first in (("dense", dense), ("hybrid", hybrid), ("lexical", lexical)):
        again = await search(demo.stub, text=text, mode=mode)
        assert again.result_cache == HIT and ids(again) == ids(first)
    # What a mode does not use is not part of its key.
    assert (await search(demo.stub, text=text, mode="dense", fusion="rank")).result_cache == HIT


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"mode": "dense"}, id="mode"),
        pytest.param({"fusion": "rank"}, id="fusion"),
        pytest.param({"lexical_weight": 0.3}, id="weight"),
    ],
)
async def test_page_token_is_refused_with_another_mode(demo: RunningServer, change: dict[str, Any]) -> None:
    first = await search(demo.stub, text="striped orange hat", page_size=3)
    error = await search_error(demo, text="striped orange hat", page_size=3, page_token=first.next_page_token, **change)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(error) == ["query.page_token"]


# --- the stores: scores of each mode --------------------------------------------------------------------------


@pytest_asyncio.fixture(params=["embedded", "qdrant"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    s = await open_store(request.param, tmp_path)
    await s.upsert(
        [
            (Product(id="code", name="Red mug RM-4471", category="mugs"), unit(0.2, 1)),
            (Product(id="mug", name="Red mug", category="mugs"), unit(1)),
            (Product(id="chair", name="Striped red chair", category="chairs"), unit(0.6, 0.8)),
            (Product(id="lamp", name="Blue lamp", category="lamps"), unit(-1, 0.3)),
            (Product(id="wordless"), unit(1, 0.1)),  # no words at all: found by its vector only
        ]
    )
    yield s
    await s.close()


async def scored(store: VectorStore, vector: Vector | None, text: str, **kwargs: Any) -> dict[str, float]:
    fusion = kwargs.pop("fusion", "weighted")
    weight = kwargs.pop("weight", 0.5)
    hits = await store.search(vector, SearchFilter(), 10, lexical=LexicalQuery(text, fusion, weight), **kwargs)
    return {hit.product.id: hit.score for hit in hits}


async def test_store_lexical_scores_are_relative_to_the_best_match(store: VectorStore) -> None:
    words = await scored(store, None, "red mug rm-4471")
    assert list(words) == ["code", "mug", "chair"] and words["code"] == pytest.approx(1.0)
    assert 0 < words["chair"] < words["mug"] < 1
    # Relative to the best match of the whole collection: a filter leaves scores as they are.
    filtered = await store.search(
        None, SearchFilter(categories=("chairs",)), 10, lexical=LexicalQuery("red mug rm-4471")
    )
    assert [(h.product.id, h.score) for h in filtered] == [("chair", pytest.approx(words["chair"]))]
    assert await scored(store, None, "the of") == {}


async def test_store_weighted_fusion_follows_its_formula(store: VectorStore) -> None:
    query = unit(1)
    dense = {h.product.id: h.score for h in await store.search(query, SearchFilter(), 10)}
    words = await scored(store, None, "red chair")
    for weight in (0.5, 0.8):
        fused = await scored(store, query, "red chair", weight=weight)
        assert set(fused) == set(dense)  # every product: 200 candidates a side
        for pid, score in fused.items():
            assert score == pytest.approx((1 - weight) * (1 + dense[pid]) / 2 + weight * words.get(pid, 0.0), abs=1e-5)


async def test_store_rank_fusion_scores_one_when_first_in_both_rankings(store: VectorStore) -> None:
    # Dense ranking: mug, wordless, chair, code, lamp; lexical ranking of "red mug": mug, then code, chair.
    fused = await scored(store, unit(1), "red mug", fusion="rank")
    assert fused["mug"] == pytest.approx(1.0)
    assert fused["wordless"] == pytest.approx(30 / 61)  # second by vector, no words
    assert fused["lamp"] == pytest.approx(30 / 64)


async def test_store_search_needs_a_vector_or_words(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="vector"):
        await store.search(None, SearchFilter(), 10)
