"""What a search computes in Python over the points the engine returned, from their image vectors: the image each
hit matched, near-duplicate collapsing, and Maximal Marginal Relevance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from imagesearch.store.layout import Vector

#: Cosines are computed in float32 (as the engine does): two copies of one image can come out a few ulps short of
#: 1, and must still reach a threshold of 1 (or any other).
SIMILARITY_SLACK = 2e-6

Matrix = npt.NDArray[np.float64]


def best_image(rows: Vector | None, query: Sequence[float]) -> tuple[int | None, float | None]:
    """(index, cosine) of the row of `rows` (a product's image vectors) closest to `query`; (None, None) for a
    point without image vectors."""
    if rows is None or not len(rows):
        return None, None
    cosines = rows.astype(np.float64) @ np.asarray(query, dtype=np.float64)
    best = int(np.argmax(cosines))
    return best, float(cosines[best])


def product_similarity(products: Sequence[Vector | None]) -> Matrix:
    """The similarity of each pair of products: the largest cosine between an image of one and an image of the
    other (0 where either has no image vectors)."""
    count = len(products)
    present = [i for i, rows in enumerate(products) if rows is not None and len(rows)]
    similarity = np.zeros((count, count), dtype=np.float64)
    if not present:
        return similarity
    blocks = [np.asarray(products[i], dtype=np.float32) for i in present]
    stacked = np.concatenate(blocks)
    starts = np.cumsum([0] + [len(block) for block in blocks[:-1]])
    pairs = stacked @ stacked.T
    best = np.maximum.reduceat(np.maximum.reduceat(pairs, starts, axis=0), starts, axis=1)
    similarity[np.ix_(present, present)] = best
    return similarity


def collapse(similarity: Matrix, threshold: float) -> tuple[list[int], dict[int, list[int]]]:
    """Near-duplicate collapsing of candidates in rank order (rows of `similarity`), greedily from the top: a
    candidate whose similarity to an earlier kept one is at least `threshold` is dropped into the first such one.
    Returns the kept indices, and for each the indices dropped into it, in rank order."""
    kept: list[int] = []
    dropped: dict[int, list[int]] = {}
    for candidate in range(len(similarity)):
        near = [k for k in kept if similarity[candidate, k] >= threshold - SIMILARITY_SLACK]
        if near:
            dropped[near[0]].append(candidate)
        else:
            kept.append(candidate)
            dropped[candidate] = []
    return kept, dropped


def mmr_order(relevance: Sequence[float], similarity: Matrix, diversity: float, count: int) -> list[int]:
    """The first `count` of the candidates (`relevance` per candidate, best first; `similarity` between them) in
    Maximal Marginal Relevance order with lambda = 1 - diversity, as indices: each next one maximises
    lambda * relevance - (1 - lambda) * its largest similarity to those already picked. Ties keep the candidates'
    order, so the result is deterministic."""
    wanted = min(count, len(relevance))
    if wanted <= 0:
        return []
    lam = 1.0 - diversity
    gains = np.asarray(relevance, dtype=np.float64)
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
