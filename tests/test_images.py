"""Several images per product, query regions and near-duplicate listings (issue #24), through the real gRPC server:
the bundled trained model (synthetic-clip), a real Qdrant Edge store, generated stubs.

The catalogues are the model's own world: rendered drawings of product kinds in colours (synthetic/renderer.py).
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from PIL import Image
from rpc import chunks, stream, violated_fields

from imagesearch.synthetic.renderer import COLOURS, KINDS, render
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from imagesearch.v1 import products_pb2

if TYPE_CHECKING:  # the async stub's type exists for type checkers only
    Stub = pb_grpc.ImageSearchServiceAsyncStub


def drawing(kind: str, colour: str, seed: int = 0, size: int = 128) -> Image.Image:
    return render(kind, colour, "plain", random.Random(seed), size)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photo(kind: str, colour: str, seed: int = 0) -> bytes:
    return jpeg(drawing(kind, colour, seed))


def product(product_id: str, *images: products_pb2.ProductImage, **fields: Any) -> products_pb2.Product:
    return products_pb2.Product(id=product_id, name=fields.pop("name", product_id), images=list(images), **fields)


def described(*ids: str) -> list[products_pb2.ProductImage]:
    return [
        products_pb2.ProductImage(id=image_id, role="packshot" if i == 0 else "detail")
        for i, image_id in enumerate(ids)
    ]


def index_messages(item: products_pb2.Product, images: Sequence[bytes], message: Any) -> list[Any]:
    """A product followed by its images: the first right after it, each further one after its image_index."""
    messages = [message(product=item)]
    for index, data in enumerate(images):
        if index:
            messages.append(message(image_index=index))
        messages += [message(image_chunk=c) for c in chunks(data, 16 * 1024)]
    return messages


async def index(stub: Stub, item: products_pb2.Product, images: Sequence[bytes]) -> pb.IndexProductResponse:
    response: pb.IndexProductResponse = await stub.IndexProduct(
        stream(*index_messages(item, images, pb.IndexProductRequest))
    )
    return response


async def index_many(stub: Stub, items: Sequence[tuple[products_pb2.Product, Sequence[bytes]]]) -> list[Any]:
    messages: list[Any] = []
    for item, images in items:
        messages += index_messages(item, images, pb.IndexProductsRequest)
    return [r async for r in stub.IndexProducts(stream(*messages))]


async def search(stub: Stub, image: bytes | None = None, **query: Any) -> pb.SearchResponse:
    messages: list[Any] = [pb.SearchRequest(query=pb.SearchQuery(**query))]
    messages += [pb.SearchRequest(image_chunk=c) for c in chunks(image or b"")]
    response: pb.SearchResponse = await stub.Search(stream(*messages))
    return response


def ids(hits: Sequence[pb.SearchHit]) -> list[str]:
    return [hit.product.id for hit in hits]


async def refused_fields(call: Any) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return violated_fields(err.value)


async def index_distractors(stub: Stub, kind: str, colour: str, count: int) -> None:
    """`count` products of one kind and colour (other renders), and one of every other kind, each with one image."""
    items = [(product(f"{kind}-{i}"), [photo(kind, colour, seed=100 + i)]) for i in range(count)]
    items += [(product(f"other-{k}"), [photo(k, "green", seed=7)]) for k in KINDS if k != kind]
    assert not [r for r in await index_many(stub, items) if r.HasField("error")]


# --- several images per product ---------------------------------------------------------------------------------


async def test_product_is_found_by_its_second_image_where_its_first_alone_ranks_below_10(stub: Stub) -> None:
    await index_distractors(stub, "mug", "red", 12)
    query = photo("mug", "red", seed=1)
    # The product's packshot is a blue hat; its second image is the red mug of the query (another encoding).
    packshot = photo("hat", "blue", seed=3)
    red_mug_view = jpeg(drawing("mug", "red", seed=1), quality=70)

    await index(stub, product("set-1", *described("hat")), [packshot])
    one_image = ids((await search(stub, query, top_k=100)).hits)
    assert one_image.index("set-1") >= 10, one_image

    created = await index(stub, product("set-1", *described("hat", "mug")), [packshot, red_mug_view])
    assert not created.created and [i.id for i in created.product.images] == ["hat", "mug"]
    best = (await search(stub, query, top_k=10)).hits[0]
    assert best.product.id == "set-1"
    assert (best.matched_image_index, best.matched_image_id) == (1, "mug")


async def test_text_search_matches_a_product_by_its_best_image(stub: Stub) -> None:
    await index_distractors(stub, "lamp", "blue", 3)
    await index(stub, product("duo", *described("mug", "lamp")), [photo("mug", "red"), photo("lamp", "yellow")])
    hits = (await search(stub, text="yellow lamp", mode=pb.SEARCH_MODE_DENSE, top_k=5)).hits
    assert hits[0].product.id == "duo" and hits[0].matched_image_index == 1
    hits = (await search(stub, text="red mug", mode=pb.SEARCH_MODE_DENSE, top_k=5)).hits
    assert hits[0].product.id == "duo" and hits[0].matched_image_index == 0


async def test_images_are_stored_with_their_ids_roles_urls_and_hashes(stub: Stub) -> None:
    import hashlib

    images = [photo("shoe", "black"), photo("shoe", "white")]
    described_images = [
        products_pb2.ProductImage(id="side", role="packshot", url="https://cdn.test/a.jpg", sha256="ignored"),
        products_pb2.ProductImage(role="detail"),
    ]
    response = await index(stub, product("shoe-1", *described_images, category="shoes"), images)
    stored = (await stub.GetProduct(pb.GetProductRequest(id="shoe-1"))).product
    assert stored == response.product
    assert [(i.id, i.role, i.url) for i in stored.images] == [
        ("side", "packshot", "https://cdn.test/a.jpg"),
        ("", "detail", ""),
    ]
    assert [i.sha256 for i in stored.images] == [hashlib.sha256(data).hexdigest() for data in images]
    listed = (await stub.ListProducts(pb.ListProductsRequest())).products
    assert listed[0] == stored


async def test_a_product_indexed_with_one_image_shows_it_as_its_one_image(stub: Stub) -> None:
    data = photo("bag", "brown")
    await index(stub, product("bag-1", image_url="https://cdn.test/bag.jpg"), [data])
    stored = (await stub.GetProduct(pb.GetProductRequest(id="bag-1"))).product
    assert len(stored.images) == 1 and stored.images[0].url == "https://cdn.test/bag.jpg"
    assert stored.image_url == "https://cdn.test/bag.jpg"
    assert (await search(stub, data, top_k=1)).hits[0].matched_image_index == 0


async def test_replacing_a_product_replaces_all_its_images(stub: Stub) -> None:
    await index_distractors(stub, "chair", "purple", 2)
    old = [photo("bottle", "orange"), photo("chair", "pink")]
    await index(stub, product("p", *described("a", "b")), old)
    before = (await search(stub, old[1], top_k=1)).hits[0]
    assert (before.product.id, before.matched_image_index) == ("p", 1) and before.score > 0.99

    new = [photo("t-shirt", "white")]
    await index(stub, product("p", *described("c")), new)
    stored = (await stub.GetProduct(pb.GetProductRequest(id="p"))).product
    assert [i.id for i in stored.images] == ["c"]
    # The pink chair is no longer one of its images: the product now matches it only through the t-shirt.
    after = next(h for h in (await search(stub, old[1], top_k=10)).hits if h.product.id == "p")
    assert after.matched_image_index == 0 and after.score < 0.9
    assert ids((await search(stub, new[0], top_k=1)).hits) == ["p"]


async def test_deleting_a_product_deletes_every_image(stub: Stub) -> None:
    images = [photo("hat", "red"), photo("lamp", "green")]
    await index(stub, product("gone", *described("a", "b")), images)
    await index(stub, product("kept"), [photo("mug", "white")])
    await stub.DeleteProduct(pb.DeleteProductRequest(id="gone"))
    for data in images:
        assert ids((await search(stub, data, top_k=5)).hits) == ["kept"]


async def test_bulk_import_takes_several_images_per_product_and_reports_bad_ones(stub: Stub) -> None:
    items = [
        (product("ok-1", *described("a", "b")), [photo("mug", "blue"), photo("mug", "yellow")]),
        (product("bad", *described("a", "b")), [photo("hat", "red")]),  # no bytes for images[1], no URL
        (product("ok-2"), [photo("shoe", "red")]),
    ]
    responses = await index_many(stub, items)
    assert [(r.id, r.HasField("error")) for r in responses] == [("ok-1", False), ("bad", True), ("ok-2", False)]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    stored = (await stub.GetProduct(pb.GetProductRequest(id="ok-1"))).product
    assert len(stored.images) == 2
    assert (await search(stub, photo("mug", "yellow"), top_k=1)).hits[0].matched_image_index == 1


@pytest.mark.parametrize(
    ("item", "images", "extra", "field"),
    [
        pytest.param(
            product("p"), [b"x"], [pb.IndexProductRequest(image_index=1)], "image_index", id="index-out-of-range"
        ),
        pytest.param(
            product("p", *described("a", "b")),
            [b"x", b"y"],
            [pb.IndexProductRequest(image_index=1)],
            "image_index",
            id="index-sent-twice",
        ),
        pytest.param(product("p", *described("a", "b")), [b"x"], [], "product.images[1]", id="image-without-bytes"),
        pytest.param(
            product("p", *described(*"abcdefghijk")), [b"x"] * 11, [], "image_index", id="more-than-the-limit"
        ),
        pytest.param(
            product("p", products_pb2.ProductImage(id="a"), products_pb2.ProductImage(id="a")),
            [b"x", b"y"],
            [],
            "product.images[1].id",
            id="repeated-image-id",
        ),
    ],
)
async def test_index_request_breaking_an_image_rule_names_the_field(
    stub: Stub, item: products_pb2.Product, images: list[bytes], extra: list[Any], field: str
) -> None:
    messages = index_messages(item, images, pb.IndexProductRequest) + extra
    assert field in await refused_fields(stub.IndexProduct(stream(*messages)))
    assert (await stub.ListProducts(pb.ListProductsRequest())).products == []  # nothing written


async def test_inline_index_takes_several_images(stub: Stub) -> None:
    images = [photo("bottle", "blue"), photo("bottle", "white")]
    request = pb.IndexProductInlineRequest(product=product("inline", *described("a", "b")), images=images)
    response = await stub.IndexProductInline(request)
    assert response.created and [i.id for i in response.product.images] == ["a", "b"]
    hit = (await search(stub, images[1], top_k=1)).hits[0]
    assert (hit.product.id, hit.matched_image_index) == ("inline", 1)
    both = pb.IndexProductInlineRequest(product=product("x"), image=images[0], images=images[:1])
    assert await refused_fields(stub.IndexProductInline(both)) == ["images"]
    too_many = pb.IndexProductInlineRequest(product=product("x", *described("a")), images=images)
    assert await refused_fields(stub.IndexProductInline(too_many)) == ["images"]


async def test_service_info_reports_the_image_limits(stub: Stub) -> None:
    limits = (await stub.GetServiceInfo(pb.GetServiceInfoRequest())).limits
    assert (limits.max_images_per_product, limits.max_query_regions) == (10, 8)


# --- query regions ----------------------------------------------------------------------------------------------


def side_by_side(left: Image.Image, right: Image.Image) -> bytes:
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return jpeg(canvas)


LEFT = pb.NormalizedBox(x0=0.0, y0=0.0, x1=0.5, y1=1.0)
RIGHT = pb.NormalizedBox(x0=0.5, y0=0.0, x1=1.0, y1=1.0)


async def index_kinds_in_colours(stub: Stub) -> None:
    items = [
        (product(f"{kind}-{colour}", category=kind), [photo(kind, colour, seed=11)])
        for kind in ("mug", "lamp", "hat", "shoe")
        for colour in ("red", "blue", "green")
    ]
    assert not [r for r in await index_many(stub, items) if r.HasField("error")]


async def test_a_region_searches_for_what_is_in_that_box(stub: Stub) -> None:
    await index_kinds_in_colours(stub)
    look = side_by_side(drawing("mug", "red", seed=5), drawing("lamp", "blue", seed=6))
    left = ids((await search(stub, look, top_k=3, regions=[LEFT])).hits)
    right = ids((await search(stub, look, top_k=3, regions=[RIGHT])).hits)
    assert left[0] == "mug-red" and "lamp-blue" not in left
    assert right[0] == "lamp-blue" and "mug-red" not in right


async def test_several_regions_return_results_per_region(stub: Stub) -> None:
    await index_kinds_in_colours(stub)
    look = side_by_side(drawing("hat", "green", seed=5), drawing("shoe", "red", seed=6))
    response = await search(
        stub, look, top_k=3, regions=[LEFT, RIGHT], facet_spec=pb.SearchQuery.FacetSpec(categories=True)
    )
    assert list(response.hits) == [] and response.next_page_token == ""
    assert [r.region for r in response.region_results] == [LEFT, RIGHT]
    assert [ids(r.hits)[0] for r in response.region_results] == ["hat-green", "shoe-red"]
    assert all(len(r.hits) == 3 for r in response.region_results)
    assert {f.value: f.count for f in response.category_facets} == {"mug": 3, "lamp": 3, "hat": 3, "shoe": 3}


async def test_region_breaking_a_rule_names_the_field(stub: Stub) -> None:
    look = photo("mug", "red")
    bad = pb.NormalizedBox(x0=0.2, y0=0.0, x1=1.2, y1=1.0)
    assert await refused_fields(search(stub, look, regions=[LEFT, bad])) == ["query.regions[1].x1"]
    empty = pb.NormalizedBox(x0=0.5, y0=0.5, x1=0.5, y1=0.9)
    assert await refused_fields(search(stub, look, regions=[empty])) == ["query.regions[0].x1"]
    assert await refused_fields(search(stub, text="red mug", regions=[LEFT])) == ["query.regions"]


# --- near-duplicate listings ------------------------------------------------------------------------------------


COPIES = {
    "reupload": lambda image: jpeg(image),
    "recompressed": lambda image: jpeg(image, quality=50),
    "resized": lambda image: jpeg(image.resize((100, 100))),
    "cropped": lambda image: jpeg(image.crop((3, 3, image.width - 3, image.height - 3))),
}


class Planted:
    """A catalogue of distinct products (each kind in each colour at most once: the model tells those apart, the
    closest two at a cosine of ~0.85) with planted copies of some of them: the same bytes re-uploaded,
    re-compressed, resized and slightly cropped, each next to an image of the copying product's own (a kind and
    colour no other product shows)."""

    def __init__(self) -> None:
        classes = [(kind, colour) for kind in KINDS for colour in COLOURS]
        originals, own = classes[::5][:8] + classes[1::5] + classes[2::5] + classes[3::5], classes[4::5]
        self.images = {f"{k}-{c}": drawing(k, c, seed=i) for i, (k, c) in enumerate(originals)}
        self.items: list[tuple[products_pb2.Product, list[bytes]]] = [
            (product(pid), [jpeg(image)]) for pid, image in self.images.items()
        ]
        self.pairs: set[frozenset[str]] = set()
        self.copy_of: dict[str, tuple[str, str]] = {}  # copy id -> (source id, how)
        for n, source in enumerate(list(self.images)[::6]):
            how = list(COPIES)[n % len(COPIES)]
            copy_id = f"copy-{how}-{source}"
            own_kind, own_colour = own[n]
            images = [photo(own_kind, own_colour, seed=900 + n), COPIES[how](self.images[source])]
            self.items.append((product(copy_id, *described("own", "copied")), images))
            self.pairs.add(frozenset((source, copy_id)))
            self.copy_of[copy_id] = (source, how)

    def copy(self, how: str) -> tuple[str, str]:
        """(copy id, source id) of the first copy made this way."""
        copy_id = next(c for c, (_, made) in self.copy_of.items() if made == how)
        return copy_id, self.copy_of[copy_id][0]


async def test_find_duplicates_finds_every_planted_copy_and_no_other_pair(stub: Stub) -> None:
    planted = Planted()
    items = planted.items
    assert not [r for r in await index_many(stub, items) if r.HasField("error")]
    found: set[frozenset[str]] = set()
    listed: dict[str, pb.ProductDuplicates] = {}
    token = ""
    pages = 0
    while True:
        page = await stub.FindDuplicates(pb.FindDuplicatesRequest(page_size=20, page_token=token))
        pages += 1
        for checked in page.products:
            listed[checked.product_id] = checked
            found |= {frozenset((checked.product_id, d.product_id)) for d in checked.duplicates}
        token = page.next_page_token
        if not token:
            break
    assert pages == -(-len(items) // 20)
    assert found == planted.pairs  # recall 1.0, and no false pair at the default threshold (0.94)
    for pair in planted.pairs:
        for product_id in pair:
            [duplicate] = listed[product_id].duplicates  # listed under both products
            assert duplicate.similarity >= 0.94
    for copy_id, (source, how) in planted.copy_of.items():
        [duplicate] = listed[copy_id].duplicates
        assert (duplicate.product_id, duplicate.image_index, duplicate.duplicate_image_index) == (source, 1, 0)
        assert duplicate.exact == (how == "reupload")
        [back] = listed[source].duplicates
        assert (back.product_id, back.image_index, back.duplicate_image_index) == (copy_id, 0, 1)


async def test_find_duplicates_of_one_product_and_its_errors(stub: Stub) -> None:
    planted = Planted()
    await index_many(stub, planted.items)
    copy_id, source = planted.copy("reupload")
    response = await stub.FindDuplicates(pb.FindDuplicatesRequest(product_id=copy_id))
    [checked] = response.products
    assert (checked.product_id, [d.product_id for d in checked.duplicates]) == (copy_id, [source])
    assert checked.duplicates[0].exact and response.next_page_token == ""
    # Only byte copies reach a cosine of 1: at threshold 1 the re-upload is found, the re-compressed copy is not.
    exact = await stub.FindDuplicates(pb.FindDuplicatesRequest(product_id=source, threshold=1.0))
    assert [d.product_id for p in exact.products for d in p.duplicates] == [copy_id]
    recompressed, its_source = planted.copy("recompressed")
    strict = await stub.FindDuplicates(pb.FindDuplicatesRequest(product_id=its_source, threshold=1.0))
    assert list(strict.products) == []
    assert recompressed != copy_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.FindDuplicates(pb.FindDuplicatesRequest(product_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await refused_fields(stub.FindDuplicates(pb.FindDuplicatesRequest(threshold=1.5))) == ["threshold"]
    assert await refused_fields(stub.FindDuplicates(pb.FindDuplicatesRequest(page_size=501))) == ["page_size"]


async def test_search_collapses_near_duplicate_listings_into_the_best(stub: Stub) -> None:
    planted = Planted()
    await index_many(stub, planted.items)
    copy_id, source = planted.copy("recompressed")
    query = jpeg(planted.images[source])  # the source's own bytes: it is the best match, its copy the next
    assert ids((await search(stub, query, top_k=5)).hits)[:2] == [source, copy_id]
    collapsed = (await search(stub, query, top_k=5, collapse_duplicates=True)).hits
    assert ids(collapsed)[0] == source and copy_id not in ids(collapsed)
    assert list(collapsed[0].duplicate_product_ids) == [copy_id]
    assert len(collapsed) == 5  # the page is still full: the collapsed copy's place goes to the next product
    # At a threshold only byte copies reach, the re-compressed copy is listed again.
    strict = (await search(stub, query, top_k=5, collapse_duplicates=True, duplicate_threshold=1.0)).hits
    assert ids(strict)[:2] == [source, copy_id] and list(strict[0].duplicate_product_ids) == []
