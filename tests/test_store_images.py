"""Several images per product at the store, on both backends: the layout (the primary image unnamed, every image in
the `images` multivector), a product matched by its best image, the matched image, atomic replacement, the image
vectors and numeric attributes read back, and near-duplicate collapsing. (Stores written before several images per
product: tests/test_store_migration.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from stores import DIM, open_store, unit

from imagesearch.domain import LexicalQuery, Product, SearchFilter
from imagesearch.images import ProductImage
from imagesearch.store import VectorStore
from imagesearch.store.base import DIVERSITY_CANDIDATES, Vector
from imagesearch.store.rerank import best_image, collapse, product_similarity

# qdrant-client's local mode warns that it ignores payload indexes; the store creates them for real servers.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


@pytest_asyncio.fixture(params=["embedded", "qdrant"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    s = await open_store(request.param, tmp_path)
    yield s
    await s.close()


def images(*ids: str) -> tuple[ProductImage, ...]:
    return tuple(
        ProductImage(id=i, role="packshot" if n == 0 else "detail", url=f"https://x/{i}.jpg") for n, i in enumerate(ids)
    )


def at(cosine: float, axis: int) -> Vector:
    """A unit vector at `cosine` to unit(1), the rest of it along `axis` (1 to DIM - 1)."""
    v = np.zeros(DIM, dtype=np.float32)
    v[0], v[axis] = cosine, np.sqrt(1 - cosine * cosine)
    return v


def rows(*vectors: Vector) -> Vector:
    return np.stack(vectors).astype(np.float32)


async def test_product_with_several_images_reads_back_with_them(store: VectorStore) -> None:
    product = Product(
        id="shoe",
        name="Trail runner",
        images=(
            ProductImage(id="front", role="packshot", url="https://x/front.jpg", sha256="ab" * 32),
            ProductImage(id="side", role="on-model", url="https://x/side.jpg", sha256="cd" * 32),
            ProductImage(),
        ),
        numeric_attributes={"popularity": 1520.0, "stock": 3.0, "created_at": 1764547200.0},
    )
    assert await store.upsert([(product, rows(unit(1), unit(0, 1), unit(0, 0, 1)))]) == [True]
    assert await store.get("shoe") == product
    assert (await store.scroll(SearchFilter(), 10))[0] == [product]


async def test_search_matches_a_product_by_its_best_image_and_names_it(store: VectorStore) -> None:
    await store.upsert(
        [
            (Product(id="three", images=images("a", "b", "c")), rows(unit(0, 0, 1), unit(0, 1), unit(1, 0.05))),
            (Product(id="one", images=images("only")), rows(unit(1, 0.3))),
            (Product(id="far", images=images("x", "y")), rows(unit(0, 0, 0, 1), unit(-1))),
        ]
    )
    hits = await store.search(unit(1), SearchFilter(), 10)
    assert [h.product.id for h in hits] == ["three", "one", "far"]
    assert [h.matched_image for h in hits] == [2, 0, 0]
    assert hits[0].score == pytest.approx(float(unit(1, 0.05) @ unit(1)), abs=1e-5)  # its best image's cosine
    assert hits[2].score == pytest.approx(0.0, abs=1e-5)  # max(0, -1)
    by_second_image = await store.search(unit(0, 1), SearchFilter(), 1)
    assert by_second_image[0].product.id == "three" and by_second_image[0].matched_image == 1


async def test_every_search_with_a_dense_side_names_the_matched_image(store: VectorStore) -> None:
    await store.upsert(
        [
            (Product(id="mug", name="red mug", images=images("a", "b")), rows(unit(0, 1), unit(1))),
            (Product(id="lamp", name="blue lamp", images=images("c", "d")), rows(unit(1, 1), unit(0, 0, 1))),
        ]
    )
    for fusion in ("weighted", "rank"):
        hybrid = await store.search(unit(1), SearchFilter(), 10, lexical=LexicalQuery("red mug", fusion))
        assert {h.product.id: h.matched_image for h in hybrid} == {"mug": 1, "lamp": 0}
    diverse = await store.search(unit(1), SearchFilter(), 10, diversity=0.5)
    assert {h.product.id: h.matched_image for h in diverse} == {"mug": 1, "lamp": 0}
    lexical = await store.search(None, SearchFilter(), 10, lexical=LexicalQuery("red mug"))
    assert [(h.product.id, h.matched_image) for h in lexical] == [("mug", None)]


async def test_replacing_a_product_replaces_all_its_images(store: VectorStore) -> None:
    await store.upsert([(Product(id="p", images=images("a", "b", "c")), rows(unit(1), unit(0, 1), unit(0, 0, 1)))])
    assert await store.upsert([(Product(id="p", images=images("new")), rows(unit(0, 0, 0, 1)))]) == [False]
    assert (await store.get("p")) == Product(id="p", images=images("new"))
    stored = await store.image_vectors(["p"])
    np.testing.assert_allclose(stored["p"], [unit(0, 0, 0, 1)], atol=1e-6)
    for old in (unit(1), unit(0, 1), unit(0, 0, 1)):  # no old image matches any more
        hit = (await store.search(old, SearchFilter(), 1))[0]
        assert hit.score == pytest.approx(0.0, abs=1e-5) and hit.matched_image == 0
    np.testing.assert_allclose((await store.vectors(["p"]))["p"], unit(0, 0, 0, 1), atol=1e-6)  # the new primary


async def test_image_vectors_returns_every_image_in_order_for_known_products(store: VectorStore) -> None:
    await store.upsert(
        [
            (Product(id="two", images=images("a", "b")), rows(unit(1), unit(0, 1))),
            (Product(id="one/ü"), unit(0, 0, 1)),  # one image, as a plain vector
        ]
    )
    found = await store.image_vectors(["two", "one/ü", "missing"])
    assert set(found) == {"two", "one/ü"}
    np.testing.assert_allclose(found["two"], rows(unit(1), unit(0, 1)), atol=1e-6)
    np.testing.assert_allclose(found["one/ü"], rows(unit(0, 0, 1)), atol=1e-6)
    assert found["two"].dtype == np.float32 and found["two"].shape == (2, DIM)
    assert await store.image_vectors([]) == {}
    primary = await store.vectors(["two"])
    np.testing.assert_allclose(primary["two"], unit(1), atol=1e-6)  # vectors(): the first image's


async def test_upsert_rejects_image_vectors_that_do_not_match_the_images(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="2 images but 3"):
        await store.upsert([(Product(id="a", images=images("a", "b")), rows(unit(1), unit(0, 1), unit(1)))])
    with pytest.raises(ValueError, match="no images but 2"):
        await store.upsert([(Product(id="a"), rows(unit(1), unit(0, 1)))])
    with pytest.raises(ValueError, match=f"\\(images, {DIM}\\)"):
        await store.upsert([(Product(id="a"), np.zeros((1, 2, DIM), dtype=np.float32))])
    assert await store.count() == 0


async def test_numeric_keys_lists_the_keys_some_product_has(store: VectorStore) -> None:
    assert await store.numeric_keys() == []
    await store.upsert(
        [
            (Product(id="a", numeric_attributes={"stock": 3.0, "popularity": 10.0}), unit(1)),
            (Product(id="b", numeric_attributes={"created_at": 1.7e9}), unit(1)),
            (Product(id="c"), unit(1)),
        ]
    )
    assert await store.numeric_keys() == ["created_at", "popularity", "stock"]


# --- near-duplicate collapsing ---------------------------------------------------------------------------------


def near(v: Vector, noise: float, seed: int) -> Vector:
    """A near copy of `v` (cosine about 1 - noise^2 * DIM / 2)."""
    rng = np.random.default_rng(seed)
    w = v + noise * rng.standard_normal(DIM).astype(np.float32)
    return (w / np.linalg.norm(w)).astype(np.float32)


async def test_collapse_drops_near_copies_into_the_best_of_them(store: VectorStore) -> None:
    base, other = unit(1, 0.2), unit(0.3, 1)
    await store.upsert(
        [
            (Product(id="orig", images=images("a", "b")), rows(unit(1), base)),  # first: its first image is the query
            # A near copy of orig's second image as its second image.
            (Product(id="copy", images=images("c", "d")), rows(unit(0.5, 0, 1), near(base, 0.003, 1))),
            (Product(id="other", images=images("e")), rows(other)),
            (Product(id="copy2", images=images("f")), rows(near(base, 0.003, 2))),
            (Product(id="copy-of-other", images=images("g")), rows(near(other, 0.003, 3))),
        ]
    )
    plain = {h.product.id: h.score for h in await store.search(unit(1), SearchFilter(), 10)}
    assert next(iter(plain)) == "orig" and set(plain) == {"orig", "copy", "other", "copy2", "copy-of-other"}
    # Of two near copies, the better ranked is kept (noise decides which of these two).
    kept, dropped = [pid for pid in plain if pid in {"other", "copy-of-other"}]

    hits = await store.search(unit(1), SearchFilter(), 10, collapse=0.99)
    assert [h.product.id for h in hits] == ["orig", kept]
    assert hits[0].duplicates == tuple(pid for pid in plain if pid in {"copy", "copy2"})  # best first
    assert hits[1].duplicates == (dropped,)
    assert [h.score for h in hits] == pytest.approx([plain["orig"], plain[kept]])  # scores as without collapsing

    # A threshold no pair of images reaches collapses nothing.
    loose = await store.search(unit(1), SearchFilter(), 10, collapse=1.0)
    assert [h.product.id for h in loose] == list(plain) and not any(h.duplicates for h in loose)


async def test_collapse_of_exact_copies_reaches_a_threshold_of_one(store: VectorStore) -> None:
    v = unit(0.3, 0.7, 0.2)
    await store.upsert([(Product(id=f"same-{i}"), v) for i in range(4)] + [(Product(id="else"), unit(0, 0, 0, 1))])
    hits = await store.search(unit(1), SearchFilter(), 10, collapse=1.0)
    assert len(hits) == 2 and len(hits[0].duplicates) == 3 and hits[1].product.id == "else"


async def test_collapsed_pages_are_slices_of_one_list(store: VectorStore) -> None:
    rng = np.random.default_rng(5)
    products = []
    for family in range(12):  # 12 families of 1 to 3 near copies, at decreasing similarity to the query
        centre = unit(1.0 - family / 20, *rng.standard_normal(DIM - 1).astype(float) * 0.4)
        for copy in range(1 + family % 3):
            products.append((Product(id=f"f{family:02d}-{copy}"), near(centre, 0.002, family * 10 + copy)))
    await store.upsert(products)
    everything = await store.search(unit(1), SearchFilter(), 50, collapse=0.98)
    assert len(everything) == 12 and len({h.product.id[:3] for h in everything}) == 12
    assert sum(len(h.duplicates) for h in everything) == len(products) - 12
    assert all({d[:3] for d in h.duplicates} <= {h.product.id[:3]} for h in everything)
    pages = [await store.search(unit(1), SearchFilter(), 5, offset=o, collapse=0.98) for o in (0, 5, 10, 15)]
    assert [(h.product.id, h.duplicates) for page in pages for h in page] == [
        (h.product.id, h.duplicates) for h in everything
    ]
    assert [len(page) for page in pages] == [5, 5, 2, 0]
    diverse = await store.search(unit(1), SearchFilter(), 50, collapse=0.98, diversity=0.5)
    assert {h.product.id for h in diverse} == {h.product.id for h in everything}  # MMR over the kept ones


async def test_collapse_considers_only_the_best_candidates(store: VectorStore) -> None:
    count = DIVERSITY_CANDIDATES + 20
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    await store.upsert([(Product(id=f"p{i}"), vectors[i]) for i in range(count)])
    hits = await store.search(vectors[0], SearchFilter(), 100, offset=150, collapse=0.999)
    assert len(hits) == DIVERSITY_CANDIDATES - 150


async def test_collapse_rejects_a_threshold_outside_zero_to_one(store: VectorStore) -> None:
    for threshold in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="collapse"):
            await store.search(unit(1), SearchFilter(), 10, collapse=threshold)


async def test_diversity_compares_products_by_the_images_they_matched(store: VectorStore) -> None:
    # "twin" matched by an image close to the one "best" matched by: diversity moves it below "apart", although
    # "twin" is the more relevant. "apart"'s other image is a copy of "best"'s, but not the one it matched by.
    best, close = unit(0.95, 0.31), unit(0.95, 0.31, 0.05)  # cosines to the query 0.951, 0.949; to each other 0.999
    await store.upsert(
        [
            (Product(id="best", images=images("a", "b")), rows(best, unit(0, 0, 0, 0, 0, 1))),
            (Product(id="twin", images=images("c")), rows(close)),
            (Product(id="apart", images=images("d", "e")), rows(at(0.9, 3), unit(0, 0, 0, 0, 0, 1))),
        ]
    )
    assert [h.product.id for h in await store.search(unit(1), SearchFilter(), 3)] == ["best", "twin", "apart"]
    diverse = await store.search(unit(1), SearchFilter(), 3, diversity=0.5)
    assert [(h.product.id, h.matched_image) for h in diverse] == [("best", 0), ("apart", 0), ("twin", 0)]


def test_rerank_treats_a_point_without_image_vectors_as_like_no_other() -> None:
    similarity = product_similarity([rows(unit(1)), None, rows(unit(0, 1), unit(1))])
    assert similarity[0, 2] == pytest.approx(1.0) and similarity[2, 0] == pytest.approx(1.0)
    assert not similarity[1].any() and not similarity[:, 1].any()
    assert collapse(similarity, 0.9) == ([0, 1], {0: [2], 1: []})
    assert best_image(None, unit(1)) == (None, None) and best_image(rows(unit(1)), None) == (None, None)
    assert best_image(rows(unit(0, 1), unit(1, 0.1)), unit(1)) == (1, pytest.approx(float(unit(1, 0.1)[0])))
