"""How the `imagesearch` command line reads its argument values and prints results (cli.py builds the commands)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagesearch.v1.image_search_service_pb2 import ProductDuplicates, SearchHit


def print_hits(hits: Iterable[SearchHit], explain: bool) -> None:
    """One line per hit; with `explain`, a line with its matched image and how its score was formed; a line with
    the near-duplicates collapsed into it, if any."""
    for rank, hit in enumerate(hits, 1):
        p = hit.product
        price = f"{p.price:.2f} {p.currency}".strip()
        print(f"{rank:>3}. {hit.score:.4f}  {p.id:<24} {p.name[:40]:<40} {p.category:<16} {price}")
        if explain:
            parts = [matched_image(hit)]
            if hit.HasField("explanation"):
                e = hit.explanation
                parts.append(f"relevance {e.relevance:.4f}")
                if e.HasField("similarity"):
                    parts.append(f"cosine {e.similarity:.4f}")
                parts.extend(f"{r.name}: f={r.value:.4g} {r.weighted:+.4f}" for r in e.rules)
            print(f"{'':7}{'  '.join(parts)}")
        if hit.duplicate_product_ids:
            print(f"{'':7}duplicates: {', '.join(hit.duplicate_product_ids)}")


def matched_image(hit: SearchHit) -> str:
    if not hit.HasField("matched_image_index"):
        return "image -"  # lexical mode looks at no image
    name = f" {hit.matched_image_id!r}" if hit.matched_image_id else ""
    return f"image {hit.matched_image_index}{name}"


def print_duplicates(entry: ProductDuplicates) -> None:
    count = len(entry.duplicates)
    print(f"{entry.product_id}: {count} duplicate{'' if count == 1 else 's'}")
    for d in entry.duplicates:
        exact = "  exact" if d.exact else ""
        print(
            f"    {d.product_id:<24} similarity {d.similarity:.4f}  image {d.image_index} ~ its image "
            f"{d.duplicate_image_index}{exact}"
        )


def cutoffs(text: str) -> list[int]:
    try:
        cutoffs = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if min(cutoffs) < 1:
        raise argparse.ArgumentTypeError(f"cutoffs must be at least 1, got {text!r}")
    return cutoffs


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def region(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1 (fractions 0-1 of the image), got {text!r}") from None
    return x0, y0, x1, y1


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--attr expects KEY=VALUE, got {text!r}")
    return key, value
