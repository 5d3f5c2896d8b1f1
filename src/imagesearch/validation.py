"""Input rules for products, filters and queries. Each check adds a FieldViolation naming the field as the
caller spells it in the proto (e.g. "product.attributes[colour]"), so one INVALID_ARGUMENT lists every problem."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence

from imagesearch.domain import Product, SearchFilter
from imagesearch.errors import FieldViolation, InvalidArgument

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
