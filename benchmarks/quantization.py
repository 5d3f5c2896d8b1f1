"""Are the served towers worth it? Speed and agreement with torch fp32, in one run.

    .venv/bin/python benchmarks/quantization.py [--model ViT-B-32:random] [-n 20] [--runtime auto]
        [--precision auto|bf16|f32|int8]

The towers as the service would run them (IMAGESEARCH_RUNTIME / IMAGESEARCH_PRECISION: by default OpenVINO in
bf16 where the CPU computes it natively; with --runtime torch, the lean text tower's fp16 weights), each against
torch fp32. Prints median forward times (one image, a batch of 16, one query) and the speed-up; and the cosine
between the fp32 and served embeddings of the same inputs (min and mean), plus whether each input's nearest
neighbour among the others stays the same. The bar is cosine >= 0.999. Random weights measure speed faithfully;
agreement is also printed for the bundled trained model (synthetic-clip), whose weights are real.
benchmarks/runtimes.py compares every runtime and precision of the image tower, build times included.
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

from imagesearch.model.calibration import Calibration
from imagesearch.model.encoder import ClipEncoder
from imagesearch.synthetic.calibration import CALIBRATION_SET, calibration_images

TEXTS = [f"a photo of a {c} {k}" for c in ("red", "blue", "green", "black") for k in ("mug", "shoe", "lamp", "bag")]


def agreement(spec: str, images: list[bytes], options: dict[str, str]) -> dict[str, tuple[float, float, float]]:
    """Per tower: (min cosine, mean cosine, share of items whose nearest neighbour is unchanged)."""
    fp32, reduced = load_pair(spec, options)
    pixels = torch.stack([fp32.preprocess(fp32.decode(b, field="f", max_pixels=10**8)) for b in images])
    pairs = {
        f"image tower, {reduced.image_runtime} {reduced.image_precision}": (
            fp32.encode_pixels(pixels),
            reduced.encode_pixels(pixels),
        ),
        f"text tower, {reduced.text_runtime} {reduced.text_path}": (
            fp32.encode_texts(TEXTS),
            reduced.encode_texts(TEXTS),
        ),
    }
    result = {}
    for tower, (a, b) in pairs.items():
        cosines = np.sum(a * b, axis=1)
        same = np.mean(np.argsort(-(a @ a.T), axis=1)[:, 1] == np.argsort(-(b @ b.T), axis=1)[:, 1])
        result[tower] = (float(cosines.min()), float(cosines.mean()), float(same))
    return result


def load_pair(spec: str, options: dict[str, str]) -> tuple[ClipEncoder, ClipEncoder]:
    """torch fp32 towers, and the served ones; the same weights in both (also when random)."""
    torch.manual_seed(0)
    fp32 = ClipEncoder.load(spec, device="cpu", runtime="torch", text_weights="fp32")
    torch.manual_seed(0)
    # int8 calibrates on the images the server uses (server.encoder_options): the synthetic renders.
    calibration = Calibration(CALIBRATION_SET, calibration_images) if options.get("precision") == "int8" else None
    return fp32, ClipEncoder.load(spec, device="cpu", calibration=calibration, **options)  # type: ignore[arg-type]


def speed(spec: str, image: bytes, n: int, options: dict[str, str]) -> None:
    fp32, reduced = load_pair(spec, options)
    one = fp32.preprocess(fp32.decode(image, field="f", max_pixels=10**8)).unsqueeze(0)
    texts = iter(f"a red leather bag number {i}" for i in range(10**6))
    cases: list[tuple[str, str, Callable[[ClipEncoder], object]]] = [
        ("1 image", reduced.image_precision, lambda e: e.encode_pixels(one)),
        ("batch of 16", reduced.image_precision, lambda e: e.encode_pixels(one.repeat(16, 1, 1, 1))),
        ("1 text", reduced.text_precision, lambda e: e.encode_texts([next(texts)])),
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
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "f32", "int8"])
    args = parser.parse_args()
    images = [photo_like_jpeg(i) for i in range(64)]
    options = {"runtime": args.runtime, "precision": args.precision}

    print(f"speed: {args.model} on cpu, {torch.get_num_threads()} threads, served towers vs torch fp32")
    speed(args.model, images[0], args.n, options)

    for spec in dict.fromkeys([args.model, "synthetic-clip"]):
        for tower, (low, mean, neighbours) in agreement(spec, images, options).items():
            print(
                f"agreement with torch fp32, {spec}, {tower}: cosine min {low:.5f} mean {mean:.5f}; "
                f"same nearest neighbour for {neighbours:.0%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
