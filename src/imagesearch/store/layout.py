"""The point layout every backend shares, and the helpers both backends use to read and write it.

Both backends store a product under the same point id, payload and vectors (the unnamed dense CLIP vector of its
primary image, the `images` multivector of all its images, and the sparse `bm25` vector of its words), so a
catalogue can move between the embedded store and a Qdrant server (snapshot or re-import) without any translation.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import qdrant_edge as qe

from imagesearch.domain import FacetCount, Facets, FacetSpec, Product, point_id_for
from imagesearch.images import IMAGE_FIELDS, ProductImage
from imagesearch.ranking import NUMBERS as NUMBERS

#: An embedding: float32, L2-normalised, shape (dimension,); or, for a product's images, shape (images, dimension).
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
# `images`: the product's images in order ({id, role, url, sha256} each), one per row of IMAGES_VECTOR. `numbers`
# (ranking.NUMBERS): the numeric attributes, which ranking formulas read as "numbers.<key>". `numeric_keys`: their
# keys as keywords, so that one facet says which numeric attributes the catalogue has.
IMAGES = "images"
NUMERIC_KEYS = "numeric_keys"

# The filterable fields and the index each needs; each backend maps the kind to its own schema type.
INDEXED_FIELDS: Mapping[str, str] = {
    CATEGORY: "keyword",
    PRICE: "float",
    ATTRIBUTE_PAIRS: "keyword",
    NUMERIC_KEYS: "keyword",
}

#: Facets are counted from the store's this-many most frequent values of a field. Attribute facets are counted
#: on `attribute_pairs` (every key's values in one indexed field, including high-cardinality keys such as a
#: family id), so this bounds all keys together; it is high enough that only catalogues with more distinct
#: attribute pairs than this can lose a rare value (its cost: benchmarks/features.py).
FACET_SCAN_VALUES = 100_000

#: The CLIP vector of the product's primary image (its first): the unnamed (default) vector, as in stores written
#: before several images per product. Read back by `vectors` (searches by example products); no search ranks by it.
DENSE_VECTOR = ""
#: Every image's CLIP vector, in the product's order: a multivector (cosine, MaxSim). Every search by vector goes
#: through it with a one-row query, so that a product scores the cosine of its best image.
IMAGES_VECTOR = "images"
#: The sparse vector that holds a product's words as BM25 term weights, next to its unnamed CLIP vector. Terms
#: come from Qdrant's own BM25 (`qdrant_edge.Bm25`: its tokenizer, English stop words and stemmer), in both
#: backends, so both tokenise alike; the engine applies the IDF modifier at query time, over the whole collection.
LEXICAL_VECTOR = "bm25"
# Pinned rather than left to the library's defaults: stored term weights are only comparable with queries made
# with the same parameters. LEXICAL_MODEL records them with the store; a store whose record differs re-derives its
# lexical side when it opens.
_BM25 = qe.Bm25(qe.Bm25Config(k=1.2, b=0.75, avg_len=256.0, language="english"))
LEXICAL_MODEL = "qdrant-bm25 k=1.2 b=0.75 avg_len=256 english"


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


def image_rows(vectors: Vector, dimension: int) -> list[list[float]]:
    """A product's image vectors as rows: shape (dimension,) is one image, (k, dimension) k >= 1 images."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2 and vectors.shape[0] >= 1:
        return [vector_values(row, dimension) for row in vectors]
    if isinstance(vectors, np.ndarray) and vectors.ndim == 1:
        return [vector_values(vectors, dimension)]
    shape = getattr(vectors, "shape", type(vectors).__name__)
    raise ValueError(f"expected vectors of shape ({dimension},) or (images, {dimension}), got {shape}")


def stored_vector(raw: Any, dimension: int) -> Vector:
    # The unnamed vector comes back as a plain list, or by name ({"": [...]}) with the point's other vectors.
    if isinstance(raw, Mapping):
        raw = raw.get(DENSE_VECTOR)
    vector = np.asarray(raw, dtype=np.float32)
    if vector.shape != (dimension,):
        raise ValueError(f"stored vector has shape {vector.shape}, expected ({dimension},)")
    return vector


def stored_rows(raw: Any, dimension: int) -> Vector | None:
    """A point's IMAGES_VECTOR rows as (k, dimension), from the named vectors a query or retrieve returned; None
    when the point has none."""
    rows = raw.get(IMAGES_VECTOR) if isinstance(raw, Mapping) else None
    if not rows:
        return None
    matrix = np.asarray(rows, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != dimension:
        raise ValueError(f"stored images have shape {matrix.shape}, expected (images, {dimension})")
    return matrix


def lexical_text(product: Product) -> str:
    """The words a product is found by: its name, description, category and attribute values."""
    return "\n".join([product.name, product.description, product.category, *product.attributes.values()])


def lexical_document(product: Product) -> qe.SparseVector | None:
    """The product's sparse BM25 vector (LEXICAL_VECTOR): term-frequency weights of its words. None for a product
    without words (or only stop words): such a point is stored without the vector, so that the points that have
    it are exactly those in the engine's sparse index (the embedded store counts its HNSW index by that)."""
    terms = _BM25.embed_document(lexical_text(product))
    return terms if terms.indices else None


def point_vectors(rows: list[list[float]], product: Product) -> dict[str, Any]:
    """A point's named vectors: the primary image's CLIP vector (unnamed), every image's (IMAGES_VECTOR) and, when
    the product has words, LEXICAL_VECTOR."""
    vectors: dict[str, Any] = {DENSE_VECTOR: rows[0], IMAGES_VECTOR: rows}
    terms = lexical_document(product)
    if terms is not None:
        vectors[LEXICAL_VECTOR] = terms
    return vectors


def stored_images(product: Product, count: int) -> tuple[ProductImage, ...]:
    """The images stored for `product` with `count` image vectors: its own, one per vector; a product without any
    has one, its `image_url` (as a product written before several images per product reads back)."""
    if product.images:
        if len(product.images) != count:
            raise ValueError(f"product {product.id!r} has {len(product.images)} images but {count} image vectors")
        return product.images
    if count != 1:
        raise ValueError(f"product {product.id!r} has no images but {count} image vectors")
    return (ProductImage(url=product.image_url),)


def point_parts(product: Product, vectors: Vector, dimension: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A product's point: its named vectors and its payload (its images checked against its image vectors)."""
    rows = image_rows(vectors, dimension)
    stored_images(product, len(rows))
    return point_vectors(rows, product), product_to_payload(product)


def image_payload(images: Sequence[ProductImage]) -> list[dict[str, str]]:
    return [{name: getattr(image, name) for name in IMAGE_FIELDS} for image in images]


def lexical_terms(text: str) -> qe.SparseVector:
    """A query text as a sparse vector of its terms (weight 1 each), to match against LEXICAL_VECTOR."""
    return _BM25.embed_query(text)


def point_ids_by_product(product_ids: Iterable[str]) -> dict[str, str]:
    """Store point id -> product id, to map records (which carry point ids) back to the caller's ids."""
    return {point_id_for(pid): pid for pid in product_ids}


def check_cursor(cursor: str) -> str:
    # Cursors are point ids, which this layout always makes UUID strings (see domain.point_id_for).
    try:
        return str(uuid.UUID(cursor))
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"not a store cursor: {cursor!r}") from None


def parse_attribute_pair(pair: str) -> tuple[str, str]:
    """The (key, value) of an `attribute_pair` string: the first "=" separates them (keys escape theirs)."""
    key, _, value = pair.partition("=")
    return key.replace("%3D", "=").replace("%25", "%"), value


def facets_from_counts(
    spec: FacetSpec, category_counts: Iterable[tuple[str, int]], pair_counts: Iterable[tuple[str, int]]
) -> Facets:
    """Facets from raw (value, count) lists of the category and attribute_pairs fields: sorted, cut, and the
    pairs split per requested key."""
    per_key: dict[str, list[tuple[str, int]]] = {key: [] for key in spec.attribute_keys}
    for pair, count in pair_counts:
        key, value = parse_attribute_pair(pair)
        if key in per_key:
            per_key[key].append((value, count))
    return Facets(
        categories=_top_counts(category_counts, spec.max_values) if spec.categories else (),
        attributes=tuple((key, _top_counts(per_key[key], spec.max_values)) for key in spec.attribute_keys),
    )


def _top_counts(counts: Iterable[tuple[str, int]], max_values: int) -> tuple[FacetCount, ...]:
    # Sorted here rather than trusting the engine's order, so that ties come out the same on every backend.
    ranked = sorted(counts, key=lambda vc: (-vc[1], vc[0]))
    return tuple(FacetCount(value, count) for value, count in ranked[:max_values])


def check_paging(limit: int, offset: int) -> None:
    if limit < 1 or offset < 0:
        raise ValueError(f"need limit >= 1 and offset >= 0, got limit={limit}, offset={offset}")


def attribute_pair(key: str, value: str) -> str:
    # Escaping "=" (and the escape character) in the key makes the first "=" the separator, so ("a=b", "c") and
    # ("a", "b=c") cannot collide. Values need no escaping.
    return f"{key.replace('%', '%25').replace('=', '%3D')}={value}"


def product_to_payload(product: Product) -> dict[str, Any]:
    """The point payload of `product` (checked against its image vectors by `stored_images`)."""
    attributes = dict(product.attributes)
    numbers = {str(key): float(value) for key, value in product.numeric_attributes.items()}
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
        IMAGES: image_payload(product.images or (ProductImage(url=product.image_url),)),
        NUMBERS: numbers,
        NUMERIC_KEYS: sorted(numbers),
    }


def with_attribute_pairs(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """A hit's payload (read without ATTRIBUTE_PAIRS) with them again, for filters evaluated in Python."""
    if ATTRIBUTE_PAIRS in payload:
        return payload
    attributes = payload.get(ATTRIBUTES) or {}
    return {**payload, ATTRIBUTE_PAIRS: sorted(attribute_pair(str(k), str(v)) for k, v in attributes.items())}


def product_from_payload(payload: Mapping[str, Any]) -> Product:
    # Tolerates missing fields so points written by other tools (or older layouts) still read back: a point written
    # before several images per product has one image, its image_url.
    image_url = str(payload.get(IMAGE_URL, ""))
    images = tuple(ProductImage.from_row(row) for row in payload.get(IMAGES) or ()) or (ProductImage(url=image_url),)
    return Product(
        id=str(payload.get(PRODUCT_ID, "")),
        name=str(payload.get(NAME, "")),
        description=str(payload.get(DESCRIPTION, "")),
        category=str(payload.get(CATEGORY, "")),
        price=float(payload.get(PRICE, 0.0)),
        currency=str(payload.get(CURRENCY, "")),
        attributes={str(k): str(v) for k, v in (payload.get(ATTRIBUTES) or {}).items()},
        image_url=image_url,
        images=images,
        numeric_attributes={str(k): float(v) for k, v in (payload.get(NUMBERS) or {}).items()},
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


def numeric_fields(products: Iterable[Product]) -> set[str]:
    """The payload fields ("numbers.<key>") of the products' numeric attributes. Each gets a float index the first
    time a product brings it: a ranking formula then reads its values from the index rather than from each
    candidate's stored payload."""
    return {f"{NUMBERS}.{key}" for product in products for key in product.numeric_attributes}


def numeric_fields_among(indexed: Iterable[str]) -> set[str]:
    """Which of a store's indexed payload fields are numeric attribute fields (numeric_fields)."""
    return {field for field in indexed if field.startswith(f"{NUMBERS}.")}
