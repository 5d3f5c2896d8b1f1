"""The embedded backend: Qdrant Edge (`qdrant_edge.EdgeShard`), the real Qdrant engine running in-process.

What this module relies on, found by experiment with qdrant-edge-py 0.9.0 (see the store benchmark):

- Every EdgeShard call holds the GIL for its whole duration (two threads searching run no faster than one, and
  the event loop cannot run while a call is in progress, thread or not). Calls still run on a dedicated worker
  thread: that thread is the single point that serialises all shard access (so a write's "did it exist" check
  and the write itself cannot interleave with another write, and close() runs after everything submitted before
  it), and the event loop gets to run between calls. Keeping each call short is what keeps the loop responsive.
- `update` appends to a memory-mapped WAL before it applies the change and returns, without any fsync. Data in
  the page cache survives a kill -9 of the process (verified: the WAL is replayed on the next load), but not an
  OS crash or power loss; only `flush()` makes it durable against those (about 10 ms at 100k points). Like a
  Qdrant server (flush_interval_sec = 5), the store flushes periodically; `flush_each_write` trades write
  latency for power-loss durability.
- Without flushes the WAL is never truncated (100k 512-d upserts leave ~335 MB of WAL to replay on load).
- The shard holds an exclusive lock on its WAL: a second open of the same directory fails, also across processes.
- Errors are raised as the bare `Exception` class.
- A sparse vector can be added to an existing shard (`UpdateOperation.create_sparse_vector`, idempotent and
  non-destructive, through the WAL) and filled in point by point (`update_vectors`); a point given an empty sparse
  vector counts as having it (`HasVectorCondition`). That is how a store written before hybrid search gets its
  lexical side at open, without touching its CLIP vectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import qdrant_edge as qe
import structlog

from imagesearch.domain import Facets, FacetSpec, Hit, LexicalQuery, Product, SearchFilter, point_id_for
from imagesearch.errors import StoreConfigError, StoreUnavailable
from imagesearch.store.base import (
    ATTRIBUTE_PAIRS,
    BM25_SCORE,
    CATEGORY,
    DENSE_COSINE,
    DENSE_VECTOR,
    DIVERSITY_CANDIDATES,
    FACET_SCAN_VALUES,
    HYBRID_CANDIDATES,
    INDEXED_FIELDS,
    LEXICAL_MODEL,
    LEXICAL_VECTOR,
    MISSING_SCORES,
    PRICE,
    RESCORED_COSINE,
    RRF_K,
    Vector,
    attribute_pair,
    check_cursor,
    check_paging,
    check_search,
    created_flags,
    facets_from_counts,
    last_per_id,
    lexical_document,
    lexical_terms,
    mmr_order,
    point_ids_by_product,
    point_vectors,
    product_from_payload,
    product_to_payload,
    score_scale,
    stored_vector,
    vector_values,
    weighted_factors,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

_SHARD_DIR = "shard"
# Our own record of what the shard was created for: the shard itself has no place for application metadata.
_META_FILE = "imagesearch-store.json"
_SCHEMA_TYPES = {"keyword": qe.PayloadSchemaType.Keyword, "float": qe.PayloadSchemaType.Float}
# attribute_pairs is only ever matched, never read back (the `attributes` map is); skip converting it per hit.
_HIT_PAYLOAD = qe.PayloadSelector.Exclude([ATTRIBUTE_PAIRS])
_LEXICAL_PARAMS = qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)
# Points whose lexical side is filled in per update while an older store is brought up to date.
_BACKFILL_BATCH = 1000


class EdgeStore:
    """VectorStore over a Qdrant Edge shard persisted in a local directory: the zero-setup default.

    One process at a time may open a directory. Use `EdgeStore.open`.
    """

    backend = "embedded"

    def __init__(
        self,
        shard: qe.EdgeShard,
        path: Path,
        dimension: int,
        executor: ThreadPoolExecutor,
        flush_each_write: bool,
    ) -> None:
        self.dimension = dimension
        self._shard: qe.EdgeShard | None = shard
        self._path = path
        self._executor = executor
        self._flush_each_write = flush_each_write
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
        write returns if `flush_each_write` is set (about 10 ms per write at 100k products).
        With `index_threshold` > 0, opening builds the HNSW index when that many products or more are not yet in
        it (see `_build_index_if_needed`); 0 never builds it, and every search scans every vector.
        Raises StoreUnavailable if the directory cannot be used (e.g. another process has it open).
        """
        # One worker: all shard access is serialised in submission order (see the module docstring).
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-store")
        try:
            shard = await asyncio.get_running_loop().run_in_executor(
                executor, _open_shard, Path(path), dimension, model_id, index_threshold
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        store = cls(shard, Path(path), dimension, executor, flush_each_write)
        if flush_interval_s is not None:
            store._flusher = asyncio.create_task(store._flush_periodically(flush_interval_s))
        return store

    async def upsert(self, items: Sequence[tuple[Product, Vector]]) -> list[bool]:
        """See VectorStore.upsert."""
        if not items:
            return []
        shard = self._open_shard()

        def write() -> set[str]:
            # Building points costs ~75 us each in the binding (GIL held): doing it here rather than on the event
            # loop lets the loop run at every GIL switch interval during a large batch.
            latest = {point_id_for(pid): item for pid, item in last_per_id(items).items()}
            points = [
                qe.Point(
                    point_id,
                    point_vectors(vector_values(vector, self.dimension), product),
                    product_to_payload(product),
                )
                for point_id, (product, vector) in latest.items()
            ]
            # Checking and writing in one job on the single worker makes the created flags race-free.
            found = shard.retrieve(list(latest), False, False)
            shard.update(qe.UpdateOperation.upsert_points(points))
            self._flush_if_synchronous(shard)
            return {latest[str(record.id)][0].id for record in found}

        existing = await self._run(write, "upsert")
        self._dirty = True
        return created_flags([product.id for product, _ in items], existing)

    async def get(self, product_id: str) -> Product | None:
        """See VectorStore.get."""
        shard = self._open_shard()
        records = await self._run(lambda: shard.retrieve([point_id_for(product_id)], True, False), "get")
        if not records or records[0].payload is None:
            return None
        return product_from_payload(records[0].payload)

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

        existed = await self._run(remove, "delete")
        self._dirty = self._dirty or existed
        return existed

    async def search(
        self,
        vector: Vector | None,
        flt: SearchFilter,
        limit: int,
        offset: int = 0,
        score_threshold: float | None = None,
        *,
        exclude_ids: Collection[str] = (),
        diversity: float | None = None,
        lexical: LexicalQuery | None = None,
    ) -> list[Hit]:
        """See VectorStore.search."""
        check_paging(limit, offset)
        check_search(vector, lexical)
        if lexical is not None:
            return await self._search_words(
                vector, lexical, flt, limit, offset, score_threshold, exclude_ids, diversity
            )
        assert vector is not None
        values = vector_values(vector, self.dimension)
        query: qe.ScoringQueryType = (
            # Edge's Mmr takes MMR's lambda (1 = relevance only); qdrant-client's takes diversity = 1 - lambda.
            qe.Mmr(values, 1.0 - diversity, DIVERSITY_CANDIDATES) if diversity else qe.Query.Nearest(values)
        )
        request = qe.QueryRequest(
            limit=limit,
            offset=offset,
            query=query,
            filter=_edge_filter(flt, exclude_ids),
            with_payload=_HIT_PAYLOAD,
            score_threshold=score_threshold,
        )
        shard = self._open_shard()
        points = await self._run(lambda: shard.query(request), "search")
        return [Hit(product_from_payload(p.payload or {}), p.score) for p in points]

    async def _search_words(
        self,
        vector: Vector | None,
        lexical: LexicalQuery,
        flt: SearchFilter,
        limit: int,
        offset: int,
        score_threshold: float | None,
        exclude_ids: Collection[str],
        diversity: float | None,
    ) -> list[Hit]:
        # A lexical or hybrid search: two engine calls in one job, so both see the same state of the shard.
        values = None if vector is None else vector_values(vector, self.dimension)
        terms = lexical_terms(lexical.text)
        edge_filter = _edge_filter(flt, exclude_ids)
        shard = self._open_shard()

        def run() -> tuple[list[qe.ScoredPoint], float]:
            # Unfiltered: lexical scores are relative to the best match in the whole collection.
            best = _best_lexical_score(shard, terms)
            if values is None and best is None:
                return [], 1.0  # no product has any of the words
            scale = score_scale(values is not None, lexical, best)
            query, prefetches = _ranking(values, terms, lexical, best, edge_filter)
            start, count = (0, DIVERSITY_CANDIDATES) if diversity else (offset, limit)
            request = qe.QueryRequest(
                limit=count,
                offset=start,
                query=query,
                prefetches=prefetches,
                filter=edge_filter,
                with_payload=_HIT_PAYLOAD,
                with_vector=[DENSE_VECTOR] if diversity else False,
                score_threshold=None if score_threshold is None else score_threshold / scale,
            )
            return shard.query(request), scale

        points, scale = await self._run(run, "search")
        hits = [Hit(product_from_payload(p.payload or {}), p.score * scale) for p in points]
        if not diversity or not hits:
            return hits
        vectors = np.asarray([stored_vector(p.vector, self.dimension) for p in points], dtype=np.float32)
        order = mmr_order([h.score for h in hits], vectors, diversity, offset + limit)
        return [hits[i] for i in order[offset:]]

    async def vectors(self, product_ids: Sequence[str]) -> dict[str, Vector]:
        """See VectorStore.vectors."""
        by_point = point_ids_by_product(product_ids)
        shard = self._open_shard()
        records = await self._run(lambda: shard.retrieve(list(by_point), False, [DENSE_VECTOR]), "vectors")
        return {by_point[str(r.id)]: stored_vector(r.vector, self.dimension) for r in records}

    async def facets(self, flt: SearchFilter, spec: FacetSpec, *, exclude_ids: Collection[str] = ()) -> Facets:
        """See VectorStore.facets."""
        edge_filter = _edge_filter(flt, exclude_ids)
        shard = self._open_shard()

        def count(field: str, wanted: bool) -> list[tuple[str, int]]:
            if not wanted:
                return []
            request = qe.FacetRequest(field, limit=FACET_SCAN_VALUES, exact=False, filter=edge_filter)
            return [(str(hit.value), hit.count) for hit in shard.facet(request).hits]

        # One job: both counts see the same state of the shard.
        categories, pairs = await self._run(
            lambda: (count(CATEGORY, spec.categories), count(ATTRIBUTE_PAIRS, bool(spec.attribute_keys))), "facets"
        )
        return facets_from_counts(spec, categories, pairs)

    async def scroll(self, flt: SearchFilter, limit: int, after: str | None = None) -> tuple[list[Product], str | None]:
        """See VectorStore.scroll."""
        check_paging(limit, 0)
        request = qe.ScrollRequest(
            offset=None if after is None else check_cursor(after),
            limit=limit,
            filter=_edge_filter(flt),
            with_payload=_HIT_PAYLOAD,
            with_vector=False,
        )
        shard = self._open_shard()
        records, next_offset = await self._run(lambda: shard.scroll(request), "scroll")
        products = [product_from_payload(r.payload or {}) for r in records]
        return products, None if next_offset is None else str(next_offset)

    async def count(self) -> int:
        """See VectorStore.count."""
        shard = self._open_shard()
        return await self._run(lambda: shard.count(qe.CountRequest(exact=True)), "count")

    async def ping(self) -> None:
        """See VectorStore.ping."""
        shard = self._open_shard()
        await self._run(shard.info, "ping")

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
            await asyncio.get_running_loop().run_in_executor(self._executor, _flush_and_close, shard)
        except Exception as exc:
            if type(exc) is not Exception:
                raise
            raise StoreUnavailable(f"embedded store at {self._path}: close failed: {exc}") from exc
        finally:
            self._executor.shutdown(wait=True)

    def _open_shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise StoreUnavailable(f"embedded store at {self._path} is closed")
        return self._shard

    def _flush_if_synchronous(self, shard: qe.EdgeShard) -> None:
        if self._flush_each_write:
            shard.flush()

    async def _run(self, call: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as exc:
            # qdrant_edge raises the bare Exception class for every engine error; anything more specific
            # (TypeError, ValueError, ...) is a bug in this module and must not pass for an outage.
            if type(exc) is not Exception:
                raise
            raise StoreUnavailable(f"embedded store at {self._path}: {what} failed: {exc}") from exc

    async def _flush_periodically(self, interval_s: float) -> None:
        shard = self._open_shard()
        while True:
            await asyncio.sleep(interval_s)
            if not self._dirty:
                continue
            self._dirty = False
            try:
                await self._run(shard.flush, "flush")
            except StoreUnavailable as exc:
                self._dirty = True
                log.warning("periodic flush failed, will retry", store=str(self._path), error=str(exc))


def _edge_filter(flt: SearchFilter, exclude_ids: Collection[str] = ()) -> qe.Filter | None:
    conditions: list[qe.ConditionType] = []
    if flt.categories:
        conditions.append(qe.FieldCondition(CATEGORY, match=qe.MatchAny(list(flt.categories))))
    if flt.price_min is not None or flt.price_max is not None:
        conditions.append(qe.FieldCondition(PRICE, range=qe.RangeFloat(gte=flt.price_min, lte=flt.price_max)))
    for key, value in flt.attributes:
        conditions.append(qe.FieldCondition(ATTRIBUTE_PAIRS, match=qe.MatchValue(attribute_pair(key, value))))
    excluded: list[qe.ConditionType] = (
        [qe.HasIdCondition({point_id_for(pid) for pid in exclude_ids})] if exclude_ids else []
    )
    if not (conditions or excluded):
        return None
    return qe.Filter(must=conditions or None, must_not=excluded or None)


def _best_lexical_score(shard: qe.EdgeShard, terms: qe.SparseVector) -> float | None:
    """The best BM25 any point reaches for these terms (None when no point has any of them)."""
    if not terms.indices:
        return None
    top = shard.query(qe.QueryRequest(limit=1, query=qe.Query.Nearest(terms, using=LEXICAL_VECTOR)))
    return top[0].score if top and top[0].score > 0 else None


def _ranking(
    values: list[float] | None,
    terms: qe.SparseVector,
    lexical: LexicalQuery,
    best: float | None,
    edge_filter: qe.Filter | None,
) -> tuple[qe.ScoringQueryType, list[qe.Prefetch] | None]:
    """The query (and prefetches) of a lexical or hybrid search; see VectorStore.search for the scores."""
    words = qe.Query.Nearest(terms, using=LEXICAL_VECTOR)
    if values is None:
        return words, None
    # The filter goes on every leaf: prefetch limits then count matching products only.
    dense = qe.Prefetch(limit=HYBRID_CANDIDATES, query=qe.Query.Nearest(values), filter=edge_filter)
    lexical_side = qe.Prefetch(limit=HYBRID_CANDIDATES, query=words, filter=edge_filter)
    if lexical.fusion == "rank":
        # The stubs type Fusion.Rrf as a class of its own rather than as a Fusion.
        return cast("qe.ScoringQueryType", qe.Fusion.Rrf(RRF_K)), [dense, lexical_side]
    rescored = qe.Prefetch(
        limit=HYBRID_CANDIDATES, prefetches=[lexical_side], query=qe.Query.Nearest(values), filter=edge_filter
    )
    e = qe.Expression
    cosine_factor, lexical_factor = weighted_factors(lexical, best)
    cosine = e.Max([e.Variable(DENSE_COSINE), e.Variable(RESCORED_COSINE)])
    formula = e.Sum(
        [
            e.Mult([e.Constant(cosine_factor), e.Sum([cosine, e.Constant(1.0)])]),
            e.Mult([e.Constant(lexical_factor), e.Variable(BM25_SCORE)]),
        ]
    )
    return qe.Formula(formula, defaults=MISSING_SCORES), [dense, lexical_side, rescored]


def _open_shard(path: Path, dimension: int, model_id: str, index_threshold: int) -> qe.EdgeShard:
    meta_path = path / _META_FILE
    meta = _read_meta(meta_path)
    if meta is not None:
        _check_meta(meta, path, dimension, model_id)
    shard_path = path / _SHARD_DIR
    dense = qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine)
    try:
        if (shard_path / "edge_config.json").exists():
            # Passing the dense config makes the engine check it against the stored segments; the sparse vectors
            # are left out so that they are inherited: a store written before hybrid search has none yet.
            shard = qe.EdgeShard.load(str(shard_path), qe.EdgeConfig(vectors=dense))
        else:
            config = qe.EdgeConfig(vectors=dense, sparse_vectors={LEXICAL_VECTOR: _LEXICAL_PARAMS})
            shard = qe.EdgeShard.create(str(shard_path), config)
    except Exception as exc:
        if type(exc) is not Exception:
            raise
        raise _open_error(exc, path, dimension, model_id) from exc
    try:
        _ensure_payload_indexes(shard)
        recorded = None if meta is None else meta.get("lexical")
        if recorded != LEXICAL_MODEL:
            _update_lexical_side(shard, path, rederive=recorded is not None)
        if recorded != LEXICAL_MODEL:
            # Recorded only once the engine has accepted the dimension and every point has its lexical side, so a
            # wrong record is never written and an interrupted update resumes at the next open.
            _write_meta(meta_path, {"dimension": dimension, "model_id": model_id, "lexical": LEXICAL_MODEL})
        _build_index_if_needed(shard, index_threshold, path)
    except BaseException:
        shard.close()
        raise
    return shard


def _update_lexical_side(shard: qe.EdgeShard, path: Path, *, rederive: bool) -> None:
    """Give every point its sparse BM25 vector, derived from its stored payload (its CLIP vector is untouched: no
    image is encoded again). For a store written before hybrid search (no lexical record), or one whose lexical
    model changed (`rederive`: every point). Each batch goes through the WAL, and points that have the vector
    are skipped, so an interrupted update resumes where it stopped."""
    # Idempotent: a no-op (that keeps the stored vectors) when the shard already has it.
    shard.update(qe.UpdateOperation.create_sparse_vector(LEXICAL_VECTOR, modifier=qe.Modifier.Idf))
    missing = None if rederive else qe.Filter(must_not=[qe.HasVectorCondition(LEXICAL_VECTOR)])
    started = time.perf_counter()
    updated = 0
    cursor: Any = None
    while True:
        request = qe.ScrollRequest(
            offset=cursor, limit=_BACKFILL_BATCH, filter=missing, with_payload=True, with_vector=False
        )
        records, cursor = shard.scroll(request)
        vectors = []
        for record in records:
            terms = lexical_document(product_from_payload(record.payload or {}))
            if terms is not None:  # a product without words stays without the vector
                vectors.append(qe.PointVectors(record.id, {LEXICAL_VECTOR: terms}))
        if vectors:
            shard.update(qe.UpdateOperation.update_vectors(vectors))
            updated += len(vectors)
        if cursor is None:
            break
    if updated:
        shard.flush()
        log.info(
            "lexical side of the catalogue derived from its stored text (no image encoded)",
            store=str(path),
            products=updated,
            seconds=round(time.perf_counter() - started, 1),
        )


def _build_index_if_needed(shard: qe.EdgeShard, threshold: int, path: Path) -> None:
    """Build the HNSW vector index when `threshold` or more products are not in it yet.

    Edge never indexes by itself: until optimize() runs, a search scans every vector (measured on 2 cores, 512-d:
    16 ms per search at 100k products, with the GIL held, so the event loop stalls as long; 0.65 ms at 60k once
    indexed). optimize() is synchronous and holds the GIL for its whole run (39 s for 60k vectors on 2 cores), so
    it cannot run while serving: it runs here, when the store opens, before the server accepts requests.
    Products added later are scanned exactly until a later start indexes them.
    """
    if threshold <= 0:
        return
    unindexed = shard.info().points_count - indexed_clip_vectors(shard)
    if unindexed < threshold:
        return
    log.info(
        "building the vector index; the server starts serving when it is done",
        store=str(path),
        products_not_indexed=unindexed,
    )
    started = time.perf_counter()
    shard.optimize()
    shard.flush()
    log.info("vector index built", store=str(path), seconds=round(time.perf_counter() - started, 1))


def indexed_clip_vectors(shard: qe.EdgeShard) -> int:
    """How many CLIP vectors the shard's HNSW index holds (deleted points may still count until optimised)."""
    # The engine's count includes every sparse vector (a sparse index is always complete); points have one
    # exactly when they have words (base.lexical_document), so the rest are CLIP vectors.
    with_words = shard.count(
        qe.CountRequest(filter=qe.Filter(must=[qe.HasVectorCondition(LEXICAL_VECTOR)]), exact=True)
    )
    return int(shard.info().indexed_vectors_count) - with_words


def _ensure_payload_indexes(shard: qe.EdgeShard) -> None:
    existing = shard.info().payload_schema
    for field, kind in INDEXED_FIELDS.items():
        if field not in existing:
            shard.update(qe.UpdateOperation.create_field_index(field, _SCHEMA_TYPES[kind]))


def _open_error(exc: Exception, path: Path, dimension: int, model_id: str) -> Exception:
    text = str(exc)
    if "incompatible" in text.lower():
        return StoreConfigError(
            f"the embedded store at {path} does not match this server's model {model_id!r} "
            f"({dimension}-d cosine vectors): {text}. Use another data directory, or re-index into a fresh one."
        )
    if "WouldBlock" in text:
        return StoreUnavailable(f"the embedded store at {path} is already open in another process ({text})")
    return StoreUnavailable(f"cannot open the embedded store at {path}: {text}")


def _check_meta(meta: dict[str, Any], path: Path, dimension: int, model_id: str) -> None:
    stored_dimension, stored_model = meta.get("dimension"), meta.get("model_id")
    if stored_dimension != dimension or stored_model != model_id:
        raise StoreConfigError(
            f"the embedded store at {path} holds {stored_dimension}-d vectors from model {stored_model!r}, but "
            f"this server uses model {model_id!r} with {dimension}-d vectors. Point the server at another data "
            f"directory, or delete {path} and re-index the catalogue with the new model."
        )


def _read_meta(meta_path: Path) -> dict[str, Any] | None:
    try:
        text = meta_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {meta_path}: {exc}") from exc
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreConfigError(
            f"{meta_path} is corrupt ({exc}); restore it or re-index into a fresh data directory"
        ) from exc
    if not isinstance(meta, dict):
        raise StoreConfigError(f"{meta_path} is corrupt; restore it or re-index into a fresh data directory")
    return meta


def _write_meta(meta_path: Path, meta: dict[str, Any]) -> None:
    # Write-then-rename, with fsyncs, so a crash leaves either no record or a complete one.
    try:
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta_path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta_path)
        dir_fd = os.open(meta_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StoreUnavailable(f"cannot write {meta_path}: {exc}") from exc


def _flush_and_close(shard: qe.EdgeShard) -> None:
    # A flush truncates the WAL, so the next open need not replay it.
    try:
        shard.flush()
    finally:
        shard.close()
