"""Every request rule, with its default: products and their images, ids, filters, queries (with their regions
and ranking rules), listings and duplicate checks. Each rule is written once, in one of these modules:

- checks.py:   the building blocks (violations, ids, text, attributes, filters, page tokens)
- products.py: a product to index, its images and numeric attributes, and the image bytes that come with it
- queries.py:  a search (`search_query`), a listing (`list_request`), a duplicate check (`duplicates_request`)
- rules.py:    ranking rules

The names below are the package's interface; import them from here.
"""

from imagesearch.search.validation.checks import (
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_CATEGORY_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_FILTER_CATEGORIES,
    MAX_ID_BYTES,
    MAX_IMAGE_URL_CHARS,
    MAX_NAME_CHARS,
    Violations,
    check_attribute_key,
    check_attributes,
    check_filter,
    check_id,
    check_product_id,
    has_control_chars,
    normalise_query_text,
)
from imagesearch.search.validation.products import (
    MAX_IMAGE_ID_CHARS,
    MAX_IMAGE_ROLE_CHARS,
    MAX_NUMERIC_ATTRIBUTES,
    check_image_source,
    check_numeric_attributes,
    check_product,
    check_uploads,
    product_uploads,
)
from imagesearch.search.validation.queries import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_FACET_VALUES,
    DEFAULT_FUSION,
    DEFAULT_LEXICAL_WEIGHT,
    DEFAULT_TEXT_WEIGHT,
    DUPLICATES_DEFAULT_PAGE_SIZE,
    DUPLICATES_MAX_PAGE_SIZE,
    LIST_DEFAULT_PAGE_SIZE,
    LIST_MAX_PAGE_SIZE,
    MAX_EXAMPLE_IDS,
    MAX_FACET_KEYS,
    MAX_FACET_VALUES,
    check_example_ids,
    check_facet_spec,
    duplicates_request,
    list_request,
    search_query,
)
from imagesearch.search.validation.rules import DEFAULT_CANDIDATES, MAX_CANDIDATES, MAX_RULES, ranking_spec

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_FACET_VALUES",
    "DEFAULT_FUSION",
    "DEFAULT_LEXICAL_WEIGHT",
    "DEFAULT_TEXT_WEIGHT",
    "DUPLICATES_DEFAULT_PAGE_SIZE",
    "DUPLICATES_MAX_PAGE_SIZE",
    "LIST_DEFAULT_PAGE_SIZE",
    "LIST_MAX_PAGE_SIZE",
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_KEY_CHARS",
    "MAX_ATTRIBUTE_VALUE_CHARS",
    "MAX_CANDIDATES",
    "MAX_CATEGORY_CHARS",
    "MAX_DESCRIPTION_CHARS",
    "MAX_EXAMPLE_IDS",
    "MAX_FACET_KEYS",
    "MAX_FACET_VALUES",
    "MAX_FILTER_CATEGORIES",
    "MAX_ID_BYTES",
    "MAX_IMAGE_ID_CHARS",
    "MAX_IMAGE_ROLE_CHARS",
    "MAX_IMAGE_URL_CHARS",
    "MAX_NAME_CHARS",
    "MAX_NUMERIC_ATTRIBUTES",
    "MAX_RULES",
    "Violations",
    "check_attribute_key",
    "check_attributes",
    "check_example_ids",
    "check_facet_spec",
    "check_filter",
    "check_id",
    "check_image_source",
    "check_numeric_attributes",
    "check_product",
    "check_product_id",
    "check_uploads",
    "duplicates_request",
    "has_control_chars",
    "list_request",
    "normalise_query_text",
    "product_uploads",
    "ranking_spec",
    "search_query",
]
