"""What a search computes in Python over the points the engine returned, from their image vectors: the image each
hit matched, near-duplicate collapsing (over every pair of images), and Maximal Marginal Relevance (over one image
per product: comparing every image of 200 candidates with every other is the costly part of collapsing, see
benchmarks/store_edge.py --images)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from imagesearch.store.layout import Vector

#: Cosines are computed in float32 (as the engine does): two copies of one image can come out a few ulps short of
#: 1, and must still reach a threshold of 1 (or any other).
SIMILARITY_SLACK = 2e-6

Matrix = npt.NDArray[np.float64]


def best_image(rows: Vector | None, query: Vector | None) -> tuple[int | None, float | None]:
    """(index, cosine) of the row of `rows` (a product's image vectors) closest to `query`; (None, None) without a
    query or for a point without image vectors."""
    if query is None or rows is None or not len(rows):
        return None, None
    cosines = rows @ query
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
    # One product of all the images with all (one BLAS call: faster here than comparing with the kept ones only).
    pairs = stacked @ stacked.T
    best = np.maximum.reduceat(np.maximum.reduceat(pairs, starts, axis=1), starts, axis=0)
    similarity[np.ix_(present, present)] = best
    return similarity


def collapse(similarity: Matrix, threshold: float) -> tuple[list[int], dict[int, list[int]]]:
    """Near-duplicate collapsing of candidates in rank order (rows of `similarity`, product_similarity), greedily
    from the top: a candidate whose similarity to an earlier kept one is at least `threshold` is dropped into the
    first such one. Returns the kept indices, and for each the indices dropped into it, in rank order."""
    kept: list[int] = []
    dropped: dict[int, list[int]] = {}
    near = similarity >= threshold - SIMILARITY_SLACK
    for candidate in range(len(similarity)):
        first = np.flatnonzero(near[candidate, kept])
        if len(first):
            dropped[kept[int(first[0])]].append(candidate)
        else:
            kept.append(candidate)
            dropped[candidate] = []
    return kept, dropped


def similarity(vectors: npt.NDArray[np.float32]) -> Matrix:
    """The cosine similarity of each pair of `vectors` (rows, L2-normalised)."""
    rows = np.asarray(vectors, dtype=np.float64)
    matrix: Matrix = rows @ rows.T
    return matrix


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
