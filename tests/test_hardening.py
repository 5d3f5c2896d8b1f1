"""Hostile and ambiguous input found by review: cache keys that must not collide, and request frames that are
not valid protobuf (a client's error, answered INVALID_ARGUMENT, logged as one JSON line)."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer, free_port, jpeg_bytes
from grpc_health.v1 import health_pb2
from helpers import serve_process, wait_serving
from hypothesis import given, settings
from hypothesis import strategies as st
from rpc import index, product, search, violated_fields

from imagesearch.api.service import SERVICE
from imagesearch.domain import (
    FUSIONS,
    SEARCH_MODES,
    FacetSpec,
    Product,
    Query,
    SearchFilter,
    canonical_bytes,
    digest,
)
from imagesearch.search.cache import NoCache, ResultKey, SearchCache
from imagesearch.search.paging import MAX_SEARCH_DEPTH, decode_search_page, encode_search_page
from imagesearch.v1 import image_search_service_pb2 as pb

# Frames that no protobuf parser accepts: a varint that never ends, and a field with wire type 7.
CORRUPT_FRAME = b"\xff\xff\xff\xff\x0f" * 4


async def test_result_cache_keeps_a_category_with_a_comma_apart_from_two_categories(running: RunningServer) -> None:
    # Reproduces the review's finding: categories ["a,b"] and ["a", "b"] shared one result-cache entry.
    stub = running.stub
    await index(stub, product("p-ab", category="a,b"), jpeg_bytes((220, 20, 20)))
    await index(stub, product("p-a", category="a"), jpeg_bytes((20, 200, 20)))
    await index(stub, product("p-b", category="b"), jpeg_bytes((20, 20, 220)))
    comma = await search(stub, text="red", categories=["a,b"])
    assert [h.product.id for h in comma.hits] == ["p-ab"]
    assert comma.result_cache == pb.CACHE_OUTCOME_MISS
    split = await search(stub, text="red", categories=["a", "b"])
    assert split.result_cache == pb.CACHE_OUTCOME_MISS
    assert sorted(h.product.id for h in split.hits) == ["p-a", "p-b"]


# --- Keys: equal keys if and only if the normalised queries are equal -------------------------------------------

# Small alphabets with the characters that broke or could break a joined text form: separators, brackets, "=".
_chars = st.sampled_from(list("ab,=[]:\\\"' \u00e9"))
_text = st.text(_chars, max_size=4)
_price = st.none() | st.sampled_from([0.0, 1.0, 2.5, 10.0])
filters = st.builds(
    SearchFilter,
    categories=st.lists(_text, max_size=3).map(tuple),
    price_min=_price,
    price_max=_price,
    attributes=st.dictionaries(_text, _text, max_size=2).map(lambda d: tuple(sorted(d.items()))),
)
_ids = st.lists(st.sampled_from(["p1", "p2", "p,3", "p\u00e94"]), max_size=3).map(tuple)
queries = st.builds(
    Query,
    text=_text,
    image=st.none() | st.sampled_from([b"", b"x", b"y"]),
    flt=filters,
    top_k=st.sampled_from([1, 10]),
    text_weight=st.sampled_from([0.5, 0.25]),
    score_threshold=st.none() | st.sampled_from([0.0, 0.5]),
    image_url=st.sampled_from(["", "https://x.test/a,b"]),
    like_ids=_ids,
    unlike_ids=_ids,
    include_liked=st.booleans(),
    group_by=st.sampled_from(["", "g", "g,"]),
    diversity=st.none() | st.sampled_from([0.0, 0.5]),
    facets=st.just(FacetSpec()),
    mode=st.sampled_from(SEARCH_MODES),
    fusion=st.sampled_from(FUSIONS),
    lexical_weight=st.sampled_from([0.5, 0.25]),
)
result_keys = st.builds(
    ResultKey,
    query=queries,
    vector=st.none() | st.sampled_from([np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)]),
    offset=st.sampled_from([0, 10]),
    count=st.sampled_from([1, 10]),
)


def _normal_filter(flt: SearchFilter) -> tuple[object, ...]:
    return (frozenset(flt.categories), flt.price_min, flt.price_max, frozenset(flt.attributes))


def _normal_query(query: Query) -> tuple[object, ...]:
    return (query.text, query.image, query.image_url, _normal_filter(query.flt), query.text_weight,
            query.score_threshold, frozenset(query.like_ids), frozenset(query.unlike_ids), query.include_liked,
            query.group_by, query.diversity, query.mode, query.fusion, query.lexical_weight)  # fmt: skip


def _normal_result_key(key: ResultKey) -> tuple[object, ...]:
    vector = None if key.vector is None else tuple(key.vector.tolist())
    return (vector, _normal_query(key.query), key.offset, key.count)


_cache = SearchCache(NoCache(), model_id="m", embedding_ttl_s=0, result_ttl_s=0)


@settings(max_examples=400, deadline=None)
@given(result_keys, result_keys)
def test_result_keys_are_equal_exactly_when_the_normalised_queries_are(a: ResultKey, b: ResultKey) -> None:
    same_key = _cache.result_key(7, a) == _cache.result_key(7, b)
    assert same_key == (_normal_result_key(a) == _normal_result_key(b))


@settings(max_examples=400, deadline=None)
@given(queries, queries)
def test_query_digests_are_equal_exactly_when_the_normalised_queries_are(a: Query, b: Query) -> None:
    same_query = _normal_query(a) == _normal_query(b) and a.top_k == b.top_k  # the page size the token counts in
    assert (a.digest() == b.digest()) == same_query


@settings(max_examples=300, deadline=None)
@given(filters, filters)
def test_filter_digests_are_equal_exactly_when_the_filters_admit_the_same(a: SearchFilter, b: SearchFilter) -> None:
    same = digest(canonical_bytes(a.key_value())) == digest(canonical_bytes(b.key_value()))
    assert same == (_normal_filter(a) == _normal_filter(b))


def test_result_key_changes_with_the_generation() -> None:
    query = Query(text="", image=None, flt=SearchFilter(), top_k=1, text_weight=0.5, like_ids=("p1",))
    key = ResultKey(query=query, vector=None, offset=0, count=1)
    assert _cache.result_key(1, key) != _cache.result_key(2, key)


# --- Page tokens: forged, foreign or past the paging limit ---------------------------------------------------------


def forged(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


async def search_error(running: RunningServer, **query: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search(running.stub, **query)
    return err.value


async def test_forged_page_tokens_are_invalid_argument_never_internal(running: RunningServer) -> None:
    for i in range(4):
        await index(running.stub, product(f"p{i}"), jpeg_bytes((60 * i, 80, 200)))
    first = await search(running.stub, image=jpeg_bytes((1, 2, 3)), page_size=1)
    real = decode_search_page(first.next_page_token, "query.page_token")
    bound = {"v": 1, "q": real.query_digest, "g": real.catalogue_version}  # this query, this catalogue
    tokens = {
        "json-list": "WzFd",  # base64 of [1]: JSON, but not an object
        "json-null": forged(None),
        "offset-zero": forged({**bound, "o": 0}),
        "offset-negative": forged({**bound, "o": -1}),
        "offset-at-depth-limit": forged({**bound, "o": MAX_SEARCH_DEPTH}),
        "offset-bool": forged({**bound, "o": True}),
        "offset-float": forged({**bound, "o": 1.5}),
        "another-format": forged({**bound, "o": 1, "v": 2}),
        "another-query": forged({**bound, "o": 1, "q": "0" * 64}),
        "another-catalogue": forged({**bound, "o": 1, "g": "s999"}),
        "not-base64": "!!!",
    }
    for name, token in tokens.items():
        error = await search_error(running, image=jpeg_bytes((1, 2, 3)), page_size=1, page_token=token)
        assert (error.code(), violated_fields(error)) == (grpc.StatusCode.INVALID_ARGUMENT, ["query.page_token"]), name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.ListProducts(pb.ListProductsRequest(page_token="WzFd"))
    assert (err.value.code(), violated_fields(err.value)) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])
    # A forged offset within the limit only gets the page its forger could have asked for.
    whole = await search(running.stub, image=jpeg_bytes((1, 2, 3)), page_size=4)
    third = await search(running.stub, image=jpeg_bytes((1, 2, 3)), page_size=1, page_token=forged({**bound, "o": 2}))
    assert [h.product.id for h in third.hits] == [whole.hits[2].product.id]


async def test_search_pages_end_at_the_paging_depth_limit(running: RunningServer) -> None:
    # More products than the paging limit. Written to the store directly with random vectors: ranking them needs
    # only vectors, and 1,100 model encodes would take minutes.
    rng = np.random.default_rng(19)
    vectors = rng.standard_normal((MAX_SEARCH_DEPTH + 100, running.components.encoder.dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    await running.components.store.upsert([(Product(id=f"deep-{i}"), v) for i, v in enumerate(vectors)])
    query: dict[str, Any] = {"image": jpeg_bytes((9, 90, 200)), "page_size": 100}
    pages = [await search(running.stub, **query)]
    while pages[-1].next_page_token and len(pages) <= 20:
        pages.append(await search(running.stub, **query, page_token=pages[-1].next_page_token))
    ids = [h.product.id for page in pages for h in page.hits]
    assert len(ids) == len(set(ids)) == MAX_SEARCH_DEPTH  # then no next page, though more products match
    assert pages[-1].next_page_token == ""
    # A page that would cross the limit is cut at it.
    last = decode_search_page(pages[-2].next_page_token, "query.page_token")
    near_end = encode_search_page(dataclasses.replace(last, offset=MAX_SEARCH_DEPTH - 5))
    cut = await search(running.stub, **query, page_token=near_end)
    assert [h.product.id for h in cut.hits] == ids[-5:] and cut.next_page_token == ""


# --- Corrupt frames ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
async def test_corrupt_request_frame_is_invalid_argument_for_every_method(running: RunningServer, method: str) -> None:
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    channel = running.channel
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if descriptor.client_streaming and descriptor.server_streaming:
            async for _ in channel.stream_stream(path, request_serializer=_raw)(_frames()):
                pass
        elif descriptor.client_streaming:
            await channel.stream_unary(path, request_serializer=_raw)(_frames())
        else:
            await channel.unary_unary(path, request_serializer=_raw)(CORRUPT_FRAME)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid {descriptor.input_type.full_name}" in (err.value.details() or "")
    # The server keeps serving.
    status = await running.health.Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def _frames() -> AsyncIterator[bytes]:
    yield CORRUPT_FRAME


def _raw(frame: bytes) -> bytes:
    return frame


def test_json_log_stays_json_when_clients_send_corrupt_frames(tmp_path: Path) -> None:
    # A real `imagesearch serve` process: every line it writes to stderr must be one JSON object, library
    # loggers (grpc's among them) included, and a corrupt frame is logged at info level without a traceback.
    port = free_port()
    process = serve_process(tmp_path, port, IMAGESEARCH_LOG_FORMAT="json")
    try:
        wait_serving(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in SERVICE.methods:
                path = f"/{SERVICE.full_name}/{method.name}"
                with pytest.raises(grpc.RpcError) as err:
                    if method.client_streaming and method.server_streaming:
                        list(channel.stream_stream(path, request_serializer=_raw)(iter([CORRUPT_FRAME])))
                    elif method.client_streaming:
                        channel.stream_unary(path, request_serializer=_raw)(iter([CORRUPT_FRAME]))
                    else:
                        channel.unary_unary(path, request_serializer=_raw)(CORRUPT_FRAME)
                assert isinstance(err.value, grpc.Call)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    lines = stderr.decode().splitlines()
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    rpc_lines = [r for r in records if r.get("event") == "rpc" and r.get("code") == "INVALID_ARGUMENT"]
    assert len(rpc_lines) == len(SERVICE.methods)
    assert all(r["level"] == "info" for r in rpc_lines)
    assert not [r for r in records if "exception" in r or r.get("level") == "error"]
