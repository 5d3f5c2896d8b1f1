"""Relevance through the gRPC surface, with the bundled trained model (synthetic-clip) on a generated catalogue.

The model is small but genuinely learned (see src/imagesearch/models/synthetic-clip/README.md), so these tests
check rankings: which products come first, not only that the calls succeed.
"""

from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from conftest import RunningServer, start_server, stop_server
from rpc import product, search, stream

from imagesearch.config import Settings
from imagesearch.model.encoder import ClipEncoder
from imagesearch.synthetic import CatalogueItem, make_catalogue, render
from imagesearch.v1 import image_search_service_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

CATALOGUE = make_catalogue(200, seed=1234)
BY_ID = {item.product_id: item for item in CATALOGUE}


def label(product_id: str) -> tuple[str, str]:
    item = BY_ID[product_id]
    return item.colour, item.kind


def unseen_jpeg(kind: str, colour: str, seed: int) -> bytes:
    """A fresh render (a seed the catalogue never used), as a caller's photo would be."""
    buffer = io.BytesIO()
    render(kind, colour, "plain", random.Random(seed), 128).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def as_product(item: CatalogueItem) -> object:
    return product(
        item.product_id, name=item.name, category=item.category, price=item.price, attributes=item.attributes
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def catalogue_server(
    tmp_path_factory: pytest.TempPathFactory, encoder: ClipEncoder
) -> AsyncIterator[RunningServer]:
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("relevance"), model="synthetic-clip")
    running = await start_server(settings, encoder)
    messages: list[object] = []
    for item in CATALOGUE:
        messages.append(pb.IndexProductsRequest(product=as_product(item)))  # type: ignore[arg-type]
        messages.append(pb.IndexProductsRequest(image_chunk=item.jpeg()))
    responses = [r async for r in running.stub.IndexProducts(stream(*messages))]
    assert not [r for r in responses if r.HasField("error")]
    yield running
    await stop_server(running)


async def ranked_ids(running: RunningServer, **query: object) -> list[str]:
    response = await search(running.stub, **query)  # type: ignore[arg-type]
    return [hit.product.id for hit in response.hits]


@pytest.mark.parametrize(
    ("colour", "kind"), [("red", "mug"), ("blue", "shoe"), ("green", "lamp"), ("black", "chair"), ("yellow", "hat")]
)
async def test_text_search_ranks_matching_colour_and_kind_first(
    catalogue_server: RunningServer, colour: str, kind: str
) -> None:
    relevant = sum(1 for item in CATALOGUE if (item.colour, item.kind) == (colour, kind))
    ids = await ranked_ids(catalogue_server, text=f"{colour} {kind}", top_k=relevant)
    assert label(ids[0]) == (colour, kind)
    hits = sum(1 for pid in ids if label(pid) == (colour, kind))
    assert hits >= relevant - 1, f"only {hits} of {relevant} {colour} {kind}s in the top {relevant}: {ids}"


async def test_unseen_photo_of_a_blue_shoe_finds_blue_shoes(catalogue_server: RunningServer) -> None:
    ids = await ranked_ids(catalogue_server, image=unseen_jpeg("shoe", "blue", seed=987654), top_k=3)
    assert label(ids[0]) == ("blue", "shoe")
    assert sum(1 for pid in ids if label(pid) == ("blue", "shoe")) >= 2


@pytest.mark.parametrize(
    ("flt", "keep"),
    [
        pytest.param({"categories": ["mug"]}, lambda item: item.category == "mug", id="category"),
        pytest.param(
            {"price_min": 50.0, "price_max": 120.0}, lambda item: 50.0 <= item.price <= 120.0, id="price-range"
        ),
        pytest.param(
            {"attributes": {"pattern": "striped"}}, lambda item: item.attributes["pattern"] == "striped", id="attribute"
        ),
        pytest.param(
            {"categories": ["mug", "bag"], "price_max": 100.0, "attributes": {"colour": "red"}},
            lambda item: item.category in ("mug", "bag") and item.price <= 100.0 and item.colour == "red",
            id="combined",
        ),
    ],
)
async def test_filters_restrict_results_without_reordering_them(
    catalogue_server: RunningServer, flt: dict[str, object], keep: object
) -> None:
    unfiltered = await ranked_ids(catalogue_server, text="red mug", top_k=100)
    filtered = await ranked_ids(catalogue_server, text="red mug", top_k=20, **flt)
    expected = [pid for pid in unfiltered if keep(BY_ID[pid])]  # type: ignore[operator]
    assert all(keep(BY_ID[pid]) for pid in filtered)  # type: ignore[operator]
    common = min(len(filtered), len(expected))
    assert common >= 3, "the test catalogue should give every filter several matches"
    assert filtered[:common] == expected[:common]


async def test_multimodal_query_moves_an_image_search_towards_the_text(catalogue_server: RunningServer) -> None:
    blue_shoe = unseen_jpeg("shoe", "blue", seed=424242)
    image_only = await ranked_ids(catalogue_server, image=blue_shoe, top_k=10)
    # Dense: the mode of a multimodal query, whose text_weight mixes vectors (a text-only query defaults to hybrid).
    text_only = await ranked_ids(catalogue_server, text="red shoe", top_k=10, mode="dense")
    # The documented weights: 0 is the image alone, 1 the text alone.
    assert await ranked_ids(catalogue_server, image=blue_shoe, text="red shoe", text_weight=0.0, top_k=10) == image_only
    assert await ranked_ids(catalogue_server, image=blue_shoe, text="red shoe", text_weight=1.0, top_k=10) == text_only

    # "This shoe, but red": shoes stay on top while red ones rise, and lead once the text weighs more.
    def red_shoes(ids: list[str]) -> int:
        return sum(1 for pid in ids if label(pid) == ("red", "shoe"))

    balanced = await ranked_ids(catalogue_server, image=blue_shoe, text="red shoe", text_weight=0.5, top_k=5)
    assert all(label(pid)[1] == "shoe" for pid in balanced)
    assert red_shoes(balanced) >= 2 > red_shoes(image_only[:5])
    text_led = await ranked_ids(catalogue_server, image=blue_shoe, text="red shoe", text_weight=0.7, top_k=5)
    assert label(text_led[0]) == ("red", "shoe")
    assert all(label(pid)[1] == "shoe" for pid in text_led[:3])
