"""Domain types shared by the encoder, store, cache and service layers.

Nothing here knows about protobuf or gRPC: `service.py` converts between these and the wire types.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

# Product ids are caller strings; the store needs UUID (or integer) point ids. UUIDv5 under a fixed namespace
# makes the mapping deterministic, so re-indexing an id always lands on the same point (an upsert).
_POINT_ID_NAMESPACE = uuid.UUID("5b0c7f8e-2f43-4d5e-9a51-6a7d1f1c2b9e")


def point_id_for(product_id: str) -> str:
    """Deterministic store point id (UUIDv5 string) for a caller's product id."""
    return str(uuid.uuid5(_POINT_ID_NAMESPACE, product_id))


@dataclass(frozen=True)
class Product:
    """A catalogue product as stored: metadata only, the image lives only as its embedding."""

    id: str
    name: str = ""
    description: str = ""
    category: str = ""
    price: float = 0.0
    currency: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    image_url: str = ""


@dataclass(frozen=True)
class SearchFilter:
    """Payload filter. Empty fields do not restrict.

    categories: the product's category is any of these.
    price_min / price_max: inclusive bounds, each optional.
    attributes: every (key, value) pair must match the product's attribute exactly.
    """

    categories: tuple[str, ...] = ()
    price_min: float | None = None
    price_max: float | None = None
    attributes: tuple[tuple[str, str], ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.categories or self.attributes) and self.price_min is None and self.price_max is None

    def canonical(self) -> str:
        """A stable text form (sorted, deduplicated) for cache keys: equal filters give equal strings."""
        cats = ",".join(sorted(set(self.categories)))
        attrs = ",".join(f"{k}={v}" for k, v in sorted(set(self.attributes)))
        lo = "" if self.price_min is None else repr(float(self.price_min))
        hi = "" if self.price_max is None else repr(float(self.price_max))
        return f"c[{cats}]p[{lo}:{hi}]a[{attrs}]"


@dataclass(frozen=True)
class Hit:
    """One ranked search result: the stored product and its cosine similarity to the query (-1..1)."""

    product: Product
    score: float


@dataclass(frozen=True)
class FacetSpec:
    """Which facet counts a search returns: per category, and per value of each attribute key."""

    categories: bool = False
    attribute_keys: tuple[str, ...] = ()
    max_values: int = 20

    @property
    def is_empty(self) -> bool:
        return not (self.categories or self.attribute_keys)


@dataclass(frozen=True)
class FacetCount:
    value: str
    count: int


@dataclass(frozen=True)
class Facets:
    """Counts over the products a filter admits. `attributes` follows the order of FacetSpec.attribute_keys."""

    categories: tuple[FacetCount, ...] = ()
    attributes: tuple[tuple[str, tuple[FacetCount, ...]], ...] = ()
