"""The rules of a product to index: its id and fields, attributes, images and numeric attributes, and the image
bytes (or URLs) that come with it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from imagesearch.domain import Product
from imagesearch.images import ImageUpload, ProductImage
from imagesearch.search.validation.checks import (
    MAX_CATEGORY_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_IMAGE_URL_CHARS,
    MAX_NAME_CHARS,
    Violations,
    check_attributes,
    check_entries,
    check_product_id,
    check_text,
)

MAX_IMAGE_ID_CHARS = 128
MAX_IMAGE_ROLE_CHARS = 64
MAX_NUMERIC_ATTRIBUTES = 32
# Numeric attribute keys become payload paths ("numbers.<key>") in ranking formulas: no dots, brackets or spaces.
NUMERIC_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")


def check_product(product: Product, v: Violations, prefix: str = "product") -> None:
    check_product_id(product.id, f"{prefix}.id", v)
    check_text(product.name, f"{prefix}.name", MAX_NAME_CHARS, v)
    check_text(product.description, f"{prefix}.description", MAX_DESCRIPTION_CHARS, v, allow_newlines=True)
    check_text(product.category, f"{prefix}.category", MAX_CATEGORY_CHARS, v)
    check_text(product.image_url, f"{prefix}.image_url", MAX_IMAGE_URL_CHARS, v)
    if not math.isfinite(product.price) or product.price < 0:
        v.add(f"{prefix}.price", f"must be a finite number >= 0, got {product.price}")
    if product.currency and not _CURRENCY.fullmatch(product.currency):
        v.add(
            f"{prefix}.currency", f"must be an ISO 4217 code of 3 capital letters (e.g. EUR), got {product.currency!r}"
        )
    check_attributes(product.attributes, f"{prefix}.attributes", v)
    check_numeric_attributes(product.numeric_attributes, f"{prefix}.numeric_attributes", v)
    ids: set[str] = set()
    for i, image in enumerate(product.images):
        where = f"{prefix}.images[{i}]"
        check_text(image.id, f"{where}.id", MAX_IMAGE_ID_CHARS, v)
        check_text(image.role, f"{where}.role", MAX_IMAGE_ROLE_CHARS, v)
        check_text(image.url, f"{where}.url", MAX_IMAGE_URL_CHARS, v)
        if image.id and image.id in ids:
            v.add(f"{where}.id", f"repeats the id {image.id!r} of an earlier image: ids are unique within a product")
        ids.add(image.id)


def check_numeric_attributes(numbers: Mapping[str, float], field: str, v: Violations) -> None:
    def check_entry(key: str, value: float, where: str) -> None:
        check_numeric_key(key, where, v)
        if not math.isfinite(value):
            v.add(where, f"values must be finite numbers, got {value}")

    check_entries(numbers, field, MAX_NUMERIC_ATTRIBUTES, check_entry, v)


def check_numeric_key(key: str, field: str, v: Violations) -> None:
    if not NUMERIC_KEY.fullmatch(key):
        v.add(field, "keys must be 1 to 64 letters, digits, '_' or '-'")


def product_uploads(product: Product, sent: Mapping[int, bytes]) -> list[ImageUpload]:
    """The images to encode for a product: each entry of product.images with the bytes sent for it (by its
    index), or, for a product without `images`, its one image (the bytes sent, else product.image_url)."""
    if not product.images:
        return [ImageUpload(ProductImage(url=product.image_url), sent.get(0))]
    return [ImageUpload(image, sent.get(i)) for i, image in enumerate(product.images)]


def check_uploads(
    product: Product, uploads: list[ImageUpload], max_images: int, fetches_urls: bool, v: Violations
) -> None:
    """Every image of a product to index has bytes or, where this server fetches URLs, a URL; at most
    `max_images` of them."""
    if len(product.images) > max_images:
        v.add("product.images", f"has {len(product.images)} images; the limit is {max_images} per product")
        return
    if not product.images:
        check_image_source(uploads[0].data, product, fetches_urls, v)
        return
    hint = "" if fetches_urls else " (fetching image URLs is disabled on this server)"
    for i, upload in enumerate(uploads):
        if upload.data is None and not (fetches_urls and upload.image.url):
            v.add(
                f"product.images[{i}]",
                f"no bytes were sent for this image (send image_index {i}, then its image_chunk messages) and "
                f"there is no url to fetch it from{hint}",
            )


def check_image_source(image: bytes | None, product: Product, fetches_urls: bool, v: Violations) -> None:
    """A product to index needs its image: sent as chunks, or at its image_url when this server fetches URLs."""
    if image is not None:
        return
    if fetches_urls and product.image_url:
        return  # fetched from product.image_url
    hint = " (or set product.image_url)" if fetches_urls else ""
    v.add("image_chunk", f"required: send the product image after the product message{hint}")
