"""What a store records about itself, and how a store written by an older release is brought up to date.

Both backends keep the same record (the embedded store in a JSON file beside its shard, a Qdrant collection in its
metadata): the model its vectors come from, their dimension, and the lexical model its words were derived with.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import qdrant_edge as qe
import structlog

from imagesearch.errors import StoreConfigError
from imagesearch.store.layout import LEXICAL_MODEL, LEXICAL_VECTOR, lexical_document, product_from_payload
from imagesearch.store.plan import Filter, HasVector

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StoreRecord:
    """A store's record; fields read from a record written elsewhere may be missing (None)."""

    model_id: str | None
    dimension: int | None
    lexical: str | None = LEXICAL_MODEL

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> StoreRecord:
        return cls(raw.get("model_id"), raw.get("dimension"), raw.get("lexical"))

    def as_mapping(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "dimension": self.dimension, "lexical": self.lexical}

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


class PayloadRecord(Protocol):
    """A point as either client's scroll returns it."""

    @property
    def id(self) -> Any: ...

    @property
    def payload(self) -> dict[str, Any] | None: ...


#: One page of a scroll: (filter, cursor: None for the first page) -> (points with payload, next cursor or None).
Scroll = Callable[[Filter | None, Any], Awaitable[tuple[Sequence[PayloadRecord], Any]]]
#: Sets the lexical vector of each (point id, terms).
SetLexical = Callable[[list[tuple[Any, qe.SparseVector]]], Awaitable[None]]


async def derive_lexical_side(which: LexicalUpdate, scroll: Scroll, update: SetLexical, where: str) -> int:
    """Give the points `which` names their sparse BM25 vector, derived from their stored payload (their CLIP
    vectors are untouched: no image is encoded again). Returns how many points it updated.

    Points that have the vector are skipped when `which` is "missing", so an interrupted update resumes where it
    stopped, and two replicas doing it at once repeat each other harmlessly."""
    missing = None if which == "all" else Filter(must_not=(HasVector(LEXICAL_VECTOR),))
    started = time.perf_counter()
    updated = 0
    cursor: Any = None
    while True:
        records, cursor = await scroll(missing, cursor)
        vectors = []
        for record in records:
            terms = lexical_document(product_from_payload(record.payload or {}))
            if terms is not None:  # a product without words stays without the vector
                vectors.append((record.id, terms))
        if vectors:
            await update(vectors)
            updated += len(vectors)
        if cursor is None:
            break
    if updated:
        log.info(
            "lexical side of the catalogue derived from its stored text (no image encoded)",
            store=where,
            products=updated,
            seconds=round(time.perf_counter() - started, 1),
        )
    return updated
