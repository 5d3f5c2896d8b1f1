"""The request rules and their defaults (search/validation.py) without a server: every limit at and past its
edge, every field a violation names, every default. Fast; part of the mutation-testing selection
(tools/mutation.sh). The gRPC tests (test_service.py, test_features.py) show the same rules reach callers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest

from imagesearch.config import Settings
from imagesearch.domain import FacetSpec, ListPage, ListRequest, Product, QueryRequest, SearchFilter, SearchPage
from imagesearch.errors import InvalidArgument
from imagesearch.search import validation
from imagesearch.search.paging import encode_list_page, encode_search_page
from imagesearch.search.validation import (
    DEFAULT_FACET_VALUES,
    DEFAULT_TEXT_WEIGHT,
    LIST_DEFAULT_PAGE_SIZE,
    LIST_MAX_PAGE_SIZE,
    Violations,
)

SETTINGS = Settings(max_text_chars=20, default_top_k=7, max_top_k=30)
CURSOR = "0b5f4a8e-2c1d-4e3f-9a8b-7c6d5e4f3a2b"


def violations_of(check: Callable[[Violations], object]) -> list[str]:
    """The fields a check names, in order. Each description continues "<field>: ", so it is lower-case prose."""
    v = Violations()
    check(v)
    for item in v.items:
        assert isinstance(item.description, str) and item.description[:1].islower(), item
    return [item.field for item in v.items]


def refused(call: Callable[[], object]) -> list[str]:
    with pytest.raises(InvalidArgument) as err:
        call()
    for item in err.value.violations:
        assert isinstance(item.description, str) and item.description[:1].islower(), item
    return [item.field for item in err.value.violations]


def product_fields(product: Product, prefix: str | None = None) -> list[str]:
    if prefix is None:  # the default: the fields of IndexProduct's product
        return violations_of(lambda v: validation.check_product(product, v))
    return violations_of(lambda v: validation.check_product(product, v, prefix))


def query(**fields: Any) -> QueryRequest:
    return QueryRequest(**{"text": "mug", **fields})


def search_fields(**fields: Any) -> list[str]:
    return refused(lambda: validation.search_query(query(**fields), SETTINGS))


# --- product ids -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "product_id",
    [
        pytest.param("a", id="one-char"),
        pytest.param("x" * 256, id="256-bytes"),
        pytest.param("\u00e9" * 128, id="256-bytes-of-2-byte-chars"),
        pytest.param("sku \u00fc/\u00df 1", id="inner-space-and-unicode"),
        pytest.param("a\u00a0b", id="no-break-space-inside"),
    ],
)
def test_product_id_within_the_rules_is_accepted(product_id: str) -> None:
    assert violations_of(lambda v: validation.check_product_id(product_id, "f", v)) == []
    validation.check_id(product_id)


@pytest.mark.parametrize(
    ("product_id", "count"),
    [
        pytest.param("", 1, id="empty"),
        pytest.param("x" * 257, 1, id="257-bytes"),
        pytest.param("\u00e9" * 129, 1, id="258-bytes-in-129-chars"),
        pytest.param("a\x00b", 1, id="nul"),
        pytest.param("a\nb", 1, id="newline"),
        pytest.param("a\x7fb", 1, id="delete"),
        pytest.param(" a", 1, id="leading-space"),
        pytest.param("a ", 1, id="trailing-space"),
        pytest.param("\ta", 2, id="leading-tab-is-both"),
        pytest.param("\x01" * 300, 2, id="long-and-control"),
    ],
)
def test_product_id_breaking_a_rule_is_refused_once_per_rule(product_id: str, count: int) -> None:
    assert violations_of(lambda v: validation.check_product_id(product_id, "f", v)) == ["f"] * count
    assert refused(lambda: validation.check_id(product_id)) == ["id"] * count
    assert refused(lambda: validation.check_id(product_id, "other")) == ["other"] * count


# --- products --------------------------------------------------------------------------------------------------


def test_product_at_every_limit_is_accepted() -> None:
    product = Product(
        id="p",
        name="n" * 1024,
        description="d" * 8190 + "\r\n",
        category="c" * 256,
        image_url="u" * 2048,
        price=0.0,
        currency="EUR",
        attributes={f"k{i:0>126}": "v" * 256 for i in range(64)},
    )
    assert product_fields(product) == []
    assert product_fields(Product(id="p", currency="")) == []  # no currency: the price has none
    assert product_fields(Product(id="p", price=-0.0)) == []


def test_product_past_every_limit_names_every_field_under_its_prefix() -> None:
    product = Product(
        id="",
        name="n" * 1025,
        description="d" * 8193,
        category="c" * 257,
        image_url="u" * 2049,
        price=-0.01,
        currency="euro",
        attributes={"a=b": "c"},
    )
    expected = ["id", "name", "description", "category", "image_url", "price", "currency", "attributes[a=b]"]
    assert product_fields(product) == [f"product.{f}" for f in expected]
    assert product_fields(product, "products[3]") == [f"products[3].{f}" for f in expected]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"name": "a\nb"}, "product.name", id="newline-in-name"),
        pytest.param({"name": "a\tb"}, "product.name", id="tab-in-name"),
        pytest.param({"category": "a\rb"}, "product.category", id="return-in-category"),
        pytest.param({"image_url": "a\x00b"}, "product.image_url", id="nul-in-url"),
        pytest.param({"description": "a\x0bb"}, "product.description", id="vertical-tab-in-description"),
        pytest.param({"description": "a\x00b"}, "product.description", id="nul-in-description"),
        pytest.param({"price": math.nan}, "product.price", id="price-nan"),
        pytest.param({"price": math.inf}, "product.price", id="price-inf"),
        pytest.param({"price": -1.0}, "product.price", id="price-negative"),
        pytest.param({"currency": "eur"}, "product.currency", id="currency-lower"),
        pytest.param({"currency": "EU"}, "product.currency", id="currency-short"),
        pytest.param({"currency": "EURO"}, "product.currency", id="currency-long"),
        pytest.param({"currency": "E1R"}, "product.currency", id="currency-digit"),
    ],
)
def test_product_field_breaking_a_rule_is_refused(changes: dict[str, Any], field: str) -> None:
    assert product_fields(Product(id="p", **changes)) == [field]


def test_description_may_hold_newlines_returns_and_tabs() -> None:
    assert product_fields(Product(id="p", description="line one\r\n\tline two\n")) == []


# --- attributes -------------------------------------------------------------------------------------------------


def attribute_fields(attributes: dict[str, str], field: str = "attrs") -> list[str]:
    return violations_of(lambda v: validation.check_attributes(attributes, field, v))


def test_too_many_attributes_are_refused_as_a_whole() -> None:
    assert attribute_fields({f"k{i}": "v" for i in range(64)}) == []
    # One violation for the map; its entries are not checked one by one.
    assert attribute_fields({f"k={i}": "\x00" for i in range(65)}) == ["attrs"]


@pytest.mark.parametrize(
    ("key", "value", "count"),
    [
        pytest.param("", "v", 1, id="empty-key"),
        pytest.param("k" * 129, "v", 1, id="long-key"),
        pytest.param("a=b", "v", 1, id="equals-in-key"),
        pytest.param("a\x00", "v", 1, id="control-in-key"),
        pytest.param("k", "a\x00", 1, id="control-in-value"),
        pytest.param("k", "v" * 257, 1, id="long-value"),
        pytest.param("=\x00", "\x00" + "v" * 300, 4, id="everything"),
    ],
)
def test_attribute_breaking_a_rule_is_named_by_its_key(key: str, value: str, count: int) -> None:
    assert attribute_fields({key: value}) == [f"attrs[{key[:40]}]"] * count


def test_attribute_field_names_at_most_40_characters_of_the_key() -> None:
    key = "=" + "k" * 60
    assert attribute_fields({key: "v"}) == [f"attrs[{key[:40]}]"]


def test_attribute_keys_and_values_at_their_limits_are_accepted() -> None:
    assert attribute_fields({"k" * 128: "v" * 256, "x": ""}) == []


# --- example ids, facets ----------------------------------------------------------------------------------------


def test_example_ids_are_checked_one_by_one_and_deduplicated_in_order() -> None:
    kept: list[tuple[str, ...]] = []
    fields = violations_of(lambda v: kept.append(validation.check_example_ids(["b", "a", "b", " c"], "ids", v)))
    assert fields == ["ids[3]"]
    assert kept == [("b", "a", " c")]


def test_too_many_example_ids_are_refused_as_a_whole() -> None:
    sixteen = [f"p{i}" for i in range(16)]
    kept: list[tuple[str, ...]] = []
    assert violations_of(lambda v: kept.append(validation.check_example_ids(sixteen, "ids", v))) == []
    assert kept == [tuple(sixteen)]
    assert violations_of(lambda v: kept.append(validation.check_example_ids([*sixteen, ""], "ids", v))) == ["ids"]
    assert kept[-1] == ()


def facet(keys: list[str], max_values: int) -> tuple[list[str], tuple[tuple[str, ...], int]]:
    result: list[tuple[tuple[str, ...], int]] = []
    fields = violations_of(lambda v: result.append(validation.check_facet_spec(keys, max_values, "fs", v)))
    return fields, result[0]


def test_search_query_keeps_the_facet_values_asked_for() -> None:
    validated = validation.search_query(query(facets=FacetSpec(attribute_keys=("colour",), max_values=5)), SETTINGS)
    assert validated.facets == FacetSpec(attribute_keys=("colour",), max_values=5)


def test_facet_spec_defaults_and_deduplicates() -> None:
    assert facet(["b", "a", "b"], 0) == ([], (("b", "a"), DEFAULT_FACET_VALUES))
    assert facet(["a"], 1) == ([], (("a",), 1))
    assert facet([f"k{i}" for i in range(16)], 100)[0] == []


def test_facet_spec_past_its_limits_is_refused() -> None:
    assert facet(["a"], 101)[0] == ["fs.max_values"]
    assert facet(["a"], -1)[0] == ["fs.max_values"]
    assert facet(["", "a=b"], 5)[0] == ["fs.attribute_keys[0]", "fs.attribute_keys[1]"]
    # Too many keys: one violation, and only the first 16 are checked one by one.
    assert facet([f"k{i}" for i in range(16)] + [""], 5)[0] == ["fs.attribute_keys"]
    assert facet([""] + [f"k{i}" for i in range(16)], 5)[0] == ["fs.attribute_keys", "fs.attribute_keys[0]"]


# --- filters ----------------------------------------------------------------------------------------------------


def filter_fields(flt: SearchFilter, prefix: str = "flt") -> list[str]:
    return violations_of(lambda v: validation.check_filter(flt, v, prefix))


def test_filter_within_the_rules_is_accepted() -> None:
    assert filter_fields(SearchFilter()) == []
    assert filter_fields(SearchFilter(categories=("c" * 256,) * 100, attributes=(("k", "v"),))) == []
    assert filter_fields(SearchFilter(price_min=0.0, price_max=0.0)) == []  # bounds are inclusive
    assert filter_fields(SearchFilter(price_min=3.0)) == []
    assert filter_fields(SearchFilter(price_max=3.0)) == []


@pytest.mark.parametrize(
    ("flt", "fields"),
    [
        pytest.param(SearchFilter(categories=("c",) * 101), ["flt.categories"], id="too-many-categories"),
        pytest.param(SearchFilter(categories=("ok", "c" * 257)), ["flt.categories[1]"], id="long-category"),
        pytest.param(SearchFilter(categories=("a\x00",)), ["flt.categories[0]"], id="control-in-category"),
        pytest.param(
            SearchFilter(categories=("c",) * 100 + ("\x00",)), ["flt.categories"], id="only-first-100-checked"
        ),
        pytest.param(SearchFilter(price_min=-1.0), ["flt.price_min"], id="negative-min"),
        pytest.param(SearchFilter(price_max=-1.0), ["flt.price_max"], id="negative-max"),
        pytest.param(SearchFilter(price_min=math.nan), ["flt.price_min"], id="nan-min"),
        pytest.param(SearchFilter(price_max=math.inf), ["flt.price_max"], id="inf-max"),
        pytest.param(SearchFilter(price_min=5.0, price_max=4.0), ["flt.price_min"], id="min-above-max"),
        # An unusable bound is reported once, not compared as well.
        pytest.param(SearchFilter(price_min=math.inf, price_max=5.0), ["flt.price_min"], id="inf-min-above-max"),
        pytest.param(SearchFilter(price_min=1.0, price_max=-math.inf), ["flt.price_max"], id="max-minus-inf"),
        pytest.param(SearchFilter(attributes=(("a=b", "v"),)), ["flt.attributes[a=b]"], id="bad-attribute"),
    ],
)
def test_filter_breaking_a_rule_names_the_field(flt: SearchFilter, fields: list[str]) -> None:
    assert filter_fields(flt) == fields


def test_filter_fields_default_to_the_query_prefix() -> None:
    assert violations_of(lambda v: validation.check_filter(SearchFilter(price_min=-1.0), v)) == [
        "query.filter.price_min"
    ]


# --- query text, image source ------------------------------------------------------------------------------------


def normalised(text: str, max_chars: int = 20) -> tuple[str, list[str]]:
    result: list[str] = []
    fields = violations_of(lambda v: result.append(validation.normalise_query_text(text, "t", max_chars, v)))
    return result[0], fields


def test_query_text_is_nfc_with_whitespace_runs_collapsed_and_trimmed() -> None:
    assert normalised("  a \t\n\r b  ") == ("a b", [])
    assert normalised("cafe\u0301") == ("caf\u00e9", [])
    assert normalised("x" * 20) == ("x" * 20, [])


def test_query_text_too_long_or_with_control_characters_is_refused() -> None:
    assert normalised("x" * 21) == ("", ["t"])
    assert normalised("a\x00b") == ("a\x00b", ["t"])


def image_source_fields(image: bytes | None, image_url: str, fetches_urls: bool) -> list[str]:
    product = Product(id="p", image_url=image_url)
    return violations_of(lambda v: validation.check_image_source(image, product, fetches_urls, v))


def test_product_image_comes_as_chunks_or_from_its_url_when_this_server_fetches() -> None:
    assert image_source_fields(b"", "", fetches_urls=False) == []
    assert image_source_fields(b"jpeg", "https://x.test/a.jpg", fetches_urls=True) == []
    assert image_source_fields(None, "https://x.test/a.jpg", fetches_urls=True) == []
    assert image_source_fields(None, "https://x.test/a.jpg", fetches_urls=False) == ["image_chunk"]
    assert image_source_fields(None, "", fetches_urls=True) == ["image_chunk"]


def test_missing_image_mentions_image_url_only_where_the_server_fetches() -> None:
    def description(fetches_urls: bool) -> str:
        v = Violations()
        validation.check_image_source(None, Product(id="p"), fetches_urls, v)
        return v.items[0].description

    assert "product.image_url" in description(fetches_urls=True)
    assert "product.image_url" not in description(fetches_urls=False)


# --- search queries ----------------------------------------------------------------------------------------------


def test_search_query_applies_the_defaults() -> None:
    validated = validation.search_query(QueryRequest(text="  a  mug "), SETTINGS)
    assert validated.text == "a mug"
    assert validated.top_k == SETTINGS.default_top_k
    assert validated.text_weight == DEFAULT_TEXT_WEIGHT == 0.5
    assert (validated.score_threshold, validated.diversity, validated.page) == (None, None, None)
    assert validated.facets == FacetSpec()
    assert (validated.like_ids, validated.unlike_ids, validated.include_liked, validated.group_by) == (
        (),
        (),
        False,
        "",
    )
    assert (validated.image, validated.image_url, validated.flt) == (None, "", SearchFilter())


def test_search_query_keeps_every_field_it_was_given() -> None:
    token = encode_search_page(SearchPage("d", "s1", 14))
    request = QueryRequest(
        text="mug",
        image=b"jpeg",
        flt=SearchFilter(categories=("mugs",)),
        top_k=12,
        score_threshold=-1.0,
        text_weight=0.0,  # an explicit 0 is not "unset"
        like_ids=("a", "a", "b"),
        unlike_ids=("c",),
        include_liked=True,
        group_by="family",
        diversity=1.0,
        facets=FacetSpec(categories=True, attribute_keys=("colour", "colour"), max_values=0),
        page_token=token,
    )
    validated = validation.search_query(request, SETTINGS)
    assert (validated.image, validated.flt, validated.top_k) == (b"jpeg", SearchFilter(categories=("mugs",)), 12)
    assert (validated.score_threshold, validated.text_weight, validated.diversity) == (-1.0, 0.0, 1.0)
    assert (validated.like_ids, validated.unlike_ids, validated.include_liked) == (("a", "b"), ("c",), True)
    assert validated.group_by == "family"
    assert validated.facets == FacetSpec(categories=True, attribute_keys=("colour",), max_values=DEFAULT_FACET_VALUES)
    assert validated.page == SearchPage("d", "s1", 14)


def test_search_query_image_url_alone_is_enough() -> None:
    validated = validation.search_query(QueryRequest(image_url="https://x.test/a.jpg"), SETTINGS)
    assert (validated.image_url, validated.image, validated.text) == ("https://x.test/a.jpg", None, "")


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"text": "mug"}, id="text"),
        pytest.param({"image": b""}, id="empty-image-is-an-image"),
        pytest.param({"image_url": "https://x.test/a.jpg"}, id="image-url"),
        pytest.param({"like_ids": ("a",)}, id="liked-products"),
        pytest.param({"like_ids": ("a",), "unlike_ids": ("b",)}, id="liked-and-unliked"),
    ],
)
def test_search_needs_something_to_search_by(fields: dict[str, Any]) -> None:
    validation.search_query(QueryRequest(**fields), SETTINGS)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"text": " \t\n "}, id="only-whitespace"),
        pytest.param({"unlike_ids": ("b",)}, id="only-unliked"),
    ],
)
def test_search_with_nothing_to_search_by_is_refused(fields: dict[str, Any]) -> None:
    assert refused(lambda: validation.search_query(QueryRequest(**fields), SETTINGS)) == ["query.text"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"text": "x" * 21}, ["query.text", "query.text"], id="text-too-long-so-nothing-to-search"),
        pytest.param({"image": b"j", "image_url": "https://x.test/a.jpg"}, ["query.image_url"], id="image-twice"),
        pytest.param({"top_k": 31}, ["query.top_k"], id="top-k-above-max"),
        pytest.param({"top_k": -1}, ["query.top_k"], id="top-k-negative"),
        pytest.param({"page_size": 31}, ["query.page_size"], id="page-size-above-max"),
        pytest.param({"page_size": -1}, ["query.page_size"], id="page-size-negative"),
        pytest.param({"score_threshold": 1.01}, ["query.score_threshold"], id="threshold-above-1"),
        pytest.param({"score_threshold": -1.01}, ["query.score_threshold"], id="threshold-below-minus-1"),
        pytest.param({"score_threshold": math.nan}, ["query.score_threshold"], id="threshold-nan"),
        pytest.param({"text_weight": 1.01}, ["query.text_weight"], id="weight-above-1"),
        pytest.param({"text_weight": -0.01}, ["query.text_weight"], id="weight-negative"),
        pytest.param({"text_weight": math.nan}, ["query.text_weight"], id="weight-nan"),
        pytest.param({"diversity": 1.01}, ["query.diversity"], id="diversity-above-1"),
        pytest.param({"diversity": -0.01}, ["query.diversity"], id="diversity-negative"),
        pytest.param({"diversity": math.nan}, ["query.diversity"], id="diversity-nan"),
        pytest.param({"group_by": "a=b"}, ["query.group_by"], id="group-by"),
        pytest.param({"flt": SearchFilter(price_min=-1.0)}, ["query.filter.price_min"], id="filter"),
        pytest.param(
            {"facets": FacetSpec(attribute_keys=("",), max_values=101)},
            ["query.facet_spec.attribute_keys[0]", "query.facet_spec.max_values"],
            id="facets",
        ),
        pytest.param({"page_token": "WzFd"}, ["query.page_token"], id="token-not-an-object"),
        pytest.param({"like_ids": ("a", " b")}, ["query.like_product_ids[1]"], id="bad-like-id"),
        pytest.param({"unlike_ids": ("",)}, ["query.unlike_product_ids[0]"], id="bad-unlike-id"),
        pytest.param(
            {"like_ids": ("a", "b"), "unlike_ids": ("c", "b")}, ["query.unlike_product_ids[1]"], id="liked-and-unliked"
        ),
    ],
)
def test_search_field_breaking_a_rule_is_named(fields: dict[str, Any], expected: list[str]) -> None:
    assert search_fields(**fields) == expected


@pytest.mark.parametrize(
    ("fields", "top_k"),
    [
        pytest.param({"top_k": 1}, 1, id="top-k-1"),
        pytest.param({"top_k": 30}, 30, id="top-k-max"),
        pytest.param({"page_size": 1}, 1, id="page-size-1"),
        pytest.param({"page_size": 30}, 30, id="page-size-max"),
        pytest.param({"page_size": 4, "top_k": 99}, 4, id="page-size-wins-over-top-k"),
        pytest.param({"page_size": 0, "top_k": 5}, 5, id="page-size-0-means-top-k"),
    ],
)
def test_search_page_size_is_page_size_else_top_k_else_the_default(fields: dict[str, Any], top_k: int) -> None:
    assert validation.search_query(query(**fields), SETTINGS).top_k == top_k


@pytest.mark.parametrize("bound", [-1.0, 0.0, 1.0])
def test_search_bounds_of_threshold_weight_and_diversity_are_inclusive(bound: float) -> None:
    validated = validation.search_query(query(score_threshold=bound), SETTINGS)
    assert validated.score_threshold == bound
    if bound >= 0:
        validated = validation.search_query(query(text_weight=bound, diversity=bound), SETTINGS)
        assert validated.text_weight == bound
        assert validated.diversity == (bound or None)  # diversity 0 is plain ranking


def test_search_lists_every_bad_field_in_one_error() -> None:
    fields = search_fields(top_k=-1, score_threshold=2.0, text_weight=2.0, diversity=2.0, page_token="garbage")
    assert fields == [
        "query.top_k",
        "query.score_threshold",
        "query.text_weight",
        "query.diversity",
        "query.page_token",
    ]


def test_search_text_limit_comes_from_the_settings() -> None:
    wider = dataclasses.replace(SETTINGS, max_text_chars=25)
    assert validation.search_query(query(text="x" * 25), wider).text == "x" * 25
    assert refused(lambda: validation.search_query(query(text="x" * 26), wider))[0] == "query.text"


# --- listings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("page_size", "expected"),
    [
        pytest.param(0, LIST_DEFAULT_PAGE_SIZE, id="default"),
        pytest.param(1, 1, id="one"),
        pytest.param(LIST_MAX_PAGE_SIZE, LIST_MAX_PAGE_SIZE, id="max"),
        pytest.param(LIST_MAX_PAGE_SIZE + 1, LIST_MAX_PAGE_SIZE, id="coerced"),
    ],
)
def test_list_page_size_defaults_and_is_coerced(page_size: int, expected: int) -> None:
    assert validation.list_request(ListRequest(page_size=page_size)) == (SearchFilter(), expected, None)
    assert (LIST_DEFAULT_PAGE_SIZE, LIST_MAX_PAGE_SIZE) == (50, 1000)


def test_list_request_keeps_its_filter_and_decodes_its_token() -> None:
    flt = SearchFilter(categories=("mugs",))
    token = encode_list_page(ListPage("f", CURSOR))
    assert validation.list_request(ListRequest(flt=flt, page_size=3, page_token=token)) == (
        flt,
        3,
        ListPage("f", CURSOR),
    )


def test_list_request_breaking_rules_names_every_field() -> None:
    request = ListRequest(flt=SearchFilter(price_max=-1.0), page_size=-1, page_token="garbage")
    assert refused(lambda: validation.list_request(request)) == ["filter.price_max", "page_size", "page_token"]


# --- search modes (dense, hybrid, lexical) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "mode"),
    [
        pytest.param({"text": "mug"}, "hybrid", id="text-alone-is-hybrid"),
        pytest.param({"text": "mug", "score_threshold": 0.2}, "dense", id="text-with-a-cosine-threshold"),
        pytest.param({"text": "mug", "image": b"j"}, "dense", id="text-and-image"),
        pytest.param({"text": "mug", "image_url": "https://x.test/a.jpg"}, "dense", id="text-and-image-url"),
        pytest.param({"text": "mug", "like_ids": ("a",)}, "dense", id="text-and-liked"),
        pytest.param({"text": "mug", "unlike_ids": ("a",)}, "dense", id="text-and-unliked"),
        pytest.param({"image": b"j"}, "dense", id="image-alone"),
        pytest.param({"text": "mug", "mode": "dense"}, "dense", id="asked-dense"),
        pytest.param({"image": b"j", "mode": "dense"}, "dense", id="asked-dense-without-text"),
        pytest.param({"text": "mug", "image": b"j", "mode": "hybrid"}, "hybrid", id="asked-hybrid"),
        pytest.param({"text": "mug", "mode": "lexical"}, "lexical", id="asked-lexical"),
    ],
)
def test_search_mode_defaults_to_hybrid_for_text_alone(fields: dict[str, Any], mode: str) -> None:
    assert validation.search_query(QueryRequest(**fields), SETTINGS).mode == mode


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"image": b"j", "mode": "hybrid"}, id="hybrid-without-text"),
        pytest.param({"image": b"j", "mode": "lexical"}, id="lexical-without-text-with-image"),
        pytest.param({"like_ids": ("a",), "mode": "lexical"}, id="lexical-without-text-with-liked"),
        pytest.param({"text": "mug", "image": b"j", "mode": "lexical"}, id="lexical-with-image"),
        pytest.param({"text": "mug", "image_url": "https://x.test/a.jpg", "mode": "lexical"}, id="lexical-url"),
        pytest.param({"text": "mug", "like_ids": ("a",), "mode": "lexical"}, id="lexical-with-liked"),
        pytest.param({"text": "mug", "unlike_ids": ("a",), "mode": "lexical"}, id="lexical-with-unliked"),
    ],
)
def test_search_mode_that_cannot_run_the_query_is_refused(fields: dict[str, Any]) -> None:
    assert "query.mode" in refused(lambda: validation.search_query(QueryRequest(**fields), SETTINGS))


def test_lexical_mode_without_text_or_image_names_the_mode_once() -> None:
    fields = refused(lambda: validation.search_query(QueryRequest(mode="lexical", like_ids=("a",)), SETTINGS))
    assert fields == ["query.mode", "query.mode"]  # needs text; and takes no examples


@pytest.mark.parametrize("mode", ["hybrid", "lexical"])
def test_threshold_of_a_word_matching_search_is_a_score_from_0_to_1(mode: str) -> None:
    for accepted in (0.0, 0.5, 1.0):
        assert search_fields_or_none(mode=mode, score_threshold=accepted) == []
    for bad in (-0.01, 1.01, math.nan):
        assert search_fields_or_none(mode=mode, score_threshold=bad) == ["query.score_threshold"]


def test_threshold_of_a_dense_search_is_a_cosine_from_minus_1_to_1() -> None:
    assert search_fields_or_none(mode="dense", score_threshold=-1.0) == []
    assert search_fields_or_none(mode="dense", score_threshold=-1.01) == ["query.score_threshold"]


def search_fields_or_none(**fields: Any) -> list[str]:
    try:
        validation.search_query(query(**fields), SETTINGS)
    except InvalidArgument:
        return search_fields(**fields)
    return []


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, ("weighted", 0.5), id="defaults"),
        pytest.param({"lexical_weight": 0.2}, ("weighted", 0.2), id="weight"),
        pytest.param({"lexical_weight": 0.0}, ("weighted", 0.0), id="weight-zero-is-not-unset"),
        pytest.param({"lexical_weight": 1.0}, ("weighted", 1.0), id="weight-one"),
        pytest.param({"fusion": "weighted", "lexical_weight": 0.3}, ("weighted", 0.3), id="weighted"),
        pytest.param({"fusion": "rank"}, ("rank", 0.5), id="rank"),
        pytest.param({"fusion": "rank", "lexical_weight": 0.2}, ("rank", 0.5), id="rank-ignores-weight"),
    ],
)
def test_hybrid_spec_defaults_and_what_a_fusion_uses(fields: dict[str, Any], expected: tuple[str, float]) -> None:
    validated = validation.search_query(query(mode="hybrid", **fields), SETTINGS)
    assert (validated.fusion, validated.lexical_weight) == expected
    assert (validation.DEFAULT_FUSION, validation.DEFAULT_LEXICAL_WEIGHT) == ("weighted", 0.5)


def test_hybrid_spec_of_a_search_that_does_not_fuse_is_the_default() -> None:
    # So that it never splits cache keys or page tokens.
    for mode in ("dense", "lexical"):
        validated = validation.search_query(query(mode=mode, fusion="rank", lexical_weight=0.2), SETTINGS)
        assert (validated.fusion, validated.lexical_weight) == ("weighted", 0.5)


@pytest.mark.parametrize("weight", [-0.01, 1.01, math.nan])
def test_lexical_weight_outside_0_to_1_is_refused(weight: float) -> None:
    assert search_fields(mode="hybrid", lexical_weight=weight) == ["query.hybrid_spec.lexical_weight"]
