"""Unit tests of reading catalogue files for `imagesearch index` (catalogue_files.py): several images per product,
numeric attributes, and an error naming the file and line for each kind of mistake. `imagesearch index` on a real
server is tested in tests/test_cli.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import jpeg_bytes

from imagesearch.catalogue_files import CatalogueError, Entry, read_entries


def jsonl(tmp_path: Path, *records: dict[str, Any] | str) -> Path:
    path = tmp_path / "catalogue.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def csv_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalogue.csv"
    path.write_text(text)
    return path


def read(path: Path) -> list[Entry | CatalogueError]:
    return list(read_entries([path]))


def only_entry(path: Path) -> Entry:
    [entry] = read(path)
    assert isinstance(entry, Entry), entry
    return entry


def only_error(path: Path) -> str:
    [error] = read(path)
    assert isinstance(error, CatalogueError), error
    return str(error)


@pytest.fixture
def photos(tmp_path: Path) -> tuple[bytes, bytes]:
    (tmp_path / "img").mkdir()
    front, side = jpeg_bytes((220, 20, 20)), jpeg_bytes((20, 20, 220))
    (tmp_path / "img" / "front.jpg").write_bytes(front)
    (tmp_path / "img" / "side.jpg").write_bytes(side)
    return front, side


def test_jsonl_images_become_product_images_with_their_bytes_in_order(
    tmp_path: Path, photos: tuple[bytes, bytes]
) -> None:
    entry = only_entry(
        jsonl(
            tmp_path,
            {
                "id": "mug-1",
                "images": [
                    {"path": "img/front.jpg", "id": "front", "role": "packshot"},
                    "img/side.jpg",
                    {"url": "https://cdn.example.com/mug-1/detail.jpg", "id": "detail"},
                    {"path": "img/front.jpg", "url": "https://cdn.example.com/mug-1/front.jpg"},
                ],
            },
        )
    )
    images = [(i.id, i.role, i.url) for i in entry.product.images]
    assert images == [
        ("front", "packshot", ""),
        ("", "", ""),
        ("detail", "", "https://cdn.example.com/mug-1/detail.jpg"),
        ("", "", "https://cdn.example.com/mug-1/front.jpg"),
    ]
    front, side = photos
    assert entry.image_data() == [front, side, None, front]  # None: the server fetches that image's url


def test_jsonl_numeric_attributes_are_read_as_numbers(tmp_path: Path) -> None:
    entry = only_entry(
        jsonl(tmp_path, {"id": "p", "image_url": "https://x.test/p.jpg", "numeric_attributes": {"stock": 3, "r": 4.5}})
    )
    assert dict(entry.product.numeric_attributes) == {"stock": 3.0, "r": 4.5}


def test_the_single_image_form_still_works(tmp_path: Path, photos: tuple[bytes, bytes]) -> None:
    entry = only_entry(jsonl(tmp_path, {"id": "p", "image": "img/front.jpg", "image_url": "https://x.test/p.jpg"}))
    assert list(entry.product.images) == []
    assert entry.product.image_url == "https://x.test/p.jpg"
    assert entry.image_data() == photos[0]
    assert only_entry(jsonl(tmp_path, {"id": "q", "image_url": "https://x.test/q.jpg"})).image_data() is None


def test_csv_images_are_semicolon_separated_files_and_numbers_numeric_columns(
    tmp_path: Path, photos: tuple[bytes, bytes]
) -> None:
    path = csv_file(
        tmp_path,
        "id,name,images,attributes.colour,numeric.popularity,numeric.stock\n"
        "mug-1,Red mug,img/front.jpg; img/side.jpg,red,1520,\n",
    )
    entry = only_entry(path)
    assert len(entry.product.images) == 2
    assert entry.image_data() == list(photos)
    assert dict(entry.product.attributes) == {"colour": "red"}
    assert dict(entry.product.numeric_attributes) == {"popularity": 1520.0}  # an empty cell: no entry


def test_csv_trailing_empty_cells_are_ignored(tmp_path: Path, photos: tuple[bytes, bytes]) -> None:
    assert only_entry(csv_file(tmp_path, "id,image\np,img/front.jpg,,\n")).image_data() == photos[0]


@pytest.mark.parametrize(
    ("record", "words"),
    [
        pytest.param({"id": "p", "image": "img/front.jpg", "images": ["img/side.jpg"]}, ["either image"], id="both"),
        pytest.param({"id": "p", "images": "img/front.jpg"}, ["images must be a list"], id="images-not-a-list"),
        pytest.param({"id": "p", "images": [{"id": "x"}]}, ["images[0]", "path", "url"], id="no-path-or-url"),
        pytest.param({"id": "p", "images": [{"path": "img/nope.jpg"}]}, ["images[0]", "nope.jpg"], id="no-such-file"),
        pytest.param({"id": "p", "images": ["img/front.jpg", 7]}, ["images[1]"], id="entry-not-a-path-or-object"),
        pytest.param({"id": "p", "images": [{"path": "img/front.jpg", "alt": "x"}]}, ["images[0]", "alt"], id="key"),
        pytest.param({"id": "p", "images": [{"path": "img/front.jpg", "id": 3}]}, ["images[0]", "strings"], id="id"),
        pytest.param({"id": "p", "numeric_attributes": [1]}, ["numeric_attributes must be an object"], id="nums"),
        pytest.param({"id": "p", "numeric_attributes": {"stock": "3"}}, ["numeric_attributes[stock]"], id="text"),
        pytest.param({"id": "p", "numeric_attributes": {"new": True}}, ["numeric_attributes[new]"], id="bool"),
        pytest.param({"id": "p", "numeric_attributes": {"x": float("nan")}}, ["numeric_attributes[x]"], id="nan"),
        pytest.param({"id": "p", "image": "img/nope.jpg"}, ["nope.jpg"], id="single-image-missing"),
        pytest.param({"id": "p", "colour": "red"}, ["unknown fields", "colour"], id="unknown-field"),
        pytest.param({"id": "p", "price": "cheap"}, ["price"], id="price"),
    ],
)
def test_jsonl_mistakes_are_reported_with_the_line(
    tmp_path: Path, photos: tuple[bytes, bytes], record: dict[str, Any], words: list[str]
) -> None:
    path = jsonl(tmp_path, {"id": "fine", "image": "img/front.jpg"}, record)
    entries = read(path)
    assert isinstance(entries[0], Entry)
    error = entries[1]
    assert isinstance(error, CatalogueError)
    assert str(error).startswith(f"{path}:2: ")
    for word in words:
        assert word in str(error)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param("id,numeric.stock\np,many\n", ["numeric.stock", "many"], id="not-a-number"),
        pytest.param("id,images\np,img/front.jpg;img/nope.jpg\n", ["images[1]", "nope.jpg"], id="missing-image"),
        pytest.param("id,image,images\np,img/front.jpg,img/side.jpg\n", ["either image"], id="both"),
        pytest.param("id,image\np,img/front.jpg,surplus\n", ["more cells", "surplus"], id="surplus-cell"),
    ],
)
def test_csv_mistakes_are_reported_with_the_line(
    tmp_path: Path, photos: tuple[bytes, bytes], text: str, words: list[str]
) -> None:
    path = csv_file(tmp_path, text)
    error = only_error(path)
    assert error.startswith(f"{path}:2: ")
    for word in words:
        assert word in error


def test_a_bad_line_does_not_stop_the_reading(tmp_path: Path, photos: tuple[bytes, bytes]) -> None:
    path = jsonl(
        tmp_path, "{not json", {"id": "p", "images": ["img/nope.jpg"]}, {"id": "q", "images": ["img/side.jpg"]}
    )
    first, second, third = read(path)
    assert isinstance(first, CatalogueError) and str(first).startswith(f"{path}:1: invalid JSON")
    assert isinstance(second, CatalogueError) and str(second).startswith(f"{path}:2: ")
    assert isinstance(third, Entry) and third.product.id == "q"
