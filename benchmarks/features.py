"""Cost of the shop search features in the embedded store (EdgeStore over Qdrant Edge), at catalogue scale.

Fills a store in a temporary directory with random L2-normalised vectors, each with a category (one of 20), a
price (1-1000), a colour and a family (`group_id`, about 4 variants each), then times through the store's async
API what one Search or ListProducts call asks of it:

- a search filtered by category + price range (~1% of the catalogue), page 1 and page 10 (page size 20, plus
  the one extra hit the service fetches to know whether a next page exists), and the same unfiltered;
- grouping by `group_id` (the catalogue's family scan), page 1 and page 10;
- diversity (MMR over the 200 best matches), facets, the stored vectors of "more like this" examples;
- ListProducts pages (keyset scroll), page 1 and page 10;
- the filtered search again with the category and price payload indexes dropped, to show they are used.

Prints medians, p95 and page-10/page-1 ratios; the goals (filtered search p50 <= 10 ms, page 10 <= 2x page 1)
are marked ok or MISSED, never asserted.

    python benchmarks/features.py [--n 100000] [--dim 512] [--queries 200]
"""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import qdrant_edge as qe
from store_edge import CATEGORIES, fill, query_makers, run, timed  # a sibling script, not a package

from imagesearch.domain import FacetSpec, Hit, SearchFilter
from imagesearch.search.catalog import best_per_group
from imagesearch.store import EdgeStore
from imagesearch.store.base import CATEGORY, PRICE

PAGE = 20
FILTERED_P50_GOAL_MS = 10.0
PAGE_RATIO_GOAL = 2.0


def report(name: str, ms: np.ndarray) -> float:
    p50 = float(np.median(ms))
    print(f"  {name:<58} p50 {p50:8.2f} ms   p95 {np.percentile(ms, 95):8.2f} ms")
    return p50


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


async def main(n: int, dim: int, queries: int, batch: int) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="features-bench-") as tmp:
        store = await EdgeStore.open(Path(tmp), dim, "bench-random", flush_interval_s=None)
        fill_s = await fill(store, rng, n, dim, batch, family_size=4)
        print(f"EdgeStore, {n} x {dim}-d: fill {fill_s:.1f} s; payload indexes: {sorted(_schema(store))}")

        vector, category_price = query_makers(rng, dim)

        def search(flt: Callable[[], SearchFilter], page: int, **options: object) -> Callable[[], Awaitable[object]]:
            return lambda: store.search(vector(), flt(), PAGE + 1, page * PAGE, **options)  # type: ignore[arg-type]

        def grouped(page: int) -> Callable[[], Awaitable[object]]:
            async def call() -> list[Hit]:
                v = vector()

                async def ranking(limit: int, start: int) -> list[Hit]:
                    return await store.search(v, SearchFilter(), limit, start)

                return await best_per_group(ranking, "group_id", page * PAGE, PAGE + 1)

            return call

        def listing(page: int, flt: SearchFilter) -> Callable[[], Awaitable[object]]:
            cursors: list[str | None] = [None]

            async def call() -> object:
                # The cursor of page `page` is found once, then the timed call is that page's scroll alone.
                while len(cursors) <= page:
                    _, cursor = await store.scroll(flt, PAGE, cursors[-1])
                    cursors.append(cursor)
                return await store.scroll(flt, PAGE, cursors[page])

            return call

        plain = SearchFilter

        print("Search (store time, page size 20):")
        filtered_1 = report("category + price (~1%), page 1", await timed(search(category_price, 0), queries))
        filtered_10 = report("category + price (~1%), page 10", await timed(search(category_price, 9), queries))
        plain_1 = report("unfiltered, page 1", await timed(search(plain, 0), queries))
        plain_10 = report("unfiltered, page 10", await timed(search(plain, 9), queries))
        grouped_1 = report("group_by group_id (~4 variants), page 1", await timed(grouped(0), queries // 4))
        grouped_10 = report("group_by group_id (~4 variants), page 10", await timed(grouped(9), queries // 4))
        report("diversity 0.5 (MMR of 200), page 1", await timed(search(plain, 0, diversity=0.5), queries // 2))
        report("diversity 0.5, category + price", await timed(search(category_price, 0, diversity=0.5), queries // 2))
        report(
            "category + price, 3 excluded examples",
            await timed(search(category_price, 0, exclude_ids={"sku-1", "sku-2", "sku-3"}), queries),
        )
        ids = [f"sku-{i}" for i in rng.integers(n, size=3)]
        report("stored vectors of 3 examples (more like this)", await timed(lambda: store.vectors(ids), queries))

        print("Facets (categories + color):")
        spec = FacetSpec(categories=True, attribute_keys=("color",))
        report("under category + price", await timed(lambda: store.facets(category_price(), spec), queries // 2))
        report("unfiltered (whole catalogue)", await timed(lambda: store.facets(SearchFilter(), spec), queries // 4))

        print("ListProducts (keyset scroll, page size 20):")
        list_1 = report("unfiltered, page 1", await timed(listing(0, SearchFilter()), queries))
        list_10 = report("unfiltered, page 10", await timed(listing(9, SearchFilter()), queries))
        one_category = SearchFilter(categories=(CATEGORIES[0],))
        report("one category (~5%), page 10", await timed(listing(9, one_category), queries))

        print("Without the category and price payload indexes:")
        # The store has no API to drop indexes (it always wants them); the benchmark reaches into the shard.
        shard = store._open_shard()
        for field in (CATEGORY, PRICE):
            shard.update(qe.UpdateOperation.delete_field_index(field))
        unindexed = report("category + price (~1%), page 1", await timed(search(category_price, 0), queries // 4))
        await store.close()

    print("Goals:")
    print(
        f"  filtered search p50 {filtered_1:.2f} ms <= {FILTERED_P50_GOAL_MS:g} ms: "
        f"{verdict(filtered_1 <= FILTERED_P50_GOAL_MS)}"
    )
    for name, first, tenth in (
        ("filtered search", filtered_1, filtered_10),
        ("unfiltered search", plain_1, plain_10),
        ("ListProducts", list_1, list_10),
    ):
        ratio = tenth / first
        print(f"  {name} page 10 / page 1 = {ratio:.2f} (<= {PAGE_RATIO_GOAL:g}): {verdict(ratio <= PAGE_RATIO_GOAL)}")
    print(f"  group_by page 10 / page 1 = {grouped_10 / grouped_1:.2f} (information: every page rescans from the top)")
    print(f"  filtered search without payload indexes is {unindexed / filtered_1:.1f}x slower (indexes used)")


def _schema(store: EdgeStore) -> dict[str, object]:
    return dict(store._open_shard().info().payload_schema)


if __name__ == "__main__":
    run(main, __doc__)
