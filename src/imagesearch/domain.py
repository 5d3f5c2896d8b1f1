"""The one vocabulary shared by every layer: products, filters, queries, outcomes, and the one way to turn a
request's parts into a key or digest.

Nothing here knows about protobuf or gRPC: `api/convert.py` converts between these and the wire types.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from imagesearch.images import NormalizedBox, ProductImage

if TYPE_CHECKING:  # ranking.py builds on this module's SearchFilter
    from imagesearch.ranking import RankingRequest, RankingSpec, ScoreExplanation

QueryKind = Literal["text", "image", "multimodal", "recommend"]
# What a cache tier did for one search: answered it, missed (and was filled), or was not consulted.
CacheOutcome = Literal["hit", "miss", "bypass"]
CACHE_OUTCOMES: tuple[CacheOutcome, ...] = ("hit", "miss", "bypass")
CacheTier = Literal["embedding", "result"]
# What a tower encodes: also the first part of an encoding's cache key.
Modality = Literal["text", "image"]
# How a search matches its text: by the CLIP embedding alone (dense), by the words of each product's text (lexical:
# BM25), or by both, fused (hybrid).
SearchMode = Literal["dense", "hybrid", "lexical"]
SEARCH_MODES: tuple[SearchMode, ...] = ("dense", "hybrid", "lexical")
# How a hybrid search fuses its two rankings: a weighted sum of their scores, or reciprocal rank fusion.
Fusion = Literal["weighted", "rank"]
FUSIONS: tuple[Fusion, ...] = ("weighted", "rank")

# Product ids are caller strings; the store needs UUID (or integer) point ids. UUIDv5 under a fixed namespace
# makes the mapping deterministic, so re-indexing an id always lands on the same point (an upsert).
_POINT_ID_NAMESPACE = uuid.UUID("5b0c7f8e-2f43-4d5e-9a51-6a7d1f1c2b9e")


def point_id_for(product_id: str) -> str:
    """Deterministic store point id (UUIDv5 string) for a caller's product id."""
    return str(uuid.uuid5(_POINT_ID_NAMESPACE, product_id))


def canonical_bytes(value: Any) -> bytes:
    """The one serialisation of a request's parts for keys and digests: JSON, whose strings are quoted and
    escaped and whose lists are delimited, so no two different values share a form (a category "a,b" is never
    the categories "a" and "b"). Callers normalise first (sort, deduplicate) where order does not matter."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def digest(*parts: bytes) -> str:
    """sha256 (hex) of length-prefixed parts: no two different lists of parts give the same input."""
    hashed = hashlib.sha256()
    for part in parts:
        hashed.update(struct.pack("<Q", len(part)))
        hashed.update(part)
    return hashed.hexdigest()


def _float_or_none(value: float | None) -> float | None:
    # An int and the float of the same value have two JSON forms; a key must not tell them apart.
    return None if value is None else float(value)


@dataclass(frozen=True)
class Product:
    """A catalogue product as stored: metadata only; its images live only as their embeddings (and `images`
    describes them, in order: the first is the primary image). `numeric_attributes` feed ranking rules."""

    id: str
    name: str = ""
    description: str = ""
    category: str = ""
    price: float = 0.0
    currency: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    image_url: str = ""
    images: tuple[ProductImage, ...] = ()
    numeric_attributes: Mapping[str, float] = field(default_factory=dict)

    def to_row(self) -> list[Any]:
        """The product as a JSON-able list in PRODUCT_FIELDS order (cache values)."""
        return [getattr(self, name) for name in PRODUCT_SCALAR_FIELDS] + [
            dict(self.attributes),
            [image.to_row() for image in self.images],
            dict(self.numeric_attributes),
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> Product:
        if len(row) != len(PRODUCT_FIELDS):
            raise ValueError(f"a product row has {len(PRODUCT_FIELDS)} fields, not {len(row)}")
        *scalars, attributes, images, numbers = row
        values = {name: _SCALAR_TYPES[name](value) for name, value in zip(PRODUCT_SCALAR_FIELDS, scalars, strict=True)}
        return cls(
            **values,
            attributes={str(k): str(v) for k, v in dict(attributes).items()},
            images=tuple(ProductImage.from_row(image) for image in images),
            numeric_attributes={str(k): float(v) for k, v in dict(numbers).items()},
        )

    @property
    def image_ids(self) -> tuple[str, ...]:
        return tuple(image.id for image in self.images)


# The product's fields that map one to one onto the wire and the store payload; `attributes` and
# `numeric_attributes` are maps everywhere, `images` a list of ProductImage.
PRODUCT_SCALAR_FIELDS = ("id", "name", "description", "category", "price", "currency", "image_url")
PRODUCT_FIELDS = (*PRODUCT_SCALAR_FIELDS, "attributes", "images", "numeric_attributes")
_SCALAR_TYPES: dict[str, type] = {name: float if name == "price" else str for name in PRODUCT_SCALAR_FIELDS}


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

    def key_value(self) -> dict[str, Any]:
        """The filter normalised (categories and attribute pairs sorted and deduplicated, prices as floats) for
        `canonical_bytes`: two filters that admit the same products under any catalogue get the same value."""
        return {
            "categories": sorted(set(self.categories)),
            "price_min": _float_or_none(self.price_min),
            "price_max": _float_or_none(self.price_max),
            "attributes": [list(pair) for pair in sorted(set(self.attributes))],
        }


@dataclass(frozen=True)
class Hit:
    """One ranked search result: the stored product and its score (dense: the cosine similarity to the query,
    -1..1; hybrid and lexical: 0..1, see VectorStore.search; with ranking rules, the ruled score).

    `matched_image`: the position in `product.images` of the image closest to the query vector (None when the
    search has no dense side). `duplicates`: the near-duplicate listings collapsed into this hit. `explanation`:
    how the score was formed, when asked for."""

    product: Product
    score: float
    matched_image: int | None = None
    duplicates: tuple[str, ...] = ()
    explanation: ScoreExplanation | None = None


@dataclass(frozen=True)
class LexicalQuery:
    """The lexical side of a search: `text` matched against the words of every product's text (BM25).

    When it is fused with a vector (hybrid), `fusion` says how, and `weight` is the lexical score's share of a
    weighted fusion (0 to 1).
    """

    text: str
    fusion: Fusion = "weighted"
    weight: float = 0.5


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


@dataclass(frozen=True)
class SearchPage:
    """Where the next page of one search starts (a decoded page token)."""

    query_digest: str
    catalogue_version: str
    offset: int


@dataclass(frozen=True)
class ListPage:
    """Where the next page of one listing starts (a decoded page token)."""

    filter_digest: str
    cursor: str


@dataclass(frozen=True)
class QueryRequest:
    """A search as the caller sent it, before the request rules (search/validation.py) and their defaults:
    optional fields are None when unset, counts are 0 when unset."""

    text: str = ""
    image: bytes | None = None
    image_url: str = ""
    flt: SearchFilter = field(default_factory=SearchFilter)
    top_k: int = 0
    page_size: int = 0
    page_token: str = ""
    score_threshold: float | None = None
    text_weight: float | None = None
    like_ids: tuple[str, ...] = ()
    unlike_ids: tuple[str, ...] = ()
    include_liked: bool = False
    group_by: str = ""
    diversity: float | None = None
    facets: FacetSpec | None = None
    mode: SearchMode | None = None
    fusion: Fusion | None = None
    lexical_weight: float | None = None
    regions: tuple[NormalizedBox, ...] = ()
    collapse_duplicates: bool = False
    duplicate_threshold: float | None = None
    # None: the request left `ranking` unset (the server's default rules apply).
    ranking: RankingRequest | None = None
    explain: bool = False


@dataclass(frozen=True)
class ListRequest:
    """A ListProducts call as sent (0 page size: the default)."""

    flt: SearchFilter = field(default_factory=SearchFilter)
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class DuplicatesRequest:
    """A FindDuplicates call as sent (unset threshold: None; 0 page size: the default)."""

    product_id: str = ""
    flt: SearchFilter = field(default_factory=SearchFilter)
    threshold: float | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class Query:
    """A validated search. `text` is already normalised; `image` holds the raw bytes (or None), `image_url` an
    image to fetch instead.

    `top_k` is the page size. `like_ids`/`unlike_ids` are example products (deduplicated, disjoint); `page` is
    the decoded page token (None: the first page). `mode` is resolved (never unset); `fusion` and
    `lexical_weight` are the defaults unless a hybrid search uses them. `regions`: boxes of the image to search
    for, each on its own (the catalogue runs one search per region, each with a single region). `collapse`: the
    near-duplicate threshold when collapsing (None: no collapsing). `ranking`: the rules in force (the request's
    or the server's default; None: relevance alone). `explain`: hits carry their score explanation.
    """

    text: str
    image: bytes | None
    flt: SearchFilter
    top_k: int
    text_weight: float
    score_threshold: float | None = None
    image_url: str = ""
    like_ids: tuple[str, ...] = ()
    unlike_ids: tuple[str, ...] = ()
    include_liked: bool = False
    group_by: str = ""
    diversity: float | None = None
    page: SearchPage | None = None
    facets: FacetSpec = field(default_factory=FacetSpec)
    mode: SearchMode = "dense"
    fusion: Fusion = "weighted"
    lexical_weight: float = 0.5
    regions: tuple[NormalizedBox, ...] = ()
    collapse: float | None = None
    ranking: RankingSpec | None = None
    explain: bool = False

    @property
    def kind(self) -> QueryKind:
        if self.like_ids or self.unlike_ids:
            return "recommend"
        has_image = self.image is not None or bool(self.image_url)
        if self.text and has_image:
            return "multimodal"
        return "image" if has_image else "text"

    @property
    def encodes(self) -> bool:
        # A lexical search matches words only: nothing goes through the model.
        return self.mode != "lexical" and (bool(self.text) or self.image is not None)

    @property
    def lexical(self) -> LexicalQuery | None:
        """The lexical side of a hybrid or lexical search; None for a dense one."""
        if self.mode == "dense":
            return None
        return LexicalQuery(self.text, self.fusion, self.lexical_weight)

    @property
    def exclude_ids(self) -> tuple[str, ...]:
        """Products never returned: the negative examples, and the positive ones unless asked for."""
        excluded = set(self.unlike_ids) if self.include_liked else {*self.like_ids, *self.unlike_ids}
        return tuple(sorted(excluded))

    def fingerprint(self) -> dict[str, Any]:
        """Everything in the query that shapes its ranking, normalised for `canonical_bytes`: queries that rank
        alike under any catalogue get the same value. The page-token digest (`digest`) and the result-cache key
        (search/cache.py) are both built from it, so a field that changes the ranking is added here, once.
        Left out: the page (`page`, `top_k`), which each of those binds in its own way, and `facets`, which are
        counted beside the ranking, not in it."""
        return {
            "text": self.text,
            "image": self._image_sha256,
            "image_url": self.image_url,
            "text_weight": float(self.text_weight),
            "filter": self.flt.key_value(),
            "score_threshold": _float_or_none(self.score_threshold),
            # Sets: the order of example ids and their repeats do not change the ranking.
            "like_ids": sorted(set(self.like_ids)),
            "unlike_ids": sorted(set(self.unlike_ids)),
            "include_liked": self.include_liked,
            "group_by": self.group_by,
            "diversity": _float_or_none(self.diversity),
            "mode": self.mode,
            "fusion": self.fusion,
            "lexical_weight": float(self.lexical_weight),
            "regions": [box.key_value() for box in self.regions],
            "collapse": _float_or_none(self.collapse),
            "ranking": None if self.ranking is None else self.ranking.key_value(),
            # What a hit carries rather than how hits rank, but a cached page must carry what was asked for.
            "explain": self.explain,
        }

    @functools.cached_property
    def _image_sha256(self) -> str | None:
        # Hashed once per query, however many keys are built from its fingerprint.
        return None if self.image is None else hashlib.sha256(self.image).hexdigest()

    def digest(self) -> str:
        """The digest a page token binds: the fingerprint and the page size that the token's offset counts in, so
        a token is only valid with the query it was issued for."""
        return digest(canonical_bytes({"query": self.fingerprint(), "page_size": self.top_k}))[:32]


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[Hit]
    kind: QueryKind
    embedding_cache: CacheOutcome
    result_cache: CacheOutcome
    server_time_ms: float
    next_page_token: str = ""
    facets: Facets | None = None
    mode: SearchMode = "dense"
    # With several query regions: the hits per region, in the requested order (`hits` is then empty).
    region_results: tuple[tuple[NormalizedBox, list[Hit]], ...] = ()

    @property
    def cached(self) -> bool:
        return self.result_cache == "hit"


@dataclass(frozen=True)
class ProductPage:
    products: list[Product]
    next_page_token: str


@dataclass(frozen=True)
class ModelDescription:
    """What the loaded model is and how it runs (GetServiceInfo, the `serving` log line)."""

    model_id: str
    dimension: int
    device: str
    image_size: int
    image_precision: str
    text_precision: str
    torch_threads: int
    image_runtime: str
    text_runtime: str
    # How queries take the text tower, e.g. "unpadded, fp16 weights".
    text_path: str
    # One sentence: the towers' runtime, precision and thread count, and why (measured times, or the settings), e.g.
    # "image tower openvino bf16, text tower openvino bf16, 2 threads: the most accurate within 10% of the fastest,
    # measured on this CPU (image forward openvino bf16 27.1 ms, openvino f32 51.0 ms, torch fp32 92.3 ms; ...)".
    runtime_reason: str = ""
    # The CPU: model name, family/model numbers, the flags the runtimes depend on, and the CPUs this process may use,
    # e.g. "AMD EPYC (family 25 model 17): avx2 avx512f avx512_vnni avx512_bf16; 2 CPUs".
    cpu: str = ""


@dataclass(frozen=True)
class CacheDescription:
    backend: str
    available: bool
    embedding_hits: int
    embedding_misses: int
    result_hits: int
    result_misses: int


@dataclass(frozen=True)
class CatalogDescription:
    """The catalogue's parts, each described by itself."""

    model: ModelDescription
    store_backend: str
    product_count: int
    cache: CacheDescription
