"""Behaviour of both VectorStore backends: the embedded Qdrant Edge store and the qdrant-client server store."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from qdrant_client import AsyncQdrantClient
from stores import DIM, MODEL, open_store, stored, unit

import imagesearch
from imagesearch.domain import FacetCount, FacetSpec, Product, SearchFilter
from imagesearch.errors import StoreConfigError, StoreUnavailable
from imagesearch.store import EdgeStore, QdrantServerStore, VectorStore
from imagesearch.store.base import Vector
from imagesearch.store.edge import indexed_clip_vectors

# qdrant-client's local mode warns that it ignores payload indexes; the store creates them for real servers.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


def at_cosine(c: float) -> Vector:
    """A unit vector whose cosine similarity to unit(1) is `c`."""
    return unit(c, float(np.sqrt(1 - c * c)))


@pytest_asyncio.fixture(params=["embedded", "qdrant"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    s = await open_store(request.param, tmp_path)
    yield s
    await s.close()


CATALOGUE = [
    Product(id="red-shoe", category="shoes", price=10.0, attributes={"color": "red", "size": "42"}),
    Product(id="blue-shoe", category="shoes", price=20.0, attributes={"color": "blue", "size": "42"}),
    Product(id="red-bag", category="bags", price=30.0, attributes={"color": "red"}),
    Product(id="blue-bag", category="bags", price=40.0, attributes={"color": "blue", "size": "L"}),
    Product(id="red-hat", category="hats", price=50.0, attributes={"color": "red", "size": "L"}),
]


async def seed(store: VectorStore) -> None:
    # Distinct similarities to unit(1), in catalogue order, so rankings are unambiguous.
    cosines = np.linspace(0.95, 0.55, len(CATALOGUE))
    await store.upsert([(p, at_cosine(float(c))) for p, c in zip(CATALOGUE, cosines, strict=True)])


async def ids_for(store: VectorStore, flt: SearchFilter, limit: int = 10) -> list[str]:
    return [hit.product.id for hit in await store.search(unit(1), flt, limit)]


async def test_upsert_reports_created_then_replaced(store: VectorStore) -> None:
    assert await store.upsert([(Product(id="a"), unit(1)), (Product(id="b"), unit(0, 1))]) == [True, True]
    assert await store.upsert([(Product(id="a", name="new"), unit(1)), (Product(id="c"), unit(1))]) == [False, True]
    assert (await store.get("a")) == stored(Product(id="a", name="new"))


async def test_upsert_keeps_last_when_batch_repeats_an_id(store: VectorStore) -> None:
    flags = await store.upsert([(Product(id="a", name="first"), unit(1)), (Product(id="a", name="last"), unit(1))])
    assert flags == [True, False]
    assert (await store.get("a")) == stored(Product(id="a", name="last"))
    assert await store.count() == 1


async def test_upsert_reports_one_creation_when_concurrent_writers_race(store: VectorStore) -> None:
    results = await asyncio.gather(*(store.upsert([(Product(id="same"), unit(1))]) for _ in range(8)))
    assert sorted(flags[0] for flags in results) == [False] * 7 + [True]


async def test_upsert_returns_empty_for_empty_batch(store: VectorStore) -> None:
    assert await store.upsert([]) == []


async def test_get_round_trips_every_field(store: VectorStore) -> None:
    product = Product(
        id="sku-1/ü",
        name="Trail runner",
        description="A light shoe.\nWaterproof.",
        category="shoes",
        price=129.99,
        currency="EUR",
        attributes={"color": "red", "size": "42", "a=b": "c=d"},
        image_url="https://example.com/shoe.jpg",
    )
    await store.upsert([(product, unit(1))])
    assert (await store.get("sku-1/ü")) == stored(product)


async def test_get_returns_none_when_product_is_unknown(store: VectorStore) -> None:
    assert await store.get("nope") is None


async def test_delete_returns_true_then_false(store: VectorStore) -> None:
    await store.upsert([(Product(id="a"), unit(1))])
    assert await store.delete("a") is True
    assert await store.delete("a") is False
    assert await store.get("a") is None


async def test_count_follows_upserts_and_deletes(store: VectorStore) -> None:
    assert await store.count() == 0
    await seed(store)
    await store.upsert([(CATALOGUE[0], unit(1))])
    await store.delete("red-bag")
    assert await store.count() == len(CATALOGUE) - 1


async def test_search_ranks_by_cosine_best_first(store: VectorStore) -> None:
    cosines = {"far": -0.6, "best": 1.0, "orthogonal": 0.0, "near": 0.8}
    await store.upsert([(Product(id=pid), at_cosine(c)) for pid, c in cosines.items()])
    hits = await store.search(unit(1), SearchFilter(), 10)
    assert [h.product.id for h in hits] == ["best", "near", "orthogonal", "far"]
    assert [h.score for h in hits] == pytest.approx([1.0, 0.8, 0.0, -0.6], abs=1e-5)


async def test_search_returns_products_without_internal_fields(store: VectorStore) -> None:
    await seed(store)
    hits = await store.search(unit(1), SearchFilter(), 1)
    assert hits[0].product == stored(CATALOGUE[0])


async def test_search_filters_by_any_of_categories(store: VectorStore) -> None:
    await seed(store)
    assert await ids_for(store, SearchFilter(categories=("bags", "hats"))) == ["red-bag", "blue-bag", "red-hat"]
    assert await ids_for(store, SearchFilter(categories=("socks",))) == []


async def test_search_filters_by_price_bounds_inclusive(store: VectorStore) -> None:
    await seed(store)
    assert await ids_for(store, SearchFilter(price_min=20.0, price_max=40.0)) == ["blue-shoe", "red-bag", "blue-bag"]
    assert await ids_for(store, SearchFilter(price_min=40.0)) == ["blue-bag", "red-hat"]
    assert await ids_for(store, SearchFilter(price_max=10.0)) == ["red-shoe"]


async def test_search_filters_by_all_attribute_pairs(store: VectorStore) -> None:
    await seed(store)
    assert await ids_for(store, SearchFilter(attributes=(("color", "red"),))) == ["red-shoe", "red-bag", "red-hat"]
    both = SearchFilter(attributes=(("color", "red"), ("size", "L")))
    assert await ids_for(store, both) == ["red-hat"]


async def test_search_keeps_attribute_pairs_apart_when_keys_contain_equals(store: VectorStore) -> None:
    key_has_equals = Product(id="k", attributes={"a=b": "c"})
    value_has_equals = Product(id="v", attributes={"a": "b=c"})
    await store.upsert([(key_has_equals, unit(1)), (value_has_equals, unit(1))])
    assert await ids_for(store, SearchFilter(attributes=(("a", "b=c"),))) == ["v"]
    assert await ids_for(store, SearchFilter(attributes=(("a=b", "c"),))) == ["k"]


async def test_search_combines_all_filter_kinds(store: VectorStore) -> None:
    await seed(store)
    flt = SearchFilter(categories=("shoes", "bags"), price_min=15.0, price_max=45.0, attributes=(("color", "blue"),))
    assert await ids_for(store, flt) == ["blue-shoe", "blue-bag"]


async def test_search_pages_with_offset_like_one_long_page(store: VectorStore) -> None:
    await store.upsert([(Product(id=f"p{i:02d}"), at_cosine(1 - i / 40)) for i in range(30)])
    everything = await ids_for(store, SearchFilter(), limit=30)
    pages = [await store.search(unit(1), SearchFilter(), 7, offset=o) for o in range(0, 35, 7)]
    assert [h.product.id for page in pages for h in page] == everything
    assert [len(page) for page in pages] == [7, 7, 7, 7, 2]


async def test_search_drops_hits_below_score_threshold(store: VectorStore) -> None:
    await seed(store)  # similarities 0.95, 0.85, 0.75, 0.65, 0.55
    hits = await store.search(unit(1), SearchFilter(), 10, score_threshold=0.8)
    assert [h.product.id for h in hits] == ["red-shoe", "blue-shoe"]


async def test_search_rejects_vector_of_wrong_dimension(store: VectorStore) -> None:
    with pytest.raises(ValueError, match=f"\\({DIM},\\)"):
        await store.search(np.ones(DIM + 1, dtype=np.float32), SearchFilter(), 10)


async def test_upsert_rejects_vector_of_wrong_dimension(store: VectorStore) -> None:
    with pytest.raises(ValueError):
        await store.upsert([(Product(id="a"), unit(1)), (Product(id="b"), np.ones(3, dtype=np.float32))])
    assert await store.count() == 0


async def test_search_matches_brute_force_on_1k_filtered_points(store: VectorStore) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((1000, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    categories = np.array(["shoes", "bags", "hats", "socks"])[rng.integers(0, 4, 1000)]
    prices = rng.integers(1, 200, 1000).astype(float)
    products = [
        Product(id=f"p{i}", category=str(categories[i]), price=float(prices[i]), attributes={"tier": str(i % 3)})
        for i in range(1000)
    ]
    await store.upsert(list(zip(products, vectors, strict=True)))
    query = vectors[0]
    flt = SearchFilter(categories=("shoes", "hats"), price_min=50.0, price_max=150.0, attributes=(("tier", "1"),))

    hits = await store.search(query, flt, 10)

    match = np.isin(categories, ["shoes", "hats"]) & (prices >= 50) & (prices <= 150) & (np.arange(1000) % 3 == 1)
    expected = np.sort(vectors[match] @ query)[::-1][:10]
    assert [h.score for h in hits] == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(match[int(h.product.id[1:])] for h in hits)


async def test_calls_raise_unavailable_when_store_is_closed(store: VectorStore) -> None:
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.get("a")


async def test_ping_answers_while_the_store_can_serve_and_fails_once_it_cannot(tmp_path: Path) -> None:
    # Health probes rely on ping: it must tell a store that serves from one that cannot, not only not raise.
    edge = await open_store("embedded", tmp_path)
    await seed(edge)
    await edge.ping()  # answers (raises nothing) while the store can serve
    await edge.close()
    with pytest.raises(StoreUnavailable):
        await edge.ping()

    client = AsyncQdrantClient(location=":memory:")
    server = await QdrantServerStore.from_client(client, DIM, MODEL, collection="pinged", where=":memory:")
    try:
        await seed(server)
        await server.ping()  # answers while the collection exists
        await client.delete_collection("pinged")  # e.g. dropped by an operator: nothing left to search
        with pytest.raises(StoreUnavailable):
            await server.ping()
    finally:
        await server.close()


# --- embedded store: persistence and configuration ---


async def test_edge_reopen_keeps_data(tmp_path: Path) -> None:
    store = await open_store("embedded", tmp_path)
    await seed(store)
    await store.delete("red-hat")
    await store.close()

    reopened = await open_store("embedded", tmp_path)
    try:
        assert await reopened.count() == len(CATALOGUE) - 1
        assert (await reopened.get("red-shoe")) == stored(CATALOGUE[0])
        assert await ids_for(reopened, SearchFilter(categories=("bags",))) == ["red-bag", "blue-bag"]
    finally:
        await reopened.close()


_KILLED_WRITER = """
import asyncio, os, signal, sys
from pathlib import Path
import numpy as np
from imagesearch.domain import Product
from imagesearch.store import EdgeStore

async def main() -> None:
    store = await EdgeStore.open(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], flush_interval_s=None)
    vector = np.zeros(int(sys.argv[2]), dtype=np.float32)
    vector[0] = 1.0
    await store.upsert([(Product(id="survivor", name="written just before kill -9"), vector)])
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_edge_upsert_survives_kill_9_after_it_returns(tmp_path: Path) -> None:
    src = str(Path(imagesearch.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "edge"), str(DIM), MODEL]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr

    store = await open_store("embedded", tmp_path)
    try:
        assert (await store.get("survivor")) == stored(Product(id="survivor", name="written just before kill -9"))
    finally:
        await store.close()


async def test_edge_reopen_raises_config_error_when_dimension_differs(tmp_path: Path) -> None:
    await (await open_store("embedded", tmp_path)).close()
    with pytest.raises(StoreConfigError, match=f"{DIM}-d.*{2 * DIM}-d.*another data directory"):
        await open_store("embedded", tmp_path, dimension=2 * DIM)


async def test_edge_reopen_raises_config_error_when_model_differs(tmp_path: Path) -> None:
    await (await open_store("embedded", tmp_path)).close()
    with pytest.raises(StoreConfigError, match=f"'{MODEL}'.*'other-model'"):
        await open_store("embedded", tmp_path, model_id="other-model")


async def test_edge_reopen_raises_config_error_when_record_is_missing_and_dimension_differs(tmp_path: Path) -> None:
    await (await open_store("embedded", tmp_path)).close()
    (tmp_path / "edge" / "imagesearch-store.json").unlink()
    with pytest.raises(StoreConfigError, match="another data directory"):
        await open_store("embedded", tmp_path, dimension=2 * DIM)
    reopened = await open_store("embedded", tmp_path)  # the failed attempt recorded nothing wrong
    await reopened.close()


async def test_edge_open_raises_unavailable_when_directory_is_in_use(tmp_path: Path) -> None:
    first = await open_store("embedded", tmp_path)
    try:
        with pytest.raises(StoreUnavailable, match="already open"):
            await open_store("embedded", tmp_path)
        await first.ping()
    finally:
        await first.close()


async def test_edge_writes_flushed_each_time_are_readable_after_reopen(tmp_path: Path) -> None:
    store = await EdgeStore.open(tmp_path / "edge", DIM, MODEL, flush_each_write=True, flush_interval_s=None)
    await store.upsert([(Product(id="a"), unit(1))])
    await store.close()
    reopened = await open_store("embedded", tmp_path)
    try:
        assert await reopened.get("a") == stored(Product(id="a"))
    finally:
        await reopened.close()


# --- server store: configuration and unreachable servers ---


async def test_qdrant_open_raises_config_error_when_collection_dimension_differs() -> None:
    client = AsyncQdrantClient(location=":memory:")
    first = await QdrantServerStore.from_client(client, DIM, MODEL)
    with pytest.raises(StoreConfigError, match=f"holds {DIM}-d.*{2 * DIM}-d.*another collection"):
        await QdrantServerStore.from_client(client, 2 * DIM, MODEL)
    await first.close()


async def test_qdrant_open_raises_config_error_when_collection_model_differs() -> None:
    client = AsyncQdrantClient(location=":memory:")
    first = await QdrantServerStore.from_client(client, DIM, MODEL)
    with pytest.raises(StoreConfigError, match=f"created for model '{MODEL}'"):
        await QdrantServerStore.from_client(client, DIM, "other-model")
    await first.close()


async def test_qdrant_open_keeps_existing_collection_when_compatible() -> None:
    client = AsyncQdrantClient(location=":memory:")
    first = await QdrantServerStore.from_client(client, DIM, MODEL)
    await first.upsert([(Product(id="a"), unit(1))])
    second = await QdrantServerStore.from_client(client, DIM, MODEL)
    assert await second.count() == 1
    await first.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_qdrant_open_raises_unavailable_quickly_when_server_is_down() -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=re.escape(url)):
        await QdrantServerStore.open(url, DIM, MODEL, timeout_s=1.0, grpc_port=port)
    # Generous bound: the point is that an unreachable server fails the open instead of hanging it.
    assert time.monotonic() - started < 10


async def test_qdrant_open_raises_unavailable_when_server_never_answers() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(StoreUnavailable, match="timed out"):
            await QdrantServerStore.open(f"http://127.0.0.1:{port}", DIM, MODEL, timeout_s=0.5, grpc_port=port)


# --- search features: exclusions, diversity, example vectors, facets, listing (both backends) ---


async def test_search_never_returns_excluded_products(store: VectorStore) -> None:
    await seed(store)
    hits = await store.search(unit(1), SearchFilter(), 10, exclude_ids={"red-shoe", "red-bag", "unknown"})
    assert [h.product.id for h in hits] == ["blue-shoe", "blue-bag", "red-hat"]
    filtered = await store.search(unit(1), SearchFilter(categories=("shoes",)), 10, exclude_ids={"red-shoe"})
    assert [h.product.id for h in filtered] == ["blue-shoe"]


def mmr_reference(query: Vector, vectors: dict[str, Vector], diversity: float, count: int) -> list[str]:
    """Maximal Marginal Relevance by the book, over every product (fewer than DIVERSITY_CANDIDATES here)."""
    pending = dict(vectors)
    chosen: list[str] = []
    while pending and len(chosen) < count:

        def mmr(pid: str) -> float:
            redundancy = max((float(pending[pid] @ vectors[c]) for c in chosen), default=0.0)
            return (1 - diversity) * float(pending[pid] @ query) - diversity * redundancy

        best = max(pending, key=mmr) if chosen else max(pending, key=lambda pid: float(pending[pid] @ query))
        chosen.append(best)
        del pending[best]
    return chosen


async def test_search_with_diversity_follows_mmr_and_keeps_similarity_scores(store: VectorStore) -> None:
    rng = np.random.default_rng(3)
    # Three tight clusters at decreasing similarity to the query: plain ranking returns the nearest cluster
    # first; diversity should interleave the others.
    centres = [at_cosine(0.9), unit(0.6, 0, 0.8), unit(0.3, 0, 0, 0.95)]
    vectors: dict[str, Vector] = {}
    for c, centre in enumerate(centres):
        for i in range(6):
            v = centre + 0.03 * rng.standard_normal(DIM).astype(np.float32)
            vectors[f"c{c}-{i}"] = (v / np.linalg.norm(v)).astype(np.float32)
    await store.upsert([(Product(id=pid), v) for pid, v in vectors.items()])
    query = unit(1)

    plain = await store.search(query, SearchFilter(), 6)
    diverse = await store.search(query, SearchFilter(), 6, diversity=0.7)

    assert {h.product.id[:2] for h in plain} == {"c0"}
    assert [h.product.id for h in diverse] == mmr_reference(query, vectors, 0.7, 6)
    assert {h.product.id[:2] for h in diverse[:3]} == {"c0", "c1", "c2"}
    for hit in diverse:  # scores stay similarities to the query, not MMR scores
        assert hit.score == pytest.approx(float(vectors[hit.product.id] @ query), abs=1e-4)
    # Pages are slices of one diversified list.
    pages = [await store.search(query, SearchFilter(), 4, offset=o, diversity=0.7) for o in (0, 4, 8)]
    assert [h.product.id for page in pages for h in page] == mmr_reference(query, vectors, 0.7, 12)


async def test_vectors_returns_stored_embeddings_of_known_products_only(store: VectorStore) -> None:
    await store.upsert([(Product(id="a"), unit(1)), (Product(id="b/ü"), unit(0, 1))])
    found = await store.vectors(["a", "b/ü", "missing"])
    assert set(found) == {"a", "b/ü"}
    np.testing.assert_allclose(found["a"], unit(1), atol=1e-6)
    np.testing.assert_allclose(found["b/ü"], unit(0, 1), atol=1e-6)
    assert found["a"].dtype == np.float32
    assert await store.vectors([]) == {}


async def test_facets_count_categories_and_attribute_values_under_the_filter(store: VectorStore) -> None:
    await seed(store)
    spec = FacetSpec(categories=True, attribute_keys=("color", "size", "absent"))

    everything = await store.facets(SearchFilter(), spec)
    assert everything.categories == (FacetCount("bags", 2), FacetCount("shoes", 2), FacetCount("hats", 1))
    assert everything.attributes == (
        ("color", (FacetCount("red", 3), FacetCount("blue", 2))),
        ("size", (FacetCount("42", 2), FacetCount("L", 2))),
        ("absent", ()),
    )

    cheap = await store.facets(SearchFilter(price_max=30.0), spec, exclude_ids={"red-shoe"})
    assert cheap.categories == (FacetCount("bags", 1), FacetCount("shoes", 1))
    assert dict(cheap.attributes)["color"] == (FacetCount("blue", 1), FacetCount("red", 1))

    top_one = await store.facets(SearchFilter(), FacetSpec(categories=True, attribute_keys=("color",), max_values=1))
    assert top_one.categories == (FacetCount("bags", 2),)  # ties broken by value
    assert top_one.attributes == (("color", (FacetCount("red", 3),)),)


async def test_facets_keep_attribute_keys_apart_when_keys_contain_equals(store: VectorStore) -> None:
    await store.upsert(
        [(Product(id="k", attributes={"a=b": "c"}), unit(1)), (Product(id="v", attributes={"a": "b=c"}), unit(1))]
    )
    facets = await store.facets(SearchFilter(), FacetSpec(attribute_keys=("a", "a=b")))
    assert facets.attributes == (("a", (FacetCount("b=c", 1),)), ("a=b", (FacetCount("c", 1),)))
    assert facets.categories == ()


async def test_scroll_lists_every_matching_product_once_in_a_stable_order(store: VectorStore) -> None:
    products = [Product(id=f"p{i:02d}", category="even" if i % 2 == 0 else "odd") for i in range(25)]
    await store.upsert([(p, unit(1)) for p in products])

    async def listing(flt: SearchFilter, size: int) -> list[list[str]]:
        pages, cursor = [], None
        while True:
            page, cursor = await store.scroll(flt, size, cursor)
            pages.append([p.id for p in page])
            if cursor is None:
                return pages

    pages = await listing(SearchFilter(), 10)
    assert [len(page) for page in pages] == [10, 10, 5]
    flat = [pid for page in pages for pid in page]
    assert sorted(flat) == sorted(p.id for p in products)
    assert await listing(SearchFilter(), 25) == [flat]  # the same order whatever the page size
    even = [pid for page in await listing(SearchFilter(categories=("even",)), 4) for pid in page]
    assert even == [pid for pid in flat if int(pid[1:]) % 2 == 0]
    first, _ = await store.scroll(SearchFilter(), 1)
    assert first == [stored(next(p for p in products if p.id == flat[0]))]  # whole products come back


async def test_scroll_stays_consistent_when_products_change_between_pages(store: VectorStore) -> None:
    await store.upsert([(Product(id=f"p{i:02d}"), unit(1)) for i in range(20)])
    first, cursor = await store.scroll(SearchFilter(), 10)
    seen = [p.id for p in first]
    await store.delete(seen[0])  # already listed
    await store.upsert([(Product(id=seen[1], name="renamed"), unit(1))])
    rest: list[str] = []
    while cursor is not None:
        page, cursor = await store.scroll(SearchFilter(), 10, cursor)
        rest += [p.id for p in page]
    assert sorted(seen + rest) == [f"p{i:02d}" for i in range(20)]


async def test_scroll_rejects_a_cursor_that_is_not_a_point_id(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="cursor"):
        await store.scroll(SearchFilter(), 10, "not-a-uuid")


@pytest.mark.slow
async def test_embedded_store_builds_its_vector_index_at_open_past_the_threshold(tmp_path: Path) -> None:
    # Enough 512-d vectors (12 MB) for Qdrant to use the HNSW index rather than a full scan once it exists.
    count, dimension = 6000, 512
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((count, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = [Product(id=f"p{i}", category=("even", "odd")[i % 2], price=float(i)) for i in range(count)]
    path = tmp_path / "edge"

    def indexed(store: EdgeStore) -> int:
        # The engine's own count (less its sparse vectors); the store has no public use for it.
        return indexed_clip_vectors(store._open_shard())

    plain = await EdgeStore.open(path, dimension, MODEL)  # the default threshold, 0: never index
    for start in range(0, count, 1000):
        await plain.upsert(list(zip(products[start : start + 1000], vectors[start : start + 1000], strict=True)))
    assert indexed(plain) == 0
    await plain.close()

    store = await EdgeStore.open(path, dimension, MODEL, index_threshold=count - 1000)
    try:
        assert indexed(store) == count
        assert await store.count() == count  # nothing lost
        for i in range(0, count, 600):  # each product is still its own best match, filtered or not
            assert (await store.search(vectors[i], SearchFilter(), 5))[0].product.id == f"p{i}"
            same_category = SearchFilter(categories=(products[i].category,))
            hits = await store.search(vectors[i], same_category, 5)
            assert hits[0].product.id == f"p{i}"
            assert {hit.product.category for hit in hits} == {products[i].category}
        # Products added after the index was built are searchable at once (scanned until the next start).
        await store.upsert([(Product(id="late", category="even"), vectors[1])])
        assert {hit.product.id for hit in await store.search(vectors[1], SearchFilter(), 2)} == {"p1", "late"}
    finally:
        await store.close()
