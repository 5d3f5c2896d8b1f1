"""End-to-end service benchmark: the real server (a subprocess) over real gRPC on loopback.

    .venv/bin/python benchmarks/service.py                 # ViT-B-32 architecture, random weights, CPU
    .venv/bin/python benchmarks/service.py --quick         # fewer iterations, smaller catalogue
    .venv/bin/python benchmarks/service.py --device cuda   # on a GPU (fp16)
    .venv/bin/python benchmarks/service.py --runtime torch # the image tower on torch instead of OpenVINO
    .venv/bin/python benchmarks/service.py --tracing       # the server traced (sampled, exported over OTLP)

Prints one table: p50/p95/p99 latency and throughput per path, next to the bare model floor (the model called directly
in this process, no server, sampled between the service's calls, on the same runtime and precision as the server), and
the ratio service/floor. Uncached text searches also run in dense and in hybrid mode (the default of a text-only
search), alternating call by call, and the ratio of their p50s is printed. Image paths are also compared with a fixed
reference sampled in the same run: the torch fp32 image tower (`vs torch fp32`), so the gain of a runtime over it is a
ratio within one run. With --tracing the server traces every request (sampled, exported over OTLP/gRPC to a stand-in
collector in this process) and the table shows the traced server; then uncached text searches alternate between two
fresh servers, one traced and one not, for the overhead of tracing within one run. Writes the table as JSON under
benchmarks/results/. Random weights cost the same compute as pretrained ones, so these are speed figures only: they say
nothing about relevance. Never asserts on time; exits non-zero only when an RPC fails.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw
from timing import median_ms  # a sibling script

from imagesearch.client import ImageSearchClient, Product
from imagesearch.domain import Product as DomainProduct
from imagesearch.model.encoder import ClipEncoder
from imagesearch.store import EdgeStore

RESULTS_DIR = Path(__file__).parent / "results"
# A pause between a floor call and a service call: after a forward pass, torch's OpenMP threads keep spinning
# for a moment, and on a small machine the spinning threads of one process would slow the other's next call.
SETTLE_S = 0.01
CATEGORIES = ["mugs", "shoes", "bags", "lamps", "shirts", "hats", "bottles", "chairs"]


@dataclass
class Row:
    path: str
    n: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    per_s: float
    floor_ms: float | None = None
    reference_ms: float | None = None

    @property
    def ratio(self) -> float | None:
        return self.p50_ms / self.floor_ms if self.floor_ms else None


def cpu_flags() -> str:
    """The CPU's model and the flags the runtimes' speed depends on (AVX-512, bf16, AMX), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu flags unknown"
    model = next((line.partition(":")[2].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.partition(":")[2].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return f"{model}; " + " ".join(f for f in wanted if f in flags)


def percentiles(samples_s: list[float]) -> tuple[float, float, float]:
    ms = np.array(samples_s) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), float(np.percentile(ms, 99))


def row(path: str, samples_s: list[float], floor_ms: float | None = None, wall_s: float | None = None) -> Row:
    p50, p95, p99 = percentiles(samples_s)
    per_s = len(samples_s) / wall_s if wall_s else 1.0 / statistics.mean(samples_s)
    return Row(path, len(samples_s), p50, p95, p99, per_s, floor_ms)


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


async def fill_catalogue(data_dir: Path, model_id: str, dimension: int, size: int) -> None:
    # Random unit vectors stand in for indexed products: the store's cost depends on count and filters, not on
    # what the vectors mean, and encoding 10k images with ViT-B-32 on 2 cores would take ~10 minutes.
    store = await EdgeStore.open(data_dir / "qdrant-edge", dimension=dimension, model_id=model_id)
    rng = np.random.default_rng(0)
    try:
        for start in range(0, size, 1000):
            vectors = rng.standard_normal((min(1000, size - start), dimension)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            items = [
                (
                    DomainProduct(
                        id=f"bench-{start + i}",
                        name=f"product {start + i}",
                        category=CATEGORIES[(start + i) % len(CATEGORIES)],
                        price=float((start + i) % 200),
                        attributes={"colour": ["red", "blue", "green"][(start + i) % 3]},
                    ),
                    vector,
                )
                for i, vector in enumerate(vectors)
            ]
            await store.upsert(items)
    finally:
        await store.close()


def start_server(
    data_dir: Path,
    args: argparse.Namespace,
    started_at: float,
    *,
    port: int | None = None,
    otlp_endpoint: str | None = None,
) -> subprocess.Popen[bytes]:
    # OpenTelemetry's variables too: a server is traced only when asked (otlp_endpoint), never by this shell's.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGESEARCH_", "OTEL_"))}
    if otlp_endpoint is not None:
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint,
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_TRACES_SAMPLER="always_on",
            OTEL_SERVICE_NAME="imagesearch-benchmark",
        )
    env.update(
        IMAGESEARCH_PORT=str(port or args.port),
        IMAGESEARCH_HOST="127.0.0.1",
        IMAGESEARCH_DATA_DIR=str(data_dir),
        IMAGESEARCH_MODEL=args.model,
        IMAGESEARCH_DEVICE=args.device,
        IMAGESEARCH_LOG_LEVEL="warning",
        IMAGESEARCH_TEXT_WEIGHTS=args.text_weights,
        IMAGESEARCH_RUNTIME=args.runtime,
        IMAGESEARCH_PRECISION=args.precision,
    )
    return subprocess.Popen([sys.executable, "-m", "imagesearch.cli", "serve"], env=env)


class OtlpSink:
    """A stand-in OpenTelemetry collector on loopback: accepts OTLP/gRPC trace exports and counts the spans, so a
    traced server pays for creating, processing and exporting every span, as it would with a real collector."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self
        self.spans = 0

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.endpoint = f"http://127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def stop(self) -> None:
        self._server.stop(None)


async def wait_serving(target: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
    raise RuntimeError("server did not become SERVING")


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
        rows.append(await bulk_import(client, 64 if quick else 256))
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


async def tracing_overhead(
    args: argparse.Namespace, data_dir: Path, otlp_endpoint: str, model_id: str, dimension: int
) -> tuple[list[Row], dict[str, float]]:
    """Uncached text searches alternating between two servers started together from identical copies of the
    catalogue, one traced (sampled, exported to `otlp_endpoint`) and one not, each call after a pause, the order
    swapped every round: both see the same machine, which on a shared one moves more between runs than tracing
    costs, and neither has a history the other lacks (a server that has just started runs slower for a while).
    Returns the rows (off, on) and figures: the median of the per-round differences (on - off, in ms), which slow
    swings of the machine's load do not move, and each server's CPU time per search (all its threads, the span
    exporter's included), which waiting does not move."""
    servers: dict[str, subprocess.Popen[bytes]] = {}
    ports = {"off": free_port(), "on": free_port()}
    off_s: list[float] = []
    on_s: list[float] = []
    rounds = max(100, 4 * args.n)
    cpu_s: dict[int, float] = {}
    try:
        for name, port in ports.items():
            ab_dir = data_dir / f"tracing-{name}"
            await fill_catalogue(ab_dir, model_id, dimension, args.catalogue)
            # The runtime's converted graph from the main run: both start as a restarted server would.
            if (data_dir / "runtime-cache").is_dir():
                shutil.copytree(data_dir / "runtime-cache", ab_dir / "runtime-cache", dirs_exist_ok=True)
            endpoint = otlp_endpoint if name == "on" else None
            servers[name] = start_server(ab_dir, args, time.perf_counter(), port=port, otlp_endpoint=endpoint)
        for port in ports.values():
            await wait_serving(f"127.0.0.1:{port}")
        twin, traced = servers["off"], servers["on"]
        async with (
            ImageSearchClient(f"127.0.0.1:{ports['off']}") as off,
            ImageSearchClient(f"127.0.0.1:{ports['on']}") as on,
        ):
            pairs = [(off, off_s), (on, on_s)]
            for i in range(-20, rounds):
                if i == 0:
                    cpu_s = {pid: process_cpu_s(pid) for pid in (twin.pid, traced.pid)}
                for client, into in pairs if i % 2 else pairs[::-1]:
                    # Longer than SETTLE_S: the other server's OpenMP threads spin on after its forward.
                    await asyncio.sleep(0.05)
                    started = time.perf_counter()
                    await client.search(text=f"a green canvas tote, size {i}")
                    if i >= 0:
                        into.append(time.perf_counter() - started)
            # The traced server's last spans are exported within its batch delay (5 s): count that work too.
            await asyncio.sleep(6)
            cpu_s = {pid: process_cpu_s(pid) - before for pid, before in cpu_s.items()}
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=60)
    figures = {
        "median_paired_difference_ms": statistics.median(on - off for on, off in zip(on_s, off_s, strict=True)) * 1e3,
        "cpu_ms_per_search_off": cpu_s[twin.pid] / rounds * 1000.0,
        "cpu_ms_per_search_on": cpu_s[traced.pid] / rounds * 1000.0,
    }
    return [row("text search, uncached, tracing off", off_s), row("text search, uncached, tracing on", on_s)], figures


def process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used, all threads (Linux: /proc/PID/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def hybrid_vs_dense(client: ImageSearchClient, n: int) -> list[Row]:
    """Uncached text searches in dense and in hybrid mode (the default of a text-only search), alternating call by
    call, the order swapped every round: both modes see the same machine. Every call has a text of its own, so
    neither cache answers."""
    samples: dict[str, list[float]] = {"dense": [], "hybrid": []}
    for i in range(-3, n):
        for k, mode in enumerate(("dense", "hybrid") if i % 2 else ("hybrid", "dense")):
            await asyncio.sleep(SETTLE_S)
            started = time.perf_counter()
            await client.search(text=f"a green canvas tote, size {2 * i + k}", mode=mode)
            if i >= 0:
                samples[mode].append(time.perf_counter() - started)
    return [row(f"text search, uncached, {mode} (alternating)", samples[mode]) for mode in ("dense", "hybrid")]


async def bulk_import(client: ImageSearchClient, count: int) -> Row:
    items = [(Product(id=f"bulk-{i}", category="bags"), photo_like_jpeg(50_000 + i)) for i in range(count)]
    started = time.perf_counter()
    last = started
    gaps: list[float] = []
    async for response in client.index_products(items):
        if response.HasField("error"):
            raise RuntimeError(f"bulk import failed for {response.id}: {response.error.message}")
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return row(f"bulk import, {count} products (IndexProducts)", gaps, None, time.perf_counter() - started)


def print_table(rows: list[Row], floor: dict[str, float], header: str) -> None:
    print()
    print(header)
    print(
        f"floor (bare model in the benchmark process, sampled between the service's calls): one text "
        f"{floor['text_ms']:.1f} ms on the service's path ({floor['text_padded_ms']:.1f} ms on open_clip's padded "
        f"path, {floor['text_padded_ms'] / floor['text_ms']:.1f}x); one image {floor['image_ms']:.1f} ms (decode + "
        f"preprocess + forward); batched images {floor['batch32_images_per_s']:.1f}/s (forward only, batch 32)"
    )
    print(
        f"reference (torch fp32 image tower, sampled alongside): one image {floor['reference_image_ms']:.1f} ms; "
        f"batched {floor['reference_batch32_images_per_s']:.1f}/s"
    )
    print(
        f"text forward, one query, sampled alongside: {floor['text_ms']:.1f} ms on the served path, "
        f"{floor['reference_text_ms']:.1f} ms on the torch path ({floor['text_ms'] / floor['reference_text_ms']:.2f}x)"
    )
    print("p50/floor: each path against the floor samples taken alongside it (text: one text; image: one image)")
    print("vs torch fp32: p50 against the torch fp32 reference's one image, sampled alongside (lower is faster)")
    header_row = f"{'path':<48} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'per s':>8} {'p50/floor':>10}"
    print(header_row + f" {'vs torch fp32':>14}")
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        vs_reference = f"{r.p50_ms / r.reference_ms:.2f}" if r.reference_ms and "concurrent" not in r.path else ""
        print(
            f"{r.path:<48} {r.n:>5} {r.p50_ms:>9.2f} {r.p95_ms:>9.2f} {r.p99_ms:>9.2f} {r.per_s:>8.1f} {ratio:>10}"
            f" {vs_reference:>14}"
        )
    batched, reference = floor["batch32_images_per_s"], floor["reference_batch32_images_per_s"]
    for r in rows:
        if r.path.startswith(("image search, 32", "bulk import")):
            print(
                f"  {r.path}: {r.per_s:.1f}/s = {r.per_s / batched:.2f} x the bare batched encoder ({batched:.1f}/s)"
                f" = {r.per_s / reference:.2f} x torch fp32 batched ({reference:.1f}/s)"
            )


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
        "--tracing",
        action="store_true",
        help="trace the server (always_on sampler, OTLP/gRPC to a local stand-in collector; needs the tracing "
        "extra) and compare uncached text search with an untraced twin",
    )
    args = parser.parse_args()
    args.n = args.n or (10 if args.quick else 30)
    args.catalogue = args.catalogue or (2000 if args.quick else 10_000)

    print(
        f"model: {args.model} on {args.device}"
        + (" (random weights: speed only, no relevance)" * ("random" in args.model))
    )
    torch.manual_seed(0)
    encoder = ClipEncoder.load(
        args.model,
        device=args.device,
        text_weights=args.text_weights,
        runtime=args.runtime,
        precision=args.precision,
    )
    torch.manual_seed(0)
    reference = ClipEncoder.load(args.model, device=args.device, runtime="torch", text_weights=args.text_weights)
    text_path = encoder.text_path
    model_id, dimension = encoder.model_id, encoder.dimension

    sink = OtlpSink() if args.tracing else None
    otlp_endpoint = sink.endpoint if sink is not None else None
    tracing_rows: list[Row] = []
    tracing_figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="imagesearch-bench-") as tmp:
        data_dir = Path(tmp)
        await fill_catalogue(data_dir, model_id, dimension, args.catalogue)
        server = start_server(data_dir, args, started_at := time.perf_counter(), otlp_endpoint=otlp_endpoint)
        try:
            target = f"127.0.0.1:{args.port}"
            await wait_serving(target)
            startup_s = time.perf_counter() - started_at
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

    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu_flags()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name(0)}"
    image_tower = f"{encoder.image_runtime} {encoder.image_precision}"
    towers = f"image tower {image_tower}, text {text_path}"
    header = (
        f"imagesearch service benchmark: {args.model} ({towers}) on {args.device}; "
        f"catalogue {args.catalogue}; {machine}" + ("; tracing on (sampled, exported)" if args.tracing else "")
    )
    print_table(rows, floor, header)
    dense, hybrid = (
        next(r for r in rows if r.path == f"text search, uncached, {m} (alternating)") for m in ("dense", "hybrid")
    )
    print(f"hybrid text search p50 / dense p50, alternating in this run: {hybrid.p50_ms / dense.p50_ms:.3f}")
    print(
        f"server start-up, process start to SERVING: {startup_s:.1f} s with the runtime's conversion cache cold, "
        f"{cached_startup_s:.1f} s cached"
    )
    tracing: dict[str, Any] | None = None
    if sink is not None:
        sink.stop()  # after the servers: each exported what it still held as it stopped
        off, on = tracing_rows
        tracing = {
            "spans_exported": sink.spans,
            "rows": [asdict(r) for r in tracing_rows],
            "p50_difference_ms": on.p50_ms - off.p50_ms,
            **tracing_figures,
        }
        print(f"\ntracing: {sink.spans} spans exported to the local collector; alternating calls, same run:")
        for r in tracing_rows:
            print(f"  {r.path:<40} n={r.n}  p50 {r.p50_ms:.2f} ms  p95 {r.p95_ms:.2f} ms  p99 {r.p99_ms:.2f} ms")
        cpu_off, cpu_on = tracing_figures["cpu_ms_per_search_off"], tracing_figures["cpu_ms_per_search_on"]
        paired = tracing_figures["median_paired_difference_ms"]
        print(
            f"  p50 difference: {on.p50_ms - off.p50_ms:+.2f} ms ({on.p50_ms / off.p50_ms:.3f}x); median of the "
            f"per-round differences (on - off, adjacent calls): {paired:+.2f} ms"
        )
        print(f"  server CPU per search: {cpu_off:.2f} ms off, {cpu_on:.2f} ms on ({cpu_on - cpu_off:+.2f} ms)")
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
                "startup_s": startup_s,
                "cached_startup_s": cached_startup_s,
                "catalogue": args.catalogue,
                "machine": machine,
                "floor": floor,
                "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
                "tracing": tracing,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    random.seed(0)
    sys.exit(asyncio.run(main()))
