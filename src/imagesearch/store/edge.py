"""The embedded backend: Qdrant Edge (`qdrant_edge.EdgeShard`), the real Qdrant engine running in-process.

What this module relies on, found by experiment with qdrant-edge-py 0.9.0 (the figures: README, "Performance",
and benchmarks/store_edge.py):

- Every EdgeShard call holds the GIL for its whole duration (two threads searching run no faster than one, and
  the event loop cannot run while a call is in progress, thread or not). Calls still run on one worker thread
  (edge_open.ShardWorker), which serialises all shard access; keeping each call short is what keeps the loop
  responsive.
- `update` appends to a memory-mapped WAL before it applies the change and returns, without any fsync. Data in
  the page cache survives a kill -9 of the process (the WAL is replayed on the next load), but not an OS crash
  or power loss; only `flush()` makes it durable against those. Like a Qdrant server (flush_interval_sec = 5),
  the store flushes periodically; `flush_each_write` trades write latency for power-loss durability.
- Without flushes the WAL is never truncated, and the next load replays all of it.
- The shard holds an exclusive lock on its WAL: a second open of the same directory fails, also across processes.
- Errors are raised as the bare `Exception` class.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Sequence
from pathlib import Path

import qdrant_edge as qe
import structlog

from imagesearch.domain import Facets, FacetSpec, Hit, Product, SearchFilter, point_id_for
from imagesearch.errors import StoreUnavailable
from imagesearch.store import layout
from imagesearch.store.base import VectorStore
from imagesearch.store.edge_open import ShardWorker, open_shard
from imagesearch.store.edge_open import indexed_clip_vectors as indexed_clip_vectors  # for the tests
from imagesearch.store.edge_plan import HIT_PAYLOAD, edge_filter, edge_request
from imagesearch.store.plan import search_filter
from imagesearch.store.search_plan import SearchPlan, drive

log = structlog.get_logger(__name__)


class EdgeStore(VectorStore):
    """VectorStore over a Qdrant Edge shard persisted in a local directory: the zero-setup default.

    One process at a time may open a directory. Use `EdgeStore.open`.
    """

    backend = "embedded"

    def __init__(self, shard: qe.EdgeShard, worker: ShardWorker, dimension: int, flush_each_write: bool) -> None:
        self.dimension = dimension
        self._shard: qe.EdgeShard | None = shard
        self._worker = worker
        # The numeric attribute fields that have their index (layout.numeric_fields); new ones get it at upsert.
        self._numeric_indexed = layout.numeric_fields_among(shard.info().payload_schema)
        self._flush_each_write = flush_each_write
        # Written since the last flush; the periodic flusher skips a clean store.
        self._dirty = False
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        dimension: int,
        model_id: str,
        *,
        flush_interval_s: float | None = 5.0,
        flush_each_write: bool = False,
        index_threshold: int = 0,
    ) -> EdgeStore:
        """Create the store under `path`, or reopen the one already there.

        A new store records `dimension` and `model_id`; reopening with either different raises StoreConfigError.
        Writes survive a crash of this process as soon as they return. Against OS crashes or power loss they are
        durable after the next flush: every `flush_interval_s` seconds (None: only at close), or before each
        write returns if `flush_each_write` is set (a disk flush per write).
        With `index_threshold` > 0, opening builds the HNSW index when that many products or more are not yet in
        it (see `edge_open._build_index_if_needed`); 0 never builds it, and every search scans every vector.
        A store written by an older release is brought up to date first (its lexical side and its `images`
        multivector: edge_open, record.bring_up_to_date).
        Raises StoreUnavailable if the directory cannot be used (e.g. another process has it open).
        """
        worker = ShardWorker(Path(path))
        try:
            shard = await open_shard(worker, dimension, model_id, index_threshold)
        except BaseException:
            worker.shutdown(wait=False)
            raise
        store = cls(shard, worker, dimension, flush_each_write)
        if flush_interval_s is not None:
            store._flusher = asyncio.create_task(store._flush_periodically(flush_interval_s))
        return store

    async def upsert(self, items: Sequence[tuple[Product, layout.Vector]]) -> list[bool]:
        """See VectorStore.upsert."""
        if not items:
            return []
        shard = self._open_shard()

        def write() -> set[str]:
            # Building points in the binding holds the GIL: doing it here rather than on the event loop lets the
            # loop run at every GIL switch interval during a large batch.
            latest = {point_id_for(pid): item for pid, item in layout.last_per_id(items).items()}
            points = [
                qe.Point(point_id, *layout.point_parts(product, vectors, self.dimension))
                for point_id, (product, vectors) in latest.items()
            ]
            for field in sorted(layout.numeric_fields(p for p, _ in latest.values()) - self._numeric_indexed):
                shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Float))
                self._numeric_indexed.add(field)
            # Checking and writing in one job on the single worker makes the created flags race-free.
            found = shard.retrieve(list(latest), False, False)
            shard.update(qe.UpdateOperation.upsert_points(points))
            self._flush_if_synchronous(shard)
            return {latest[str(record.id)][0].id for record in found}

        existing = await self._worker.run(write, "upsert")
        self._dirty = True
        return layout.created_flags([product.id for product, _ in items], existing)

    async def get(self, product_id: str) -> Product | None:
        """See VectorStore.get."""
        shard = self._open_shard()
        records = await self._worker.run(lambda: shard.retrieve([point_id_for(product_id)], True, False), "get")
        if not records or records[0].payload is None:
            return None
        return layout.product_from_payload(records[0].payload)

    async def delete(self, product_id: str) -> bool:
        """See VectorStore.delete."""
        point_id = point_id_for(product_id)
        shard = self._open_shard()

        def remove() -> bool:
            if not shard.retrieve([point_id], False, False):
                return False
            shard.update(qe.UpdateOperation.delete_points([point_id]))
            self._flush_if_synchronous(shard)
            return True

        existed = await self._worker.run(remove, "delete")
        self._dirty = self._dirty or existed
        return existed

    async def execute(self, plan: SearchPlan) -> list[Hit]:
        """See VectorStore.execute."""
        shard = self._open_shard()
        # One job: every engine call of the plan sees the same state of the shard.
        return await self._worker.run(lambda: drive(plan, lambda request: shard.query(edge_request(request))), "search")

    async def vectors(self, product_ids: Sequence[str]) -> dict[str, layout.Vector]:
        """See VectorStore.vectors."""
        by_point = layout.point_ids_by_product(product_ids)
        shard = self._open_shard()
        records = await self._worker.run(
            lambda: shard.retrieve(list(by_point), False, [layout.DENSE_VECTOR]), "vectors"
        )
        return {by_point[str(r.id)]: layout.stored_vector(r.vector, self.dimension) for r in records}

    async def image_vectors(self, product_ids: Sequence[str]) -> dict[str, layout.Vector]:
        """See VectorStore.image_vectors."""
        by_point = layout.point_ids_by_product(product_ids)
        shard = self._open_shard()
        records = await self._worker.run(
            lambda: shard.retrieve(list(by_point), False, [layout.IMAGES_VECTOR]), "image_vectors"
        )
        found = ((by_point[str(r.id)], layout.stored_rows(r.vector, self.dimension)) for r in records)
        return {product_id: rows for product_id, rows in found if rows is not None}

    async def numeric_keys(self) -> list[str]:
        """See VectorStore.numeric_keys."""
        request = qe.FacetRequest(layout.NUMERIC_KEYS, limit=layout.FACET_SCAN_VALUES, exact=False)
        shard = self._open_shard()
        response = await self._worker.run(lambda: shard.facet(request), "numeric_keys")
        return sorted(str(hit.value) for hit in response.hits)

    async def facets(self, flt: SearchFilter, spec: FacetSpec, *, exclude_ids: Collection[str] = ()) -> Facets:
        """See VectorStore.facets."""
        matching = edge_filter(search_filter(flt, exclude_ids))
        shard = self._open_shard()

        def count(field: str, wanted: bool) -> list[tuple[str, int]]:
            if not wanted:
                return []
            request = qe.FacetRequest(field, limit=layout.FACET_SCAN_VALUES, exact=False, filter=matching)
            return [(str(hit.value), hit.count) for hit in shard.facet(request).hits]

        # One job: both counts see the same state of the shard.
        categories, pairs = await self._worker.run(
            lambda: (count(layout.CATEGORY, spec.categories), count(layout.ATTRIBUTE_PAIRS, bool(spec.attribute_keys))),
            "facets",
        )
        return layout.facets_from_counts(spec, categories, pairs)

    async def scroll(self, flt: SearchFilter, limit: int, after: str | None = None) -> tuple[list[Product], str | None]:
        """See VectorStore.scroll."""
        layout.check_paging(limit, 0)
        request = qe.ScrollRequest(
            offset=None if after is None else layout.check_cursor(after),
            limit=limit,
            filter=edge_filter(search_filter(flt)),
            with_payload=HIT_PAYLOAD,
            with_vector=False,
        )
        shard = self._open_shard()
        records, next_offset = await self._worker.run(lambda: shard.scroll(request), "scroll")
        products = [layout.product_from_payload(r.payload or {}) for r in records]
        return products, None if next_offset is None else str(next_offset)

    async def count(self) -> int:
        """See VectorStore.count."""
        shard = self._open_shard()
        return await self._worker.run(lambda: shard.count(qe.CountRequest(exact=True)), "count")

    async def ping(self) -> None:
        """See VectorStore.ping."""
        shard = self._open_shard()
        await self._worker.run(shard.info, "ping")

    async def close(self) -> None:
        """Flush and close the shard; idempotent."""
        shard, self._shard = self._shard, None
        if shard is None:
            return
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        try:
            # Queued behind every job already submitted, so nothing runs on a closed shard.
            await self._worker.run(lambda: _flush_and_close(shard), "close")
        finally:
            self._worker.shutdown(wait=True)

    def _open_shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise StoreUnavailable(f"embedded store at {self._worker.path} is closed")
        return self._shard

    def _flush_if_synchronous(self, shard: qe.EdgeShard) -> None:
        if self._flush_each_write:
            shard.flush()

    async def _flush_periodically(self, interval_s: float) -> None:
        shard = self._open_shard()
        while True:
            await asyncio.sleep(interval_s)
            if not self._dirty:
                continue
            self._dirty = False
            try:
                await self._worker.run(shard.flush, "flush")
            except StoreUnavailable as exc:
                self._dirty = True
                log.warning("periodic flush failed, will retry", store=str(self._worker.path), error=str(exc))


def _flush_and_close(shard: qe.EdgeShard) -> None:
    # A flush truncates the WAL, so the next open need not replay it.
    try:
        shard.flush()
    finally:
        shard.close()
