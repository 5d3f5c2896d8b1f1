"""The several-images A/B of benchmarks/service.py (--images K): two servers started together on catalogues of the
same size, one with one image per product and one with K, image searches alternating between them call by call,
a bulk import of products with one image against products with K, and each store's size and server's memory."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from service_report import Row, row
from service_server import disk_mb, fill_catalogue, free_port, rss_mb, start_server, wait_serving

from imagesearch.client import ImageSearchClient, Product, ProductImage

# A pause between calls to the two servers, so one's threads do not spin into the other's call (see service.py).
SETTLE_S = 0.01


async def images_ab(
    args: argparse.Namespace, data_dir: Path, model_id: str, dimension: int, jpeg: Any
) -> tuple[list[Row], dict[str, float]]:
    """Rows (image search and bulk import, one image and K images per product) and figures (store size on disk,
    server memory, the ratio of the search p50s). `jpeg(seed)` makes a query or product photo."""
    counts = {"1 image": 1, f"{args.images} images": args.images}
    ports = {name: free_port() for name in counts}
    servers: dict[str, subprocess.Popen[bytes]] = {}
    searches: dict[str, list[float]] = {name: [] for name in counts}
    figures: dict[str, float] = {}
    rows: list[Row] = []
    try:
        for name, images in counts.items():
            ab_dir = data_dir / f"images-{images}"
            await fill_catalogue(ab_dir, model_id, dimension, args.catalogue, images=images)
            figures[f"store_disk_mb, {name}"] = disk_mb(ab_dir / "qdrant-edge")
            # The runtime's converted graph and its measured choice from the main run: both start as a restart.
            if (data_dir / "runtime-cache").is_dir():
                shutil.copytree(data_dir / "runtime-cache", ab_dir / "runtime-cache", dirs_exist_ok=True)
            servers[name] = start_server(ab_dir, args, time.perf_counter(), port=ports[name])
        for port in ports.values():
            await wait_serving(f"127.0.0.1:{port}")
        clients = {name: ImageSearchClient(f"127.0.0.1:{port}", timeout_s=120) for name, port in ports.items()}
        try:
            names = list(counts)
            for i in range(-3, max(2 * args.n, 20)):
                photo = jpeg(70_000 + i)  # a new photo every round: neither cache answers; both get the same one
                for name in names if i % 2 else reversed(names):
                    await asyncio.sleep(SETTLE_S)
                    started = time.perf_counter()
                    await clients[name].search(image=photo)
                    if i >= 0:
                        searches[name].append(time.perf_counter() - started)
            for name in names:
                rows.append(row(f"image search, uncached, {name} per product (alternating)", searches[name]))
                figures[f"server_rss_mb, {name}"] = rss_mb(servers[name])
            bulk = 32 if args.quick else 128
            for name, images in counts.items():
                rows.append(await bulk_import(clients[name], bulk, jpeg, images, f" x {name}"))
                figures[f"bulk_images_per_s, {name}"] = rows[-1].per_s * images
        finally:
            for client in clients.values():
                await client.close()
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=60)
    one, many = (rows[0].p50_ms, rows[1].p50_ms)
    figures["search_p50_ratio"] = many / one
    return rows, figures


async def bulk_import(client: ImageSearchClient, count: int, jpeg: Any, images: int = 1, label: str = "") -> Row:
    """`count` products with `images` photos each over one IndexProducts stream; the row's samples are the gaps
    between answers, its rate products per second."""

    def item(i: int) -> tuple[Product, bytes | list[bytes | None]]:
        if images == 1:
            return Product(id=f"bulk-{i}", category="bags"), jpeg(50_000 + i)
        product = Product(id=f"bulk-{images}-{i}", category="bags", images=[ProductImage() for _ in range(images)])
        return product, [jpeg(90_000 + i * images + k) for k in range(images)]

    items = [item(i) for i in range(count)]
    started = time.perf_counter()
    last = started
    gaps: list[float] = []
    async for response in client.index_products(items):
        if response.HasField("error"):
            raise RuntimeError(f"bulk import failed for {response.id}: {response.error.message}")
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    path = f"bulk import, {count} products{label} (IndexProducts)"
    return row(path, gaps, None, time.perf_counter() - started)
