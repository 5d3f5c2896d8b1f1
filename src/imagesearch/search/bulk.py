"""Bulk indexing: a stream of products in, one outcome per product out, in order.

Encodes run concurrently (so the micro-batcher turns them into batched forwards) while earlier products are
written; writes are batched too. At most `read_ahead` products are held in memory: when the writer falls behind,
the reader stops pulling from the stream, and gRPC flow control slows the client down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from imagesearch.domain import Product
from imagesearch.errors import ImageSearchError
from imagesearch.images import ImageUpload
from imagesearch.search.catalog import Catalog, EmbeddedProduct

DEFAULT_READ_AHEAD = 32
DEFAULT_WRITE_BATCH = 64


@dataclass(frozen=True)
class BulkItem:
    """One product from the stream with its images. `error` is set when it was already found invalid while
    reading."""

    position: int
    product: Product
    uploads: list[ImageUpload]
    error: ImageSearchError | None = None


@dataclass(frozen=True)
class BulkResult:
    position: int
    product_id: str
    created: bool = False
    error: ImageSearchError | None = None


@dataclass(frozen=True)
class _EndOfStream:
    error: BaseException | None = None


_Entry = tuple[BulkItem, "asyncio.Task[EmbeddedProduct] | None"]


async def index_many(
    catalog: Catalog,
    items: AsyncIterator[BulkItem],
    *,
    read_ahead: int = DEFAULT_READ_AHEAD,
    write_batch: int = DEFAULT_WRITE_BATCH,
) -> AsyncIterator[BulkResult]:
    queue: asyncio.Queue[_Entry | _EndOfStream] = asyncio.Queue(maxsize=read_ahead)
    reader = asyncio.create_task(_read(catalog, items, queue))
    in_flight: list[_Entry] = []
    try:
        finished = False
        while not finished:
            entry = await queue.get()
            batch: list[_Entry] = []
            while True:
                if isinstance(entry, _EndOfStream):
                    finished = True
                    if entry.error is not None:
                        # Answer what was read before the stream broke, then report the break.
                        async for result in _write(catalog, batch):
                            yield result
                        raise entry.error
                    break
                batch.append(entry)
                if len(batch) >= write_batch or queue.empty():
                    break
                entry = queue.get_nowait()
            in_flight = batch
            async for result in _write(catalog, batch):
                yield result
            in_flight = []
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        for _, task in in_flight:
            if task is not None:
                task.cancel()


async def _read(catalog: Catalog, items: AsyncIterator[BulkItem], queue: asyncio.Queue[_Entry | _EndOfStream]) -> None:
    try:
        async for item in items:
            task = None
            if item.error is None:
                task = asyncio.create_task(catalog.embed_product(item.product, item.uploads))
            await queue.put((item, task))
    except Exception as exc:
        await queue.put(_EndOfStream(exc))
    else:
        await queue.put(_EndOfStream())


async def _write(catalog: Catalog, batch: list[_Entry]) -> AsyncIterator[BulkResult]:
    errors: dict[int, ImageSearchError] = {}
    ready: list[tuple[BulkItem, EmbeddedProduct]] = []
    for item, task in batch:
        if item.error is not None or task is None:
            errors[item.position] = item.error or ImageSearchError("no image")
            continue
        try:
            ready.append((item, await task))
        except ImageSearchError as exc:
            errors[item.position] = exc
    created: dict[int, bool] = {}
    if ready:
        try:
            flags = await catalog.store_many([embedded for _, embedded in ready])
            created = {item.position: flag for (item, _), flag in zip(ready, flags, strict=True)}
        except ImageSearchError as exc:  # e.g. the store is unavailable: none of this batch was written
            errors.update({item.position: exc for item, _ in ready})
    for item, _ in batch:
        error = errors.get(item.position)
        if error is not None:
            yield BulkResult(item.position, item.product.id, error=error)
        else:
            yield BulkResult(item.position, item.product.id, created=created[item.position])
