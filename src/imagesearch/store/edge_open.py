"""Opening the embedded store: its worker thread, its record file, and bringing an older shard up to date.

A shard written before hybrid search gets its lexical side in place: `UpdateOperation.create_sparse_vector` adds
the sparse vector to the existing shard (idempotent and non-destructive, through the WAL) and `update_vectors`
fills it point by point; a point given an empty sparse vector counts as having it (`HasVectorCondition`). A shard
written before several images per product gets its `images` multivector the same way
(`UpdateOperation.create_dense_vector`), each point one image: its unnamed vector.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import qdrant_edge as qe
import structlog

from imagesearch.errors import StoreConfigError, StoreUnavailable
from imagesearch.store.edge_plan import edge_filter
from imagesearch.store.layout import DENSE_VECTOR, IMAGES, IMAGES_VECTOR, INDEXED_FIELDS, LEXICAL_VECTOR
from imagesearch.store.plan import Filter
from imagesearch.store.record import ImagesItem, PayloadRecord, StoreRecord, bring_up_to_date

log = structlog.get_logger(__name__)

T = TypeVar("T")

_SHARD_DIR = "shard"
# Our own record of what the shard was created for: the shard itself has no place for application metadata.
_RECORD_FILE = "imagesearch-store.json"
_SCHEMA_TYPES = {"keyword": qe.PayloadSchemaType.Keyword, "float": qe.PayloadSchemaType.Float}
# Points whose lexical side or images are filled in per update while an older store is brought up to date.
_BACKFILL_BATCH = 1000
_MAXSIM = qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim)


class ShardWorker:
    """The one thread that runs every call on a shard, in submission order: so a write's "did it exist" check and
    the write cannot interleave with another write, and a close runs after everything submitted before it.
    Between calls the event loop runs (a call itself holds the GIL throughout)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-store")

    async def run(self, call: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as exc:
            # qdrant_edge raises the bare Exception class for every engine error; anything more specific
            # (TypeError, ValueError, ...) is a bug in this package and must not pass for an outage.
            if type(exc) is not Exception:
                raise
            raise StoreUnavailable(f"embedded store at {self.path}: {what} failed: {exc}") from exc

    def run_now(self, call: Callable[[], T]) -> T:
        """Run `call` on the worker and wait for it, blocking the event loop: for failure paths only."""
        return self._executor.submit(call).result()

    def shutdown(self, *, wait: bool) -> None:
        self._executor.shutdown(wait=wait)


async def open_shard(worker: ShardWorker, dimension: int, model_id: str, index_threshold: int) -> qe.EdgeShard:
    """Create the shard under `worker.path`, or reopen it and bring it up to date: see EdgeStore.open."""
    path = worker.path
    shard, record, images_added = await worker.run(lambda: _load(path, dimension, model_id), "open")
    try:
        if await _bring_up_to_date(worker, shard, record, images_added, dimension):
            # Recorded only once the engine has accepted the dimension and every point has its lexical side and
            # images, so a wrong record is never written and an interrupted update resumes at the next open.
            current = StoreRecord(model_id, dimension)
            await worker.run(lambda: _write_record(path / _RECORD_FILE, current), "open")
        await worker.run(lambda: _build_index_if_needed(shard, index_threshold, path), "open (indexing)")
    except BaseException:
        # Closed before this returns (even when cancelled), so that a failed open leaves the directory free.
        worker.run_now(shard.close)
        raise
    return shard


def _load(path: Path, dimension: int, model_id: str) -> tuple[qe.EdgeShard, StoreRecord | None, bool]:
    """The shard, with every vector name (an older shard is given those it lacks), its record, and whether the
    `images` multivector was just added."""
    record = _read_record(path / _RECORD_FILE)
    if record is not None:
        record.check(model_id, dimension, f"the embedded store at {path}", _advice(path))
    shard_path = path / _SHARD_DIR
    dense = qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine)
    images = qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine, multivector_config=_MAXSIM)
    config_path = shard_path / "edge_config.json"
    try:
        if config_path.exists():
            # Passing the dense configs makes the engine check them against the stored segments. The engine wants
            # every dense vector the shard has, so the `images` multivector goes in only where the shard has it (a
            # store written before several images per product has none yet); the sparse vectors are left out, so
            # that they are inherited (a store written before hybrid search has none yet).
            stored = _stored_vector_names(config_path)
            had_images, had_words = IMAGES_VECTOR in stored, LEXICAL_VECTOR in stored
            vectors = {DENSE_VECTOR: dense, IMAGES_VECTOR: images} if had_images else {DENSE_VECTOR: dense}
            shard = qe.EdgeShard.load(str(shard_path), qe.EdgeConfig(vectors=vectors))
        else:
            had_images = had_words = True
            lexical = qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)
            config = qe.EdgeConfig(
                vectors={DENSE_VECTOR: dense, IMAGES_VECTOR: images}, sparse_vectors={LEXICAL_VECTOR: lexical}
            )
            shard = qe.EdgeShard.create(str(shard_path), config)
    except Exception as exc:
        if type(exc) is not Exception:
            raise
        raise _open_error(exc, path, dimension, model_id) from exc
    try:
        # Adding a vector name is non-destructive, through the WAL: the points get their vectors by the backfills.
        if not had_words:
            shard.update(qe.UpdateOperation.create_sparse_vector(LEXICAL_VECTOR, modifier=qe.Modifier.Idf))
        if not had_images:
            add = qe.UpdateOperation.create_dense_vector(
                IMAGES_VECTOR, dimension, qe.Distance.Cosine, multivector_config=_MAXSIM
            )
            shard.update(add)
        existing = shard.info().payload_schema
        for field, kind in INDEXED_FIELDS.items():
            if field not in existing:
                shard.update(qe.UpdateOperation.create_field_index(field, _SCHEMA_TYPES[kind]))
    except BaseException:
        shard.close()
        raise
    return shard, record, not had_images


def _stored_vector_names(config_path: Path) -> set[str]:
    """The dense and sparse vector names of a stored shard, from the engine's own record of its configuration
    (EdgeShard has no call that reads it before loading)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreUnavailable(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        return set()
    return {*(config.get("vectors") or {}), *(config.get("sparse_vectors") or {})}


async def _bring_up_to_date(
    worker: ShardWorker, shard: qe.EdgeShard, record: StoreRecord | None, images_added: bool, dimension: int
) -> bool:
    what = "open (bringing the store up to date)"

    async def scroll(missing: Filter | None, cursor: Any, with_vector: bool) -> tuple[Sequence[PayloadRecord], Any]:
        request = qe.ScrollRequest(
            offset=cursor,
            limit=_BACKFILL_BATCH,
            filter=edge_filter(missing),
            with_payload=True,
            with_vector=[DENSE_VECTOR] if with_vector else False,
        )
        return await worker.run(lambda: shard.scroll(request), what)

    async def set_lexical(vectors: list[tuple[Any, qe.SparseVector]]) -> None:
        points = [qe.PointVectors(point_id, {LEXICAL_VECTOR: terms}) for point_id, terms in vectors]
        await worker.run(lambda: shard.update(qe.UpdateOperation.update_vectors(points)), what)

    async def set_images(items: list[ImagesItem]) -> None:
        def write() -> None:
            # The payload first: a point counts as done once it has the vector (the backfill's filter).
            for point_id, _, images in items:
                shard.update(qe.UpdateOperation.set_payload([point_id], {IMAGES: images}))
            points = [qe.PointVectors(point_id, {IMAGES_VECTOR: rows}) for point_id, rows, _ in items]
            shard.update(qe.UpdateOperation.update_vectors(points))

        await worker.run(write, what)

    where = str(worker.path)
    if not await bring_up_to_date(record, images_added, scroll, set_lexical, set_images, dimension, where):
        return False
    await worker.run(shard.flush, what)
    return True


def _build_index_if_needed(shard: qe.EdgeShard, threshold: int, path: Path) -> None:
    """Build the HNSW vector index when `threshold` or more products are not in it yet.

    Edge never indexes by itself: until optimize() runs, every search scans every vector, holding the GIL (so the
    event loop stalls as long). optimize() is synchronous and holds the GIL for its whole run, so it cannot run
    while serving: it runs here, when the store opens, before the server accepts requests. Products added later
    are scanned exactly until a later start indexes them. (What each costs: README, "Performance".)
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
    """How many products' CLIP vectors the shard's HNSW index holds (deleted points may still count until
    optimised)."""
    # The engine's count includes every sparse vector (a sparse index is always complete); points have one
    # exactly when they have words (layout.lexical_document). The rest are CLIP vectors, two per product: the
    # unnamed one and the `images` multivector (counted once, however many images it holds).
    with_words = shard.count(
        qe.CountRequest(filter=qe.Filter(must=[qe.HasVectorCondition(LEXICAL_VECTOR)]), exact=True)
    )
    return (int(shard.info().indexed_vectors_count) - with_words) // 2


def _advice(path: Path) -> str:
    return (
        f"Point the server at another data directory, or delete {path} and re-index the catalogue with the new model."
    )


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


def _read_record(record_path: Path) -> StoreRecord | None:
    try:
        text = record_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {record_path}: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreConfigError(
            f"{record_path} is corrupt ({exc}); restore it or re-index into a fresh data directory"
        ) from exc
    if not isinstance(raw, dict):
        raise StoreConfigError(f"{record_path} is corrupt; restore it or re-index into a fresh data directory")
    return StoreRecord.from_mapping(raw)


def _write_record(record_path: Path, record: StoreRecord) -> None:
    # Write-then-rename, with fsyncs, so a crash leaves either no record or a complete one.
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record.as_mapping(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, record_path)
        dir_fd = os.open(record_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StoreUnavailable(f"cannot write {record_path}: {exc}") from exc
