"""Business rules in ranking (issue #25) through the gRPC surface, on both store backends, with the bundled model.

Every ruled ranking is checked against the formula written out here by hand (relevance * prod(1 + w * f) over
MULTIPLY rules + sum(w * f) over ADD rules), with the relevance of each product taken from the same search without
rules: so both backends are shown to rank alike, and as the contract says. The "qdrant" backend is qdrant-client's
in-process `:memory:` mode, which runs the server store's code path (formula queries included).
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from conftest import RunningServer, free_port, start_server, stop_server
from google.protobuf import json_format
from helpers import serve_process
from rpc import index_all, stream, violated_fields
from test_features import start_backend

from imagesearch.config import Settings
from imagesearch.model.encoder import ClipEncoder
from imagesearch.synthetic import make_catalogue
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import products_pb2

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
]

CATALOGUE = make_catalogue(48, seed=2468)
NOW = 1_764_547_200.0  # a fixed "now" in Unix seconds: rules take their target from the caller
DAY = 86_400.0
Rule = pb.RankingRule


def numbers(i: int) -> dict[str, float]:
    rng = random.Random(i)
    values = {"popularity": float(rng.randrange(0, 5000)), "created_at": NOW - rng.randrange(0, 120) * DAY}
    if i % 4:  # every fourth product has no stock figure at all
        values["stock"] = float(rng.randrange(0, 12))
    return values


def as_product(i: int) -> products_pb2.Product:
    item = CATALOGUE[i]
    attributes = dict(item.attributes)
    if i % 5 == 0:
        attributes["condition"] = "refurbished"
    return products_pb2.Product(
        id=item.product_id,
        name=item.name,
        category=item.category,
        price=item.price,
        attributes=attributes,
        numeric_attributes=numbers(i),
    )


PRODUCTS = {p.id: p for p in (as_product(i) for i in range(len(CATALOGUE)))}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["embedded", "qdrant"])
async def shop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, encoder: ClipEncoder
) -> AsyncIterator[RunningServer]:
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("rules"), model="synthetic-clip")
    running = await start_backend(request.param, settings, encoder)
    await index_all(running.stub, [(PRODUCTS[item.product_id], item.jpeg()) for item in CATALOGUE])
    yield running
    await stop_server(running)


async def search(running: RunningServer, **fields: Any) -> pb.SearchResponse:
    response: pb.SearchResponse = await running.stub.Search(stream(pb.SearchRequest(query=pb.SearchQuery(**fields))))
    return response


# --- the formula, by hand -----------------------------------------------------------------------------------------


def transformed(rule: pb.RankingRule, x: float) -> float:
    kind = rule.transform
    if kind in (Rule.TRANSFORM_UNSPECIFIED, Rule.TRANSFORM_IDENTITY):
        return x
    if kind == Rule.TRANSFORM_LOG1P:
        return math.log1p(max(x, 0.0))
    target, scale = rule.decay.target, rule.decay.scale
    midpoint = rule.decay.midpoint if rule.decay.HasField("midpoint") else 0.5
    distance = abs(x - target)
    if kind == Rule.TRANSFORM_LINEAR_DECAY:
        return max(0.0, 1.0 - (1.0 - midpoint) * distance / scale)
    if kind == Rule.TRANSFORM_EXP_DECAY:
        return math.exp(math.log(midpoint) * distance / scale)
    return math.exp(math.log(midpoint) * (distance / scale) ** 2)  # Gaussian


def matches(flt: pb.SearchFilter, product: products_pb2.Product) -> bool:
    return (not flt.categories or product.category in flt.categories) and all(
        product.attributes.get(k) == v for k, v in flt.attributes.items()
    )


def rule_value(rule: pb.RankingRule, product: products_pb2.Product) -> float:
    if rule.WhichOneof("signal") == "matches":
        return 1.0 if matches(rule.matches, product) else 0.0
    missing = rule.missing_value if rule.HasField("missing_value") else 0.0
    return transformed(rule, product.numeric_attributes.get(rule.field, missing))


def expected_score(relevance: float, rules: list[pb.RankingRule], product: products_pb2.Product) -> float:
    factor, added = 1.0, 0.0
    for rule in rules:
        weighted = rule.weight * rule_value(rule, product)
        if rule.combine == Rule.COMBINE_MULTIPLY:
            factor *= 1.0 + weighted
        else:
            added += weighted
    return relevance * factor + added


async def relevance(shop: RunningServer, **query: Any) -> dict[str, float]:
    """Every product's score without rules (the catalogue is smaller than top_k, so all are ranked)."""
    response = await search(shop, top_k=100, ranking=pb.RankingSpec(), **query)
    assert len(response.hits) == len(PRODUCTS)
    return {hit.product.id: hit.score for hit in response.hits}


async def check_ranked_by_hand(shop: RunningServer, rules: list[pb.RankingRule], **query: Any) -> list[pb.SearchHit]:
    plain = await relevance(shop, **query)
    ruled = (await search(shop, top_k=100, ranking=pb.RankingSpec(rules=rules), **query)).hits
    expected = {pid: expected_score(score, rules, PRODUCTS[pid]) for pid, score in plain.items()}
    assert sorted(h.product.id for h in ruled) == sorted(plain)
    for hit in ruled:
        assert hit.score == pytest.approx(expected[hit.product.id], rel=1e-4, abs=1e-5), hit.product.id
    scores = [hit.score for hit in ruled]
    assert scores == sorted(scores, reverse=True)
    # The order is the formula's (ties aside), and the rules did reorder the plain ranking.
    by_hand = sorted(expected, key=lambda pid: -expected[pid])
    assert [expected[h.product.id] for h in ruled] == pytest.approx([expected[pid] for pid in by_hand], abs=1e-5)
    assert [h.product.id for h in ruled] != sorted(plain, key=lambda pid: -plain[pid])
    return list(ruled)


POPULAR = Rule(name="popular", field="popularity", transform=Rule.TRANSFORM_LOG1P, weight=0.05)
NEW = Rule(
    name="new",
    field="created_at",
    transform=Rule.TRANSFORM_GAUSS_DECAY,
    decay=Rule.Decay(target=NOW, scale=30 * DAY),
    weight=1.0,
    combine=Rule.COMBINE_MULTIPLY,
)
IN_STOCK = Rule(
    name="stock",
    field="stock",
    transform=Rule.TRANSFORM_EXP_DECAY,
    decay=Rule.Decay(target=20, scale=10, midpoint=0.3),
    weight=0.2,
    missing_value=-50.0,
)
BURY_REFURBISHED = Rule(
    name="refurbished",
    matches=pb.SearchFilter(attributes={"condition": "refurbished"}),
    weight=-0.9,
    combine=Rule.COMBINE_MULTIPLY,
)


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param([POPULAR], id="add-log1p"),
        pytest.param([NEW], id="multiply-gauss-decay"),
        pytest.param([IN_STOCK], id="add-exp-decay-missing"),
        pytest.param([BURY_REFURBISHED], id="bury-by-filter"),
        pytest.param([POPULAR, NEW, IN_STOCK, BURY_REFURBISHED], id="all-together"),
        pytest.param(
            [Rule(field="popularity", weight=0.0001), Rule(matches=pb.SearchFilter(categories=["mug"]), weight=0.3)],
            id="identity-and-boost-by-category",
        ),
        pytest.param(
            [
                Rule(
                    field="created_at",
                    transform=Rule.TRANSFORM_LINEAR_DECAY,
                    decay=Rule.Decay(target=NOW, scale=60 * DAY, midpoint=0.25),
                    weight=0.5,
                )
            ],
            id="linear-decay",
        ),
    ],
)
async def test_rules_rank_as_the_formula_says_on_both_backends(
    shop: RunningServer, rules: list[pb.RankingRule]
) -> None:
    await check_ranked_by_hand(shop, rules, text="red mug", mode=pb.SEARCH_MODE_DENSE)


async def test_rules_apply_on_top_of_a_hybrid_ranking(shop: RunningServer) -> None:
    await check_ranked_by_hand(shop, [POPULAR, BURY_REFURBISHED], text="striped bag", mode=pb.SEARCH_MODE_HYBRID)


async def test_buried_products_sink_below_the_others(shop: RunningServer) -> None:
    hits = await check_ranked_by_hand(shop, [Rule(matches=BURY_REFURBISHED.matches, weight=-1000.0)], text="hat")
    refurbished = [PRODUCTS[h.product.id].attributes.get("condition") == "refurbished" for h in hits]
    assert refurbished == sorted(refurbished)  # every refurbished product after every other


async def test_explanations_add_up_to_the_score(shop: RunningServer) -> None:
    rules = [POPULAR, NEW, BURY_REFURBISHED]
    plain = await relevance(shop, text="blue shoe", mode=pb.SEARCH_MODE_DENSE)
    response = await search(
        shop,
        text="blue shoe",
        mode=pb.SEARCH_MODE_DENSE,
        top_k=10,
        ranking=pb.RankingSpec(rules=rules),
        explain_scores=True,
    )
    for hit in response.hits:
        explained = hit.explanation
        assert explained.relevance == pytest.approx(plain[hit.product.id], abs=1e-5)
        assert explained.HasField("similarity") and explained.similarity == pytest.approx(explained.relevance, abs=1e-5)
        assert [r.name for r in explained.rules] == ["popular", "new", "refurbished"]
        for rule, part in zip(rules, explained.rules, strict=True):
            assert part.value == pytest.approx(rule_value(rule, PRODUCTS[hit.product.id]), rel=1e-6, abs=1e-9)
            assert part.weighted == pytest.approx(rule.weight * part.value, rel=1e-6, abs=1e-9)
        factor = (1 + explained.rules[1].weighted) * (1 + explained.rules[2].weighted)
        assert hit.score == pytest.approx(explained.relevance * factor + explained.rules[0].weighted, abs=1e-5)
    unexplained = await search(
        shop, text="blue shoe", mode=pb.SEARCH_MODE_DENSE, top_k=10, ranking=pb.RankingSpec(rules=rules)
    )
    assert [h.product.id for h in unexplained.hits] == [h.product.id for h in response.hits]
    assert not any(h.HasField("explanation") for h in unexplained.hits)


async def test_rules_reorder_only_the_candidates(shop: RunningServer) -> None:
    plain = await relevance(shop, text="green lamp", mode=pb.SEARCH_MODE_DENSE)
    best5 = sorted(plain, key=lambda pid: -plain[pid])[:5]
    spec = pb.RankingSpec(rules=[Rule(field="popularity", weight=1.0)], candidates=5)
    first = await search(shop, text="green lamp", mode=pb.SEARCH_MODE_DENSE, page_size=3, ranking=spec)
    second = await search(
        shop, text="green lamp", mode=pb.SEARCH_MODE_DENSE, page_size=3, ranking=spec, page_token=first.next_page_token
    )
    assert second.next_page_token == ""
    assert sorted(h.product.id for h in [*first.hits, *second.hits]) == sorted(best5)


async def test_rules_are_part_of_the_cache_key_and_the_page_token(shop: RunningServer) -> None:
    popular = pb.RankingSpec(rules=[POPULAR])
    first = await search(shop, text="yellow bottle", page_size=4, ranking=popular)
    again = await search(shop, text="yellow bottle", page_size=4, ranking=popular)
    assert again.result_cache == pb.CACHE_OUTCOME_HIT
    other = await search(shop, text="yellow bottle", page_size=4, ranking=pb.RankingSpec(rules=[NEW]))
    assert other.result_cache == pb.CACHE_OUTCOME_MISS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search(
            shop,
            text="yellow bottle",
            page_size=4,
            ranking=pb.RankingSpec(rules=[NEW]),
            page_token=first.next_page_token,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err.value) == ["query.page_token"]


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        pytest.param(Rule(field="popularty", weight=1.0), "query.ranking.rules[0].field", id="unknown-field"),
        pytest.param(Rule(field="popularity", weight=math.nan), "query.ranking.rules[0].weight", id="nan-weight"),
        pytest.param(
            Rule(field="created_at", transform=Rule.TRANSFORM_EXP_DECAY, weight=1.0),
            "query.ranking.rules[0].decay",
            id="decay-without-scale",
        ),
        pytest.param(
            Rule(field="created_at", transform=Rule.TRANSFORM_EXP_DECAY, decay=Rule.Decay(target=NOW), weight=1.0),
            "query.ranking.rules[0].decay.scale",
            id="decay-scale-zero",
        ),
        pytest.param(Rule(weight=1.0), "query.ranking.rules[0]", id="no-signal"),
        pytest.param(
            Rule(field="popularity", weight=1.0, transform=99),  # type: ignore[arg-type]  # a newer client's value
            "query.ranking.rules[0].transform",
            id="unknown-enum",
        ),
    ],
)
async def test_a_bad_rule_is_invalid_argument_naming_the_field(
    shop: RunningServer, rule: pb.RankingRule, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await search(shop, text="mug", ranking=pb.RankingSpec(rules=[rule]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(err.value) == [field]
    if rule.WhichOneof("signal") == "field" and rule.field == "popularty":
        assert "popularity" in (err.value.details() or "")  # the message lists the catalogue's numeric attributes


async def test_numeric_attributes_are_stored_and_returned(shop: RunningServer) -> None:
    product_id = CATALOGUE[3].product_id
    stored = (await shop.stub.GetProduct(pb.GetProductRequest(id=product_id))).product
    assert dict(stored.numeric_attributes) == dict(PRODUCTS[product_id].numeric_attributes)


# --- the server's default rules ---------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def ruled_server(tmp_path: Path, encoder: ClipEncoder) -> AsyncIterator[RunningServer]:
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json_format.MessageToJson(pb.RankingSpec(rules=[POPULAR, BURY_REFURBISHED])))
    settings = Settings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "data", model="synthetic-clip", ranking_rules_file=rules_file
    )
    running = await start_server(settings, encoder)
    await index_all(running.stub, [(PRODUCTS[item.product_id], item.jpeg()) for item in CATALOGUE])
    yield running
    await stop_server(running)


async def test_the_server_default_rules_apply_unless_a_search_sends_its_own(ruled_server: RunningServer) -> None:
    def order(response: pb.SearchResponse) -> list[str]:
        return [h.product.id for h in response.hits]

    defaulted = await search(ruled_server, text="red hat", top_k=20)
    explicit = await search(
        ruled_server, text="red hat", top_k=20, ranking=pb.RankingSpec(rules=[POPULAR, BURY_REFURBISHED])
    )
    plain = await search(ruled_server, text="red hat", top_k=20, ranking=pb.RankingSpec())
    assert order(defaulted) == order(explicit) != order(plain)
    assert [h.score for h in defaulted.hits] == pytest.approx([h.score for h in explicit.hits])


async def test_a_bad_default_rules_file_stops_the_start(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.json"
    rules_file.write_text('{"rules": [{"field": "popularity", "weight": "Infinity"}]}')
    process = serve_process(tmp_path, free_port(), IMAGESEARCH_RANKING_RULES_FILE=str(rules_file))
    try:
        _, logs = process.communicate(timeout=120)
        assert process.returncode == 3
        assert b"startup failed" in logs and b"ranking.rules[0].weight" in logs and str(rules_file).encode() in logs
    finally:
        process.kill()
        process.communicate()
