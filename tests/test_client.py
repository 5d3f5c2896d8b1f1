"""The typed asyncio client (src/imagesearch/client.py) against a real server."""

from __future__ import annotations

import io
import math
import random
from typing import Any

import grpc
import pytest
from conftest import RunningServer, jpeg_bytes
from PIL import Image

from imagesearch.client import ImageSearchClient, Product, ProductImage, search_query
from imagesearch.errors import StoreUnavailable
from imagesearch.synthetic.renderer import render
from imagesearch.v1 import image_search_service_pb2 as pb


def flaky(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, failures: int) -> list[int]:
    """Make `owner.name` raise StoreUnavailable `failures` times, then behave. Returns the call counter.
    (No Qdrant server can run here to take down for real; the failure is injected at the store interface.)"""
    calls = [0]
    original = getattr(owner, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= failures:
            raise StoreUnavailable("injected outage")
        return await original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


async def test_client_streams_images_and_round_trips_products(running: RunningServer) -> None:
    big = jpeg_bytes((200, 10, 10), size=(900, 900))  # several 64 KiB chunks
    async with ImageSearchClient(running.target) as client:
        assert await client.health() == "SERVING"
        response = await client.index_product(Product(id="big", category="mugs"), big)
        assert response.created
        hits = (await client.search(image=big, categories=["mugs"])).hits
        assert [h.product.id for h in hits] == ["big"]
        results = [r async for r in client.index_products([(Product(id=f"b{i}"), jpeg_bytes()) for i in range(3)])]
        assert [r.id for r in results] == ["b0", "b1", "b2"]
        assert (await client.get_product("b1")).id == "b1"
        assert (await client.service_info()).store.product_count == 4


async def test_a_call_can_set_its_own_deadline(running: RunningServer) -> None:
    async with ImageSearchClient(running.target, timeout_s=60) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.search(text="red mug", timeout_s=1e-6)  # expires before the server can answer
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await client.search(text="red mug", timeout_s=None)).query_kind  # no deadline at all
        assert await client.health(timeout_s=5) == "SERVING"


async def test_client_retries_idempotent_calls_on_unavailable(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ImageSearchClient(running.target) as client:
        await client.index_product(Product(id="p"), jpeg_bytes())
        calls = flaky(monkeypatch, running.components.store, "get", failures=2)
        assert (await client.get_product("p")).id == "p"
        assert calls[0] == 3


async def test_client_does_not_retry_delete(running: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async with ImageSearchClient(running.target) as client:
        await client.index_product(Product(id="p"), jpeg_bytes())
        calls = flaky(monkeypatch, running.components.store, "delete", failures=1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.delete_product("p")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert calls[0] == 1


# --- several images per product, query regions, near-duplicates, ranking rules (issues #24, #25) -----------------


def render_jpeg(kind: str, colour: str, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    render(kind, colour, "plain", random.Random(seed), 128).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def side_by_side(left: bytes, right: bytes) -> bytes:
    images = [Image.open(io.BytesIO(data)) for data in (left, right)]
    canvas = Image.new("RGB", (images[0].width + images[1].width, max(i.height for i in images)), "white")
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (images[0].width, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def described(*ids: str) -> list[ProductImage]:
    return [ProductImage(id=image_id, role="packshot" if i == 0 else "detail") for i, image_id in enumerate(ids)]


def test_search_query_builds_regions_collapsing_rules_and_explain() -> None:
    query = search_query(
        regions=[(0, 0, 0.5, 1), pb.NormalizedBox(x0=0.5, y0=0, x1=1, y1=1)],
        collapse_duplicates=True,
        duplicate_threshold=0.9,
        ranking={"rules": [{"name": "popular", "field": "popularity", "transform": "TRANSFORM_LOG1P", "weight": 2}]},
        explain=True,
    )
    assert [(b.x0, b.x1) for b in query.regions] == [(0, 0.5), (0.5, 1)]
    assert query.collapse_duplicates and query.explain_scores
    assert query.duplicate_threshold == pytest.approx(0.9)
    rule = query.ranking.rules[0]
    assert (rule.name, rule.field, rule.transform, rule.weight) == (
        "popular",
        "popularity",
        pb.RankingRule.TRANSFORM_LOG1P,
        2,
    )
    # Unset: the server's defaults (no threshold, its default rules); an empty spec: no rules at all.
    plain = search_query(text="mug")
    assert not plain.HasField("duplicate_threshold") and not plain.HasField("ranking")
    assert search_query(text="mug", ranking=pb.RankingSpec()).HasField("ranking")


async def test_index_product_refuses_image_and_images_together_before_calling() -> None:
    async with ImageSearchClient("127.0.0.1:1") as client:  # nothing listens there: no call may be made
        with pytest.raises(ValueError, match="not both"):
            await client.index_product(Product(id="p", images=described("a")), b"x", images=[b"y"])
        with pytest.raises(ValueError, match=r"product\.images"):
            await client.index_product(Product(id="p", images=described("a")), images=[b"x", b"y"])


async def test_client_indexes_several_images_and_search_names_the_matched_one(running: RunningServer) -> None:
    async with ImageSearchClient(running.target) as client:
        results = [
            r
            async for r in client.index_products(
                [
                    (Product(id="hat"), render_jpeg("hat", "blue")),
                    (
                        Product(id="duo", images=described("hat", "mug")),
                        [render_jpeg("hat", "green"), render_jpeg("mug", "red")],
                    ),
                    # No bytes for the second image and a server that fetches no URLs: this product alone fails.
                    (
                        Product(id="half", images=[ProductImage(id="a"), ProductImage(id="b", url="https://x.test/b")]),
                        [render_jpeg("lamp", "red"), None],
                    ),
                    (Product(id="lamp"), render_jpeg("lamp", "yellow")),
                ]
            )
        ]
        assert [(r.id, r.HasField("error")) for r in results] == [
            ("hat", False),
            ("duo", False),
            ("half", True),
            ("lamp", False),
        ]
        assert results[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

        best = (await client.search(image=render_jpeg("mug", "red", seed=1), top_k=3)).hits[0]
        assert (best.product.id, best.matched_image_index, best.matched_image_id) == ("duo", 1, "mug")

        # One product, image i after image_index i: the first image's bytes may come second.
        response = await client.index_product(
            Product(id="trio", images=described("front", "side", "top")),
            images=[render_jpeg("bag", "red"), render_jpeg("bag", "blue"), render_jpeg("bag", "green")],
        )
        assert response.created
        stored = await client.get_product("trio")
        assert [i.id for i in stored.images] == ["front", "side", "top"]
        assert all(len(i.sha256) == 64 for i in stored.images)
        best = (await client.search(image=render_jpeg("bag", "blue"), top_k=1)).hits[0]
        assert (best.product.id, best.matched_image_index, best.matched_image_id) == ("trio", 1, "side")


async def test_client_finds_duplicates_of_one_product_and_page_by_page(running: RunningServer) -> None:
    mug = render_jpeg("mug", "red")
    async with ImageSearchClient(running.target) as client:
        for product_id, category, image in [
            ("mug-1", "a", mug),
            ("mug-2", "b", mug),  # a re-upload of mug-1's photo
            ("hat", "a", render_jpeg("hat", "blue")),
            ("shoe", "a", render_jpeg("shoe", "green")),
        ]:
            await client.index_product(Product(id=product_id, category=category), image)

        page = await client.find_duplicates(product_id="mug-1")
        assert [p.product_id for p in page.products] == ["mug-1"] and page.next_page_token == ""
        [duplicate] = page.products[0].duplicates
        assert (duplicate.product_id, duplicate.exact, duplicate.image_index, duplicate.duplicate_image_index) == (
            "mug-2",
            True,
            0,
            0,
        )
        assert duplicate.similarity == pytest.approx(1, abs=1e-4)
        # The filter restricts the duplicates too: mug-2 is in category b.
        assert list((await client.find_duplicates(product_id="mug-1", categories=["a"])).products) == []
        assert list((await client.find_duplicates(product_id="hat")).products) == []

        first = await client.find_duplicates(page_size=1)
        assert first.next_page_token  # four products, one per page
        every = [entry async for entry in client.all_duplicates(page_size=1)]
        assert sorted((e.product_id, [d.product_id for d in e.duplicates]) for e in every) == [
            ("mug-1", ["mug-2"]),
            ("mug-2", ["mug-1"]),
        ]


async def test_client_search_options_reach_the_server(running: RunningServer) -> None:
    mug, lamp = render_jpeg("mug", "red"), render_jpeg("lamp", "blue")
    async with ImageSearchClient(running.target) as client:
        for product_id, image, numbers in [
            ("mug", mug, {}),
            ("mug-copy", mug, {}),
            ("lamp", lamp, {"popularity": 1000.0}),
            ("hat", render_jpeg("hat", "green"), {"popularity": 3.0}),
        ]:
            await client.index_product(Product(id=product_id, numeric_attributes=numbers), image)

        regions = await client.search(image=side_by_side(mug, lamp), regions=[(0, 0, 0.5, 1), (0.5, 0, 1, 1)], top_k=2)
        assert list(regions.hits) == [] and len(regions.region_results) == 2
        assert regions.region_results[0].hits[0].product.id in {"mug", "mug-copy"}
        assert regions.region_results[1].hits[0].product.id == "lamp"

        collapsed = (await client.search(image=mug, collapse_duplicates=True, duplicate_threshold=0.99)).hits
        ids = [h.product.id for h in collapsed]
        assert {ids[0], *collapsed[0].duplicate_product_ids} == {"mug", "mug-copy"}
        assert len(ids) == 3 and len(set(ids) & {"mug", "mug-copy"}) == 1

        popular = {"rules": [{"name": "popular", "field": "popularity", "transform": "TRANSFORM_LOG1P", "weight": 1}]}
        ranked = (await client.search(text="red mug", mode="dense", ranking=popular, explain=True)).hits
        assert ranked[0].product.id == "lamp"  # ln(1001) outweighs any cosine similarity
        for hit in ranked:
            explanation = hit.explanation
            [rule] = explanation.rules
            expected = math.log1p(hit.product.numeric_attributes.get("popularity", 0.0))
            assert rule.name == "popular" and rule.value == pytest.approx(expected, rel=1e-5)
            assert hit.score == pytest.approx(explanation.relevance + rule.weighted, abs=1e-4)
            assert explanation.HasField("similarity")
        unranked = (await client.search(text="red mug", mode="dense", ranking=pb.RankingSpec())).hits
        assert unranked[0].product.id in {"mug", "mug-copy"} and not unranked[0].HasField("explanation")


async def test_client_retries_find_duplicates_on_unavailable(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ImageSearchClient(running.target) as client:
        await client.index_product(Product(id="p"), jpeg_bytes())
        calls = flaky(monkeypatch, running.components.store, "get", failures=2)
        assert list((await client.find_duplicates(product_id="p")).products) == []
        assert calls[0] == 3
