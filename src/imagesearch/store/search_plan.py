"""The search algorithm, written once for both backends.

`SearchPlan.steps` is the whole of it (the best lexical score, the scale, dense vs lexical vs hybrid, weighted vs
rank fusion, ranking rules over the relevance, the threshold, the re-rank candidates, the matched image,
collapsing, diversity, explanations). It yields `Request`s (store/plan.py) and is sent each request's points; a
backend compiles a request to its client's types and runs it (`drive` on the thread that owns the engine,
`drive_async` for an async client).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import NamedTuple

import numpy as np
import qdrant_edge as qe

from imagesearch.domain import Hit, LexicalQuery
from imagesearch.ranking import ScoreExplanation
from imagesearch.store.layout import (
    IMAGES,
    IMAGES_VECTOR,
    LEXICAL_VECTOR,
    Vector,
    lexical_terms,
    product_from_payload,
    stored_rows,
)
from imagesearch.store.plan import (
    Constant,
    Expression,
    Filter,
    Formula,
    HasId,
    Max,
    Mult,
    Nearest,
    Prefetch,
    Query,
    Request,
    Rrf,
    ScoredPoint,
    Sum,
    Variable,
)
from imagesearch.store.ranking_formula import RuleFormula
from imagesearch.store.rerank import best_image, collapse, mmr_order, product_similarity, similarity

#: A diversified or collapsing search re-ranks this many best matches, and returns no others. Fixed, not derived
#: from the page, so that every page of one query is a slice of the same re-ranked list.
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
#: A ruled query has one prefetch, the relevance query; this is a candidate's score in it.
RELEVANCE = "$score[0]"

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
    collapse: float | None = None
    rules: RuleFormula | None = None
    explain: bool = False

    def steps(self) -> Steps:
        """The search: yields each engine request, is sent its points, returns the hits."""
        terms, best = None, None
        if self.lexical is not None:
            terms = lexical_terms(self.lexical.text)
            # Unfiltered: lexical scores are relative to the best match in the whole collection.
            if terms.indices:
                top = yield Request(Nearest(terms, using=LEXICAL_VECTOR), limit=1, with_payload=False)
                best = top[0].score if top and top[0].score > 0 else None
            if self.values is None and best is None:
                return []  # no product has any of the words
        scale = 1.0 if self.lexical is None else score_scale(self.values is not None, self.lexical, best)
        query, prefetches = self._relevance(terms, best)
        threshold = None if self.score_threshold is None else self.score_threshold / scale
        relevance: dict[str, float] = {}
        if self.rules is not None:
            if self.explain:
                # An explanation shows each hit's relevance, which its ruled score no longer tells.
                candidates = self.rules.candidates
                points = yield Request(query, candidates, 0, prefetches, self.filter, threshold, with_payload=False)
                relevance = {str(p.id): p.score * scale for p in points}
            # The rules reorder the best candidates by relevance (the threshold applies to relevance).
            inner = Prefetch(query, self.rules.candidates, self.filter, prefetches, threshold)
            query, prefetches, threshold = self.rules.formula(_scaled(RELEVANCE, scale)), (inner,), None
            scale = 1.0
        reranked = bool(self.diversity or self.collapse)
        start, count = (0, DIVERSITY_CANDIDATES) if reranked else (self.offset, self.limit)
        # The image vectors with the points where every candidate needs them: to compare candidates, and for the
        # cosine an explanation shows. Otherwise only the hits with several images need theirs (to tell which one
        # matched), fetched by id below: converting every hit's vectors cost more than the search itself.
        every = reranked or (self.explain and self.values is not None)
        vectors = (IMAGES_VECTOR,) if every else ()
        points = yield Request(query, count, start, prefetches, self.filter, threshold, with_vectors=vectors)
        rows: list[Vector | None] = [stored_rows(p.vector, self.dimension) if every else None for p in points]
        if self.values is not None and not every:
            several = frozenset(str(p.id) for p in points if len((p.payload or {}).get(IMAGES) or ()) > 1)
            if several:
                by_id = Filter(must=(HasId(several),))
                images = Nearest([self.values], using=IMAGES_VECTOR)
                fetched = yield Request(
                    images, len(several), 0, (), by_id, with_payload=False, with_vectors=(IMAGES_VECTOR,)
                )
                found = {str(p.id): stored_rows(p.vector, self.dimension) for p in fetched}
                rows = [found.get(str(p.id)) for p in points]
        target = None if self.values is None else np.asarray(self.values, dtype=np.float32)
        hits = [self._hit(p, r, target, scale, relevance) for p, r in zip(points, rows, strict=True)]
        return self._rerank(hits, rows) if reranked and hits else hits

    def _relevance(self, terms: qe.SparseVector | None, best: float | None) -> tuple[Query, tuple[Prefetch, ...]]:
        """The query and prefetches of the search without rules; see VectorStore.search for the scores."""
        if self.lexical is None or terms is None:
            assert self.values is not None
            return Nearest([self.values], using=IMAGES_VECTOR), ()  # a product scores its best image
        words = Nearest(terms, using=LEXICAL_VECTOR)
        if self.values is None:
            return words, ()
        images = Nearest([self.values], using=IMAGES_VECTOR)
        # The filter goes on every leaf: prefetch limits then count matching products only.
        dense = Prefetch(images, HYBRID_CANDIDATES, self.filter)
        lexical_side = Prefetch(words, HYBRID_CANDIDATES, self.filter)
        if self.lexical.fusion == "rank":
            return Rrf(RRF_K), (dense, lexical_side)
        rescored = Prefetch(images, HYBRID_CANDIDATES, self.filter, (lexical_side,))
        cosine_factor, lexical_factor = weighted_factors(self.lexical, best)
        cosine = Max((Variable(DENSE_COSINE), Variable(RESCORED_COSINE)))
        mapped_cosine = Mult((Constant(cosine_factor), Sum((cosine, Constant(1.0)))))
        formula = Sum((mapped_cosine, Mult((Constant(lexical_factor), Variable(BM25_SCORE)))))
        return Formula(formula, MISSING_SCORES), (dense, lexical_side, rescored)

    def _hit(
        self, point: ScoredPoint, rows: Vector | None, target: Vector | None, scale: float, relevance: dict[str, float]
    ) -> Hit:
        payload = point.payload or {}
        product, score = product_from_payload(payload), point.score * scale
        # A product with one image matched by it (its rows are fetched only where a search needs them).
        matched, cosine = best_image(rows, target) if rows is not None or target is None else (0, None)
        if not self.explain:
            return Hit(product, score, matched)
        if self.rules is None:
            return Hit(product, score, matched, explanation=ScoreExplanation(score, cosine))
        point_id = str(point.id)
        contributions = self.rules.contributions(payload, point_id)
        # Absent only when a write landed between the two requests (a server runs them apart).
        own = relevance.get(point_id, self.rules.relevance(score, contributions))
        return Hit(product, score, matched, explanation=ScoreExplanation(own, cosine, contributions))

    def _rerank(self, hits: list[Hit], rows: list[Vector | None]) -> list[Hit]:
        """The page of the candidates `hits` collapsed (near copies into the best of them), then diversified."""
        order, dropped = list(range(len(hits))), dict[int, list[int]]()
        if self.collapse:
            order, dropped = collapse(product_similarity(rows), self.collapse)
        if self.diversity:
            # Products compare by the image each matched (the primary one in a search without a vector).
            shown = np.zeros((len(order), self.dimension), dtype=np.float32)
            for row, i in enumerate(order):
                images = rows[i]
                if images is not None and len(images):
                    shown[row] = images[hits[i].matched_image or 0]
            relevance = [hits[i].score for i in order]
            picked = mmr_order(relevance, similarity(shown), self.diversity, self.offset + self.limit)
            order = [order[i] for i in picked]
        page = order[self.offset : self.offset + self.limit]
        return [
            dataclasses.replace(hits[i], duplicates=tuple(hits[j].product.id for j in dropped[i]))
            if dropped.get(i)
            else hits[i]
            for i in page
        ]


def _scaled(variable: str, scale: float) -> Expression:
    return Variable(variable) if scale == 1.0 else Mult((Constant(scale), Variable(variable)))


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
