"""The vocabulary of a product's images and of a query image's regions (bottom layer: no other imports).

A product has one or more images (packshot, on-model, detail): each is stored as its own CLIP vector, and a
search matches a product by its best image. A query image may be searched in regions (boxes cropped before
encoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Fields of an image's stored record, in order (store payload and cache values).
IMAGE_FIELDS = ("id", "role", "url", "sha256")


@dataclass(frozen=True)
class ProductImage:
    """One image of a product: the caller's id and role for it (both optional), where the caller keeps it, and
    the SHA-256 (hex) of the bytes the server encoded, which exact re-uploads share."""

    id: str = ""
    role: str = ""
    url: str = ""
    sha256: str = ""

    def to_row(self) -> list[str]:
        return [getattr(self, name) for name in IMAGE_FIELDS]

    @classmethod
    def from_row(cls, row: Any) -> ProductImage:
        if isinstance(row, dict):  # a store payload holds each image as an object
            return cls(**{name: str(row.get(name, "")) for name in IMAGE_FIELDS})
        if len(row) != len(IMAGE_FIELDS):
            raise ValueError(f"an image row has {len(IMAGE_FIELDS)} fields, not {len(row)}")
        return cls(*(str(value) for value in row))


@dataclass(frozen=True)
class ImageUpload:
    """One image as an index request brings it: its description, and its bytes (None: to be fetched from
    `image.url`)."""

    image: ProductImage
    data: bytes | None


@dataclass(frozen=True)
class NormalizedBox:
    """A rectangle of an image in fractions of its width and height: (x0, y0) top-left, (x1, y1) bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float

    def key_value(self) -> list[float]:
        return [float(self.x0), float(self.y0), float(self.x1), float(self.y1)]

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box in pixels of an image of this size (left, top, right, bottom), at least one pixel each way: a
        valid box is never empty, however small the image."""
        left = min(int(self.x0 * width), width - 1)
        top = min(int(self.y0 * height), height - 1)
        right = max(round(self.x1 * width), left + 1)
        bottom = max(round(self.y1 * height), top + 1)
        return left, top, min(right, width), min(bottom, height)


@dataclass(frozen=True)
class Duplicate:
    """A product whose images nearly copy a checked product's: the closest pair of images (one of each, by
    position in their products' images), its cosine similarity, and whether the two share an image byte for
    byte (same SHA-256)."""

    product_id: str
    similarity: float
    image_index: int
    duplicate_image_index: int
    exact: bool


@dataclass(frozen=True)
class ProductDuplicates:
    """One checked product and its near-duplicate listings, most similar first."""

    product_id: str
    duplicates: tuple[Duplicate, ...]


@dataclass(frozen=True)
class DuplicatesPage:
    products: list[ProductDuplicates]
    next_page_token: str
