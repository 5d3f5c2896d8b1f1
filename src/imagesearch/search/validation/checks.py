"""The checks every request rule is built from: violations collected per request, ids, text, attributes and
filters, and page tokens. Each check adds a FieldViolation naming the field as the caller spells it in the proto
(e.g. "product.attributes[colour]"), so one INVALID_ARGUMENT lists every problem."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import TypeVar

from imagesearch.domain import ListPage, SearchFilter, SearchPage
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
Page = TypeVar("Page", SearchPage, ListPage)
V = TypeVar("V")
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


def check_attributes(attributes: Mapping[str, str], field: str, v: Violations) -> None:
    def check_entry(key: str, value: str, where: str) -> None:
        check_attribute_key(key, where, v)
        if has_control_chars(value):
            v.add(where, "values must not contain control characters")
        if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
            v.add(where, f"values must be at most {MAX_ATTRIBUTE_VALUE_CHARS} characters")

    check_entries(attributes, field, MAX_ATTRIBUTES, check_entry, v)


def check_entries(
    entries: Mapping[str, V], field: str, limit: int, check_entry: Callable[[str, V, str], None], v: Violations
) -> None:
    """A map field: at most `limit` entries, each checked as `field[key]` (the key cut to 40 characters)."""
    if len(entries) > limit:
        v.add(field, f"has {len(entries)} entries; the limit is {limit}")
        return
    for key, value in entries.items():
        check_entry(key, value, f"{field}[{key[:40]}]")


def check_attribute_key(key: str, field: str, v: Violations) -> None:
    if not key or len(key) > MAX_ATTRIBUTE_KEY_CHARS:
        v.add(field, f"keys must be 1 to {MAX_ATTRIBUTE_KEY_CHARS} characters")
    if "=" in key:
        v.add(field, "keys must not contain '='")
    if has_control_chars(key):
        v.add(field, "keys must not contain control characters")


def check_filter(flt: SearchFilter, v: Violations, prefix: str = "query.filter") -> None:
    if len(flt.categories) > MAX_FILTER_CATEGORIES:
        v.add(f"{prefix}.categories", f"has {len(flt.categories)} entries; the limit is {MAX_FILTER_CATEGORIES}")
    for i, category in enumerate(flt.categories[:MAX_FILTER_CATEGORIES]):
        check_text(category, f"{prefix}.categories[{i}]", MAX_CATEGORY_CHARS, v)
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


def check_text(text: str, field: str, max_chars: int, v: Violations, *, allow_newlines: bool = False) -> None:
    if len(text) > max_chars:
        v.add(field, f"is {len(text)} characters; the limit is {max_chars}")
    checked = text.replace("\n", "").replace("\r", "").replace("\t", "") if allow_newlines else text
    if has_control_chars(checked):
        v.add(field, "must not contain control characters")


def check_id(product_id: str, field: str = "id") -> None:
    """Raise InvalidArgument unless `product_id` is a valid product id."""
    v = Violations()
    check_product_id(product_id, field, v)
    v.raise_if_any()


def decoded(token: str, decode: Callable[[str, str], Page], field: str, v: Violations) -> Page | None:
    if not token:
        return None
    try:
        return decode(token, field)
    except InvalidArgument as exc:
        v.items += exc.violations
        return None
