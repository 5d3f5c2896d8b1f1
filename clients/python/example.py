"""The imagesearch.v1 walkthrough in Python, with the typed asyncio client in src/imagesearch/client.py.

Health check, index a product with an image (streamed in 64 KiB chunks by the client), search by that image and
by text, read the google.rpc.BadRequest of an INVALID_ARGUMENT, and delete the product again.

Usage: .venv/bin/python clients/python/example.py TARGET IMAGE [--id ID] [--text TEXT] [--keep]
Exits 1 when the product is not the first hit for its own image.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagesearch.client import ImageSearchClient, Product
from imagesearch.v1 import image_search_service_pb2 as pb


def print_hits(title: str, response: pb.SearchResponse) -> None:
    kind = pb.QueryKind.Name(response.query_kind)
    print(f"{title}: {len(response.hits)} hits ({kind}, {response.server_time_ms:.1f} ms server time)")
    for rank, hit in enumerate(response.hits, 1):
        print(f"  {rank}. {hit.product.id:<20} score={hit.score:.4f}  {hit.product.name}")


async def main(target: str, image_path: Path, product_id: str, text: str, keep: bool) -> int:
    image = image_path.read_bytes()
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
        )
        indexed = await client.index_product(product, image)
        print(f"indexed {indexed.product.id} (created={indexed.created})")

        by_image = await client.search(image=image, top_k=5)
        print_hits("image search", by_image)
        print_hits(f'text search "{text}"', await client.search(text=text, top_k=5))

        # An invalid request: INVALID_ARGUMENT with a google.rpc.BadRequest naming every offending field.
        try:
            await client.search(text=text, top_k=1000, price_min=50, price_max=10)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            print(f"INVALID_ARGUMENT as expected: {error.details()}")
            status = rpc_status.from_call(error)  # the google.rpc.Status from the trailers
            for detail in status.details if status else []:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    for violation in bad_request.field_violations:
                        print(f"  field violation: {violation.field}: {violation.description}")
        else:
            print("FAIL: top_k 1000 was accepted", file=sys.stderr)
            return 1

        if not keep:
            await client.delete_product(product_id)
            print(f"deleted {product_id}")

    if not by_image.hits or by_image.hits[0].product.id != product_id:
        print(f"FAIL: {product_id} is not the first hit for its own image", file=sys.stderr)
        return 1
    print(f"OK: {product_id} came back first for its own image")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="server address, e.g. localhost:50051")
    parser.add_argument("image", type=Path, help="image file to index and search with")
    parser.add_argument("--id", default="python-example-1", help="product id to index")
    parser.add_argument("--text", default="red mug", help="text query")
    parser.add_argument("--keep", action="store_true", help="keep the product instead of deleting it")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.target, args.image, args.id, args.text, args.keep)))
