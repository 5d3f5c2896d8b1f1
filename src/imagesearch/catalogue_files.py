"""Reading catalogues for `imagesearch index`: image files and folders, JSON Lines and CSV.

- An image file (or every image under a folder) is one product: id and name from the file name.
- JSONL: one product object per line, with the Product fields (`id`, `name`, `description`, `category`, `price`,
  `currency`, `attributes` (an object), `image_url`) and `image`: the image file, relative to the JSONL file.
- CSV: a header row with the same column names; attributes as `attributes.KEY` columns.
A product without `image` is sent without bytes: the server then fetches its `image_url` (when enabled).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesearch.v1 import products_pb2

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
_TEXT_FIELDS = ("id", "name", "description", "category", "currency", "image_url")
_KNOWN = {*_TEXT_FIELDS, "price", "attributes", "image"}


class CatalogueError(ValueError):
    """A line or file that cannot be turned into a product; the message names where."""


@dataclass(frozen=True)
class Entry:
    product: products_pb2.Product
    image_path: Path | None
    source: str

    def image_bytes(self) -> bytes | None:
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
            attributes = {k.split(".", 1)[1]: v for k, v in row.items() if k and k.startswith("attributes.") and v}
            record: dict[str, Any] = {k: v for k, v in row.items() if k and not k.startswith("attributes.") and v}
            if attributes:
                record["attributes"] = attributes
            try:
                yield _entry(record, path.parent, where)
            except CatalogueError as exc:
                yield exc


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
    product = products_pb2.Product(
        price=price,
        attributes={str(k): str(v) for k, v in attributes.items()},
        **{name: str(record.get(name, "")) for name in _TEXT_FIELDS},
    )
    image = record.get("image")
    image_path = (base / str(image)) if image else None
    if image_path is not None and not image_path.is_file():
        raise CatalogueError(f"{where}: image file {image_path} does not exist")
    return Entry(product, image_path, where)
