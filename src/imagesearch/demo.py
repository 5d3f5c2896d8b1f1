"""`imagesearch demo`: the whole product, offline, in one command.

Serves the bundled test model (synthetic-clip) on an embedded store in a temporary directory, bulk-indexes a
generated catalogue over gRPC, and runs a few searches through the same client any caller would use. The model
only knows the synthetic catalogue; see the README for running a real pretrained model.
"""

from __future__ import annotations

import asyncio
import io
import random
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from imagesearch.client import ImageSearchClient, Product
from imagesearch.config import Settings
from imagesearch.server import build_server, open_components
from imagesearch.synthetic import CatalogueItem, make_catalogue, render
from imagesearch.v1 import image_search_service_pb2 as pb

DEMO_MODEL = "synthetic-clip"


def _print_hits(title: str, response: pb.SearchResponse) -> None:
    mode = pb.SearchMode.Name(response.mode).removeprefix("SEARCH_MODE_").lower()
    print(f"\n{title}   ({mode}, {response.server_time_ms:.1f} ms on the server)")
    for rank, hit in enumerate(response.hits, 1):
        p = hit.product
        print(f"  {rank}. {hit.score:.3f}  {p.id}  {p.name:<28} {p.category:<8} {p.price:>7.2f} {p.currency}")


def _photo(kind: str, colour: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    render(kind, colour, "plain", random.Random(seed), 128).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def run_demo(*, products: int, port: int, keep_serving: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="imagesearch-demo-") as tmp:
        settings = Settings(host="127.0.0.1", port=port, data_dir=Path(tmp), model=DEMO_MODEL, device="cpu")
        components = await open_components(settings)
        server, bound_port, health = build_server(settings, components)
        await server.start()
        await health.serving()
        target = f"127.0.0.1:{bound_port}"
        try:
            async with ImageSearchClient(target) as client:
                await _tour(client, products)
                if keep_serving:
                    print(f"\nserving on {target} (Ctrl-C to stop); try:")
                    print(f"  grpcurl -plaintext -d '{{\"query\": {{\"text\": \"red mug\"}}}}' {target} "
                          "imagesearch.v1.ImageSearchService/Search")  # fmt: skip
                    await _wait_for_ctrl_c()
        finally:
            await server.stop(1)
            await health.close()
            await components.close()
    return 0


async def _tour(client: ImageSearchClient, count: int) -> None:
    # Every third product has a model code in its name ("Red mug RM-4471"): words only the text carries.
    catalogue = make_catalogue(count, seed=7, model_codes=True)
    info = await client.service_info()
    print(
        f"model {info.model.name} ({info.model.embedding_dimension}-d, {info.model.device}); store {info.store.backend}"
    )
    started = time.monotonic()
    failed = [r async for r in client.index_products(indexed(catalogue)) if r.HasField("error")]
    elapsed = time.monotonic() - started
    print(f"indexed {count - len(failed)} generated products in {elapsed:.1f} s over IndexProducts")

    for text in ("red mug", "striped orange hat", "black chair"):
        _print_hits(f'text: "{text}"', await client.search(text=text, top_k=5))
    _print_hits(
        'text: "striped orange hat" by the CLIP vector alone (mode dense): the model barely sees patterns',
        await client.search(text="striped orange hat", top_k=5, mode="dense"),
    )
    code = next((item.model_code for item in catalogue if item.model_code), None)
    if code is not None:
        _print_hits(f'text: "{code}", a model code', await client.search(text=code, top_k=3))
    _print_hits(
        "image: a photo of a yellow hat the catalogue has never seen",
        await client.search(image=_photo("hat", "yellow", seed=99), top_k=5),
    )
    _print_hits(
        'text: "bag", category bag, price <= 60', await client.search(text="bag", categories=["bag"], price_max=60)
    )
    _print_hits(
        'multimodal: the yellow hat photo + "green" (text_weight 0.5)',
        await client.search(image=_photo("hat", "yellow", seed=99), text="green hat", text_weight=0.5, top_k=5),
    )


def indexed(catalogue: Iterable[CatalogueItem]) -> Iterator[tuple[Product, bytes]]:
    """The generated catalogue as the demo indexes it: each item as a product (prices in EUR) and its photo."""
    for item in catalogue:
        product = Product(
            id=item.product_id,
            name=item.name,
            category=item.category,
            price=item.price,
            currency="EUR",
            attributes=item.attributes,
        )
        yield product, item.jpeg()


async def _wait_for_ctrl_c() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
