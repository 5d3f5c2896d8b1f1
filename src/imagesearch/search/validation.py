"""Every request rule, with its default: products, ids, filters, queries, listings. Each check adds a
FieldViolation naming the field as the caller spells it in the proto (e.g. "product.attributes[colour]"), so one
INVALID_ARGUMENT lists every problem. `search_query` and `list_request` turn a request as sent (domain.py) into
the validated form the catalogue runs."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from imagesearch.config import Settings
from imagesearch.domain import (
    FacetSpec,
    Fusion,
    ListPage,
    ListRequest,
    Product,
    Query,
    QueryRequest,
    SearchFilter,
    SearchMode,
    SearchPage,
)
from imagesearch.errors import FieldViolation, InvalidArgument
from imagesearch.search.paging import (
    LIST_PAGE_TOKEN_FIELD,
    SEARCH_PAGE_TOKEN_FIELD,
    decode_list_page,
    decode_search_page,
)

MAX_ID_BYTES = 256
MAX_NAME_CHARS = 1024
MAX_DESCRIPTION_CHARS = 8192
MAX_CATEGORY_CHARS = 256
MAX_IMAGE_URL_CHARS = 2048
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_CHARS = 128
MAX_ATTRIBUTE_VALUE_CHARS = 256
MAX_FILTER_CATEGORIES = 100
MAX_EXAMPLE_IDS = 16
MAX_FACET_KEYS = 16
MAX_FACET_VALUES = 100
DEFAULT_FACET_VALUES = 20
# A multimodal query's weight of its text against its image when the caller sends none.
DEFAULT_TEXT_WEIGHT = 0.5
# A hybrid search's fusion and, for the weighted fusion, the lexical score's weight, when the caller sends none.
# Measured on the bundled model's demo catalogue (README, "Hybrid search"): the weighted fusion puts a product
# first for its model number where rank fusion does not, and both keep colour + kind precision.
DEFAULT_FUSION: Fusion = "weighted"
DEFAULT_LEXICAL_WEIGHT = 0.5
LIST_DEFAULT_PAGE_SIZE = 50
LIST_MAX_PAGE_SIZE = 1000
Page = TypeVar("Page", SearchPage, ListPage)
_CURRENCY = re.compile(r"[A-Z]{3}")
_WHITESPACE = re.compile(r"\s+")


class Violations:
    """Collects violations; `raise_if_any` raises one InvalidArgument holding all of them."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def has_control_chars(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def check_product_id(product_id: str, field: str, v: Violations) -> None:
    if not product_id:
        v.add(field, "required: a non-empty product id")
        return
    size = len(product_id.encode("utf-8"))
    if size > MAX_ID_BYTES:
        v.add(field, f"is {size} bytes of UTF-8; the limit is {MAX_ID_BYTES}")
    if has_control_chars(product_id):
        v.add(field, "must not contain control characters")
    if product_id != product_id.strip():
        v.add(field, "must not start or end with whitespace")


def check_product(product: Product, v: Violations, prefix: str = "product") -> None:
    check_product_id(product.id, f"{prefix}.id", v)
    _check_text(product.name, f"{prefix}.name", MAX_NAME_CHARS, v)
    _check_text(product.description, f"{prefix}.description", MAX_DESCRIPTION_CHARS, v, allow_newlines=True)
    _check_text(product.category, f"{prefix}.category", MAX_CATEGORY_CHARS, v)
    _check_text(product.image_url, f"{prefix}.image_url", MAX_IMAGE_URL_CHARS, v)
    if not math.isfinite(product.price) or product.price < 0:
        v.add(f"{prefix}.price", f"must be a finite number >= 0, got {product.price}")
    if product.currency and not _CURRENCY.fullmatch(product.currency):
        v.add(
            f"{prefix}.currency", f"must be an ISO 4217 code of 3 capital letters (e.g. EUR), got {product.currency!r}"
        )
    check_attributes(product.attributes, f"{prefix}.attributes", v)


def check_attributes(attributes: Mapping[str, str], field: str, v: Violations) -> None:
    if len(attributes) > MAX_ATTRIBUTES:
        v.add(field, f"has {len(attributes)} entries; the limit is {MAX_ATTRIBUTES}")
        return
    for key, value in attributes.items():
        where = f"{field}[{key[:40]}]"
        check_attribute_key(key, where, v)
        if has_control_chars(value):
            v.add(where, "values must not contain control characters")
        if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
            v.add(where, f"values must be at most {MAX_ATTRIBUTE_VALUE_CHARS} characters")


def check_attribute_key(key: str, field: str, v: Violations) -> None:
    if not key or len(key) > MAX_ATTRIBUTE_KEY_CHARS:
        v.add(field, f"keys must be 1 to {MAX_ATTRIBUTE_KEY_CHARS} characters")
    if "=" in key:
        v.add(field, "keys must not contain '='")
    if has_control_chars(key):
        v.add(field, "keys must not contain control characters")


def check_example_ids(ids: Sequence[str], field: str, v: Violations) -> tuple[str, ...]:
    """Example product ids for a search, deduplicated in order (a repeat counts once)."""
    if len(ids) > MAX_EXAMPLE_IDS:
        v.add(field, f"has {len(ids)} entries; the limit is {MAX_EXAMPLE_IDS}")
        return ()
    for i, product_id in enumerate(ids):
        check_product_id(product_id, f"{field}[{i}]", v)
    return tuple(dict.fromkeys(ids))


def check_facet_spec(
    attribute_keys: Sequence[str], max_values: int, field: str, v: Violations
) -> tuple[tuple[str, ...], int]:
    """The attribute keys (deduplicated in order) and the number of values per facet (0 means the default)."""
    if len(attribute_keys) > MAX_FACET_KEYS:
        v.add(f"{field}.attribute_keys", f"has {len(attribute_keys)} entries; the limit is {MAX_FACET_KEYS}")
    for i, key in enumerate(attribute_keys[:MAX_FACET_KEYS]):
        check_attribute_key(key, f"{field}.attribute_keys[{i}]", v)
    if not 0 <= max_values <= MAX_FACET_VALUES:
        v.add(
            f"{field}.max_values",
            f"must be 1 to {MAX_FACET_VALUES} (0 means {DEFAULT_FACET_VALUES}), got {max_values}",
        )
    return tuple(dict.fromkeys(attribute_keys)), max_values or DEFAULT_FACET_VALUES


def check_filter(flt: SearchFilter, v: Violations, prefix: str = "query.filter") -> None:
    if len(flt.categories) > MAX_FILTER_CATEGORIES:
        v.add(f"{prefix}.categories", f"has {len(flt.categories)} entries; the limit is {MAX_FILTER_CATEGORIES}")
    for i, category in enumerate(flt.categories[:MAX_FILTER_CATEGORIES]):
        _check_text(category, f"{prefix}.categories[{i}]", MAX_CATEGORY_CHARS, v)
    for name, bound in (("price_min", flt.price_min), ("price_max", flt.price_max)):
        if bound is not None and (not math.isfinite(bound) or bound < 0):
            v.add(f"{prefix}.{name}", f"must be a finite number >= 0, got {bound}")
    if (
        flt.price_min is not None
        and flt.price_max is not None
        and math.isfinite(flt.price_min)
        and math.isfinite(flt.price_max)
        and flt.price_min > flt.price_max
    ):
        v.add(f"{prefix}.price_min", f"is greater than price_max ({flt.price_min} > {flt.price_max})")
    check_attributes(dict(flt.attributes), f"{prefix}.attributes", v)


def normalise_query_text(text: str, field: str, max_chars: int, v: Violations) -> str:
    """NFC, whitespace runs (tabs, newlines) collapsed to one space, trimmed. Other control characters are
    refused: they are never meaningful in a query and usually mean a client encoding bug."""
    if len(text) > max_chars:
        v.add(field, f"is {len(text)} characters; the limit is {max_chars}")
        return ""
    normalised = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    if has_control_chars(normalised):
        v.add(field, "must not contain control characters")
    return normalised


def _check_text(text: str, field: str, max_chars: int, v: Violations, *, allow_newlines: bool = False) -> None:
    if len(text) > max_chars:
        v.add(field, f"is {len(text)} characters; the limit is {max_chars}")
    checked = text.replace("\n", "").replace("\r", "").replace("\t", "") if allow_newlines else text
    if has_control_chars(checked):
        v.add(field, "must not contain control characters")


def check_image_source(image: bytes | None, product: Product, fetches_urls: bool, v: Violations) -> None:
    """A product to index needs its image: sent as chunks, or at its image_url when this server fetches URLs."""
    if image is not None:
        return
    if fetches_urls and product.image_url:
        return  # fetched from product.image_url
    hint = " (or set product.image_url)" if fetches_urls else ""
    v.add("image_chunk", f"required: send the product image after the product message{hint}")


def check_id(product_id: str, field: str = "id") -> None:
    """Raise InvalidArgument unless `product_id` is a valid product id."""
    v = Violations()
    check_product_id(product_id, field, v)
    v.raise_if_any()


def search_query(request: QueryRequest, settings: Settings) -> Query:
    """The validated query, defaults applied; raises one InvalidArgument naming every bad field."""
    v = Violations()
    if request.image_url and request.image is not None:
        v.add("query.image_url", "send the image either as image_chunk messages or as image_url, not both")
    text = normalise_query_text(request.text, "query.text", settings.max_text_chars, v)
    like_ids, unlike_ids = _example_ids(request, v)
    if not text and request.image is None and not request.image_url and not like_ids:
        v.add(
            "query.text",
            "a search needs text, an image (image_chunk messages or image_url), liked products "
            "(like_product_ids), or a combination; unlike_product_ids alone are not enough",
        )
    check_filter(request.flt, v)
    page_size = _page_size(request, settings, v)
    mode = _search_mode(request, text, v)
    threshold = request.score_threshold
    if threshold is not None and mode == "dense" and not -1.0 <= threshold <= 1.0:  # also false for NaN
        v.add("query.score_threshold", f"must be a cosine similarity from -1 to 1, got {threshold}")
    if threshold is not None and mode != "dense" and not 0.0 <= threshold <= 1.0:
        v.add("query.score_threshold", f"must be a score from 0 to 1 in {mode} mode, got {threshold}")
    fusion, lexical_weight = _hybrid_spec(request, mode, v)
    weight = DEFAULT_TEXT_WEIGHT if request.text_weight is None else request.text_weight
    if not 0.0 <= weight <= 1.0:
        v.add("query.text_weight", f"must be 0 to 1, got {weight}")
    if request.group_by:
        check_attribute_key(request.group_by, "query.group_by", v)
    diversity = request.diversity
    if diversity is not None and not 0.0 <= diversity <= 1.0:
        v.add("query.diversity", f"must be 0 to 1, got {diversity}")
    facets = FacetSpec()
    if request.facets is not None:
        keys, max_values = check_facet_spec(
            request.facets.attribute_keys, request.facets.max_values, "query.facet_spec", v
        )
        facets = FacetSpec(categories=request.facets.categories, attribute_keys=keys, max_values=max_values)
    page = _decoded(request.page_token, decode_search_page, SEARCH_PAGE_TOKEN_FIELD, v)
    v.raise_if_any()
    return Query(
        text=text,
        image=request.image,
        image_url=request.image_url,
        flt=request.flt,
        top_k=page_size,
        score_threshold=threshold,
        text_weight=weight,
        like_ids=like_ids,
        unlike_ids=unlike_ids,
        include_liked=request.include_liked,
        group_by=request.group_by,
        diversity=diversity or None,  # 0 is plain ranking
        page=page,
        facets=facets,
        mode=mode,
        fusion=fusion,
        lexical_weight=lexical_weight,
    )


def list_request(request: ListRequest) -> tuple[SearchFilter, int, ListPage | None]:
    """The validated listing: filter, page size (defaults applied) and decoded page token."""
    v = Violations()
    check_filter(request.flt, v, prefix="filter")
    if request.page_size < 0:
        v.add("page_size", f"must be >= 0 (0 means {LIST_DEFAULT_PAGE_SIZE}), got {request.page_size}")
    # googleapis convention: 0 means the default, and sizes above the maximum are coerced, not refused.
    page_size = min(request.page_size or LIST_DEFAULT_PAGE_SIZE, LIST_MAX_PAGE_SIZE)
    page = _decoded(request.page_token, decode_list_page, LIST_PAGE_TOKEN_FIELD, v)
    v.raise_if_any()
    return request.flt, page_size, page


def _example_ids(request: QueryRequest, v: Violations) -> tuple[tuple[str, ...], tuple[str, ...]]:
    like_ids = check_example_ids(request.like_ids, "query.like_product_ids", v)
    unlike_ids = check_example_ids(request.unlike_ids, "query.unlike_product_ids", v)
    liked = set(like_ids)
    for i, product_id in enumerate(request.unlike_ids):
        if product_id in liked:
            v.add(f"query.unlike_product_ids[{i}]", "is also in like_product_ids: a product cannot be both")
    return like_ids, unlike_ids


def _search_mode(request: QueryRequest, text: str, v: Violations) -> SearchMode:
    has_image = request.image is not None or bool(request.image_url)
    has_examples = bool(request.like_ids or request.unlike_ids)
    if request.mode is None:
        # Hybrid for text alone. Dense where the text is one part of a vector query (its weight against an image,
        # the average-vector rule of examples) and where a threshold was written for cosine similarities: the
        # default never changes what a field the caller sent means.
        text_only = bool(text) and not has_image and not has_examples
        return "hybrid" if text_only and request.score_threshold is None else "dense"
    if request.mode != "dense" and not text:
        v.add("query.mode", f"{request.mode} mode matches words: it needs query.text")
    if request.mode == "lexical" and (has_image or has_examples):
        v.add(
            "query.mode",
            "lexical mode matches words only: send no image, image_url or example products "
            "(hybrid mode combines them with the words)",
        )
    return request.mode


def _hybrid_spec(request: QueryRequest, mode: SearchMode, v: Violations) -> tuple[Fusion, float]:
    weight = request.lexical_weight
    if weight is not None and not 0.0 <= weight <= 1.0:  # also false for NaN
        v.add("query.hybrid_spec.lexical_weight", f"must be 0 to 1, got {weight}")
    # What a search does not use is set to its default, so that it never splits cache keys or page tokens.
    fusion = (request.fusion or DEFAULT_FUSION) if mode == "hybrid" else DEFAULT_FUSION
    if mode != "hybrid" or fusion != "weighted" or weight is None:
        weight = DEFAULT_LEXICAL_WEIGHT
    return fusion, weight


def _page_size(request: QueryRequest, settings: Settings, v: Violations) -> int:
    # page_size takes precedence; without it, top_k (or its default) is the page size.
    if request.page_size:
        if not 1 <= request.page_size <= settings.max_top_k:
            v.add("query.page_size", f"must be 1 to {settings.max_top_k} (0 means top_k), got {request.page_size}")
        return request.page_size
    top_k = request.top_k or settings.default_top_k
    if not 1 <= top_k <= settings.max_top_k:
        v.add("query.top_k", f"must be 1 to {settings.max_top_k} (0 means {settings.default_top_k}), got {top_k}")
    return top_k


def _decoded(token: str, decode: Callable[[str, str], Page], field: str, v: Violations) -> Page | None:
    if not token:
        return None
    try:
        return decode(token, field)
    except InvalidArgument as exc:
        v.items += exc.violations
        return None
