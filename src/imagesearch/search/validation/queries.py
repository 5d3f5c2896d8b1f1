"""The rules of a search and of a listing, with their defaults: `search_query` and `list_request` turn a request
as sent (domain.py) into the validated form the catalogue runs."""

from __future__ import annotations

import math
from collections.abc import Sequence

from imagesearch.config import Settings
from imagesearch.domain import (
    DuplicatesRequest,
    FacetSpec,
    Fusion,
    ListPage,
    ListRequest,
    Query,
    QueryRequest,
    SearchFilter,
    SearchMode,
)
from imagesearch.images import NormalizedBox
from imagesearch.ranking import RankingSpec
from imagesearch.search.paging import (
    LIST_PAGE_TOKEN_FIELD,
    SEARCH_PAGE_TOKEN_FIELD,
    decode_list_page,
    decode_search_page,
)
from imagesearch.search.validation.checks import (
    Violations,
    check_attribute_key,
    check_filter,
    check_product_id,
    decoded,
    normalise_query_text,
)
from imagesearch.search.validation.rules import ranking_spec

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
# Query fields the rules check but keep as the caller sent them.
_KEPT_AS_SENT = ("image", "image_url", "flt", "include_liked", "group_by", "regions", "explain")
LIST_DEFAULT_PAGE_SIZE = 50
LIST_MAX_PAGE_SIZE = 1000
# Near-duplicate images: clip-retrieval's deduplication threshold (cosine similarity of CLIP image embeddings).
DEFAULT_DUPLICATE_THRESHOLD = 0.94
DUPLICATES_DEFAULT_PAGE_SIZE = 100
DUPLICATES_MAX_PAGE_SIZE = 500


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


def search_query(request: QueryRequest, settings: Settings, default_ranking: RankingSpec | None = None) -> Query:
    """The validated query, defaults applied (`default_ranking`: the server's rules for a request that sends none);
    raises one InvalidArgument naming every bad field."""
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
    page = decoded(request.page_token, decode_search_page, SEARCH_PAGE_TOKEN_FIELD, v)
    _check_regions(request, settings.max_query_regions, v)
    collapse = _collapse(request, v)
    ranking = default_ranking if request.ranking is None else ranking_spec(request.ranking, "query.ranking", v)
    v.raise_if_any()
    return Query(
        text=text,
        top_k=page_size,
        score_threshold=threshold,
        text_weight=weight,
        like_ids=like_ids,
        unlike_ids=unlike_ids,
        diversity=diversity or None,  # 0 is plain ranking
        page=page,
        facets=facets,
        mode=mode,
        fusion=fusion,
        lexical_weight=lexical_weight,
        collapse=collapse,
        ranking=ranking,
        **{name: getattr(request, name) for name in _KEPT_AS_SENT},
    )


def _check_regions(request: QueryRequest, max_regions: int, v: Violations) -> None:
    if not request.regions:
        return
    if len(request.regions) > max_regions:
        v.add("query.regions", f"has {len(request.regions)} boxes; the limit is {max_regions}")
    if request.image is None and not request.image_url:
        v.add("query.regions", "regions are boxes of the query image: send an image (image_chunk or image_url)")
    if len(request.regions) > 1 and request.page_token:
        v.add(SEARCH_PAGE_TOKEN_FIELD, "a search of several regions has no pages: search one region to page")
    for i, box in enumerate(request.regions[:max_regions]):
        _check_box(box, f"query.regions[{i}]", v)


def _check_box(box: NormalizedBox, field: str, v: Violations) -> None:
    for name in ("x0", "y0", "x1", "y1"):
        value = getattr(box, name)
        if not 0.0 <= value <= 1.0:  # also false for NaN
            v.add(f"{field}.{name}", f"must be a fraction of the image from 0 to 1, got {value}")
    if box.x1 <= box.x0:
        v.add(f"{field}.x1", f"must be greater than x0 ({box.x1} <= {box.x0}): the box is empty")
    if box.y1 <= box.y0:
        v.add(f"{field}.y1", f"must be greater than y0 ({box.y1} <= {box.y0}): the box is empty")


def _collapse(request: QueryRequest, v: Violations) -> float | None:
    threshold = request.duplicate_threshold
    if threshold is not None and not request.collapse_duplicates:
        v.add("query.duplicate_threshold", "applies with collapse_duplicates: set it, or leave this unset")
    if threshold is not None and not 0.0 < threshold <= 1.0:  # also false for NaN
        v.add("query.duplicate_threshold", f"must be a cosine similarity above 0, at most 1, got {threshold}")
    if not request.collapse_duplicates:
        return None
    return DEFAULT_DUPLICATE_THRESHOLD if threshold is None else threshold


def duplicates_request(request: DuplicatesRequest) -> tuple[DuplicatesRequest, ListPage | None]:
    """The validated duplicate check, defaults applied (threshold, page size), and its decoded page token."""
    v = Violations()
    if request.product_id:
        check_product_id(request.product_id, "product_id", v)
    check_filter(request.flt, v, prefix="filter")
    threshold = DEFAULT_DUPLICATE_THRESHOLD if request.threshold is None else request.threshold
    if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        v.add("threshold", f"must be a cosine similarity above 0, at most 1, got {threshold}")
    if not 0 <= request.page_size <= DUPLICATES_MAX_PAGE_SIZE:
        default, most = DUPLICATES_DEFAULT_PAGE_SIZE, DUPLICATES_MAX_PAGE_SIZE
        v.add("page_size", f"must be 1 to {most} (0 means {default}), got {request.page_size}")
    page = decoded(request.page_token, decode_list_page, LIST_PAGE_TOKEN_FIELD, v)
    if page is not None and request.product_id:
        v.add(LIST_PAGE_TOKEN_FIELD, "a check of one product has one page: send no page_token with product_id")
    v.raise_if_any()
    size = request.page_size or DUPLICATES_DEFAULT_PAGE_SIZE
    return DuplicatesRequest(request.product_id, request.flt, threshold, size, request.page_token), page


def list_request(request: ListRequest) -> tuple[SearchFilter, int, ListPage | None]:
    """The validated listing: filter, page size (defaults applied) and decoded page token."""
    v = Violations()
    check_filter(request.flt, v, prefix="filter")
    if request.page_size < 0:
        v.add("page_size", f"must be >= 0 (0 means {LIST_DEFAULT_PAGE_SIZE}), got {request.page_size}")
    # googleapis convention: 0 means the default, and sizes above the maximum are coerced, not refused.
    page_size = min(request.page_size or LIST_DEFAULT_PAGE_SIZE, LIST_MAX_PAGE_SIZE)
    page = decoded(request.page_token, decode_list_page, LIST_PAGE_TOKEN_FIELD, v)
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
