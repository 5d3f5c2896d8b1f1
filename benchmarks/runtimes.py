"""Which runtime for CLIP's towers on CPU? torch against OpenVINO (model/openvino_runtime.py), in one run.

    .venv/bin/python benchmarks/runtimes.py [--model ViT-B-32:random] [--threads 2] [-n 30] [--no-int8]
                                            [--speed-only]

Image tower, one image and a batch of 16: torch fp32 (today's path), torch dynamic int8 (today's
IMAGESEARCH_QUANTIZE_IMAGE_TOWER), OpenVINO f32, bf16 (where the CPU has it natively) and int8 (NNCF).
Text tower, one query of 7 tokens: the lean torch tower with fp16 weights (today's path) against OpenVINO f32
and bf16. Prints median and p95 ms, images/s, and the ratio to torch fp32 (image) or to the lean tower (text)
of the same run; then each OpenVINO build's time, cold (export + convert (+ quantise) + compile, in an empty
cache directory) and cached (verify + read + compile), for the benchmark model and the bundled trained model;
then the cosine of each variant to torch fp32 on the bundled model, whose weights are real.

The machine is shared and noisy: samples are taken in interleaved rounds (one burst of each case, then the next
case, and again), so a slow spell hits every case alike and the ratios within a run stay comparable. Random
weights cost the same compute as pretrained ones: speed figures only. Never asserts on time.
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

import imagesearch
from imagesearch.model.calibration import Calibration
from imagesearch.model.cpus import CpuBudget, CpuModel
from imagesearch.model.openvino_runtime import (
    FloatPrecision,
    OpenVinoImageTower,
    OpenVinoTextTower,
    Precision,
    native_precisions,
)
from imagesearch.model.text_tower import LeanTextTower, fp16_weight_kernels_available
from imagesearch.synthetic.calibration import CALIBRATION_SET, calibration_images
from imagesearch.synthetic.renderer import COLOURS, KINDS, PATTERNS, render

SYNTHETIC = "synthetic-clip"
# int8 calibrates on the images the server uses (server.encoder_options).
CALIBRATION = Calibration(CALIBRATION_SET, calibration_images)
QUERY = "a photo of a red leather bag"  # 7 tokens + start and end


@dataclass
class Case:
    label: str
    call: Callable[[], object]
    items: int  # images (or texts) per call
    samples: list[float] = field(default_factory=list)

    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1000.0

    def p95_ms(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000.0


def load(spec: str) -> tuple[Any, Any, Any]:
    """(model, preprocess, tokenizer) straight from open_clip; "ARCH:random" seeds torch first."""
    if spec == SYNTHETIC:
        name = f"local-dir:{Path(imagesearch.__file__).parent / 'models' / SYNTHETIC}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        return model.eval(), preprocess, open_clip.get_tokenizer(name)
    arch, _, tag = spec.partition(":")
    if tag != "random":
        raise SystemExit(f"--model takes ARCH:random or {SYNTHETIC} (no weights can be downloaded here)")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def renders(preprocess: Any, count: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    images = [render(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(PATTERNS), rng) for _ in range(count)]
    return torch.stack([preprocess(image) for image in images])


def torch_int8(visual: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao is deprecated in favour of torchao; the eager API still works
        quantised: torch.nn.Module = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(visual), {torch.nn.Linear}, dtype=torch.qint8
        )
    return quantised


def float_precisions() -> list[FloatPrecision]:
    """f32, and each reduced precision this CPU computes natively."""
    return ["f32", *(p for p in ("f16", "bf16") if p in native_precisions())]  # type: ignore[list-item]


def precisions(int8: bool) -> list[Precision]:
    return [*float_precisions(), *(["int8"] if int8 else [])]  # type: ignore[list-item]


def build_image(
    visual: torch.nn.Module, cache_dir: Path, precision: Precision, threads: int, preprocess: Any
) -> OpenVinoImageTower:
    return OpenVinoImageTower.build(
        visual,
        cache_dir=cache_dir,
        precision=precision,
        threads=threads,
        preprocess=preprocess,
        calibration=CALIBRATION,
    )


def image_forward(model: Any, visual: torch.nn.Module | None = None) -> Callable[[torch.Tensor], np.ndarray]:
    tower = visual or model.visual

    def forward(pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.nn.functional.normalize(tower(pixels), dim=-1).numpy()

    return forward


def sample(cases: list[Case], rounds: int, per_round: int) -> None:
    for case in cases:  # warm-up: kernels are set up on first use
        for _ in range(2):
            case.call()
    for _ in range(rounds):
        for case in cases:
            for _ in range(per_round):
                started = time.perf_counter()
                case.call()
                case.samples.append(time.perf_counter() - started)


def print_table(title: str, cases: list[Case], reference: Case) -> None:
    print(f"\n{title}")
    print(f"  {'':<34}{'median ms':>10}{'p95 ms':>10}{'items/s':>10}   vs {reference.label}")
    for case in cases:
        print(
            f"  {case.label:<34}{case.median_ms():10.1f}{case.p95_ms():10.1f}"
            f"{case.items * 1000.0 / case.median_ms():10.1f}   {reference.median_ms() / case.median_ms():.2f}x"
        )


def speed(spec: str, threads: int, n: int, int8: bool, cache_dir: Path) -> None:
    model, preprocess, tokenizer = load(spec)
    one, sixteen = renders(preprocess, 1, seed=1), renders(preprocess, 16, seed=2)
    ours = {p: build_image(model.visual, cache_dir, p, threads, preprocess) for p in precisions(int8)}
    variants: list[tuple[str, Callable[[torch.Tensor], object]]] = [
        ("torch fp32", image_forward(model)),
        ("torch dynamic int8", image_forward(model, torch_int8(model.visual))),
        *((f"openvino {p}", tower) for p, tower in ours.items()),
    ]
    singles = [Case(f"{label}, 1 image", lambda f=f: f(one), 1) for label, f in variants]  # type: ignore[misc]
    batches = [Case(f"{label}, batch of 16", lambda f=f: f(sixteen), 16) for label, f in variants]  # type: ignore[misc]
    rounds = max(3, n // 5)
    sample(singles, rounds, 5)
    sample(batches, rounds, 1)
    print_table(f"image tower, {spec}, {threads} threads: one image", singles, singles[0])
    print_table(f"image tower, {spec}, {threads} threads: batch of 16", batches, batches[0])

    if not OpenVinoTextTower.supports(model):
        print(f"\ntext tower: {spec}'s layout is not supported by the lean or OpenVINO text towers")
        return
    tokens = tokenizer([QUERY])
    lean_weights = "fp16" if fp16_weight_kernels_available() else "fp32"
    lean = LeanTextTower(model, lean_weights).eval()  # type: ignore[arg-type]
    text_variants = [("lean torch, " + lean_weights + " weights", lambda: _no_grad(lean, tokens))]
    for p in float_precisions():
        tower = OpenVinoTextTower.build(model, cache_dir=cache_dir, precision=p, threads=threads)
        text_variants.append((f"openvino {p}", lambda t=tower: t(tokens)))  # type: ignore[misc]
    texts = [Case(f"{label}, 1 query", call, 1) for label, call in text_variants]
    sample(texts, rounds, 10)
    length = int((tokens != 0).sum())
    print_table(f"text tower, {spec}, {threads} threads: one query of {length} tokens", texts, texts[0])


def _no_grad(module: torch.nn.Module, tokens: torch.Tensor) -> object:
    with torch.inference_mode():
        return module(tokens)


def build_times(specs: list[str], threads: int, int8: bool) -> None:
    print("\nOpenVINO build time (cold: empty cache directory; cached: second build, same directory)")
    for spec in specs:
        model, preprocess, _ = load(spec)
        for p in precisions(int8):
            with tempfile.TemporaryDirectory(prefix="runtimes-bench-") as scratch:
                cold = build_image(model.visual, Path(scratch), p, threads, preprocess)
                cached = build_image(model.visual, Path(scratch), p, threads, preprocess)
                assert not cold.cache.hit and cached.cache.hit
                size_mb = sum(f.stat().st_size for f in cold.cache.path.iterdir()) / 1e6
            print(
                f"  {spec:<18} image {p:<5} cold {cold.cache.seconds:6.2f} s   cached {cached.cache.seconds:5.2f} s"
                f"   entry {size_mb:6.1f} MB"
            )
        if OpenVinoTextTower.supports(model):
            with tempfile.TemporaryDirectory(prefix="runtimes-bench-") as scratch:
                p = float_precisions()[-1]
                cold_text = OpenVinoTextTower.build(model, cache_dir=Path(scratch), precision=p, threads=threads)
                cached_text = OpenVinoTextTower.build(model, cache_dir=Path(scratch), precision=p, threads=threads)
            print(
                f"  {spec:<18} text  {p:<5} cold {cold_text.cache.seconds:6.2f} s   "
                f"cached {cached_text.cache.seconds:5.2f} s"
            )


def agreement(specs: list[str], threads: int, int8: bool, cache_dir: Path) -> None:
    print("\ncosine to torch fp32 (min / mean over 64 renders; 8 queries for text)")
    queries = [f"a {c} {k}" for c, k in zip(COLOURS, KINDS, strict=False)]
    for spec in specs:
        model, preprocess, tokenizer = load(spec)
        pixels = renders(preprocess, 64, seed=3)
        reference = image_forward(model)(pixels)
        towers: dict[str, Callable[[torch.Tensor], np.ndarray]] = {
            "torch dynamic int8": image_forward(model, torch_int8(model.visual))
        }
        for p in precisions(int8):
            towers[f"openvino {p}"] = OpenVinoImageTower.build(
                model.visual,
                cache_dir=cache_dir,
                precision=p,
                threads=threads,
                preprocess=preprocess,
                calibration=CALIBRATION,
            )
        for label, tower in towers.items():
            cosines = np.sum(tower(pixels) * reference, axis=1)
            print(f"  {spec:<18} image, {label:<20} {cosines.min():.5f} / {cosines.mean():.5f}")
        if OpenVinoTextTower.supports(model):
            tokens = tokenizer(queries)
            with torch.inference_mode():
                text_reference = model.encode_text(tokens, normalize=True).numpy()
            for p in float_precisions():
                text = OpenVinoTextTower.build(model, cache_dir=cache_dir, precision=p, threads=threads)
                cosines = np.sum(text(tokens) * text_reference, axis=1)
                print(f"  {spec:<18} text,  openvino {p:<11} {cosines.min():.5f} / {cosines.mean():.5f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32:random", help="ARCH:random or synthetic-clip")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenVINO threads")
    parser.add_argument("-n", type=int, default=30, help="samples per case (more for one image / one query)")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip OpenVINO int8 (needs nncf)")
    parser.add_argument("--speed-only", action="store_true", help="skip the agreement and build-time sections")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    natives = ", ".join(sorted(native_precisions())) or "none"
    print(f"machine: {CpuModel.read().describe(CpuBudget.detect())}; {args.threads} threads")
    print(f"native reduced precisions (OpenVINO): {natives}; python {platform.python_version()}")
    print(f"torch {torch.__version__}")
    specs = list(dict.fromkeys([args.model, SYNTHETIC]))
    with tempfile.TemporaryDirectory(prefix="runtimes-bench-") as scratch:
        speed(args.model, args.threads, args.n, args.int8, Path(scratch))
        if not args.speed_only:
            agreement(specs, args.threads, args.int8, Path(scratch))
    if not args.speed_only:
        build_times(specs, args.threads, args.int8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
