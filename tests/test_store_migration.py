"""Stores written by older releases, brought up to date when they open, without encoding any image again: their
lexical side (a store from before hybrid search: the fixture written by that release, tests/fixtures/README.md, and
an old-layout collection; a store recorded with another lexical model) and their `images` multivector (a store
from before several images per product), each resuming where an interrupted update stopped."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import qdrant_edge as qe
from conftest import start_server, stop_server
from qdrant_client import AsyncQdrantClient, models
from rpc import search
from stores import DIM, MODEL, unit

from imagesearch.config import Settings
from imagesearch.domain import LexicalQuery, Product, SearchFilter, point_id_for
from imagesearch.images import ProductImage
from imagesearch.model.encoder import ClipEncoder
from imagesearch.store import EdgeStore, QdrantServerStore
from imagesearch.store.base import LEXICAL_MODEL, LEXICAL_VECTOR, Vector, product_to_payload
from imagesearch.store.layout import lexical_document
from imagesearch.store.record import IMAGES_LAYOUT
from imagesearch.synthetic import make_catalogue
from imagesearch.v1 import image_search_service_pb2 as pb

# qdrant-client's local mode warns that it ignores payload indexes; the store creates them for real servers.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

FIXTURE = Path(__file__).parent / "fixtures" / "edge-store-before-hybrid.tar.gz"
HYBRID = pb.SEARCH_MODE_HYBRID


def ids(response: pb.SearchResponse) -> list[str]:
    return [hit.product.id for hit in response.hits]


# --- stores written before hybrid search -------------------------------------------------------------------------


def fixture_products() -> list[tuple[Product, str]]:
    """The products in FIXTURE with their model codes ("" for none), as tests/fixtures/README.md says."""
    products = []
    for i, item in enumerate(make_catalogue(24, seed=2024)):
        code = f"{item.colour[0]}{item.kind[0]}-{7100 + i}".upper() if i % 3 == 0 else ""
        product = Product(
            id=item.product_id,
            name=f"{item.name} {code}" if code else item.name,
            category=item.category,
            price=item.price,
            currency="EUR",
            attributes=item.attributes,
        )
        products.append((product, code))
    return products


def unpack_fixture(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True)
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(data_dir, filter="data")
    return data_dir / "qdrant-edge"


class RawPoint(NamedTuple):
    vector: list[float]  # the unnamed CLIP vector
    payload: dict[str, Any]
    has_words: bool  # has the lexical vector
    images: list[list[float]] | None  # the `images` multivector


def raw_points(store_dir: Path) -> dict[str, RawPoint]:
    """Each product's stored vectors and payload, read with the engine."""
    shard = qe.EdgeShard.load(str(store_dir / "shard"))
    try:
        records, _ = shard.scroll(qe.ScrollRequest(limit=100, with_payload=True, with_vector=True))
    finally:
        shard.close()
    points = {}
    for record in records:
        vector: Any = record.vector
        named = vector if isinstance(vector, dict) else {"": vector}
        payload = dict(record.payload or {})
        points[str(record.id)] = RawPoint(list(named[""]), payload, LEXICAL_VECTOR in named, named.get("images"))
    return points


async def test_embedded_store_written_before_hybrid_search_gets_its_lexical_side_and_images_at_open(
    tmp_path: Path, encoder: ClipEncoder
) -> None:
    store_dir = unpack_fixture(tmp_path / "data")
    before = raw_points(store_dir)
    assert len(before) == 24 and not any(p.has_words or p.images or "images" in p.payload for p in before.values())
    record = json.loads((store_dir / "imagesearch-store.json").read_text())
    assert "lexical" not in record and "images" not in record

    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", model="synthetic-clip")
    running = await start_server(settings, encoder)
    try:
        products = fixture_products()
        info = await running.stub.GetServiceInfo(pb.GetServiceInfoRequest())
        assert info.store.product_count == 24
        for product, code in products:
            if code:
                response = await search(running.stub, text=code, top_k=1)
                assert response.mode == HYBRID and ids(response) == [product.id], code
        stripes = await search(running.stub, text="striped", mode="lexical", top_k=24)
        assert {h.product.id for h in stripes.hits} == {p.id for p, _ in products if "Striped" in p.name}
        stored = await running.stub.GetProduct(pb.GetProductRequest(id=products[0][0].id))
        assert stored.product.name == products[0][0].name
    finally:
        await stop_server(running)

    after = raw_points(store_dir)
    assert after.keys() == before.keys()
    for point_id, point in after.items():
        old = before[point_id]
        assert point.vector == old.vector  # no image encoded again
        assert point.images == [old.vector]  # one image: the one it had
        # The payload gains the description of that image (changed on purpose: the point now has `images`).
        assert point.payload == {**old.payload, "images": [{"id": "", "role": "", "url": "", "sha256": ""}]}
        assert point.has_words
    record = json.loads((store_dir / "imagesearch-store.json").read_text())
    assert record["lexical"] == LEXICAL_MODEL and record["images"] == IMAGES_LAYOUT

    store = await EdgeStore.open(store_dir, 128, "synthetic-clip")
    try:
        for point in after.values():
            query = np.asarray(point.vector, dtype=np.float32)
            hits = await store.search(query, SearchFilter(), 1)
            assert hits[0].product.id == point.payload["product_id"] and hits[0].matched_image == 0
            assert hits[0].product.images == (ProductImage(url=point.payload["image_url"]),)
    finally:
        await store.close()


async def test_interrupted_lexical_update_resumes_at_the_next_open(tmp_path: Path) -> None:
    store_dir = unpack_fixture(tmp_path / "data")
    products = {point_id_for(p.id): p for p, _ in fixture_products()}
    # An update stopped halfway: the vector name added and half of the points given their words (with flush,
    # as a crash after the WAL would leave them), the store record not yet written.
    shard = qe.EdgeShard.load(str(store_dir / "shard"))
    shard.update(qe.UpdateOperation.create_sparse_vector(LEXICAL_VECTOR, modifier=qe.Modifier.Idf))
    half = sorted(products)[:12]
    bm25 = qe.Bm25(qe.Bm25Config(k=1.2, b=0.75, avg_len=256.0, language="english"))
    shard.update(
        qe.UpdateOperation.update_vectors(
            [qe.PointVectors(pid, {LEXICAL_VECTOR: bm25.embed_document(products[pid].name)}) for pid in half]
        )
    )
    shard.flush()
    shard.close()

    store = await EdgeStore.open(store_dir, 128, "synthetic-clip")
    try:
        for product in products.values():
            hits = await store.search(None, SearchFilter(), 1, lexical=LexicalQuery(product.name))
            assert hits and hits[0].product.name == product.name
    finally:
        await store.close()
    assert all(point.has_words for point in raw_points(store_dir).values())


async def test_embedded_store_rederives_its_lexical_side_when_the_recorded_model_differs(tmp_path: Path) -> None:
    store = await EdgeStore.open(tmp_path / "edge", DIM, MODEL)
    await store.upsert([(Product(id="a", name="Red mug"), unit(1)), (Product(id="b", name="Blue lamp"), unit(0, 1))])
    await store.close()
    # Words from another lexical model: "a" indexed under the terms of "blue lamp".
    shard = qe.EdgeShard.load(str(tmp_path / "edge" / "shard"))
    wrong = qe.Bm25().embed_document("blue lamp")
    shard.update(qe.UpdateOperation.update_vectors([qe.PointVectors(point_id_for("a"), {LEXICAL_VECTOR: wrong})]))
    shard.flush()
    shard.close()
    record_path = tmp_path / "edge" / "imagesearch-store.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "lexical": "an older lexical model"}))

    store = await EdgeStore.open(tmp_path / "edge", DIM, MODEL)
    try:
        hits = await store.search(None, SearchFilter(), 5, lexical=LexicalQuery("red mug"))
        assert [h.product.id for h in hits] == ["a"]
    finally:
        await store.close()
    assert json.loads(record_path.read_text())["lexical"] == LEXICAL_MODEL


def previous_payload(product: Product) -> dict[str, Any]:
    """A product's payload as the release before several images per product wrote it."""
    return {
        "product_id": product.id,
        "name": product.name,
        "description": "",
        "category": "",
        "price": 0.0,
        "currency": "",
        "image_url": product.image_url,
        "attributes": {},
        "attribute_pairs": [],
    }


async def test_qdrant_collection_created_before_hybrid_search_gets_its_lexical_side_and_images() -> None:
    client = AsyncQdrantClient(location=":memory:")
    # The collection as the previous release created and filled it: one unnamed vector, no sparse vector.
    await client.create_collection(
        "products",
        vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE),
        metadata={"imagesearch": {"model_id": MODEL, "dimension": DIM}},
    )
    old = [
        (Product(id="code", name="Red mug RM-4471", image_url="https://example.com/mug.jpg"), unit(1)),
        (Product(id="chair", name="Striped red chair"), unit(0, 1)),
        (Product(id="wordless"), unit(1, 1)),
    ]
    await client.upsert(
        "products",
        [models.PointStruct(id=point_id_for(p.id), vector=v.tolist(), payload=previous_payload(p)) for p, v in old],
    )

    store = await QdrantServerStore.from_client(client, DIM, MODEL)
    info = await client.get_collection("products")
    assert LEXICAL_VECTOR in (info.config.params.sparse_vectors or {})
    assert isinstance(info.config.params.vectors, dict) and "images" in info.config.params.vectors
    record = (info.config.metadata or {})["imagesearch"]
    assert record["lexical"] == LEXICAL_MODEL and record["images"] == IMAGES_LAYOUT
    hits = await store.search(None, SearchFilter(), 5, lexical=LexicalQuery("RM-4471"))
    assert [h.product.id for h in hits] == ["code"]
    assert hits[0].product.images == (ProductImage(url="https://example.com/mug.jpg"),)
    stored = await store.vectors([p.id for p, _ in old])
    images = await store.image_vectors([p.id for p, _ in old])
    for product, vector in old:
        np.testing.assert_allclose(stored[product.id], vector, atol=1e-6)  # untouched
        np.testing.assert_allclose(images[product.id], [vector], atol=1e-6)  # its one image
        dense = await store.search(vector, SearchFilter(), 1)
        assert dense[0].product.id == product.id and dense[0].matched_image == 0
    fused = await store.search(unit(1), SearchFilter(), 5, lexical=LexicalQuery("striped chair"))
    assert {h.product.id for h in fused} == {"code", "chair", "wordless"}
    assert all(h.matched_image == 0 for h in fused)
    # Opened again (another replica): up to date, it accepts the collection as it now is.
    again = await QdrantServerStore.from_client(client, DIM, MODEL)
    assert await again.count() == 3
    await store.close()


async def test_fixture_is_the_previous_layout() -> None:
    # Guards the fixture itself: a store without sparse vectors (so the migration tests test a migration).
    with tarfile.open(FIXTURE) as archive:
        member = archive.extractfile("qdrant-edge/shard/edge_config.json")
        assert member is not None
        config = json.loads(member.read())
    assert config["sparse_vectors"] == {} and list(config["vectors"]) == [""]


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
