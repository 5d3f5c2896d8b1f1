"""Ranking rules and score explanations at the store, on both backends: boosts from numeric attributes, decays,
burials by filter, missing values, the candidates bound, explanations that add up, and the one formula
(store/ranking_formula.py) ranking alike when the engine computes it and when Python evaluates it."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from stores import open_store, unit

from imagesearch.domain import Hit, LexicalQuery, Product, SearchFilter, point_id_for
from imagesearch.ranking import Decay, RankingRule, RankingSpec, ScoreExplanation
from imagesearch.store import VectorStore
from imagesearch.store.base import Vector, product_to_payload
from imagesearch.store.plan import Variable, evaluate
from imagesearch.store.ranking_formula import rule_formula

# qdrant-client's local mode warns that it ignores payload indexes; the store creates them for real servers.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


def at_cosine(c: float) -> Vector:
    """A unit vector whose cosine similarity to unit(1) is `c`."""
    return unit(c, float(np.sqrt(1 - c * c)))


# Relevance (cosine to unit(1)) falls in catalogue order; popularity, stock and age vary independently.
CATALOGUE = [
    Product(id="a", name="red mug", category="mugs", price=10.0, numeric_attributes={"popularity": 3, "age": 40}),
    Product(id="b", name="red cup", category="mugs", price=12.0, numeric_attributes={"popularity": 900, "age": 5}),
    Product(id="c", name="blue lamp", category="lamps", price=30.0, numeric_attributes={"popularity": 50}),
    Product(id="d", name="red lamp", category="lamps", price=35.0, attributes={"refurbished": "yes"}),
    Product(id="e", name="green mug", category="mugs", price=8.0, numeric_attributes={"popularity": 5000, "age": 0}),
    Product(id="f", name="chair", category="chairs", price=90.0, numeric_attributes={"age": 400}),
]
COSINES = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7]
COSINE_OF = {p.id: c for p, c in zip(CATALOGUE, COSINES, strict=True)}


@pytest_asyncio.fixture(params=["embedded", "qdrant"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    s = await open_store(request.param, tmp_path)
    await s.upsert([(p, at_cosine(c)) for p, c in zip(CATALOGUE, COSINES, strict=True)])
    yield s
    await s.close()


def spec(*rules: RankingRule, candidates: int = 200) -> RankingSpec:
    return RankingSpec(rules, candidates)


async def ruled(store: VectorStore, ranking: RankingSpec, **kwargs: Any) -> list[Hit]:
    vector = kwargs.pop("vector", unit(1))
    return await store.search(vector, SearchFilter(), kwargs.pop("limit", 10), ranking=ranking, **kwargs)


def ids(hits: list[Hit]) -> list[str]:
    return [h.product.id for h in hits]


def popularity(p: Product, missing: float = 0.0) -> float:
    return float(p.numeric_attributes.get("popularity", missing))


async def test_boost_by_a_numeric_field_reorders_the_candidates(store: VectorStore) -> None:
    boost = RankingRule("popular", 0.1, field="popularity", transform="log1p")
    hits = await ruled(store, spec(boost))
    expected = {p.id: c + 0.1 * math.log1p(popularity(p)) for p, c in zip(CATALOGUE, COSINES, strict=True)}
    assert ids(hits) == sorted(expected, key=lambda pid: -expected[pid])
    assert {h.product.id: h.score for h in hits} == pytest.approx(expected, abs=1e-5)
    assert ids(hits)[0] == "e"  # the most popular, fifth by relevance


async def test_identity_field_with_its_missing_value(store: VectorStore) -> None:
    # Products without popularity take 10000: above every product that has it.
    rule = RankingRule("raw", 0.001, field="popularity", missing_value=10000.0)
    hits = await ruled(store, spec(rule))
    assert ids(hits)[:2] == ["d", "f"]
    assert hits[0].score == pytest.approx(0.8 + 10.0, abs=1e-4)


async def test_two_rules_on_one_field_keep_their_own_missing_values(store: VectorStore) -> None:
    first = RankingRule("low", 1.0, field="popularity", missing_value=-1.0)
    second = RankingRule("high", 0.001, field="popularity", missing_value=2000.0)
    hits = await ruled(store, spec(first, second), explain=True)
    by_id = {h.product.id: h for h in hits}
    for product, cosine in zip(CATALOGUE, COSINES, strict=True):
        hit = by_id[product.id]
        values = [r.value for r in hit.explanation.rules] if hit.explanation else []
        assert values == [popularity(product, -1.0), popularity(product, 2000.0)]
        assert hit.score == pytest.approx(cosine + popularity(product, -1.0) + 0.001 * popularity(product, 2000.0))


@pytest.mark.parametrize(
    ("transform", "curve"),
    [
        pytest.param("gauss_decay", lambda d: math.exp(math.log(0.5) * d**2 / 20.0**2), id="gauss"),
        pytest.param("exp_decay", lambda d: math.exp(math.log(0.5) * abs(d) / 20.0), id="exp"),
        pytest.param("linear_decay", lambda d: max(0.0, 1 - 0.5 * abs(d) / 20.0), id="linear"),
    ],
)
async def test_decay_favours_values_near_the_target(store: VectorStore, transform: Any, curve: Any) -> None:
    # Newness: age 0 days is best, 20 days scores half; products without an age are 1000 days old.
    rule = RankingRule("new", 1.0, field="age", transform=transform, decay=Decay(0.0, 20.0), missing_value=1000.0)
    hits = await ruled(store, spec(rule))
    ages = {p.id: float(p.numeric_attributes.get("age", 1000.0)) for p in CATALOGUE}
    expected = {p.id: c + curve(ages[p.id]) for p, c in zip(CATALOGUE, COSINES, strict=True)}
    assert {h.product.id: h.score for h in hits} == pytest.approx(expected, abs=1e-5)
    assert set(ids(hits)[:2]) == {"e", "b"}  # the newest two first


async def test_decay_around_a_target_in_the_middle(store: VectorStore) -> None:
    # A popularity near 50 is favoured.
    rule = RankingRule("about-50", 2.0, field="popularity", transform="gauss_decay", decay=Decay(50.0, 10.0, 0.2))
    hits = await ruled(store, spec(rule))
    assert ids(hits)[0] == "c"  # popularity exactly 50


async def test_bury_by_filter_multiplies_relevance(store: VectorStore) -> None:
    refurbished = SearchFilter(attributes=(("refurbished", "yes"),))
    lamps = SearchFilter(categories=("lamps",))
    halve = RankingRule("bury-refurbished", -0.5, matches=refurbished, combine="multiply")
    hits = await ruled(store, spec(halve))
    assert {h.product.id: h.score for h in hits}["d"] == pytest.approx(0.4, abs=1e-5)
    assert ids(hits)[-1] == "d"
    gone = RankingRule("no-lamps", -1.0, matches=lamps, combine="multiply")
    boost = RankingRule("mugs", 0.5, matches=SearchFilter(categories=("mugs",), price_max=10.0))
    hits = await ruled(store, spec(gone, boost))
    scores = {h.product.id: h.score for h in hits}
    assert scores["c"] == pytest.approx(0.0, abs=1e-6) and scores["d"] == pytest.approx(0.0, abs=1e-6)
    assert scores["a"] == pytest.approx(0.95 + 0.5, abs=1e-5) and scores["b"] == pytest.approx(0.9, abs=1e-5)
    assert ids(hits)[:2] == ["a", "e"]


async def test_rules_reorder_only_the_candidates_best_by_relevance(store: VectorStore) -> None:
    boost = RankingRule("popular", 1.0, field="popularity", transform="log1p")
    hits = await ruled(store, spec(boost, candidates=3))
    assert set(ids(hits)) == {"a", "b", "c"}  # "e", the most popular, is not among the 3 most relevant
    assert ids(hits) == ["b", "c", "a"]
    pages = [await ruled(store, spec(boost, candidates=5), limit=2, offset=o) for o in (0, 2, 4)]
    everything = await ruled(store, spec(boost, candidates=5))
    assert [ids(page) for page in pages] == [ids(everything)[:2], ids(everything)[2:4], ids(everything)[4:]]
    assert len(everything) == 5


async def test_score_threshold_applies_to_relevance(store: VectorStore) -> None:
    boost = RankingRule("popular", 1.0, field="popularity", transform="log1p")
    hits = await ruled(store, spec(boost), score_threshold=0.82)
    assert set(ids(hits)) == {"a", "b", "c"}  # relevance above 0.82, whatever the ruled score
    assert all(h.score > 1.0 for h in hits)


async def test_rules_with_diversity_and_collapsing_work_within_the_candidates(store: VectorStore) -> None:
    boost = RankingRule("popular", 1.0, field="popularity", transform="log1p")
    diverse = await ruled(store, spec(boost, candidates=4), diversity=0.3)
    assert set(ids(diverse)) == {"a", "b", "c", "d"}
    collapsed = await ruled(store, spec(boost, candidates=4), collapse=0.9999)
    assert ids(collapsed) == ids(await ruled(store, spec(boost, candidates=4)))  # no near copies here


async def test_explanations_add_up_to_the_score(store: VectorStore) -> None:
    rules = spec(
        RankingRule("popular", 0.1, field="popularity", transform="log1p"),
        RankingRule("new", 0.3, field="age", transform="exp_decay", decay=Decay(0.0, 30.0, 0.5), missing_value=365),
        RankingRule("bury-lamps", -0.25, matches=SearchFilter(categories=("lamps",)), combine="multiply"),
        RankingRule("cheap", 1.5, matches=SearchFilter(price_max=10.0), combine="multiply"),
    )
    hits = await ruled(store, rules, explain=True)
    plain = {h.product.id: h.score for h in await store.search(unit(1), SearchFilter(), 10)}
    formula = rule_formula(rules)
    for hit in hits:
        explanation = hit.explanation
        assert explanation is not None
        assert explanation.relevance == pytest.approx(plain[hit.product.id], abs=1e-5)
        assert explanation.similarity == pytest.approx(plain[hit.product.id], abs=1e-5)
        assert [r.name for r in explanation.rules] == ["popular", "new", "bury-lamps", "cheap"]
        assert all(
            r.weighted == pytest.approx(w.weight * r.value) for r, w in zip(explanation.rules, rules.rules, strict=True)
        )
        assert formula.score(explanation.relevance, explanation.rules) == pytest.approx(hit.score, abs=1e-5)
    cheap = next(h for h in hits if h.product.id == "e")
    assert cheap.explanation is not None and [r.value for r in cheap.explanation.rules][2:] == [0.0, 1.0]


async def test_explanation_without_rules_is_the_score_and_the_similarity(store: VectorStore) -> None:
    hits = await store.search(unit(1), SearchFilter(), 3, explain=True)
    for hit in hits:  # dense: the relevance is the similarity of the matched image
        assert hit.explanation is not None and (hit.explanation.relevance, hit.explanation.rules) == (hit.score, ())
        assert hit.explanation.similarity == pytest.approx(hit.score, abs=1e-6)
    hybrid = await store.search(unit(1), SearchFilter(), 3, lexical=LexicalQuery("red mug"), explain=True)
    for hit in hybrid:
        assert hit.explanation is not None and hit.explanation.relevance == hit.score
        assert hit.explanation.similarity == pytest.approx(COSINE_OF[hit.product.id], abs=1e-5)
    lexical = await store.search(None, SearchFilter(), 3, lexical=LexicalQuery("red mug"), explain=True)
    assert all(h.explanation == ScoreExplanation(h.score, None) for h in lexical)
    assert all(h.explanation is None for h in await store.search(unit(1), SearchFilter(), 3))


def relevance_modes() -> list[Any]:
    return [
        pytest.param({}, id="dense"),
        pytest.param({"lexical": LexicalQuery("red mug lamp")}, id="hybrid-weighted"),
        pytest.param({"lexical": LexicalQuery("red mug lamp", "rank")}, id="hybrid-rank"),
        pytest.param({"vector": None, "lexical": LexicalQuery("red mug lamp")}, id="lexical"),
    ]


@pytest.mark.parametrize("mode", relevance_modes())
async def test_python_evaluation_ranks_and_scores_as_the_engine(store: VectorStore, mode: dict[str, Any]) -> None:
    # The "one definition of the formula for both": the engine's ruled ranking and the same formula tree
    # evaluated in Python over the candidates (their relevance from a search without rules) agree, on each backend.
    rules = spec(
        RankingRule("popular", 0.05, field="popularity", transform="log1p"),
        RankingRule("new", 0.2, field="age", transform="gauss_decay", decay=Decay(10.0, 50.0, 0.3), missing_value=99),
        RankingRule("lin", 0.1, field="age", transform="linear_decay", decay=Decay(0.0, 200.0, 0.5)),
        RankingRule("mugs", 0.3, matches=SearchFilter(categories=("mugs",)), combine="multiply"),
        RankingRule("not-refurbished", -0.4, matches=SearchFilter(attributes=(("refurbished", "yes"),))),
        RankingRule("raw", 0.0001, field="popularity", missing_value=7),
        candidates=5,
    )
    vector, lexical = mode.get("vector", unit(1)), mode.get("lexical")
    relevance = await store.search(vector, SearchFilter(), rules.candidates, lexical=lexical)
    formula = rule_formula(rules).formula(Variable("$score[0]"))
    by_id = {p.id: p for p in CATALOGUE}
    python = {
        h.product.id: evaluate(
            formula.expression,
            {**formula.defaults, "$score[0]": h.score},
            product_to_payload(by_id[h.product.id]),
            point_id_for(h.product.id),
        )
        for h in relevance
    }
    engine = await store.search(vector, SearchFilter(), 10, lexical=lexical, ranking=rules)
    assert ids(engine) == sorted(python, key=lambda pid: -python[pid])
    assert {h.product.id: h.score for h in engine} == pytest.approx(python, abs=1e-5)
    explained = await store.search(vector, SearchFilter(), 10, lexical=lexical, ranking=rules, explain=True)
    assert ids(explained) == ids(engine)
    for hit in explained:
        assert hit.explanation is not None
        assert rule_formula(rules).score(hit.explanation.relevance, hit.explanation.rules) == pytest.approx(
            hit.score, abs=1e-5
        )


@pytest.mark.parametrize("mode", relevance_modes())
async def test_score_threshold_applies_to_relevance_in_every_mode(store: VectorStore, mode: dict[str, Any]) -> None:
    vector, lexical = mode.get("vector", unit(1)), mode.get("lexical")
    relevance = {h.product.id: h.score for h in await store.search(vector, SearchFilter(), 10, lexical=lexical)}
    ranked = sorted(relevance.values())
    threshold = (ranked[len(ranked) // 2] + ranked[len(ranked) // 2 - 1]) / 2  # between two scores: keeps half
    boost = RankingRule("popular", 1.0, field="popularity", transform="log1p")
    hits = await store.search(
        vector, SearchFilter(), 10, score_threshold=threshold, lexical=lexical, ranking=spec(boost)
    )
    assert set(ids(hits)) == {pid for pid, score in relevance.items() if score > threshold}


async def test_numeric_attributes_get_a_float_index_the_first_time_a_product_brings_them(tmp_path: Path) -> None:
    from imagesearch.store import EdgeStore

    store = await open_store("embedded", tmp_path)
    try:
        assert isinstance(store, EdgeStore)
        await store.upsert([(CATALOGUE[0], at_cosine(0.9))])
        await store.upsert([(Product(id="g", numeric_attributes={"stock": 2.0, "age": 1.0}), at_cosine(0.5))])
        schema = store._open_shard().info().payload_schema
        assert {field for field in schema if field.startswith("numbers.")} == {
            "numbers.popularity",
            "numbers.age",
            "numbers.stock",
        }
        assert str(schema["numbers.stock"].data_type).endswith("Float")
        # The rules read the indexed values: a boost by stock still ranks by the formula.
        hits = await ruled(store, spec(RankingRule(name="s", weight=1.0, field="stock")), vector=unit(1))
        assert [h.product.id for h in hits] == ["g", "a"]
    finally:
        await store.close()
