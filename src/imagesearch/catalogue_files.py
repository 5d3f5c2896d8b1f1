"""Reading catalogues for `imagesearch index`: image files and folders, JSON Lines and CSV.

- An image file (or every image under a folder) is one product: id and name from the file name.
- JSONL: one product object per line, with the Product fields (`id`, `name`, `description`, `category`, `price`,
  `currency`, `attributes` (an object of strings), `numeric_attributes` (an object of numbers), `image_url`) and
  its image(s), in one of two forms:
  - one image: `image`, the image file relative to the JSONL file (or only `image_url`, fetched by the server);
  - several: `images`, a list with one entry per image, in order: {"path": file relative to the JSONL file,
    "url": ..., "id": ..., "role": ...} (a path or a url, or both; id and role optional), or just the path as a
    string. An image with a url and no path is fetched by the server.
- CSV: a header row with the same column names; attributes as `attributes.KEY` columns, numeric attributes as
  `numeric.KEY` columns, and `images` as image files separated by `;` (image ids, roles and URLs: JSONL only).
A product without image files is sent without bytes: the server then fetches its URLs (when it enables that).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesearch.v1 import products_pb2

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
_TEXT_FIELDS = ("id", "name", "description", "category", "currency", "image_url")
_KNOWN = {*_TEXT_FIELDS, "price", "attributes", "numeric_attributes", "image", "images"}
_IMAGE_KEYS = {"path", "url", "id", "role"}
# CSV column prefixes for the entries of the two maps.
_ATTRIBUTE_COLUMN = "attributes."
_NUMERIC_COLUMN = "numeric."


class CatalogueError(ValueError):
    """A line or file that cannot be turned into a product; the message names where."""


@dataclass(frozen=True)
class Entry:
    """One product read from a catalogue, with where its image bytes are: `image_path` for a product with one
    image (None: no bytes), or `image_paths`, aligned with `product.images`, for one with several (None where the
    server fetches that image's url)."""

    product: products_pb2.Product
    image_path: Path | None
    source: str
    image_paths: tuple[Path | None, ...] = ()

    def image_data(self) -> bytes | list[bytes | None] | None:
        """The image bytes as `ImageSearchClient.index_products` takes them."""
        if self.product.images:
            return [path.read_bytes() if path is not None else None for path in self.image_paths]
        return self.image_path.read_bytes() if self.image_path is not None else None


def read_entries(paths: list[Path], category: str = "") -> Iterator[Entry | CatalogueError]:
    """Every product in `paths`, in order; a bad line yields a CatalogueError and reading goes on."""
    for path in paths:
        if path.is_dir():
            for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
                yield _image_entry(image, category)
        elif path.suffix.lower() == ".jsonl":
            yield from _jsonl(path)
        elif path.suffix.lower() == ".csv":
            yield from _csv(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield _image_entry(path, category)
        else:
            yield CatalogueError(f"{path}: not an image, folder, .jsonl or .csv file (or it does not exist)")


def _image_entry(path: Path, category: str) -> Entry:
    product = products_pb2.Product(id=path.stem, name=path.stem.replace("_", " "), category=category)
    return Entry(product, path, str(path))


def _jsonl(path: Path) -> Iterator[Entry | CatalogueError]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise CatalogueError(f"{where}: expected a JSON object")
                yield _entry(record, path.parent, where)
            except (json.JSONDecodeError, CatalogueError) as exc:
                yield exc if isinstance(exc, CatalogueError) else CatalogueError(f"{where}: invalid JSON: {exc}")


def _csv(path: Path) -> Iterator[Entry | CatalogueError]:
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), 2):
            where = f"{path}:{number}"
            try:
                yield _entry(_csv_record(row, where), path.parent, where)
            except CatalogueError as exc:
                yield exc


def _csv_record(row: Mapping[str | None, Any], where: str) -> dict[str, Any]:
    """A CSV row as the record a JSONL line would give: the map columns gathered, `images` split on ";"."""
    record: dict[str, Any] = {}
    attributes: dict[str, str] = {}
    numbers: dict[str, float] = {}
    for column, value in row.items():
        if column is None:  # cells beyond the header's columns (empty ones, as from a trailing comma, are fine)
            if any(value):
                raise CatalogueError(f"{where}: more cells than the header has columns: {value!r}")
            continue
        if not value:
            continue
        if column.startswith(_ATTRIBUTE_COLUMN):
            attributes[column.removeprefix(_ATTRIBUTE_COLUMN)] = value
        elif column.startswith(_NUMERIC_COLUMN):
            try:
                numbers[column.removeprefix(_NUMERIC_COLUMN)] = float(value)
            except ValueError:
                raise CatalogueError(f"{where}: column {column} must be a number, got {value!r}") from None
        elif column == "images":
            record["images"] = [part.strip() for part in value.split(";") if part.strip()]
        elif column:
            record[column] = value
    if attributes:
        record["attributes"] = attributes
    if numbers:
        record["numeric_attributes"] = numbers
    return record


def _entry(record: Mapping[str, Any], base: Path, where: str) -> Entry:
    unknown = set(record) - _KNOWN
    if unknown:
        raise CatalogueError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(_KNOWN)}")
    try:
        price = float(record.get("price", 0) or 0)
    except (TypeError, ValueError):
        raise CatalogueError(f"{where}: price must be a number, got {record.get('price')!r}") from None
    attributes = record.get("attributes", {})
    if not isinstance(attributes, dict):
        raise CatalogueError(f"{where}: attributes must be an object of strings")
    if record.get("image") and record.get("images"):
        raise CatalogueError(f"{where}: give either image (one image file) or images (several), not both")
    images, image_paths = _images(record.get("images", []), base, where)

    def text(name: str) -> str:
        return str(record.get(name, ""))

    product = products_pb2.Product(
        id=text("id"),
        name=text("name"),
        description=text("description"),
        category=text("category"),
        currency=text("currency"),
        image_url=text("image_url"),
        price=price,
        attributes={str(k): str(v) for k, v in attributes.items()},
        numeric_attributes=_numbers(record.get("numeric_attributes", {}), where),
        images=images,
    )
    image = record.get("image")
    image_path = (base / str(image)) if image else None
    if image_path is not None and not image_path.is_file():
        raise CatalogueError(f"{where}: image file {image_path} does not exist")
    return Entry(product, image_path, where, image_paths)


def _numbers(numbers: object, where: str) -> dict[str, float]:
    if not isinstance(numbers, dict):
        raise CatalogueError(f"{where}: numeric_attributes must be an object of numbers")
    parsed: dict[str, float] = {}
    for key, value in numbers.items():
        # bool is an int in Python; true/false is no number here.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CatalogueError(f"{where}: numeric_attributes[{key}] must be a finite number, got {value!r}")
        parsed[str(key)] = float(value)
    return parsed


def _images(entries: object, base: Path, where: str) -> tuple[list[products_pb2.ProductImage], tuple[Path | None, ...]]:
    """`images` of a record: the entries of Product.images and, aligned with them, the files of their bytes."""
    if not isinstance(entries, list):
        raise CatalogueError(f"{where}: images must be a list of image files or objects with a path or url")
    images: list[products_pb2.ProductImage] = []
    paths: list[Path | None] = []
    for i, entry in enumerate(entries):
        field = f"{where}: images[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise CatalogueError(f"{field} must be an image file or an object with a path or url, got {entry!r}")
        unknown = set(entry) - _IMAGE_KEYS
        if unknown:
            raise CatalogueError(f"{field}: unknown fields {sorted(unknown)}; known: {sorted(_IMAGE_KEYS)}")
        if not all(isinstance(v, str) for v in entry.values()):
            raise CatalogueError(f"{field}: path, url, id and role must be strings")
        if not entry.get("path") and not entry.get("url"):
            raise CatalogueError(f"{field} needs a path (an image file) or a url")
        path = base / entry["path"] if entry.get("path") else None
        if path is not None and not path.is_file():
            raise CatalogueError(f"{field}: image file {path} does not exist")
        images.append(
            products_pb2.ProductImage(id=entry.get("id", ""), role=entry.get("role", ""), url=entry.get("url", ""))
        )
        paths.append(path)
    return images, tuple(paths)
