"""Unit tests of the request rules of several images per product, query regions, near-duplicates and ranking rules
(search/validation/), and of the default rules file (api/rules_file.py). The same rules are exercised through the
real server in tests/test_images.py and tests/test_ranking.py."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest
from test_validation_unit import product_fields, refused, violations_of

from imagesearch.api.rules_file import RulesFileError, load_ranking_rules
from imagesearch.config import Settings
from imagesearch.domain import DuplicatesRequest, Product, QueryRequest, SearchFilter
from imagesearch.images import NormalizedBox, ProductImage
from imagesearch.ranking import Decay, RankingRequest, RankingRule, RankingSpec
from imagesearch.search import validation

SETTINGS = Settings(max_images_per_product=3, max_query_regions=2)
BOX = NormalizedBox(0.1, 0.2, 0.6, 0.9)


def uploads_fields(product: Product, sent: dict[int, bytes], *, fetches_urls: bool = False) -> list[str]:
    uploads = validation.product_uploads(product, sent)
    return violations_of(lambda v: validation.check_uploads(product, uploads, 3, fetches_urls, v))


# --- product images and numeric attributes ----------------------------------------------------------------------


def test_product_images_within_the_rules_are_accepted() -> None:
    images = (ProductImage(id="front", role="packshot"), ProductImage(), ProductImage(url="https://x.test/a.jpg"))
    assert product_fields(Product(id="p", images=images, numeric_attributes={"popularity": 3.0, "stock-eu_1": 0})) == []


@pytest.mark.parametrize(
    ("image", "field"),
    [
        pytest.param(ProductImage(id="x" * 129), "product.images[1].id", id="long-id"),
        pytest.param(ProductImage(id="a\x00"), "product.images[1].id", id="control-in-id"),
        pytest.param(ProductImage(role="r" * 65), "product.images[1].role", id="long-role"),
        pytest.param(ProductImage(url="u" * 2049), "product.images[1].url", id="long-url"),
        pytest.param(ProductImage(id="front"), "product.images[1].id", id="repeated-id"),
    ],
)
def test_product_image_breaking_a_rule_is_named(image: ProductImage, field: str) -> None:
    assert product_fields(Product(id="p", images=(ProductImage(id="front"), image))) == [field]


def test_images_without_ids_may_repeat_the_empty_id() -> None:
    assert product_fields(Product(id="p", images=(ProductImage(), ProductImage()))) == []


@pytest.mark.parametrize(
    ("numbers", "field"),
    [
        pytest.param({"a.b": 1.0}, "product.numeric_attributes[a.b]", id="dot-in-key"),
        pytest.param({"": 1.0}, "product.numeric_attributes[]", id="empty-key"),
        pytest.param({"k" * 65: 1.0}, "product.numeric_attributes[" + "k" * 40 + "]", id="long-key"),
        pytest.param({"a": math.nan}, "product.numeric_attributes[a]", id="nan"),
        pytest.param({"a": math.inf}, "product.numeric_attributes[a]", id="infinite"),
        pytest.param({f"k{i}": 1.0 for i in range(33)}, "product.numeric_attributes", id="too-many"),
    ],
)
def test_numeric_attribute_breaking_a_rule_is_named(numbers: dict[str, float], field: str) -> None:
    assert product_fields(Product(id="p", numeric_attributes=numbers)) == [field]


def test_a_product_without_images_has_one_image_from_its_chunks_or_url() -> None:
    product = Product(id="p", image_url="https://x.test/a.jpg")
    [upload] = validation.product_uploads(product, {0: b"jpeg"})
    assert upload.data == b"jpeg" and upload.image == ProductImage(url="https://x.test/a.jpg")
    [fetched] = validation.product_uploads(product, {})
    assert fetched.data is None
    assert uploads_fields(product, {}, fetches_urls=True) == []
    assert uploads_fields(product, {}, fetches_urls=False) == ["image_chunk"]


def test_each_described_image_needs_bytes_or_a_url_the_server_fetches() -> None:
    product = Product(id="p", images=(ProductImage(id="a"), ProductImage(url="https://x.test/b.jpg"), ProductImage()))
    uploads = validation.product_uploads(product, {0: b"a", 2: b"c"})
    assert [u.data for u in uploads] == [b"a", None, b"c"]
    assert uploads_fields(product, {0: b"a", 2: b"c"}, fetches_urls=True) == []
    assert uploads_fields(product, {0: b"a", 2: b"c"}, fetches_urls=False) == ["product.images[1]"]
    assert uploads_fields(product, {0: b"a"}, fetches_urls=True) == ["product.images[2]"]


def test_more_images_than_the_limit_are_refused() -> None:
    product = Product(id="p", images=tuple(ProductImage() for _ in range(4)))
    assert uploads_fields(product, {i: b"x" for i in range(4)}) == ["product.images"]


# --- query regions and collapsing -----------------------------------------------------------------------------------


def search_fields(**fields: Any) -> list[str]:
    return refused(lambda: validation.search_query(QueryRequest(**fields), SETTINGS))


def test_regions_of_a_query_image_are_kept_in_order() -> None:
    other = NormalizedBox(0.0, 0.0, 1.0, 1.0)
    query = validation.search_query(QueryRequest(image=b"jpeg", regions=(BOX, other)), SETTINGS)
    assert query.regions == (BOX, other)


@pytest.mark.parametrize(
    ("box", "fields"),
    [
        pytest.param(NormalizedBox(-0.1, 0, 1, 1), ["query.regions[0].x0"], id="x0-below-0"),
        pytest.param(NormalizedBox(0, 0, 1.5, 1), ["query.regions[0].x1"], id="x1-above-1"),
        pytest.param(NormalizedBox(0, math.nan, 1, 1), ["query.regions[0].y0"], id="nan"),
        pytest.param(NormalizedBox(0.5, 0, 0.5, 1), ["query.regions[0].x1"], id="empty-width"),
        pytest.param(NormalizedBox(0, 0.7, 1, 0.2), ["query.regions[0].y1"], id="upside-down"),
    ],
)
def test_a_region_outside_the_image_or_empty_is_named(box: NormalizedBox, fields: list[str]) -> None:
    assert search_fields(image=b"jpeg", regions=(box,)) == fields


def test_regions_need_an_image_and_several_have_no_pages() -> None:
    assert search_fields(text="mug", regions=(BOX,)) == ["query.regions"]
    assert search_fields(image=b"jpeg", regions=(BOX, BOX, BOX)) == ["query.regions"]
    token_fields = search_fields(image=b"jpeg", regions=(BOX, BOX), page_token="x")
    assert token_fields[0] == "query.page_token"
    validation.search_query(QueryRequest(image_url="https://x.test/q.jpg", regions=(BOX,)), SETTINGS)


def test_collapsing_takes_the_default_threshold_or_a_cosine_in_range() -> None:
    assert validation.search_query(QueryRequest(text="mug"), SETTINGS).collapse is None
    assert validation.search_query(QueryRequest(text="mug", collapse_duplicates=True), SETTINGS).collapse == 0.94
    custom = QueryRequest(text="mug", collapse_duplicates=True, duplicate_threshold=0.9)
    assert validation.search_query(custom, SETTINGS).collapse == pytest.approx(0.9)
    assert search_fields(text="mug", duplicate_threshold=0.9) == ["query.duplicate_threshold"]
    assert search_fields(text="mug", collapse_duplicates=True, duplicate_threshold=0.0) == ["query.duplicate_threshold"]
    assert search_fields(text="mug", collapse_duplicates=True, duplicate_threshold=1.01) == [
        "query.duplicate_threshold"
    ]


def test_duplicates_request_applies_its_defaults_and_rules() -> None:
    checked, page = validation.duplicates_request(DuplicatesRequest())
    assert (checked.threshold, checked.page_size, page) == (0.94, 100, None)
    for request, field in [
        (DuplicatesRequest(threshold=0.0), "threshold"),
        (DuplicatesRequest(threshold=math.nan), "threshold"),
        (DuplicatesRequest(page_size=501), "page_size"),
        (DuplicatesRequest(page_size=-1), "page_size"),
        (DuplicatesRequest(product_id=" p"), "product_id"),
        (DuplicatesRequest(flt=SearchFilter(price_min=-1.0)), "filter.price_min"),
        (DuplicatesRequest(page_token="!"), "page_token"),
    ]:
        assert refused(functools.partial(validation.duplicates_request, request)) == [field], request


# --- ranking rules ---------------------------------------------------------------------------------------------------


def rule(**fields: Any) -> RankingRule:
    return RankingRule(**{"name": "r", "weight": 1.0, "field": "popularity", **fields})


def ranking_fields(*rules: RankingRule, candidates: int = 0) -> list[str]:
    return search_fields(text="mug", ranking=RankingRequest(rules=rules, candidates=candidates))


def test_ranking_rules_take_their_defaults() -> None:
    request = RankingRequest(rules=(rule(name=""), rule(matches=SearchFilter(categories=("mugs",)), field=None)))
    ranking = validation.search_query(QueryRequest(text="mug", ranking=request), SETTINGS).ranking
    assert ranking is not None and ranking.candidates == 200
    assert [r.name for r in ranking.rules] == ["rules[0]", "r"]


def test_empty_rules_mean_relevance_alone_even_with_a_server_default() -> None:
    default = RankingSpec(rules=(rule(),), candidates=50)
    assert validation.search_query(QueryRequest(text="mug"), SETTINGS, default).ranking == default
    empty = QueryRequest(text="mug", ranking=RankingRequest(rules=()))
    assert validation.search_query(empty, SETTINGS, default).ranking is None


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        pytest.param(rule(field=None), "query.ranking.rules[0]", id="no-signal"),
        pytest.param(rule(matches=SearchFilter()), "query.ranking.rules[0]", id="two-signals"),
        pytest.param(rule(field="a.b"), "query.ranking.rules[0].field", id="bad-key"),
        pytest.param(rule(weight=math.nan), "query.ranking.rules[0].weight", id="nan-weight"),
        pytest.param(rule(weight=1001.0), "query.ranking.rules[0].weight", id="huge-weight"),
        pytest.param(rule(missing_value=math.inf), "query.ranking.rules[0].missing_value", id="infinite-missing"),
        pytest.param(rule(transform="exp_decay"), "query.ranking.rules[0].decay", id="decay-without-params"),
        pytest.param(
            rule(transform="gauss_decay", decay=Decay(0.0, 0.0)), "query.ranking.rules[0].decay.scale", id="zero-scale"
        ),
        pytest.param(
            rule(transform="lin" + "ear_decay", decay=Decay(0.0, 1.0, 1.0)),
            "query.ranking.rules[0].decay.midpoint",
            id="midpoint-1",
        ),
        pytest.param(
            rule(transform="exp_decay", decay=Decay(math.inf, 1.0)),
            "query.ranking.rules[0].decay.target",
            id="infinite-target",
        ),
        pytest.param(rule(decay=Decay(0.0, 1.0)), "query.ranking.rules[0].decay", id="decay-without-decay-transform"),
        pytest.param(
            rule(field=None, matches=SearchFilter(), transform="log1p"),
            "query.ranking.rules[0].transform",
            id="transform-on-matches",
        ),
        pytest.param(
            rule(field=None, matches=SearchFilter(price_min=5.0, price_max=1.0)),
            "query.ranking.rules[0].matches.price_min",
            id="bad-matches-filter",
        ),
        pytest.param(rule(name="n" * 65), "query.ranking.rules[0].name", id="long-name"),
    ],
)
def test_a_bad_rule_is_named(bad: RankingRule, field: str) -> None:
    assert ranking_fields(bad) == [field]


def test_too_many_rules_or_candidates_are_refused() -> None:
    assert ranking_fields(*[rule()] * 17) == ["query.ranking.rules"]
    assert ranking_fields(rule(), candidates=1001) == ["query.ranking.candidates"]
    assert ranking_fields(rule(), candidates=-1) == ["query.ranking.candidates"]


# --- the default rules file ---------------------------------------------------------------------------------------


def test_rules_file_is_read_with_the_request_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(
        '{"rules": [{"field": "popularity", "transform": "TRANSFORM_LOG1P", "weight": 0.1},'
        ' {"name": "bury", "matches": {"categories": ["refurbished"]}, "weight": -0.5, "combine": "COMBINE_MULTIPLY"}],'
        ' "candidates": 300}'
    )
    spec = load_ranking_rules(path)
    assert spec is not None and spec.candidates == 300
    assert [(r.name, r.field, r.transform, r.combine) for r in spec.rules] == [
        ("rules[0]", "popularity", "log1p", "add"),
        ("bury", None, "identity", "multiply"),
    ]
    path.write_text('{"rules": []}')
    assert load_ranking_rules(path) is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param("{", "proto3 JSON", id="not-json"),
        pytest.param('{"rulez": []}', "proto3 JSON", id="unknown-field"),
        pytest.param('{"rules": [{"field": "x", "weight": "NaN"}]}', "ranking.rules[0].weight", id="nan"),
        pytest.param('{"rules": [{"weight": 1}]}', "ranking.rules[0]:", id="no-signal"),
    ],
)
def test_a_bad_rules_file_names_the_file_and_the_problem(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(text)
    with pytest.raises(RulesFileError) as err:
        load_ranking_rules(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_a_missing_rules_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RulesFileError, match="cannot read ranking rules file"):
        load_ranking_rules(tmp_path / "absent.json")
