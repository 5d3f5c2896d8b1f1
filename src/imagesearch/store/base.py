"""The vector store interface, and the payload layout every backend shares.

Both backends store a product under the same point id and payload, so a catalogue can move between the embedded
store and a Qdrant server (snapshot or re-import) without any translation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from imagesearch.domain import Hit, Product, SearchFilter

#: An embedding: float32, L2-normalised, shape (dimension,).
Vector = npt.NDArray[np.float32]

# Payload field names. `attributes` is the map (read back into Product); `attribute_pairs` holds the same data as
# "key=value" keywords so that "every pair must match" is a `must` of keyword matches on one indexed field.
PRODUCT_ID = "product_id"
NAME = "name"
DESCRIPTION = "description"
CATEGORY = "category"
PRICE = "price"
CURRENCY = "currency"
IMAGE_URL = "image_url"
ATTRIBUTES = "attributes"
ATTRIBUTE_PAIRS = "attribute_pairs"

# The filterable fields and the index each needs; each backend maps the kind to its own schema type.
INDEXED_FIELDS: Mapping[str, str] = {CATEGORY: "keyword", PRICE: "float", ATTRIBUTE_PAIRS: "keyword"}


class VectorStore(Protocol):
    """Where product embeddings and metadata live; the handlers depend on this, never on a backend.

    Vectors passed in are float32, L2-normalised, of shape (dimension,); any other shape is a programming error
    (ValueError). Backend failures raise `StoreUnavailable`; an incompatible existing store raises
    `StoreConfigError` when it is opened.
    """

    backend: str
    """Which backend this is: "embedded" (Qdrant Edge, in-process) or "qdrant" (a Qdrant server or cluster)."""

    dimension: int
    """Length of every stored vector."""

    async def upsert(self, items: Sequence[tuple[Product, Vector]]) -> list[bool]:
        """Insert or replace products with their embeddings.

        Returns one flag per item: True if the product was created, False if it replaced an existing one. When the
        same product id appears twice in `items`, the last one wins (and reports False).
        """
        ...

    async def get(self, product_id: str) -> Product | None:
        """The stored product, or None if there is none with this id."""
        ...

    async def delete(self, product_id: str) -> bool:
        """Remove a product; False if it did not exist."""
        ...

    async def search(
        self,
        vector: Vector,
        flt: SearchFilter,
        limit: int,
        offset: int = 0,
        score_threshold: float | None = None,
    ) -> list[Hit]:
        """Products most similar to `vector` (cosine similarity), best first, among those matching `flt`.

        `offset` skips that many best hits (paging: page n is offset=n*limit). Hits scoring at or below
        `score_threshold` are dropped (Qdrant keeps only scores strictly above it).
        """
        ...

    async def count(self) -> int:
        """Number of stored products."""
        ...

    async def ping(self) -> None:
        """A cheap probe for health checks; raises StoreUnavailable if the backend is not usable."""
        ...

    async def close(self) -> None:
        """Release the backend (flushing what the backend buffers). Idempotent; later calls raise StoreUnavailable."""
        ...


def vector_values(vector: Vector, dimension: int) -> list[float]:
    # Both client libraries take plain lists; validating here turns a wrong-model vector into a clear ValueError
    # instead of a backend error that would be reported to callers as "store unavailable".
    if not isinstance(vector, np.ndarray) or vector.shape != (dimension,):
        shape = getattr(vector, "shape", type(vector).__name__)
        raise ValueError(f"expected a vector of shape ({dimension},), got {shape}")
    if not np.isfinite(vector).all():
        raise ValueError("vector contains NaN or infinity")
    values: list[float] = vector.astype(np.float32, copy=False).tolist()
    return values


def check_paging(limit: int, offset: int) -> None:
    if limit < 1 or offset < 0:
        raise ValueError(f"need limit >= 1 and offset >= 0, got limit={limit}, offset={offset}")


def attribute_pair(key: str, value: str) -> str:
    # Escaping "=" (and the escape character) in the key makes the first "=" the separator, so ("a=b", "c") and
    # ("a", "b=c") cannot collide. Values need no escaping.
    return f"{key.replace('%', '%25').replace('=', '%3D')}={value}"


def product_to_payload(product: Product) -> dict[str, Any]:
    attributes = dict(product.attributes)
    return {
        PRODUCT_ID: product.id,
        NAME: product.name,
        DESCRIPTION: product.description,
        CATEGORY: product.category,
        PRICE: float(product.price),
        CURRENCY: product.currency,
        IMAGE_URL: product.image_url,
        ATTRIBUTES: attributes,
        ATTRIBUTE_PAIRS: sorted(attribute_pair(k, v) for k, v in attributes.items()),
    }


def product_from_payload(payload: Mapping[str, Any]) -> Product:
    # Tolerates missing fields so points written by other tools (or older layouts) still read back.
    return Product(
        id=str(payload.get(PRODUCT_ID, "")),
        name=str(payload.get(NAME, "")),
        description=str(payload.get(DESCRIPTION, "")),
        category=str(payload.get(CATEGORY, "")),
        price=float(payload.get(PRICE, 0.0)),
        currency=str(payload.get(CURRENCY, "")),
        attributes={str(k): str(v) for k, v in (payload.get(ATTRIBUTES) or {}).items()},
        image_url=str(payload.get(IMAGE_URL, "")),
    )


def last_per_id(items: Sequence[tuple[Product, Vector]]) -> dict[str, tuple[Product, Vector]]:
    # A batch that names a product twice is stored as its last occurrence (dicts keep first-insertion order).
    latest: dict[str, tuple[Product, Vector]] = {}
    for product, vector in items:
        latest[product.id] = (product, vector)
    return latest


def created_flags(product_ids: Sequence[str], existing: set[str]) -> list[bool]:
    # The second occurrence of an id within one batch replaces the first, so it reports False.
    seen = set(existing)
    flags = []
    for product_id in product_ids:
        flags.append(product_id not in seen)
        seen.add(product_id)
    return flags
