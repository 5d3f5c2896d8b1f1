"""What a store records about itself, and how a store written by an older release is brought up to date.

Both backends keep the same record (the embedded store in a JSON file beside its shard, a Qdrant collection in its
metadata): the model its vectors come from, their dimension, the lexical model its words were derived with, and
the layout of its image vectors.

An older store is brought up to date by backfills: each gives the points that lack something (their words, their
`images` multivector) what they lack, derived from what they store (no image is encoded again). A backfill selects
only the points still lacking it, so an interrupted one resumes where it stopped, and two replicas doing it at once
repeat each other harmlessly; the record is written once every backfill is done.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import qdrant_edge as qe
import structlog

from imagesearch.errors import StoreConfigError
from imagesearch.images import ProductImage
from imagesearch.store.layout import (
    IMAGE_URL,
    IMAGES_VECTOR,
    LEXICAL_MODEL,
    LEXICAL_VECTOR,
    image_payload,
    lexical_document,
    product_from_payload,
    stored_vector,
)
from imagesearch.store.plan import Filter, HasVector, PointRecord

log = structlog.get_logger(__name__)

T = TypeVar("T")


#: The image vectors' layout, as recorded: every image in the `images` multivector (MaxSim), the first also unnamed.
IMAGES_LAYOUT = "images multivector maxsim"


@dataclass(frozen=True)
class StoreRecord:
    """A store's record; fields read from a record written elsewhere may be missing (None)."""

    model_id: str | None
    dimension: int | None
    lexical: str | None = LEXICAL_MODEL
    images: str | None = IMAGES_LAYOUT

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> StoreRecord:
        return cls(raw.get("model_id"), raw.get("dimension"), raw.get("lexical"), raw.get("images"))

    def as_mapping(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "dimension": self.dimension, "lexical": self.lexical, "images": self.images}

    def check(self, model_id: str, dimension: int, place: str, advice: str) -> None:
        """Raise StoreConfigError unless the store was created for `model_id` with `dimension`-d vectors."""
        if self.model_id != model_id or self.dimension != dimension:
            raise StoreConfigError(
                f"{place} was created for model {self.model_id!r} with {self.dimension}-d vectors, but this server "
                f"uses model {model_id!r} with {dimension}-d vectors. {advice}"
            )


#: Which points need their lexical vector derived: those without one, or all (a new lexical model).
LexicalUpdate = Literal["missing", "all"]


def lexical_update(record: StoreRecord | None) -> LexicalUpdate | None:
    """Which points need their lexical vector derived: none (None) when the record names the current lexical
    model, every point when it names another, the points without one when it names none (a store written before
    hybrid search, or created just now)."""
    if record is None or record.lexical is None:
        return "missing"
    return None if record.lexical == LEXICAL_MODEL else "all"


def images_update(record: StoreRecord | None) -> bool:
    """Whether points may lack the `images` multivector: a store not recorded with IMAGES_LAYOUT (written before
    several images per product, or created just now)."""
    return record is None or record.images != IMAGES_LAYOUT


#: A point as a scroll returns it (with its unnamed vector when the scroll asked for it).
PayloadRecord = PointRecord


#: One page of a scroll: (filter, cursor: None for the first page, with the unnamed vector) -> (points with
#: payload, next cursor or None).
Scroll = Callable[[Filter | None, Any, bool], Awaitable[tuple[Sequence[PayloadRecord], Any]]]
#: Sets the lexical vector of each (point id, terms).
SetLexical = Callable[[list[tuple[Any, qe.SparseVector]]], Awaitable[None]]
#: Sets the `images` multivector and the `images` payload of each ImagesItem.
SetImages = Callable[[list["ImagesItem"]], Awaitable[None]]


#: One image update: (point id, rows of the `images` multivector, the `images` payload).
ImagesItem = tuple[Any, list[list[float]], list[dict[str, str]]]


async def bring_up_to_date(
    record: StoreRecord | None,
    images_added: bool,
    scroll: Scroll,
    set_lexical: SetLexical,
    set_images: SetImages,
    dimension: int,
    where: str,
) -> bool:
    """Run the backfills that a store with `record` needs (`images_added`: the store has just been given the
    `images` multivector). Returns whether any ran: then the caller records the store as up to date (only then,
    so that an interrupted update resumes at the next open)."""
    which = lexical_update(record)
    if which is not None:
        await derive_lexical_side(which, scroll, set_lexical, where)
    images = images_added or images_update(record)
    if images:
        await derive_images(scroll, set_images, dimension, where)
    return which is not None or images


async def derive_lexical_side(which: LexicalUpdate, scroll: Scroll, update: SetLexical, where: str) -> int:
    """Give the points `which` names their sparse BM25 vector, derived from their stored payload (their CLIP
    vectors are untouched: no image is encoded again). Returns how many points it updated.

    Points that have the vector are skipped when `which` is "missing"."""
    missing = None if which == "all" else Filter(must_not=(HasVector(LEXICAL_VECTOR),))

    def derive(record: PayloadRecord) -> tuple[Any, qe.SparseVector] | None:
        terms = lexical_document(product_from_payload(record.payload or {}))
        return None if terms is None else (record.id, terms)  # a product without words stays without the vector

    return await _backfill(missing, False, derive, scroll, update, where, "lexical side of the catalogue derived")


async def derive_images(scroll: Scroll, update: SetImages, dimension: int, where: str) -> int:
    """Give the points without the `images` multivector one image: their unnamed vector, described by their
    `image_url` (as such a point reads back). Returns how many points it updated."""

    def derive(record: PayloadRecord) -> ImagesItem:
        vector: list[float] = stored_vector(record.vector, dimension).tolist()
        image = ProductImage(url=str((record.payload or {}).get(IMAGE_URL, "")))
        return record.id, [vector], image_payload([image])

    missing = Filter(must_not=(HasVector(IMAGES_VECTOR),))
    return await _backfill(missing, True, derive, scroll, update, where, "image vectors laid out per image")


async def _backfill(
    missing: Filter | None,
    with_vector: bool,
    derive: Callable[[PayloadRecord], T | None],
    scroll: Scroll,
    update: Callable[[list[T]], Awaitable[None]],
    where: str,
    done: str,
) -> int:
    started = time.perf_counter()
    updated = 0
    cursor: Any = None
    while True:
        records, cursor = await scroll(missing, cursor, with_vector)
        items = [item for item in map(derive, records) if item is not None]
        if items:
            await update(items)
            updated += len(items)
        if cursor is None:
            break
    if updated:
        log.info(
            f"{done} from what the store holds (no image encoded)",
            store=where,
            products=updated,
            seconds=round(time.perf_counter() - started, 1),
        )
    return updated
