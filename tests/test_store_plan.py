"""The search plan's trees (store/plan.py) compiled by both backends: one formula of every node kind scores the same
on the embedded engine and on qdrant-client, as written out by hand, and as plan.evaluate computes it in Python."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import qdrant_edge as qe
from qdrant_client import AsyncQdrantClient, models

from imagesearch.domain import point_id_for
from imagesearch.store import plan
from imagesearch.store.edge_plan import edge_request
from imagesearch.store.qdrant_plan import query_points

POINTS = [
    ("a", [1.0, 0.0], {"product_id": "a", "price": 20.0, "category": "shoes", "rating": 0.9, "numbers": {"sold": 9}}),
    ("b", [0.6, 0.8], {"product_id": "b", "price": 150.0, "category": "bags"}),
    ("c", [0.0, 1.0], {"product_id": "c", "price": 80.0, "category": "shoes", "rating": 0.1, "numbers": {}}),
]
COSINES = {"a": 1.0, "b": 0.6, "c": 0.0}  # to the query [1, 0]

# Every node kind: constants, the prefetch's score, payload fields (one missing on "b": its default), sum, mult,
# max, conditions over every filter kind, and each decay (with and without a target).
BUSINESS_RULES = plan.Sum(
    (
        plan.Mult((plan.Constant(0.5), plan.Variable("$score[0]"))),
        plan.Decay("exp", plan.Variable("price"), target=plan.Constant(50.0), scale=100.0, midpoint=0.5),
        plan.Decay("gauss", plan.Variable("price"), plan.Constant(0.0), scale=200.0, midpoint=0.25),
        plan.Decay("lin", plan.Variable("price"), scale=1000.0),
        plan.Mult(
            (
                plan.Constant(0.25),
                plan.Matches(
                    plan.Filter(
                        must=(plan.MatchAny("category", ("shoes",)), plan.Range("price", 0.0, 100.0)),
                        must_not=(plan.HasId(frozenset({point_id_for("c")})),),
                    )
                ),
            )
        ),
        plan.Matches(plan.Filter(must=(plan.MatchValue("category", "bags"), plan.HasVector("")))),
        plan.Max((plan.Variable("rating"), plan.Constant(0.0))),
        plan.Ln(plan.Sum((plan.Variable("numbers.sold"), plan.Constant(1.0)))),
        plan.Mult((plan.Constant(2.0), plan.Matches(plan.Filter(must=(plan.IsEmpty("numbers.sold"),))))),
    )
)
DEFAULTS = {"rating": 0.3, "numbers.sold": 4.0}
# The prefetch's threshold leaves "c" (cosine 0) out.
REQUEST = plan.Request(
    plan.Formula(BUSINESS_RULES, DEFAULTS),
    limit=10,
    prefetches=(plan.Prefetch(plan.Nearest([1.0, 0.0]), 10, score_threshold=0.1),),
)


def by_hand(product_id: str) -> float:
    """BUSINESS_RULES for one of POINTS, with Qdrant's decay functions written out."""
    payload: Mapping[str, Any] = {i: p for i, _, p in POINTS}[product_id]
    price = payload["price"]
    exp = math.exp(math.log(0.5) / 100.0 * abs(price - 50.0))
    gauss = math.exp(math.log(0.25) / 200.0**2 * price**2)
    lin = max(0.0, 1.0 - 0.5 / 1000.0 * abs(price))
    cheap_shoe = payload["category"] == "shoes" and price <= 100.0 and product_id != "c"
    bag = payload["category"] == "bags"
    rating = payload.get("rating", DEFAULTS["rating"])
    sold = payload.get("numbers", {}).get("sold")
    ln = math.log((DEFAULTS["numbers.sold"] if sold is None else sold) + 1.0)
    no_sales = 2.0 * (sold is None)
    return 0.5 * COSINES[product_id] + exp + gauss + lin + 0.25 * cheap_shoe + bag + max(rating, 0.0) + ln + no_sales


async def scores_embedded(tmp_path: Path) -> dict[str, float]:
    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=2, distance=qe.Distance.Cosine))
    shard = qe.EdgeShard.create(str(tmp_path / "shard"), config)
    try:
        shard.update(qe.UpdateOperation.upsert_points([qe.Point(point_id_for(i), v, p) for i, v, p in POINTS]))
        points = shard.query(edge_request(REQUEST))
    finally:
        shard.close()
    return {str((p.payload or {})["product_id"]): p.score for p in points}


async def scores_qdrant(tmp_path: Path) -> dict[str, float]:
    client = AsyncQdrantClient(location=":memory:")
    try:
        await client.create_collection("t", vectors_config=models.VectorParams(size=2, distance=models.Distance.COSINE))
        await client.upsert("t", [models.PointStruct(id=point_id_for(i), vector=v, payload=p) for i, v, p in POINTS])
        points = await query_points(client, "t", REQUEST)
    finally:
        await client.close()
    return {str((p.payload or {})["product_id"]): p.score for p in points}


@pytest.mark.parametrize("scores", [scores_embedded, scores_qdrant], ids=["embedded", "qdrant"])
async def test_formula_of_every_node_kind_scores_as_written_on_both_backends(scores: Any, tmp_path: Path) -> None:
    expected = {i: by_hand(i) for i, _, _ in POINTS if COSINES[i] > 0.1}
    assert await scores(tmp_path) == pytest.approx(expected, abs=1e-5)


def test_formula_of_every_node_kind_evaluates_in_python_as_written() -> None:
    for product_id, _, payload in POINTS:
        variables = {**DEFAULTS, "$score[0]": COSINES[product_id]}
        score = plan.evaluate(BUSINESS_RULES, variables, payload, point_id_for(product_id), vectors=("",))
        assert score == pytest.approx(by_hand(product_id), abs=1e-9)


def test_python_filters_follow_the_engine_rules_for_lists_and_missing_fields() -> None:
    payload = {"tags": ["a", "b"], "sizes": [38, 42], "n": {"x": 1.0}, "empty": []}
    holds: list[plan.Condition] = [
        plan.MatchAny("tags", ("b", "z")),
        plan.MatchValue("tags", "a"),
        plan.Range("sizes", 40.0, None),
        plan.Range("n.x", None, 1.0),
        plan.IsEmpty("missing"),
        plan.IsEmpty("empty"),
        plan.Filter(must_not=(plan.MatchValue("tags", "z"),)),
    ]
    fails: list[plan.Condition] = [
        plan.MatchAny("tags", ("z",)),
        plan.Range("sizes", 43.0, None),
        plan.IsEmpty("tags"),
        plan.Range("nope", 0, 1),
    ]
    for condition in holds:
        assert plan.matches(plan.Filter(must=(condition,)), payload), condition
    for condition in fails:
        assert not plan.matches(plan.Filter(must=(condition,)), payload), condition
