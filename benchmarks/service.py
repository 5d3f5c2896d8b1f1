"""End-to-end service benchmark: the real server (a subprocess) over real gRPC on loopback.

    .venv/bin/python benchmarks/service.py                 # ViT-B-32 architecture, random weights, CPU
    .venv/bin/python benchmarks/service.py --quick         # fewer iterations, smaller catalogue
    .venv/bin/python benchmarks/service.py --device cuda   # on a GPU (fp16)
    .venv/bin/python benchmarks/service.py --runtime torch # the image tower on torch instead of OpenVINO
    .venv/bin/python benchmarks/service.py --tracing       # the server traced (sampled, exported over OTLP)

Prints first the CPU (model, family/model numbers, the flags the runtimes depend on, the CPUs and cores this process
may use) and how the server runs its towers and why (the runtime choice it measured at its first start); then one
table: p50/p95/p99 latency and throughput per path, next to the bare model floor (the model called directly in this
process, no server, sampled between the service's calls, loaded from the server's runtime cache so that it reuses the
server's runtime choice), and the ratio service/floor. Uncached text searches also run in dense and in hybrid mode
(the default of a text-only search), alternating call by call, and the ratio of their p50s is printed. Image paths are
also compared with a fixed reference sampled in the same run: the torch fp32 image tower (`vs torch fp32`), so the gain
of a runtime over it is a ratio within one run. With --tracing the server traces every request (sampled, exported over
OTLP/gRPC to a stand-in collector in this process) and the table shows the traced server; then uncached text searches
alternate between two fresh servers, one traced and one not, for the overhead of tracing within one run
(service_tracing.py). Writes the table, the CPU and the runtime choice as JSON under benchmarks/results/. Random
weights cost the same compute as pretrained ones, so these are speed figures only: they say nothing about relevance.
Never asserts on time; exits non-zero only when an RPC fails.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw

# Sibling scripts.
from service_images import bulk_import, images_ab
from service_modes import hybrid_vs_dense, rules_vs_plain
from service_report import Row, print_rows, print_table, row
from service_server import fill_catalogue, start_server, wait_serving
from service_tracing import OtlpSink, tracing_overhead
from service_tracing import report as report_tracing
from timing import median_ms

from imagesearch.client import ImageSearchClient, Product
from imagesearch.model.cpus import CpuBudget, CpuModel
from imagesearch.model.encoder import ClipEncoder

RESULTS_DIR = Path(__file__).parent / "results"
# A pause between a floor call and a service call: after a forward pass, torch's OpenMP threads keep spinning
# for a moment, and on a small machine the spinning threads of one process would slow the other's next call.
SETTLE_S = 0.01
CATEGORIES = ["mugs", "shoes", "bags", "lamps", "shirts", "hats", "bottles", "chairs"]


def photo_like_jpeg(seed: int, size: int = 400) -> bytes:
    """A ~50 KB JPEG with texture (noise + shapes), different per seed so no two hash alike."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 60 + rng.integers(60, 190, size=3)).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, size - 80, size=2)
        draw.ellipse((int(x), int(y), int(x) + 80, int(y) + 60), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class Floor:
    """The bare model in this process, no server: what each service path is compared with.

    Its samples are taken interleaved with the service's (one floor call, one RPC, ...), so both see the same
    machine: on a shared, noisy machine a floor measured minutes earlier can be 30% off.
    """

    def __init__(self, encoder: ClipEncoder, reference: ClipEncoder) -> None:
        self.encoder = encoder
        # The torch fp32 image tower and the lean torch text path (the paths before the OpenVINO runtime): the
        # fixed reference every runtime is compared with.
        self.reference = reference
        self._texts = iter(f"a photo of a red mug number {i}" for i in range(10**6))

    def text(self, encoder: ClipEncoder | None = None) -> object:
        """One new query through the service's text path (on the reference encoder when given it)."""
        return (encoder or self.encoder).encode_texts([next(self._texts)])

    def text_padded(self) -> object:
        """One new query through open_clip's own padded text path, for comparison."""
        return self.encoder.encode_texts_padded([next(self._texts)])

    def image(self, jpeg: bytes, encoder: ClipEncoder | None = None) -> object:
        """One image: decode + preprocess + forward (on the reference encoder when given it)."""
        encoder = encoder or self.encoder
        return encoder.encode_pixels(encoder.preprocess(encoder.decode(jpeg, field="f", max_pixels=10**8))[None])

    def batched_images_per_s(self, jpeg: bytes, repeats: int = 3, encoder: ClipEncoder | None = None) -> float:
        """Forward-only throughput in batches of 32: the most the model can do."""
        encoder = encoder or self.encoder
        pixels = encoder.preprocess(encoder.decode(jpeg, field="f", max_pixels=10**8))
        batch = torch.stack([pixels] * 32)
        return 32 / (median_ms(lambda: encoder.encode_pixels(batch), repeats, warm_up=1) / 1000.0)


@dataclass
class Samples:
    service_s: list[float]
    floor_s: list[float]
    reference_s: list[float]


async def sequential(
    call: Callable[[int], Awaitable[object]],
    n: int,
    floor: Callable[[int], object] | None = None,
    reference: Callable[[int], object] | None = None,
) -> Samples:
    """`n` calls one after another, each after one `floor` call and one `reference` call (when given), after 3
    warm-ups of each."""
    result = Samples([], [], [])
    for i in range(-3, n):
        for sample, into in ((floor, result.floor_s), (reference, result.reference_s)):
            if sample is None:
                continue
            started = time.perf_counter()
            sample(i)
            if i >= 0:
                into.append(time.perf_counter() - started)
            await asyncio.sleep(SETTLE_S)
        started = time.perf_counter()
        await call(i)
        if i >= 0:
            result.service_s.append(time.perf_counter() - started)
        if floor is not None:
            await asyncio.sleep(SETTLE_S)
    return result


async def concurrent(call: Callable[[int], Awaitable[object]], clients: int, total: int) -> tuple[list[float], float]:
    samples: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            samples.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return samples, time.perf_counter() - started


async def run_paths(target: str, floor: Floor, n: int, quick: bool) -> tuple[list[Row], dict[str, float]]:
    """Every path's row, and the floor figures measured alongside them."""
    rows: list[Row] = []
    jpegs = [photo_like_jpeg(i) for i in range(2 * n + 12)]
    search_images, index_images, floor_image = iter(jpegs[: n + 3]), iter(jpegs[n + 3 :]), jpegs[-1]
    async with ImageSearchClient(target, timeout_s=120) as client:
        health = health_pb2_grpc.HealthStub(client._channel)

        def add(path: str, samples: Samples, wall_s: float | None = None, image_reference: bool = True) -> Row:
            floor_ms = statistics.median(samples.floor_s) * 1000.0 if samples.floor_s else None
            rows.append(row(path, samples.service_s, floor_ms, wall_s))
            if samples.reference_s and image_reference:
                rows[-1].reference_ms = statistics.median(samples.reference_s) * 1000.0
            return rows[-1]

        def text_floor(i: int) -> object:
            return floor.text()

        def text_reference(i: int) -> object:
            return floor.text(floor.reference)

        def image_floor(i: int) -> object:
            return floor.image(floor_image)

        def image_reference(i: int) -> object:
            return floor.image(floor_image, floor.reference)

        add("health check", await sequential(lambda i: health.Check(health_pb2.HealthCheckRequest()), n))
        text_samples = await sequential(
            lambda i: client.search(text=f"a red leather bag number {i}"), n, text_floor, text_reference
        )
        # The "vs torch fp32" column is about images; the text reference goes to the figures instead.
        text = add("text search, uncached", text_samples, image_reference=False)
        add("text search, cached repeat", await sequential(lambda i: client.search(text="a red leather bag"), n))
        add(
            "text search + category/price filter",
            await sequential(
                lambda i: client.search(text=f"blue shoes {i}", categories=["shoes"], price_min=10, price_max=90),
                n,
                text_floor,
            ),
        )
        rows.extend(await hybrid_vs_dense(client, max(2 * n, 20)))
        rows.extend(await rules_vs_plain(client, max(2 * n, 20)))
        image = add(
            f"image search, uncached ({len(jpegs[0]) // 1024} KB JPEG)",
            await sequential(lambda i: client.search(image=next(search_images)), n, image_floor, image_reference),
        )
        add("image search, cached repeat", await sequential(lambda i: client.search(image=jpegs[0]), n))
        add(
            "IndexProduct (one product)",
            await sequential(
                lambda i: client.index_product(Product(id=f"single-{i}", category="mugs"), next(index_images)),
                max(5, n // 2),
                image_floor,
                image_reference,
            ),
        )
        # The batched floor is measured just before and just after the concurrent runs, for the same reason.
        batched_before = floor.batched_images_per_s(floor_image)
        reference_before = floor.batched_images_per_s(floor_image, encoder=floor.reference)
        for clients in (1, 8, 32):
            total = clients * (2 if quick else 4)
            batch = [photo_like_jpeg(10_000 * clients + i) for i in range(total)]
            samples, wall = await concurrent(lambda i, b=batch: client.search(image=b[i]), clients, total)
            rows.append(row(f"image search, {clients} concurrent clients", samples, image.floor_ms, wall))
            rows[-1].reference_ms = image.reference_ms
        rows.append(await bulk_import(client, 64 if quick else 256, photo_like_jpeg))
        batched_after = floor.batched_images_per_s(floor_image)
        reference_after = floor.batched_images_per_s(floor_image, encoder=floor.reference)
    figures = {
        "text_padded_ms": median_ms(floor.text_padded, 10),
        "text_ms": text.floor_ms or float("nan"),
        "reference_text_ms": statistics.median(text_samples.reference_s) * 1000.0,
        "image_ms": image.floor_ms or float("nan"),
        "batch32_images_per_s": (batched_before + batched_after) / 2,
        "reference_image_ms": image.reference_ms or float("nan"),
        "reference_batch32_images_per_s": (reference_before + reference_after) / 2,
    }
    return rows, figures


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32:random", help="open_clip spec (default: ViT-B-32:random)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--catalogue", type=int, help="products in the store (default 10000; 2000 with --quick)")
    parser.add_argument("-n", type=int, help="sequential requests per path (default 30; 10 with --quick)")
    parser.add_argument("--quick", action="store_true", help="n=10, catalogue 2000, smaller concurrency runs")
    parser.add_argument("--port", type=int, default=50999)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=f"default {RESULTS_DIR}")
    parser.add_argument(
        "--runtime", default="auto", choices=["auto", "torch", "openvino"], help="IMAGESEARCH_RUNTIME (default auto)"
    )
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "f32", "int8"], help="IMAGESEARCH_PRECISION"
    )
    parser.add_argument(
        "--text-weights",
        default="auto",
        choices=["auto", "fp16", "fp32"],
        help="IMAGESEARCH_TEXT_WEIGHTS (default auto)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=5,
        metavar="K",
        help="also compare a catalogue of K images per product with one of 1 image (two servers, alternating "
        "image searches; bulk import; store size and memory); 1: skip (default 5)",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="trace the server (always_on sampler, OTLP/gRPC to a local stand-in collector; needs the tracing "
        "extra) and compare uncached text search with an untraced twin",
    )
    args = parser.parse_args()
    args.n = args.n or (10 if args.quick else 30)
    args.catalogue = args.catalogue or (2000 if args.quick else 10_000)

    budget = CpuBudget.detect()
    cpu = CpuModel.read()
    print(
        f"model: {args.model} on {args.device}"
        + (" (random weights: speed only, no relevance)" * ("random" in args.model))
    )
    print(f"cpu: {cpu.describe(budget)}; torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")
    torch.manual_seed(0)
    reference = ClipEncoder.load(args.model, device=args.device, runtime="torch", text_weights=args.text_weights)
    model_id, dimension = reference.model_id, reference.dimension

    sink = OtlpSink() if args.tracing else None
    otlp_endpoint = sink.endpoint if sink is not None else None
    tracing: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="imagesearch-bench-") as tmp:
        data_dir = Path(tmp)
        await fill_catalogue(data_dir, model_id, dimension, args.catalogue)
        server = start_server(data_dir, args, started_at := time.perf_counter(), otlp_endpoint=otlp_endpoint)
        try:
            target = f"127.0.0.1:{args.port}"
            await wait_serving(target)
            startup_s = time.perf_counter() - started_at
            # The floor runs the way the server does: loaded from the server's runtime cache, it reuses the runtime
            # choice the server measured and stored at its start (and says why, as the server does).
            encoder = ClipEncoder.load(
                args.model,
                device=args.device,
                text_weights=args.text_weights,
                runtime=args.runtime,
                precision=args.precision,
                runtime_cache_dir=data_dir / "runtime-cache",
            )
            served = await served_model(target)
            print(f"runtime (server): {served['image_tower']} image tower, {served['text_tower']} text tower")
            print(f"runtime choice: {served['runtime_reason'] or encoder.runtime_reason}")
            # The benchmark keeps its own copies of the model (the floor, the reference) next to the server's.
            rows, floor = await run_paths(target, Floor(encoder, reference), args.n, args.quick)
        finally:
            server.terminate()
            server.wait(timeout=60)
        # Again on the same data directory: the runtime's converted graph now comes from its cache.
        server = start_server(data_dir, args, started_at := time.perf_counter(), otlp_endpoint=otlp_endpoint)
        try:
            await wait_serving(target)
            cached_startup_s = time.perf_counter() - started_at
        finally:
            server.terminate()
            server.wait(timeout=60)
        if sink is not None:
            tracing_rows, tracing_figures = await tracing_overhead(args, data_dir, sink.endpoint, model_id, dimension)
        images_rows: list[Row] = []
        images_figures: dict[str, float] = {}
        if args.images > 1:
            images_rows, images_figures = await images_ab(args, data_dir, model_id, dimension, photo_like_jpeg)

    machine = f"{platform.machine()}, {cpu.describe(budget)}, torch {torch.__version__}"
    machine += f", threads {encoder.torch_threads}"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name(0)}"
    image_tower, text_path = f"{encoder.image_runtime} {encoder.image_precision}", encoder.text_path
    header = (
        f"imagesearch service benchmark: {args.model} (image tower {image_tower}, text {text_path}) on "
        f"{args.device}; catalogue {args.catalogue}; {machine}" + ("; tracing on (sampled, exported)" * args.tracing)
    )
    print_table(rows, floor, header)
    dense, hybrid = (
        next(r for r in rows if r.path == f"text search, uncached, {m} (alternating)") for m in ("dense", "hybrid")
    )
    print(f"hybrid text search p50 / dense p50, alternating in this run: {hybrid.p50_ms / dense.p50_ms:.3f}")
    plain, ruled = (r for r in rows if r.path.startswith("text search, uncached, hybrid, "))
    print(
        f"hybrid + 3 ranking rules p50 / plain hybrid p50, alternating in this run: {ruled.p50_ms / plain.p50_ms:.3f}"
    )
    if images_rows:
        print(f"\nseveral images per product: 1 vs {args.images}, catalogue {args.catalogue} (two servers)")
        print_rows(images_rows)
        print("  " + "; ".join(f"{name} {value:.3g}" for name, value in images_figures.items()))
    print(
        f"server start-up, process start to SERVING: {startup_s:.1f} s with the runtime's conversion cache cold, "
        f"{cached_startup_s:.1f} s cached"
    )
    if sink is not None:
        sink.stop()  # after the servers: each exported what it still held as it stopped
        tracing = report_tracing(sink, tracing_rows, tracing_figures)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"service-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "device": args.device,
                "precision": args.precision,
                "image_tower": image_tower,
                "text_path": text_path,
                "cpu": asdict(cpu) | asdict(budget),
                "runtime_reason": served["runtime_reason"] or encoder.runtime_reason,
                "served": served,
                "startup_s": startup_s,
                "cached_startup_s": cached_startup_s,
                "catalogue": args.catalogue,
                "machine": machine,
                "floor": floor,
                "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
                "tracing": tracing,
                "images": {"rows": [asdict(r) for r in images_rows], "figures": images_figures},
            },
            indent=2,
        )
    )
    print(f"\nwritten: {out}")
    return 0


async def served_model(target: str) -> dict[str, Any]:
    """How the server runs its towers, as its GetServiceInfo says (runtime_reason and cpu where it reports them)."""
    async with ImageSearchClient(target) as client:
        model = (await client.service_info()).model
    return {
        "image_tower": f"{model.image_tower_runtime} {model.image_tower_precision}",
        "text_tower": f"{model.text_tower_runtime} {model.text_tower_precision}",
        "torch_threads": model.torch_threads,
        "runtime_reason": getattr(model, "runtime_reason", ""),
        "cpu": getattr(model, "cpu", ""),
    }


if __name__ == "__main__":
    random.seed(0)
    sys.exit(asyncio.run(main()))
