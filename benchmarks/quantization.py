"""Are the reduced-precision towers worth it? Speed and agreement with fp32, in one run.

    .venv/bin/python benchmarks/quantization.py [--model ViT-B-32:random] [-n 20]

Two options, each against fp32: int8 dynamic quantisation of the image tower (IMAGESEARCH_QUANTIZE_IMAGE_TOWER,
off by default) and fp16 weights for the text tower (IMAGESEARCH_TEXT_WEIGHTS, on by default on x86 CPUs).
Prints median forward times (one image, a batch of 16, one query) and the speed-up; and the cosine between the
fp32 and reduced embeddings of the same inputs (min and mean), plus whether each input's nearest neighbour
among the others stays the same. The bar for either is cosine >= 0.999. Random weights measure speed
faithfully; agreement is also printed for the bundled trained model (synthetic-clip), whose weights are real.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from service import photo_like_jpeg  # sibling scripts, not a package
from timing import median_ms

from imagesearch.model.encoder import ClipEncoder

TEXTS = [f"a photo of a {c} {k}" for c in ("red", "blue", "green", "black") for k in ("mug", "shoe", "lamp", "bag")]


def agreement(spec: str, images: list[bytes]) -> dict[str, tuple[float, float, float]]:
    """Per tower: (min cosine, mean cosine, share of items whose nearest neighbour is unchanged)."""
    fp32, reduced = load_pair(spec)
    pixels = torch.stack([fp32.preprocess(fp32.decode(b, field="f", max_pixels=10**8)) for b in images])
    pairs = {
        "image tower, int8": (fp32.encode_pixels(pixels), reduced.encode_pixels(pixels)),
        "text tower, fp16 weights": (fp32.encode_texts(TEXTS), reduced.encode_texts(TEXTS)),
    }
    result = {}
    for tower, (a, b) in pairs.items():
        cosines = np.sum(a * b, axis=1)
        same = np.mean(np.argsort(-(a @ a.T), axis=1)[:, 1] == np.argsort(-(b @ b.T), axis=1)[:, 1])
        result[tower] = (float(cosines.min()), float(cosines.mean()), float(same))
    return result


def load_pair(spec: str) -> tuple[ClipEncoder, ClipEncoder]:
    """fp32 towers, and int8 image tower + fp16 text weights; the same weights in both (also when random)."""
    torch.manual_seed(0)
    fp32 = ClipEncoder.load(spec, device="cpu", text_weights="fp32")
    torch.manual_seed(0)
    return fp32, ClipEncoder.load(spec, device="cpu", quantize_image_tower=True, text_weights="fp16")


def speed(spec: str, image: bytes, n: int) -> None:
    fp32, reduced = load_pair(spec)
    one = fp32.preprocess(fp32.decode(image, field="f", max_pixels=10**8)).unsqueeze(0)
    texts = iter(f"a red leather bag number {i}" for i in range(10**6))
    cases: list[tuple[str, str, Callable[[ClipEncoder], object]]] = [
        ("1 image", "int8", lambda e: e.encode_pixels(one)),
        ("batch of 16", "int8", lambda e: e.encode_pixels(one.repeat(16, 1, 1, 1))),
        ("1 text", "fp16", lambda e: e.encode_texts([next(texts)])),
    ]
    for label, reduced_name, run in cases:
        t32 = median_ms(lambda r=run: r(fp32), n)  # type: ignore[misc]
        t_reduced = median_ms(lambda r=run: r(reduced), n)  # type: ignore[misc]
        print(
            f"  {label:<12} fp32 {t32:8.1f} ms   {reduced_name} {t_reduced:8.1f} ms   speed-up {t32 / t_reduced:.2f}x"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    images = [photo_like_jpeg(i) for i in range(64)]

    print(f"speed: {args.model} on cpu, {torch.get_num_threads()} threads")
    speed(args.model, images[0], args.n)

    for spec in dict.fromkeys([args.model, "synthetic-clip"]):
        for tower, (low, mean, neighbours) in agreement(spec, images).items():
            print(
                f"agreement with fp32, {spec}, {tower}: cosine min {low:.5f} mean {mean:.5f}; "
                f"same nearest neighbour for {neighbours:.0%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
