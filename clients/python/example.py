"""The imagesearch.v1 walkthrough in Python, with the typed asyncio client in src/imagesearch/client.py.

Health check; index a product with two images (the packshot IMAGE and a detail view cropped from it, each streamed
in 64 KiB chunks by the client) and a numeric attribute; search by each image (the hit says which image matched),
by text, by a region of the packshot and with a ranking rule (with the score's explanation); index an exact
re-upload and find it with FindDuplicates; read the google.rpc.BadRequest of an INVALID_ARGUMENT; delete both
products again.

Usage: .venv/bin/python clients/python/example.py TARGET IMAGE [--id ID] [--text TEXT] [--keep]
Exits 1 when an answer is not what the contract says: the product is not the first hit for its own images and
region, the second image is not the one matched, the rule's part is missing, the re-upload is not found.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import sys
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from imagesearch.client import ImageSearchClient, Product, ProductImage
from imagesearch.v1 import image_search_service_pb2 as pb

# The detail view: this box of the packshot, in fractions of its width and height (x0, y0, x1, y1). The region
# search looks for the same box.
DETAIL_BOX = (0.25, 0.15, 0.85, 0.80)
POPULARITY = 1520.0
RULES = {"rules": [{"name": "popular", "field": "popularity", "transform": "TRANSFORM_LOG1P", "weight": 0.01}]}


def crop(image: bytes, box: tuple[float, float, float, float]) -> bytes:
    """The box of the image as a PNG: a second view of the product for this walkthrough."""
    with Image.open(io.BytesIO(image)) as picture:
        w, h = picture.size
        x0, y0, x1, y1 = box
        buffer = io.BytesIO()
        picture.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))).save(buffer, format="PNG")
    return buffer.getvalue()


def matched(hit: pb.SearchHit) -> str:
    if not hit.HasField("matched_image_index"):
        return "-"
    return f"{hit.matched_image_index}:{hit.matched_image_id}"


def print_hits(title: str, response: pb.SearchResponse, explain: bool = False) -> None:
    kind = pb.QueryKind.Name(response.query_kind)
    print(f"{title}: {len(response.hits)} hits ({kind}, {response.server_time_ms:.1f} ms server time)")
    for rank, hit in enumerate(response.hits, 1):
        print(f"  {rank}. {hit.product.id:<20} score={hit.score:.4f} image={matched(hit)}  {hit.product.name}")
        if explain:
            e = hit.explanation
            rules = " ".join(f"{r.name}: f={r.value:.4f} {r.weighted:+.4f}" for r in e.rules)
            print(f"     explanation: relevance={e.relevance:.4f} {rules}")


def first_is(response: pb.SearchResponse, product_id: str, what: str) -> bool:
    if response.hits and response.hits[0].product.id == product_id:
        return True
    print(f"FAIL: {product_id} is not the first hit for {what}", file=sys.stderr)
    return False


async def main(target: str, image_path: Path, product_id: str, text: str, keep: bool) -> int:
    packshot = image_path.read_bytes()
    detail = crop(packshot, DETAIL_BOX)
    copy_id = f"{product_id}-copy"
    ok = True
    async with ImageSearchClient(target, timeout_s=30) as client:
        for service in ("", "imagesearch.v1.ImageSearchService"):
            print(f'health "{service}": {await client.health(service)}')

        product = Product(
            id=product_id,
            name="Red mug (Python client)",
            category="mugs",
            price=9.5,
            currency="EUR",
            attributes={"client": "python"},
            images=[ProductImage(id="packshot", role="packshot"), ProductImage(id="detail", role="detail")],
            numeric_attributes={"popularity": POPULARITY},
        )
        indexed = await client.index_product(product, images=[packshot, detail])
        print(f"indexed {indexed.product.id} (created={indexed.created}) with {len(indexed.product.images)} images")

        by_image = await client.search(image=packshot, top_k=5)
        print_hits("image search", by_image)
        by_detail = await client.search(image=detail, top_k=5)
        print_hits("second-image search", by_detail)
        ok &= first_is(by_detail, product_id, "its second image")
        if by_detail.hits and matched(by_detail.hits[0]) != "1:detail":
            print(f"FAIL: the second image matched image {matched(by_detail.hits[0])}, want 1:detail", file=sys.stderr)
            ok = False
        print_hits(f'text search "{text}"', await client.search(text=text, top_k=5))

        by_region = await client.search(image=packshot, regions=[DETAIL_BOX], top_k=5)
        print_hits(f"region search {DETAIL_BOX}", by_region)
        ok &= first_is(by_region, product_id, "a region of its packshot")

        # Business rules: popular products first (ln(1 + popularity) * 0.01 added to the score), explained.
        ranked = await client.search(image=packshot, ranking=RULES, explain=True, top_k=3)
        print_hits("ranked search (popular first)", ranked, explain=True)
        ok &= first_is(ranked, product_id, "the ranked search")
        if ranked.hits:
            parts = {r.name: r.value for r in ranked.hits[0].explanation.rules}
            if not math.isclose(parts.get("popular", math.nan), math.log1p(POPULARITY), rel_tol=1e-4):
                print(f"FAIL: the ranked hit's explanation is {parts}, want popular = ln(1 + 1520)", file=sys.stderr)
                ok = False

        # An exact re-upload under another id: FindDuplicates lists it.
        await client.index_product(Product(id=copy_id, name="Red mug (a re-upload)", category="mugs"), packshot)
        duplicates = await client.find_duplicates(product_id=product_id)
        found = [d for entry in duplicates.products for d in entry.duplicates]
        for d in found:
            print(
                f"duplicates of {product_id}: {d.product_id} similarity={d.similarity:.4f} "
                f"image {d.image_index} ~ {d.duplicate_image_index} exact={str(d.exact).lower()}"
            )
        if not any(d.product_id == copy_id and d.exact for d in found):
            print(f"FAIL: FindDuplicates did not list {copy_id} as an exact duplicate", file=sys.stderr)
            ok = False
        await client.delete_product(copy_id)

        # An invalid request: INVALID_ARGUMENT with a google.rpc.BadRequest naming every offending field.
        try:
            await client.search(text=text, top_k=1000, price_min=50, price_max=10)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            print(f"INVALID_ARGUMENT as expected: {error.details()}")
            status = rpc_status.from_call(error)  # the google.rpc.Status from the trailers
            for detail_any in status.details if status else []:
                if detail_any.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail_any.Unpack(bad_request)
                    for violation in bad_request.field_violations:
                        print(f"  field violation: {violation.field}: {violation.description}")
        else:
            print("FAIL: top_k 1000 was accepted", file=sys.stderr)
            return 1

        if not keep:
            await client.delete_product(product_id)
            print(f"deleted {product_id}")

    ok &= first_is(by_image, product_id, "its own image")
    if not ok:
        return 1
    print(f"OK: {product_id} came back first for its own images and region, with the second image matched")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="server address, e.g. localhost:50051")
    parser.add_argument("image", type=Path, help="image file to index and search with (the packshot)")
    parser.add_argument("--id", default="python-example-1", help="product id to index")
    parser.add_argument("--text", default="red mug", help="text query")
    parser.add_argument("--keep", action="store_true", help="keep the product instead of deleting it")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.target, args.image, args.id, args.text, args.keep)))
