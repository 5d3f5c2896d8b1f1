"""Latency of the embedded store (EdgeStore over Qdrant Edge) on a synthetic catalogue.

Fills a store in a temporary directory with random L2-normalised vectors, each with a category (one of 20), a
price (1-1000) and a colour attribute, then times searches through the store's async API:
plain, filtered by category + price range, filtered by an attribute pair, and offset paging (page 1 vs page 10,
page size 20), first as filled (every search scans every vector), then after building the HNSW vector index
(what a server start does past IMAGESEARCH_STORE_INDEX_THRESHOLD). Prints medians and p95; asserts nothing
about time.

With --images K, compares catalogues of one image per product and of K images per product instead (each in a
process of its own, so that their memory compares): fill time, size on disk, the process's resident memory, and
searches (plain; with ranking rules, with and without explanations; collapsing near duplicates; diversified; hybrid)
by a full scan and with the HNSW index, whose build time it also prints.

    python benchmarks/store_edge.py [--n 100000] [--dim 512] [--queries 200]
    python benchmarks/store_edge.py --images 5 --n 10000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from imagesearch.domain import LexicalQuery, Product, SearchFilter
from imagesearch.images import ProductImage
from imagesearch.ranking import RankingRule, RankingSpec
from imagesearch.store import EdgeStore

CATEGORIES = [f"cat-{i:02d}" for i in range(20)]
COLOURS = ["red", "green", "blue", "black", "white", "grey", "yellow", "pink"]


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


async def fill(
    store: EdgeStore, rng: np.random.Generator, n: int, dim: int, batch: int, *, family_size: int = 0
) -> float:
    """Fill `store` with `n` random products; with `family_size`, every `family_size` consecutive products share
    a `group_id` attribute (variants). Returns the seconds taken."""
    started = time.perf_counter()
    for start in range(0, n, batch):
        size = min(batch, n - start)
        vectors = unit_rows(rng, size, dim)
        products = [
            Product(
                id=f"sku-{start + i}",
                name=f"product {start + i}",
                category=CATEGORIES[int(rng.integers(len(CATEGORIES)))],
                price=float(rng.integers(1, 1001)),
                currency="EUR",
                attributes=_attributes(rng, start + i, family_size),
            )
            for i in range(size)
        ]
        await store.upsert(list(zip(products, vectors, strict=True)))
    return time.perf_counter() - started


def _attributes(rng: np.random.Generator, index: int, family_size: int) -> dict[str, str]:
    attributes = {"color": COLOURS[int(rng.integers(len(COLOURS)))]}
    if family_size:
        attributes["group_id"] = f"family-{index // family_size}"
    return attributes


def query_makers(rng: np.random.Generator, dim: int) -> tuple[Callable[[], np.ndarray], Callable[[], SearchFilter]]:
    """Two makers for the benchmarks' queries: the next of 64 random query vectors (cycled), and a random
    category + 200-wide price range filter (~1% of a filled catalogue)."""
    query_vectors = unit_rows(rng, 64, dim)
    counter = iter(range(10**9))

    def vector() -> np.ndarray:
        row: np.ndarray = query_vectors[next(counter) % len(query_vectors)]
        return row

    def category_price() -> SearchFilter:
        low = float(rng.integers(1, 800))
        return SearchFilter(categories=(CATEGORIES[int(rng.integers(20))],), price_min=low, price_max=low + 200)

    return vector, category_price


async def timed(call: Callable[[], Awaitable[object]], repeats: int) -> np.ndarray:
    await call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return np.array(times) * 1e3


async def loop_lag(call: Callable[[], Awaitable[object]], repeats: int) -> np.ndarray:
    # How late a 1 ms timer fires while calls run: qdrant_edge holds the GIL during a call, so the event loop
    # cannot run until it returns, worker thread or not.
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    task = asyncio.create_task(ticker())
    for _ in range(repeats):
        await call()
    done.set()
    await task
    return np.array(lags) * 1e3


def report(name: str, ms: np.ndarray) -> None:
    print(f"  {name:<44} p50 {np.median(ms):8.2f} ms   p95 {np.percentile(ms, 95):8.2f} ms")


async def main(n: int, dim: int, queries: int, batch: int) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="store-edge-bench-") as tmp:
        path = Path(tmp)
        store = await EdgeStore.open(path, dim, "bench-random", flush_interval_s=None)
        fill_s = await fill(store, rng, n, dim, batch)
        print(f"EdgeStore, {n} x {dim}-d, batches of {batch}: fill {fill_s:.1f} s ({n / fill_s:,.0f} products/s)")

        started = time.perf_counter()
        await store.close()
        close_s = time.perf_counter() - started
        started = time.perf_counter()
        store = await EdgeStore.open(path, dim, "bench-random", flush_interval_s=None)
        print(f"  close (flush) {close_s:.2f} s, reopen {time.perf_counter() - started:.2f} s")

        vector, category_price = query_makers(rng, dim)

        async def measure(store: EdgeStore) -> None:
            colour = SearchFilter(attributes=(("color", "red"),))
            cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("plain, top 20", lambda: store.search(vector(), SearchFilter(), 20)),
                ("category + price range (~1%), top 20", lambda: store.search(vector(), category_price(), 20)),
                ("attribute color=red (~12%), top 20", lambda: store.search(vector(), colour, 20)),
                ("page 1 (offset 0, limit 20)", lambda: store.search(vector(), SearchFilter(), 20, offset=0)),
                ("page 10 (offset 180, limit 20)", lambda: store.search(vector(), SearchFilter(), 20, offset=180)),
                ("filtered page 10 (category + price)", lambda: store.search(vector(), category_price(), 20, 180)),
                ("get by id", lambda: store.get(f"sku-{int(rng.integers(n))}")),
                ("count (exact)", store.count),
                ("ping", store.ping),
                ("upsert 1 product (replace)", lambda: store.upsert([(Product(id="sku-1"), vector())])),
            ]
            for name, call in cases:
                report(name, await timed(call, queries))
            lags = await loop_lag(cases[0][1], queries)
            print(f"  1 ms timer lateness during plain searches: p50 {np.median(lags):.2f} ms, max {lags.max():.2f} ms")

        print("without the vector index (every search scans every vector):")
        await measure(store)
        await store.close()

        started = time.perf_counter()
        store = await EdgeStore.open(path, dim, "bench-random", flush_interval_s=None, index_threshold=1)
        print(f"with the vector index, built at open in {time.perf_counter() - started:.1f} s:")
        await measure(store)
        await store.close()

        synchronous = await EdgeStore.open(path, dim, "bench-random", flush_interval_s=None, flush_each_write=True)
        report(
            "upsert 1 product, flush_each_write=True",
            await timed(lambda: synchronous.upsert([(Product(id="sku-1"), vector())]), max(20, queries // 5)),
        )
        await synchronous.close()


# --- several images per product -----------------------------------------------------------------------------

#: Ranking rules of the multi-image case: a popularity boost (ADD) and a category buried (MULTIPLY).
BENCH_RULES = RankingSpec(
    (
        RankingRule("popular", 0.05, field="popularity", transform="log1p"),
        RankingRule("bury", -0.5, matches=SearchFilter(categories=(CATEGORIES[0],)), combine="multiply"),
    ),
    candidates=200,
)


def compare_images(n: int, dim: int, queries: int, batch: int, images: int) -> None:
    """The multi-image comparison: one process per catalogue (1 and `images` images per product)."""
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        rows = [pool.apply(_images_case, (n, dim, queries, batch, k)) for k in (1, images)]
    print(f"load after: {os.getloadavg()}")
    print(f"{'':<44}" + "".join(f"{f'{k} image(s)':>16}" for k in (1, images)))
    for name in rows[0]:
        cells = "".join(f"{row[name]:>16}" for row in rows)
        print(f"{name:<44}{cells}")


def _images_case(n: int, dim: int, queries: int, batch: int, images: int) -> dict[str, str]:
    return asyncio.run(_measure_images(n, dim, queries, batch, images))


async def _measure_images(n: int, dim: int, queries: int, batch: int, images: int) -> dict[str, str]:
    rng = np.random.default_rng(0)
    row: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="store-images-bench-") as tmp:
        path = Path(tmp)
        store = await EdgeStore.open(path, dim, "bench-random", flush_interval_s=None)
        started = time.perf_counter()
        for start in range(0, n, batch):
            size = min(batch, n - start)
            await store.upsert([_product(rng, start + i, dim, images) for i in range(size)])
        row["fill (s)"] = f"{time.perf_counter() - started:.1f}"
        await store.close()
        row["size on disk, scanned (MB)"] = f"{_megabytes(path):.0f}"
        vector, _ = query_makers(rng, dim)

        async def searches(store: EdgeStore, label: str) -> None:
            hybrid = LexicalQuery("product 12")
            cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("plain", lambda: store.search(vector(), SearchFilter(), 20)),
                ("rules", lambda: store.search(vector(), SearchFilter(), 20, ranking=BENCH_RULES)),
                (
                    "rules + explain",
                    lambda: store.search(vector(), SearchFilter(), 20, ranking=BENCH_RULES, explain=True),
                ),
                ("collapse 0.94", lambda: store.search(vector(), SearchFilter(), 20, collapse=0.94)),
                ("diversity 0.5", lambda: store.search(vector(), SearchFilter(), 20, diversity=0.5)),
                ("hybrid weighted", lambda: store.search(vector(), SearchFilter(), 20, lexical=hybrid)),
            ]
            for name, call in cases:
                row[f"{label}: {name}, top 20, p50 (ms)"] = f"{np.median(await timed(call, queries)):.2f}"

        store = await EdgeStore.open(path, dim, "bench-random", flush_interval_s=None)
        await searches(store, "scan")
        row["RSS after scanned searches (MB)"] = f"{_rss_mb():.0f}"
        await store.close()
        started = time.perf_counter()
        store = await EdgeStore.open(path, dim, "bench-random", flush_interval_s=None, index_threshold=1)
        row["HNSW index build at open (s)"] = f"{time.perf_counter() - started:.1f}"
        await searches(store, "index")
        row["RSS after indexed searches (MB)"] = f"{_rss_mb():.0f}"
        await store.close()
        row["size on disk, indexed (MB)"] = f"{_megabytes(path):.0f}"
    return row


def _product(rng: np.random.Generator, index: int, dim: int, images: int) -> tuple[Product, np.ndarray]:
    product = Product(
        id=f"sku-{index}",
        name=f"product {index}",
        category=CATEGORIES[int(rng.integers(len(CATEGORIES)))],
        price=float(rng.integers(1, 1001)),
        images=tuple(ProductImage(id=f"i{k}", url=f"https://img/{index}/{k}.jpg") for k in range(images)),
        numeric_attributes={"popularity": float(rng.integers(0, 10_000))},
    )
    return product, unit_rows(rng, images, dim)


def _megabytes(path: Path) -> float:
    # Allocated blocks, as du counts them: the engine preallocates sparse files (its WAL segments).
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 2**20


def _rss_mb() -> float:
    # VmRSS of this process (Linux), in MB.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def options(description: str | None) -> argparse.ArgumentParser:
    """The store benchmarks' common options: catalogue size, dimension, queries, fill batch."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1000)
    return parser


def run(main: Callable[[int, int, int, int], Awaitable[None]], description: str | None) -> None:
    """Parse the common options and run `main(n, dim, queries, batch)`."""
    args = options(description).parse_args()
    asyncio.run(main(args.n, args.dim, args.queries, args.batch))


if __name__ == "__main__":
    parser = options(__doc__)
    parser.add_argument("--images", type=int, default=0, help="compare 1 and this many images per product")
    arguments = parser.parse_args()
    if arguments.images:
        compare_images(arguments.n, arguments.dim, arguments.queries, arguments.batch, arguments.images)
    else:
        asyncio.run(main(arguments.n, arguments.dim, arguments.queries, arguments.batch))
