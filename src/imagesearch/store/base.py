"""The vector store interface, and the point layout every backend shares.

Both backends store a product under the same point id, payload and vectors (the unnamed dense CLIP vector and the
sparse `bm25` vector of its words), so a catalogue can move between the embedded store and a Qdrant server
(snapshot or re-import) without any translation.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import qdrant_edge as qe

from imagesearch.domain import FacetCount, Facets, FacetSpec, Hit, LexicalQuery, Product, SearchFilter, point_id_for

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

#: A diversified search (Maximal Marginal Relevance) re-ranks this many best matches, and returns no others.
#: Fixed, not derived from the page, so that every page of one query is a slice of the same re-ranked list.
DIVERSITY_CANDIDATES = 200

#: Facets are counted from the store's this-many most frequent values of a field. Attribute facets are counted
#: on `attribute_pairs` (every key's values in one indexed field, including high-cardinality keys such as a
#: family id), so this bounds all keys together; it is high enough that only catalogues with more distinct
#: attribute pairs than this can lose a rare value (at 100k products it costs about 50 ms unfiltered, 3 ms for a
#: 1% filter, in the embedded store).
FACET_SCAN_VALUES = 100_000

#: The CLIP vector's name: the unnamed (default) vector, as in stores written before hybrid search.
DENSE_VECTOR = ""
#: The sparse vector that holds a product's words as BM25 term weights, next to its unnamed CLIP vector. Terms
#: come from Qdrant's own BM25 (`qdrant_edge.Bm25`: its tokenizer, English stop words and stemmer), in both
#: backends, so both tokenise alike; the engine applies the IDF modifier at query time, over the whole collection.
LEXICAL_VECTOR = "bm25"
# Pinned rather than left to the library's defaults: stored term weights are only comparable with queries made
# with the same parameters. LEXICAL_MODEL records them with the store; a store whose record differs re-derives its
# lexical side when it opens.
_BM25 = qe.Bm25(qe.Bm25Config(k=1.2, b=0.75, avg_len=256.0, language="english"))
LEXICAL_MODEL = "qdrant-bm25 k=1.2 b=0.75 avg_len=256 english"

#: A hybrid search fuses the HYBRID_CANDIDATES best matches of each side (the CLIP vector and the words); the
#: fused ranking holds at most twice as many products. Fixed, not derived from the page, so that every page of
#: one query is a slice of the same fused ranking.
HYBRID_CANDIDATES = 200
#: Reciprocal rank fusion adds 1 / (RRF_K + rank) per ranking (rank counting from 0, Qdrant's convention); the
#: usual constant. A product first in both rankings gets 2 / RRF_K, which RRF_SCALE maps to a score of 1.
RRF_K = 60
RRF_SCALE = RRF_K / 2
#: A weighted hybrid query combines three prefetches, named by position: the dense candidates' cosine, the
#: lexical candidates' BM25, and the lexical candidates rescored by the CLIP vector (so that every candidate gets
#: its true cosine, not only those among the best dense matches). A product missing from one list scores these:
#: -1 loses the max of the two cosines, 0 adds no lexical score.
DENSE_COSINE, BM25_SCORE, RESCORED_COSINE = "$score[0]", "$score[1]", "$score[2]"
MISSING_SCORES = {DENSE_COSINE: -1.0, BM25_SCORE: 0.0, RESCORED_COSINE: -1.0}


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
        """The best matches among the products matching `flt`, best first.

        Dense (`vector` only): by cosine similarity to `vector`; the score is that similarity (-1 to 1).
        Lexical (`lexical` only): by BM25 of `lexical.text` against each product's words; the score is that BM25
        divided by the best BM25 any product of the collection reaches for this text (0 to 1), so that a filter
        never changes a score. A text with no indexable word (only stop words) matches nothing.
        Hybrid (both): the HYBRID_CANDIDATES best of each side, fused. `lexical.fusion` "weighted": the score is
        (1 - w) * (1 + cosine) / 2 + w * lexical score (w = `lexical.weight`; 0 to 1), with every candidate's own
        cosine, so that a filter never changes a score either. "rank": reciprocal rank fusion, RRF_SCALE * sum
        of 1 / (RRF_K + rank) over the two rankings (0 to 1; 1 for a product first in both), ranks taken among
        the products matching `flt`.

        `offset` skips that many best hits (paging: page n is offset=n*limit). Hits scoring at or below
        `score_threshold` (in the score's own scale) are dropped (Qdrant keeps only scores strictly above it).
        Products in `exclude_ids` are never returned.

        `diversity` in (0, 1] re-ranks the DIVERSITY_CANDIDATES best matches by Maximal Marginal Relevance with
        lambda = 1 - diversity: each next hit maximises lambda * relevance - (1 - lambda) *
        max_similarity_to_hits_before_it, where relevance is the score and similarity the cosine between the
        products' CLIP vectors. `offset` then applies to the re-ranked list; scores stay those of the plain
        ranking. None or 0: plain ranking.

        Raises ValueError when neither `vector` nor `lexical` is given.
        """
        ...

    async def vectors(self, product_ids: Sequence[str]) -> dict[str, Vector]:
        """The stored embeddings of those of `product_ids` that exist (unknown ids are absent), by product id."""
        ...

    async def facets(self, flt: SearchFilter, spec: FacetSpec, *, exclude_ids: Collection[str] = ()) -> Facets:
        """Counts of products per category and per requested attribute value, among the products matching `flt`
        except `exclude_ids`. Values are sorted by count (descending), then value; at most `spec.max_values` per
        facet, found among the FACET_SCAN_VALUES most frequent values of the field.

        Counts come from Qdrant's fast facet mode (`exact=False`), which counts every segment's matching points
        in full: exact, except that a point being rewritten (present in two segments for a moment, e.g. during
        an optimisation) can count twice. The `exact=True` mode runs one count per distinct value, which is
        prohibitive for attribute_pairs (about 1 s at 100k products with a family id per product)."""
        ...

    async def scroll(self, flt: SearchFilter, limit: int, after: str | None = None) -> tuple[list[Product], str | None]:
        """Up to `limit` products matching `flt`, in the store's stable point order, starting at cursor `after`
        (None: the beginning). Returns them and the cursor of the next page (None after the last page).

        Cursors are point ids, so paging is keyset-based: stable while products are added or removed. A cursor
        that is not a point id of this store layout raises ValueError.
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


def stored_vector(raw: Any, dimension: int) -> Vector:
    # The unnamed vector comes back as a plain list, or by name ({"": [...]}) with the point's other vectors.
    if isinstance(raw, Mapping):
        raw = raw.get(DENSE_VECTOR)
    vector = np.asarray(raw, dtype=np.float32)
    if vector.shape != (dimension,):
        raise ValueError(f"stored vector has shape {vector.shape}, expected ({dimension},)")
    return vector


def lexical_text(product: Product) -> str:
    """The words a product is found by: its name, description, category and attribute values."""
    return "\n".join([product.name, product.description, product.category, *product.attributes.values()])


def lexical_document(product: Product) -> qe.SparseVector | None:
    """The product's sparse BM25 vector (LEXICAL_VECTOR): term-frequency weights of its words. None for a product
    without words (or only stop words): such a point is stored without the vector, so that the points that have
    it are exactly those in the engine's sparse index (the embedded store counts its HNSW index by that)."""
    terms = _BM25.embed_document(lexical_text(product))
    return terms if terms.indices else None


def point_vectors(vector: list[float], product: Product) -> dict[str, Any]:
    """A point's named vectors: the unnamed CLIP vector and, when the product has words, LEXICAL_VECTOR."""
    terms = lexical_document(product)
    return {DENSE_VECTOR: vector} if terms is None else {DENSE_VECTOR: vector, LEXICAL_VECTOR: terms}


def lexical_terms(text: str) -> qe.SparseVector:
    """A query text as a sparse vector of its terms (weight 1 each), to match against LEXICAL_VECTOR."""
    return _BM25.embed_query(text)


def score_scale(has_vector: bool, lexical: LexicalQuery, best: float | None) -> float:
    """The factor from the engine's score of a lexical or hybrid query to the score VectorStore.search documents
    (`best`: the best BM25 in the collection for the text, None when nothing matches)."""
    if not has_vector:
        return 1.0 / best if best else 1.0  # BM25 relative to the best match
    return RRF_SCALE if lexical.fusion == "rank" else 1.0  # the weighted formula computes the score itself


def weighted_factors(lexical: LexicalQuery, best: float | None) -> tuple[float, float]:
    """(cosine_factor, lexical_factor) of the weighted hybrid score, which both stores have their engine compute
    as cosine_factor * (1 + max(DENSE_COSINE, RESCORED_COSINE)) + lexical_factor * BM25_SCORE, that is
    (1 - w) * (1 + cosine) / 2 + w * BM25 / best: the cosine mapped onto 0..1 as the lexical score is."""
    return (1.0 - lexical.weight) / 2, lexical.weight / (best or 1.0)


def check_search(vector: Vector | None, lexical: LexicalQuery | None) -> None:
    if vector is None and lexical is None:
        raise ValueError("a search needs a vector, a lexical query or both")


def mmr_order(relevance: Sequence[float], vectors: npt.NDArray[np.float32], diversity: float, count: int) -> list[int]:
    """The first `count` of the candidates (rows of `vectors`, L2-normalised; `relevance` per row, best first) in
    Maximal Marginal Relevance order with lambda = 1 - diversity, as indices: each next one maximises
    lambda * relevance - (1 - lambda) * its largest cosine similarity to those already picked. Ties keep the
    candidates' order, so the result is deterministic."""
    wanted = min(count, len(relevance))
    if wanted <= 0:
        return []
    lam = 1.0 - diversity
    gains = np.asarray(relevance, dtype=np.float64)
    similarity = np.asarray(vectors, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T
    picked = [int(np.argmax(gains))]
    nearest = similarity[picked[0]].copy()
    taken = np.zeros(len(gains), dtype=bool)
    taken[picked[0]] = True
    while len(picked) < wanted:
        marginal = np.where(taken, -np.inf, lam * gains - (1.0 - lam) * nearest)
        best = int(np.argmax(marginal))
        picked.append(best)
        taken[best] = True
        nearest = np.maximum(nearest, similarity[best])
    return picked


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
