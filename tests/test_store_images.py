"""Several images per product at the store, on both backends: the layout (the primary image unnamed, every image in
the `images` multivector), a product matched by its best image, the matched image, atomic replacement, the image
vectors and numeric attributes read back, and near-duplicate collapsing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import qdrant_edge as qe
from stores import DIM, MODEL, open_store, unit

from imagesearch.domain import LexicalQuery, Product, SearchFilter, point_id_for
from imagesearch.images import ProductImage
from imagesearch.store import EdgeStore, VectorStore
from imagesearch.store.base import DIVERSITY_CANDIDATES, LEXICAL_MODEL, Vector, product_to_payload
from imagesearch.store.layout import lexical_document
from imagesearch.store.record import IMAGES_LAYOUT

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


# --- stores written before several images per product ------------------------------------------------------------


def old_edge_store(path: Path, points: list[tuple[Product, Vector]]) -> None:
    """An embedded store as the release before several images per product wrote it: the unnamed vector and the
    lexical one, payloads without images, a record without `images`."""
    dense = qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine)
    lexical = qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)
    shard = qe.EdgeShard.create(str(path / "shard"), qe.EdgeConfig(vectors=dense, sparse_vectors={"bm25": lexical}))
    old_payload = {"images", "numbers", "numeric_keys"}
    shard.update(
        qe.UpdateOperation.upsert_points(
            [
                qe.Point(
                    point_id_for(p.id),
                    {"": v.tolist(), "bm25": lexical_document(p) or qe.SparseVector([], [])},
                    {k: v for k, v in product_to_payload(p).items() if k not in old_payload},
                )
                for p, v in points
            ]
        )
    )
    shard.flush()
    shard.close()
    record = {"model_id": MODEL, "dimension": DIM, "lexical": LEXICAL_MODEL}
    (path / "imagesearch-store.json").write_text(json.dumps(record))


OLD = [
    (Product(id=f"p{i}", name=f"old product {i}", image_url=f"https://x/{i}.jpg"), unit(1, i / 10)) for i in range(6)
]


async def test_embedded_store_written_before_several_images_gets_them_at_open(tmp_path: Path) -> None:
    old_edge_store(tmp_path / "edge", OLD)
    store = await EdgeStore.open(tmp_path / "edge", DIM, MODEL)
    try:
        for product, vector in OLD:
            hits = await store.search(vector, SearchFilter(), 1)
            assert hits[0].product.id == product.id and hits[0].matched_image == 0
            assert hits[0].score == pytest.approx(1.0, abs=1e-5)
            assert hits[0].product.images == (ProductImage(url=product.image_url),)
        found = await store.image_vectors([p.id for p, _ in OLD])
        for product, vector in OLD:
            np.testing.assert_allclose(found[product.id], [vector], atol=1e-6)
        words = await store.search(None, SearchFilter(), 10, lexical=LexicalQuery("old product"))
        assert len(words) == len(OLD)
    finally:
        await store.close()
    record = json.loads((tmp_path / "edge" / "imagesearch-store.json").read_text())
    assert record["images"] == IMAGES_LAYOUT
    reopened = await EdgeStore.open(tmp_path / "edge", DIM, MODEL)  # now with the multivector in its config
    try:
        assert (await reopened.search(OLD[3][1], SearchFilter(), 1))[0].product.id == "p3"
    finally:
        await reopened.close()


async def test_interrupted_images_update_resumes_at_the_next_open(tmp_path: Path) -> None:
    old_edge_store(tmp_path / "edge", OLD)
    # An update stopped halfway: the vector name added and p0..p2 done (with flush, as a crash after the WAL would
    # leave them; p0 written since with two images), the store record not yet written.
    shard = qe.EdgeShard.load(str(tmp_path / "edge" / "shard"))
    maxsim = qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim)
    shard.update(qe.UpdateOperation.create_dense_vector("images", DIM, qe.Distance.Cosine, multivector_config=maxsim))
    done = {"p0": [unit(0, 0, 1), unit(0, 0, 0, 1)], "p1": [OLD[1][1]], "p2": [OLD[2][1]]}
    shard.update(
        qe.UpdateOperation.update_vectors(
            [qe.PointVectors(point_id_for(pid), {"images": [v.tolist() for v in vs]}) for pid, vs in done.items()]
        )
    )
    shard.update(qe.UpdateOperation.set_payload([point_id_for("p0")], {"images": [{"id": "x"}, {"id": "y"}]}))
    shard.flush()
    shard.close()

    store = await EdgeStore.open(tmp_path / "edge", DIM, MODEL)
    try:
        found = await store.image_vectors([p.id for p, _ in OLD])
        np.testing.assert_allclose(found["p0"], done["p0"], atol=1e-6)  # left as it was
        p0 = await store.get("p0")
        assert p0 is not None and [image.id for image in p0.images] == ["x", "y"]
        for product, vector in OLD[1:]:
            np.testing.assert_allclose(found[product.id], [vector], atol=1e-6)
    finally:
        await store.close()
