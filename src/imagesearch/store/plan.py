"""The search plan: what one search asks of the engine, in terms neither client library owns.

`SearchPlan.steps` is the whole search algorithm (the best lexical score, the scale, dense vs lexical vs hybrid,
weighted vs rank fusion, the diversity candidates, the threshold, the re-rank), written once. It yields `Request`s
and is sent each request's points; a backend compiles a request to its client's types and runs it (`drive` on the
thread that owns the engine, `drive_async` for an async client). Filters and formulas are small trees for the
same reason: each backend compiles them (edge_plan.py, qdrant_plan.py), neither decides them.

The records are NamedTuples, cheap to build on every search. Being tuples, two of different kinds can compare
equal (Sum((x,)) == Mult((x,))): tell them apart by type, as the compilers do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Generator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
import qdrant_edge as qe

from imagesearch.domain import Hit, LexicalQuery, SearchFilter, point_id_for
from imagesearch.store.layout import (
    ATTRIBUTE_PAIRS,
    CATEGORY,
    DENSE_VECTOR,
    LEXICAL_VECTOR,
    PRICE,
    attribute_pair,
    lexical_terms,
    product_from_payload,
    stored_vector,
)

#: A diversified search (Maximal Marginal Relevance) re-ranks this many best matches, and returns no others.
#: Fixed, not derived from the page, so that every page of one query is a slice of the same re-ranked list.
DIVERSITY_CANDIDATES = 200
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


# --- filters: every condition of `must` holds and none of `must_not` --------------------------------------------


class MatchAny(NamedTuple):  # the keyword field holds any of the values
    key: str
    values: tuple[str, ...]


class MatchValue(NamedTuple):  # the keyword field holds the value
    key: str
    value: str


class Range(NamedTuple):  # the numeric field lies within the inclusive bounds (None: unbounded)
    key: str
    gte: float | None
    lte: float | None


class HasId(NamedTuple):  # the point is one of these
    point_ids: frozenset[str]


class HasVector(NamedTuple):  # the point has this named vector
    name: str


class Filter(NamedTuple):
    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


Condition = MatchAny | MatchValue | Range | HasId | HasVector | Filter


def search_filter(flt: SearchFilter, exclude_ids: Collection[str] = ()) -> Filter | None:
    """The filter of a search or listing: `flt` over the payload, minus the products in `exclude_ids`."""
    must: list[Condition] = []
    if flt.categories:
        must.append(MatchAny(CATEGORY, tuple(flt.categories)))
    if flt.price_min is not None or flt.price_max is not None:
        must.append(Range(PRICE, flt.price_min, flt.price_max))
    must.extend(MatchValue(ATTRIBUTE_PAIRS, attribute_pair(key, value)) for key, value in flt.attributes)
    must_not = (HasId(frozenset(point_id_for(pid) for pid in exclude_ids)),) if exclude_ids else ()
    return Filter(tuple(must), must_not) if must or must_not else None


# --- formulas: a score computed per point ---------------------------------------------------------------------


class Constant(NamedTuple):
    value: float


class Variable(NamedTuple):  # a prefetch's score ("$score[i]": the i-th prefetch) or a numeric payload field
    name: str


class Sum(NamedTuple):
    terms: tuple[Expression, ...]


class Mult(NamedTuple):
    factors: tuple[Expression, ...]


class Max(NamedTuple):
    operands: tuple[Expression, ...]


class Matches(NamedTuple):  # 1 where the point matches the filter, else 0: a boost or a bury by filter
    filter: Filter


class Decay(NamedTuple):
    """Qdrant's decay of `x` away from `target`: 1 at the target, `midpoint` at `scale` from it (lin: linear down to
    0; gauss, exp: those curves). None leaves the engine's default (target 0, scale 1, midpoint 0.5)."""

    kind: Literal["lin", "gauss", "exp"]
    x: Expression
    target: Expression | None = None
    scale: float | None = None
    midpoint: float | None = None


Expression = Constant | Variable | Sum | Mult | Max | Matches | Decay


class Formula(NamedTuple):
    """The score of `expression`; a variable a point lacks (a prefetch it is not in, a missing field) takes its
    value in `defaults`."""

    expression: Expression
    defaults: Mapping[str, float]


# --- requests -------------------------------------------------------------------------------------------------

#: What a leaf matches: a dense vector, a multivector (several per point, MaxSim) or the sparse terms of a text
#: (layout.lexical_terms: the one BM25 model both backends share).
QueryVector = list[float] | list[list[float]] | qe.SparseVector


class Nearest(NamedTuple):
    """The points nearest `vector` on the named vector `using`; with `mmr_diversity`, the `mmr_candidates` nearest
    re-ranked by the engine's Maximal Marginal Relevance (diversity = 1 - lambda)."""

    vector: QueryVector
    using: str = DENSE_VECTOR
    mmr_diversity: float | None = None
    mmr_candidates: int = DIVERSITY_CANDIDATES


class Rrf(NamedTuple):
    """Reciprocal rank fusion of the prefetches' rankings."""

    k: int


Query = Nearest | Rrf | Formula


class Prefetch(NamedTuple):
    """The `limit` best points by `query` among those matching `filter` (of the nested prefetches', if any)."""

    query: Query
    limit: int
    filter: Filter | None = None
    prefetches: tuple[Prefetch, ...] = ()


class Request(NamedTuple):
    """One engine query. `with_payload`: the product payload (without ATTRIBUTE_PAIRS, which is only ever
    matched, never read back); `with_vectors`: the named vectors to return."""

    query: Query
    limit: int
    offset: int = 0
    prefetches: tuple[Prefetch, ...] = ()
    filter: Filter | None = None
    score_threshold: float | None = None
    with_payload: bool = True
    with_vectors: tuple[str, ...] = ()


class ScoredPoint(Protocol):
    """A point as either client returns it."""

    @property
    def score(self) -> float: ...

    @property
    def payload(self) -> dict[str, Any] | None: ...

    @property
    def vector(self) -> Any: ...


# --- the algorithm --------------------------------------------------------------------------------------------

Steps = Generator[Request, Sequence[ScoredPoint], list[Hit]]


class SearchPlan(NamedTuple):
    """One VectorStore.search, its arguments checked (VectorStore.search builds it); see there for the hits."""

    dimension: int
    values: list[float] | None
    lexical: LexicalQuery | None
    filter: Filter | None
    limit: int
    offset: int
    score_threshold: float | None
    diversity: float | None

    def steps(self) -> Steps:
        """The search: yields each engine request, is sent its points, returns the hits."""
        if self.lexical is None:
            assert self.values is not None
            # A dense search is one engine query, diversified by the engine itself.
            nearest = Nearest(self.values, mmr_diversity=self.diversity)
            points = yield Request(nearest, self.limit, self.offset, (), self.filter, self.score_threshold)
            return [Hit(product_from_payload(p.payload or {}), p.score) for p in points]
        terms = lexical_terms(self.lexical.text)
        # Unfiltered: lexical scores are relative to the best match in the whole collection.
        best = None
        if terms.indices:
            top = yield Request(Nearest(terms, using=LEXICAL_VECTOR), limit=1, with_payload=False)
            best = top[0].score if top and top[0].score > 0 else None
        if self.values is None and best is None:
            return []  # no product has any of the words
        scale = score_scale(self.values is not None, self.lexical, best)
        query, prefetches = self._ranking(terms, best)
        start, count = (0, DIVERSITY_CANDIDATES) if self.diversity else (self.offset, self.limit)
        threshold = None if self.score_threshold is None else self.score_threshold / scale
        vectors = (DENSE_VECTOR,) if self.diversity else ()
        points = yield Request(query, count, start, prefetches, self.filter, threshold, with_vectors=vectors)
        hits = [Hit(product_from_payload(p.payload or {}), p.score * scale) for p in points]
        if not self.diversity or not hits:
            return hits
        rows = np.asarray([stored_vector(p.vector, self.dimension) for p in points], dtype=np.float32)
        order = mmr_order([h.score for h in hits], rows, self.diversity, self.offset + self.limit)
        return [hits[i] for i in order[self.offset :]]

    def _ranking(self, terms: qe.SparseVector, best: float | None) -> tuple[Query, tuple[Prefetch, ...]]:
        """The query and prefetches of a lexical or hybrid search; see VectorStore.search for the scores."""
        assert self.lexical is not None
        words = Nearest(terms, using=LEXICAL_VECTOR)
        if self.values is None:
            return words, ()
        # The filter goes on every leaf: prefetch limits then count matching products only.
        dense = Prefetch(Nearest(self.values), HYBRID_CANDIDATES, self.filter)
        lexical_side = Prefetch(words, HYBRID_CANDIDATES, self.filter)
        if self.lexical.fusion == "rank":
            return Rrf(RRF_K), (dense, lexical_side)
        rescored = Prefetch(Nearest(self.values), HYBRID_CANDIDATES, self.filter, (lexical_side,))
        cosine_factor, lexical_factor = weighted_factors(self.lexical, best)
        cosine = Max((Variable(DENSE_COSINE), Variable(RESCORED_COSINE)))
        mapped_cosine = Mult((Constant(cosine_factor), Sum((cosine, Constant(1.0)))))
        formula = Sum((mapped_cosine, Mult((Constant(lexical_factor), Variable(BM25_SCORE)))))
        return Formula(formula, MISSING_SCORES), (dense, lexical_side, rescored)


def drive(plan: SearchPlan, query: Callable[[Request], Sequence[ScoredPoint]]) -> list[Hit]:
    """Run `plan` on a synchronous engine: every request within this call, so all see one state of the engine."""
    steps = plan.steps()
    try:
        request = next(steps)
        while True:
            request = steps.send(query(request))
    except StopIteration as done:
        return done.value


async def drive_async(plan: SearchPlan, query: Callable[[Request], Awaitable[Sequence[ScoredPoint]]]) -> list[Hit]:
    """Run `plan` on an asynchronous engine."""
    steps = plan.steps()
    try:
        request = next(steps)
        while True:
            request = steps.send(await query(request))
    except StopIteration as done:
        return done.value


def score_scale(has_vector: bool, lexical: LexicalQuery, best: float | None) -> float:
    """The factor from the engine's score of a lexical or hybrid query to the score VectorStore.search documents
    (`best`: the best BM25 in the collection for the text, None when nothing matches)."""
    if not has_vector:
        return 1.0 / best if best else 1.0  # BM25 relative to the best match
    return RRF_SCALE if lexical.fusion == "rank" else 1.0  # the weighted formula computes the score itself


def weighted_factors(lexical: LexicalQuery, best: float | None) -> tuple[float, float]:
    """(cosine_factor, lexical_factor) of the weighted hybrid score, which the engine computes as
    cosine_factor * (1 + max(DENSE_COSINE, RESCORED_COSINE)) + lexical_factor * BM25_SCORE, that is
    (1 - w) * (1 + cosine) / 2 + w * BM25 / best: the cosine mapped onto 0..1 as the lexical score is."""
    return (1.0 - lexical.weight) / 2, lexical.weight / (best or 1.0)


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
