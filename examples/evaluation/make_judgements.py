"""Writes judgements.jsonl and the query photos in images/ for the catalogue `imagesearch demo` indexes.

    .venv/bin/python examples/evaluation/make_judgements.py           # rewrite them
    .venv/bin/python examples/evaluation/make_judgements.py --check   # exit 1 if judgements.jsonl is out of date

Deterministic: the same catalogue, queries and grades every run (the photos' JPEG bytes may change with Pillow's
version, not what they show). The grades are explained in README.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from imagesearch.synthetic import CatalogueItem, make_catalogue, render
from imagesearch.synthetic.renderer import COLOURS, KINDS

HERE = Path(__file__).resolve().parent
# `imagesearch demo`'s catalogue: --products defaults to 240 (cli.py), demo.py draws it with seed 7 and model codes.
DEMO_PRODUCTS = 240
DEMO_SEED = 7
PHOTO_SEED = 2026
# Words shoppers use that no product name holds: the model learned them from its training captions (synthetic/
# renderer.py), BM25 cannot match them (except the shared "lamp" and "hat").
SYNONYMS = {
    "t-shirt": "tee",
    "mug": "cup",
    "shoe": "sneaker",
    "bag": "handbag",
    "lamp": "desk lamp",
    "hat": "sun hat",
    "bottle": "flask",
    "chair": "seat",
}
PHOTO_JPEG_QUALITY = 90


def catalogue() -> list[CatalogueItem]:
    return make_catalogue(DEMO_PRODUCTS, seed=DEMO_SEED, model_codes=True)


def photos(items: list[CatalogueItem]) -> list[tuple[str, str, str]]:
    """(pattern, colour, kind) of the query photos: one per kind, each colour at most once, and every one a product
    the catalogue has (so each photo has a perfect match)."""
    rng = random.Random(PHOTO_SEED)
    chosen: list[tuple[str, str, str]] = []
    for kind in KINDS:
        have = sorted({(i.pattern, i.colour, i.kind) for i in items if i.kind == kind})
        fresh = [t for t in have if t[1] not in {c for _, c, _ in chosen}]
        chosen.append(rng.choice(fresh or have))
    return chosen


def judgements(items: list[CatalogueItem]) -> list[dict[str, object]]:
    lines: list[dict[str, object]] = []

    def judge(query: dict[str, object], grades: dict[str, int]) -> None:
        lines.extend({**query, "product_id": pid, "grade": grade} for pid, grade in sorted(grades.items()))

    def by_look(pattern: str | None, colour: str, kind: str) -> dict[str, int]:
        # 2: the colour and kind asked for, in the pattern asked for (any, when none is); 1: that colour and kind in
        # another pattern. Another colour or another kind is not what was asked for (0, left unjudged).
        return {
            i.product_id: 2 if pattern is None or i.pattern == pattern else 1
            for i in items
            if (i.colour, i.kind) == (colour, kind)
        }

    for colour in COLOURS:
        for kind in KINDS:
            judge({"query_id": f"colour/{colour} {kind}", "query": f"{colour} {kind}"}, by_look(None, colour, kind))
    for colour in COLOURS:
        for kind in KINDS:
            text = f"{colour} {SYNONYMS[kind]}"
            judge({"query_id": f"synonym/{text}", "query": text}, by_look(None, colour, kind))
    patterned = sorted({(i.pattern, i.colour, i.kind) for i in items if i.pattern != "plain"})
    for pattern, colour, kind in patterned:
        text = f"{pattern} {colour} {kind}"
        judge({"query_id": f"pattern/{text}", "query": text}, by_look(pattern, colour, kind))
    for item in items:
        if item.model_code:
            judge({"query_id": f"code/{item.model_code}", "query": item.model_code}, {item.product_id: 2})
    for pattern, colour, kind in photos(items):
        name = f"images/{pattern}-{colour}-{kind}.jpg"
        judge({"query_id": f"photo/{pattern} {colour} {kind}", "image": name}, by_look(pattern, colour, kind))
    return lines


def jsonl(lines: list[dict[str, object]]) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


def write_photos(items: list[CatalogueItem]) -> None:
    (HERE / "images").mkdir(exist_ok=True)
    for number, (pattern, colour, kind) in enumerate(photos(items)):
        # Seeds no catalogue product has: new photos of products the catalogue holds.
        image = render(kind, colour, pattern, random.Random(PHOTO_SEED + number), 128)
        image.save(HERE / "images" / f"{pattern}-{colour}-{kind}.jpg", format="JPEG", quality=PHOTO_JPEG_QUALITY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare judgements.jsonl with what would be written")
    args = parser.parse_args(argv)
    items = catalogue()
    text = jsonl(judgements(items))
    path = HERE / "judgements.jsonl"
    if args.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    write_photos(items)
    print(f"wrote {path} ({text.count(chr(10))} judgements) and {len(photos(items))} photos in images/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
