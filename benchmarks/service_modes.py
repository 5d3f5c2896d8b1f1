"""Alternating A/Bs of benchmarks/service.py on one server: uncached text searches in dense vs hybrid mode, and
hybrid searches with vs without ranking rules. Call by call, the order swapped every round: both sides see the same
machine."""

from __future__ import annotations

import asyncio
import time

from service_report import Row, row
from service_server import DAY_S, NOW_S

from imagesearch.client import ImageSearchClient

# A pause between two calls (see service.py's SETTLE_S).
SETTLE_S = 0.01


async def hybrid_vs_dense(client: ImageSearchClient, n: int) -> list[Row]:
    """Uncached text searches in dense and in hybrid mode (the default of a text-only search), alternating call by
    call, the order swapped every round: both modes see the same machine. Every call has a text of its own, so
    neither cache answers."""
    samples: dict[str, list[float]] = {"dense": [], "hybrid": []}
    for i in range(-3, n):
        for k, mode in enumerate(("dense", "hybrid") if i % 2 else ("hybrid", "dense")):
            await asyncio.sleep(SETTLE_S)
            started = time.perf_counter()
            await client.search(text=f"a green canvas tote, size {2 * i + k}", mode=mode)
            if i >= 0:
                samples[mode].append(time.perf_counter() - started)
    return [row(f"text search, uncached, {mode} (alternating)", samples[mode]) for mode in ("dense", "hybrid")]


# Ranking rules as a shop would set them: popularity, newness, a category buried (benchmarks' catalogue numbers).
RULES = {
    "rules": [
        {"name": "popular", "field": "popularity", "transform": "TRANSFORM_LOG1P", "weight": 0.02},
        {
            "name": "new",
            "field": "created_at",
            "transform": "TRANSFORM_GAUSS_DECAY",
            "decay": {"target": NOW_S, "scale": 30 * DAY_S},
            "weight": 0.5,
            "combine": "COMBINE_MULTIPLY",
        },
        {"name": "bury", "matches": {"categories": ["hats"]}, "weight": -0.5, "combine": "COMBINE_MULTIPLY"},
    ]
}


async def rules_vs_plain(client: ImageSearchClient, n: int) -> list[Row]:
    """Uncached hybrid text searches (the default of a text-only search) with the ranking rules above and without
    any, alternating call by call, the order swapped every round."""
    samples: dict[str, list[float]] = {"plain": [], "with 3 ranking rules": []}
    for i in range(-3, n):
        for k, kind in enumerate(samples if i % 2 else reversed(list(samples))):
            await asyncio.sleep(SETTLE_S)
            started = time.perf_counter()
            ranking = None if kind == "plain" else RULES
            await client.search(text=f"a striped wool scarf, size {2 * i + k}", ranking=ranking)
            if i >= 0:
                samples[kind].append(time.perf_counter() - started)
    return [row(f"text search, uncached, hybrid, {kind} (alternating)", samples[kind]) for kind in samples]
