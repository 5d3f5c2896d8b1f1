"""The cache's keys and values (search/cache.py) without a server: a key changes with every input of the
ranking (so two queries never share an entry) and with nothing else; values that are not ours are misses.
Fast; part of the mutation-testing selection (tools/mutation.sh). test_cache.py shows the same through gRPC,
test_hardening.py checks key equality against normalised queries by property."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest

from imagesearch.domain import CacheDescription, Hit, Product, Query, SearchFilter, canonical_bytes
from imagesearch.images import NormalizedBox
from imagesearch.search import cache as cache_module
from imagesearch.search.cache import KEY_VERSION, LruCache, NoCache, ResultKey, SearchCache

VECTOR = np.array([0.6, 0.8, 0.0], dtype=np.float32)
QUERY = Query(text="", image=None, flt=SearchFilter(), top_k=10, text_weight=0.5)
BASE = ResultKey(query=QUERY, vector=VECTOR, offset=0, count=11)
_KEY_FIELDS = {f.name for f in dataclasses.fields(ResultKey)}
HITS = [
    Hit(
        product=Product(
            id="p\u00fc",
            name="Mug",
            description="two\nlines",
            category="mugs",
            price=9.5,
            currency="EUR",
            attributes={"colour": "red"},
            image_url="https://x.test/p.jpg",
        ),
        score=0.875,
    ),
    Hit(product=Product(id="q"), score=-0.25),
]


def key_with(**changes: Any) -> ResultKey:
    """BASE with some of its own fields (vector, offset, count) and some of its query's changed."""
    own = {name: changes.pop(name) for name in list(changes) if name in _KEY_FIELDS}
    return dataclasses.replace(BASE, query=dataclasses.replace(QUERY, **changes), **own)


class RecordingBackend:
    """An in-memory backend that records what was stored with which TTL."""

    def __init__(self, name: str = "memory", available: bool = True) -> None:
        self.name = name
        self.available = available
        self.values: dict[str, bytes] = {}
        self.ttls: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.closed = False

    async def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self.values[key], self.ttls[key] = value, ttl_s

    async def get_counter(self, key: str) -> int | None:
        return self.counters.get(key, 0) if self.available else None

    async def incr(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def close(self) -> None:
        self.closed = True


def cache_over(backend: Any = None, *, model_id: str = "model-a", namespace: str | None = None) -> SearchCache:
    backend = backend if backend is not None else RecordingBackend()
    if namespace is None:  # the default: no namespace
        return SearchCache(backend, model_id=model_id, embedding_ttl_s=3600, result_ttl_s=60)
    return SearchCache(backend, model_id=model_id, embedding_ttl_s=3600, result_ttl_s=60, namespace=namespace)


CACHE = cache_over()


# --- keys -------------------------------------------------------------------------------------------------------


def test_keys_are_prefixed_by_format_version_and_namespace() -> None:
    assert KEY_VERSION == "v3"
    assert CACHE.embedding_key("text", b"mug").startswith("imagesearch:v3:emb:")
    assert CACHE.result_key(1, BASE).startswith("imagesearch:v3:res:")
    staging = cache_over(namespace="staging")
    assert staging.embedding_key("text", b"mug").startswith("imagesearch:v3:staging:emb:")
    assert staging.result_key(1, BASE).startswith("imagesearch:v3:staging:res:")
    # The rest of the key is the same digest: only the prefix keeps deployments apart.
    assert (
        staging.embedding_key("text", b"mug").rsplit(":", 1)[1] == CACHE.embedding_key("text", b"mug").rsplit(":", 1)[1]
    )


def test_embedding_key_changes_with_model_kind_and_content_only() -> None:
    key = CACHE.embedding_key("text", b"mug")
    assert key == cache_over().embedding_key("text", b"mug")
    others = {
        CACHE.embedding_key("image", b"mug"),
        CACHE.embedding_key("text", b"mug "),
        CACHE.embedding_key("text", b""),
        cache_over(model_id="model-b").embedding_key("text", b"mug"),
    }

    assert key not in others and len(others) == 4


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"vector": np.array([0.8, 0.6, 0.0], dtype=np.float32)}, id="vector"),
        pytest.param({"vector": None}, id="no-vector"),
        pytest.param({"flt": SearchFilter(categories=("mugs",))}, id="filter"),
        pytest.param({"flt": SearchFilter(price_min=0.0)}, id="price-bound-zero"),
        pytest.param({"count": 12}, id="count"),
        pytest.param({"score_threshold": 0.0}, id="threshold-zero"),
        pytest.param({"score_threshold": 0.5}, id="threshold"),
        pytest.param({"offset": 11}, id="offset"),
        pytest.param({"like_ids": ("a",)}, id="liked"),
        pytest.param({"unlike_ids": ("a",)}, id="unliked"),
        pytest.param({"include_liked": True}, id="include-liked"),
        pytest.param({"group_by": "family"}, id="group-by"),
        pytest.param({"diversity": 0.5}, id="diversity"),
        pytest.param({"text": "mug"}, id="text"),
        pytest.param({"image": b""}, id="image"),
        pytest.param({"image_url": "https://x.test/p.jpg"}, id="image-url"),
        pytest.param({"text_weight": 0.25}, id="text-weight"),
        pytest.param({"text": "mug", "mode": "hybrid"}, id="lexical"),
        pytest.param({"vector": None, "text": "mug", "mode": "lexical"}, id="lexical-only"),
    ],
)
def test_result_key_changes_with_every_input_of_the_ranking(changes: dict[str, Any]) -> None:
    assert CACHE.result_key(1, key_with(**changes)) != CACHE.result_key(1, BASE)


def test_result_key_takes_in_every_field_of_result_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # A field added to ResultKey but left out of the key would let two rankings share an entry.
    forms: list[Any] = []

    def recorded(value: Any) -> bytes:
        forms.append(value)
        return canonical_bytes(value)

    monkeypatch.setattr(cache_module, "canonical_bytes", recorded)
    CACHE.result_key(1, BASE)
    named = {"vector": None}  # the vector enters as its bytes, not in the canonical form
    expected = {named.get(f.name, f.name) for f in dataclasses.fields(ResultKey)} - {None} | {"generation"}
    assert [set(form) for form in forms] == [expected]
    assert forms[0]["query"] == QUERY.fingerprint()


def test_fingerprint_takes_in_every_field_of_the_query_but_the_page_and_facets() -> None:
    # A field added to Query but left out of its fingerprint would let two rankings share an entry (and a page
    # token); the page and the facets are the only fields that do not shape the ranking.
    named = {"flt": "filter", "page": None, "top_k": None, "facets": None}
    expected = {named.get(f.name, f.name) for f in dataclasses.fields(Query)} - {None}
    assert set(QUERY.fingerprint()) == expected


def test_result_key_changes_with_every_part_of_the_lexical_side() -> None:
    keys = {
        CACHE.result_key(1, key_with(mode="hybrid", **lexical))
        for lexical in (
            {"text": "mug"},
            {"text": "cup"},
            {"text": "mug", "fusion": "rank"},
            {"text": "mug", "lexical_weight": 0.25},
        )
    }
    assert len(keys) == 4


def test_result_key_keeps_example_lists_apart_from_each_other() -> None:
    keys = {
        CACHE.result_key(1, key_with(like_ids=("a",))),
        CACHE.result_key(1, key_with(unlike_ids=("a",))),
        CACHE.result_key(1, key_with(like_ids=("a",), include_liked=True)),  # liked, not excluded
    }
    assert len(keys) == 3


def test_result_key_changes_with_generation_and_model() -> None:
    assert CACHE.result_key(1, BASE) != CACHE.result_key(2, BASE)
    assert CACHE.result_key(0, BASE) != CACHE.result_key(1, BASE)
    assert cache_over(model_id="model-b").result_key(1, BASE) != CACHE.result_key(1, BASE)


def test_result_key_ignores_order_and_repeats_of_example_ids() -> None:
    ids = key_with(like_ids=("a", "b"), unlike_ids=("c", "d"))
    shuffled = key_with(like_ids=("b", "a", "b"), unlike_ids=("d", "c", "c"))
    assert CACHE.result_key(1, ids) == CACHE.result_key(1, shuffled)
    assert CACHE.result_key(1, BASE) == CACHE.result_key(1, dataclasses.replace(BASE, vector=VECTOR.copy()))


def test_result_key_depends_on_the_vector_as_float32() -> None:
    # Encoders return float32; a float64 copy of the same values is the same query.
    assert CACHE.result_key(1, BASE) == CACHE.result_key(1, dataclasses.replace(BASE, vector=VECTOR.astype(np.float64)))


def test_liking_a_product_with_and_without_including_it_never_shares_a_result_entry() -> None:
    # The include_liked_products toggle changes only which ids are excluded from the ranking.
    def key(include_liked: bool) -> str:
        return CACHE.result_key(1, key_with(vector=None, like_ids=("a",), include_liked=include_liked))

    assert key(include_liked=True) != key(include_liked=False)


# --- generation and backend ------------------------------------------------------------------------------------


async def test_generation_is_the_backends_counter_and_every_write_bumps_it() -> None:
    backend = RecordingBackend()
    cache = cache_over(backend, namespace="ns")
    assert await cache.generation() == 0
    await cache.bump_generation()
    await cache.bump_generation()
    assert await cache.generation() == 2
    assert backend.counters == {"imagesearch:v3:ns:generation": 2}
    backend.available = False
    assert await cache.generation() is None


def test_only_a_redis_generation_is_shared_between_replicas() -> None:
    assert cache_over(RecordingBackend("redis")).shared
    assert not cache_over(RecordingBackend("memory")).shared
    assert not cache_over(NoCache()).shared


def test_cache_is_enabled_while_its_backend_is_available() -> None:
    assert cache_over(RecordingBackend(available=True)).enabled
    assert not cache_over(RecordingBackend(available=False)).enabled
    assert not cache_over(NoCache()).enabled


async def test_close_closes_the_backend() -> None:
    backend = RecordingBackend()
    await cache_over(backend).close()
    assert backend.closed


# --- values ------------------------------------------------------------------------------------------------------


async def test_embedding_round_trips_as_float32_with_its_ttl() -> None:
    backend = RecordingBackend()
    cache = cache_over(backend)
    key = cache.embedding_key("text", b"mug")
    await cache.put_embedding(key, VECTOR.astype(np.float64))
    assert backend.ttls[key] == 3600
    assert backend.values[key] == VECTOR.astype("<f4").tobytes()
    found = await cache.get_embedding(key, 3)
    assert found is not None and found.dtype == np.float32
    assert found.tolist() == VECTOR.tolist()
    assert (cache.stats.embedding_hits, cache.stats.embedding_misses) == (1, 0)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(None, id="absent"),
        pytest.param(np.zeros(2, "<f4").tobytes(), id="too-short"),
        pytest.param(np.zeros(4, "<f4").tobytes(), id="too-long"),
        pytest.param(np.array([0.0, np.nan, 1.0], "<f4").tobytes(), id="nan"),
        pytest.param(np.array([0.0, np.inf, 1.0], "<f4").tobytes(), id="inf"),
    ],
)
async def test_embedding_that_is_not_one_of_ours_is_a_miss(raw: bytes | None) -> None:
    backend = RecordingBackend()
    cache = cache_over(backend)
    if raw is not None:
        backend.values["k"] = raw
    assert await cache.get_embedding("k", 3) is None
    assert (cache.stats.embedding_hits, cache.stats.embedding_misses) == (0, 1)


async def test_results_round_trip_with_whole_products_and_their_ttl() -> None:
    backend = RecordingBackend()
    cache = cache_over(backend)
    await cache.put_results("k", HITS)
    assert backend.ttls["k"] == 60
    assert await cache.get_results("k") == HITS
    await cache.put_results("empty", [])
    assert await cache.get_results("empty") == []
    assert (cache.stats.result_hits, cache.stats.result_misses) == (2, 0)
    assert await cache.get_results("absent") is None
    assert (cache.stats.result_hits, cache.stats.result_misses) == (2, 1)
    # Non-ASCII text is stored as UTF-8, not escaped.
    assert "p\u00fc".encode() in backend.values["k"]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x00garbage", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"{}", id="object"),
        pytest.param(b"[[1.0]]", id="row-without-product"),
        pytest.param(b"[5]", id="number-row"),
        pytest.param(json.dumps([[1.0, ["id", "name"]]]).encode(), id="short-product"),
        pytest.param(json.dumps([[1.0, ["i", "n", "d", "c", 1.0, "EUR", "u", 7]]]).encode(), id="bad-attributes"),
        pytest.param(json.dumps([["high", ["i", "n", "d", "c", 1.0, "EUR", "u", {}]]]).encode(), id="bad-score"),
        pytest.param(json.dumps([[1.0, ["i", "n", "d", "c", "free", "EUR", "u", {}]]]).encode(), id="bad-price"),
    ],
)
async def test_results_that_are_not_ours_are_a_miss(raw: bytes) -> None:
    backend = RecordingBackend()
    backend.values["k"] = raw
    cache = cache_over(backend)
    assert await cache.get_results("k") is None
    assert (cache.stats.result_hits, cache.stats.result_misses) == (0, 1)


async def test_describe_reports_the_backend_and_counts_every_lookup() -> None:
    cache = cache_over(RecordingBackend("redis"))
    await cache.put_embedding("e", VECTOR)
    await cache.put_results("r", HITS)
    for key in ("absent", "e", "absent", "e", "e"):
        await cache.get_embedding(key, 3)
        await cache.get_results(key.replace("e", "r"))
    assert cache.describe() == CacheDescription(
        backend="redis", available=True, embedding_hits=3, embedding_misses=2, result_hits=3, result_misses=2
    )


# --- backends -------------------------------------------------------------------------------------------------------


async def test_no_cache_stores_nothing_and_counts_nothing() -> None:
    backend = NoCache()
    await backend.set("k", b"v", 0)
    await backend.incr("g")
    assert (await backend.get("k"), await backend.get_counter("g")) == (None, None)
    assert (backend.name, backend.available) == ("none", False)
    await backend.close()


async def test_lru_counts_in_process_and_close_empties_it() -> None:
    backend = LruCache(max_entries=2)
    assert await backend.get_counter("g") == 0
    await backend.incr("g")
    await backend.incr("g")
    assert await backend.get_counter("g") == 2
    await backend.set("a", b"1", ttl_s=0)
    await backend.set("b", b"2", ttl_s=0)
    await backend.set("a", b"3", ttl_s=0)  # an update refreshes the entry: b is now the oldest
    await backend.set("c", b"4", ttl_s=0)
    assert [await backend.get(k) for k in ("a", "b", "c")] == [b"3", None, b"4"]
    assert (backend.name, backend.available, len(backend)) == ("memory", True, 2)
    await backend.close()
    assert len(backend) == 0


def test_embedding_key_of_a_region_is_not_the_key_of_other_bytes() -> None:
    # A box is its own part of the digest: image bytes that end with a box's canonical form never share a key with
    # the image before them searched in that box.
    box = NormalizedBox(0.1, 0.2, 0.6, 0.9)
    region_key = CACHE.embedding_key("image", b"jpeg", box)
    assert region_key != CACHE.embedding_key("image", b"jpeg")
    assert region_key != CACHE.embedding_key("image", b"jpeg" + canonical_bytes(box.key_value()))
    assert region_key != CACHE.embedding_key("image", b"jpeg", NormalizedBox(0.1, 0.2, 0.6, 0.8))
    assert region_key == CACHE.embedding_key("image", b"jpeg", NormalizedBox(0.1, 0.2, 0.6, 0.9))
