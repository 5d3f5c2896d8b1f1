"""HTTP/JSON port vs gRPC: the same text search through both ports of one real server (a subprocess), on loopback.

    .venv/bin/python benchmarks/http_port.py --quick --model synthetic-clip
    .venv/bin/python benchmarks/http_port.py --quick                       # ViT-B-32 architecture, random weights

Each round calls, in turn: gRPC Search (the client stream, one message), gRPC SearchInline (unary) and HTTP
SearchInline (a JSON POST through httpx on a kept-alive connection), so the three paths share the machine's load
within one run. `uncached` rounds search a text no path searched before (the text is encoded, the store
searched); `cached` rounds repeat one text (the result cache answers, so the transport is most of the time).
Prints p50/p95 per path and the HTTP - gRPC Search difference of the medians, and writes them as JSON under
benchmarks/results/. Never asserts on time; exits non-zero only when a call fails.
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
from PIL import Image

from imagesearch.client import ImageSearchClient
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from imagesearch.v1 import products_pb2

# The gRPC benchmark's helpers (this directory is on sys.path when a benchmark runs as a script).
from service_server import free_port, wait_serving  # isort: skip

RESULTS_DIR = Path(__file__).parent / "results"
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown"]
KINDS = ["mug", "shoe", "bag", "lamp", "shirt", "hat", "bottle", "chair"]


def jpeg(seed: int) -> bytes:
    rng = random.Random(seed)
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3))).save(buffer, format="JPEG")
    return buffer.getvalue()


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


def summary(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000, 3),
        "n": len(ordered),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32:random", help="open_clip spec (default: ViT-B-32:random)")
    parser.add_argument("-n", type=int, help="rounds per kind (default 200; 60 with --quick)")
    parser.add_argument("--catalogue", type=int, help="products (default 2000; 300 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    rounds = args.n or (60 if args.quick else 200)
    catalogue = args.catalogue or (300 if args.quick else 2000)

    grpc_port, http_port = free_port(), free_port()
    target, base_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    with tempfile.TemporaryDirectory() as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGESEARCH_", "OTEL_"))}
        env.update(
            IMAGESEARCH_HOST="127.0.0.1",
            IMAGESEARCH_PORT=str(grpc_port),
            IMAGESEARCH_HTTP_PORT=str(http_port),
            IMAGESEARCH_DATA_DIR=data_dir,
            IMAGESEARCH_MODEL=args.model,
            IMAGESEARCH_DEVICE="cpu",
            IMAGESEARCH_LOG_LEVEL="warning",
        )
        server = subprocess.Popen([sys.executable, "-m", "imagesearch.cli", "serve"], env=env)
        try:
            await wait_serving(target)
            async with ImageSearchClient(target) as client:
                items = (
                    (products_pb2.Product(id=f"p{i:05d}", name=f"{COLOURS[i % 10]} {KINDS[i % 8]}"), jpeg(i))
                    for i in range(catalogue)
                )
                async for response in client.index_products(items):
                    if response.HasField("error"):
                        raise RuntimeError(response.error.message)
            results = await measure(target, base_url, rounds)
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"\nHTTP/JSON vs gRPC text search, model {args.model}, {catalogue} products, {rounds} rounds per kind")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print(f"{'kind':<10} {'path':<22} {'p50 ms':>8} {'p95 ms':>8}")
    for kind, paths in results.items():
        for path, stats in paths.items():
            if isinstance(stats, dict):
                print(f"{kind:<10} {path:<22} {stats['p50_ms']:>8.2f} {stats['p95_ms']:>8.2f}")
        print(f"{kind:<10} {'HTTP - gRPC Search':<22} {paths['http_minus_grpc_p50_ms']:>8.2f}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"http-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"model": args.model, "catalogue": catalogue, "rounds": rounds, **results}, indent=2))
    print(f"\nwritten: {out}")
    return 0


async def measure(target: str, base_url: str, rounds: int) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    async with (
        grpc.aio.insecure_channel(target) as channel,
        httpx.AsyncClient(base_url=base_url, timeout=30) as http,
    ):
        stub = pb_grpc.ImageSearchServiceStub(channel)
        path = "/imagesearch.v1.ImageSearchService/SearchInline"

        async def grpc_search(text: str) -> None:
            async def messages():  # type: ignore[no-untyped-def]
                yield pb.SearchRequest(query=pb.SearchQuery(text=text, top_k=10))

            await stub.Search(messages(), timeout=30)

        async def grpc_inline(text: str) -> None:
            await stub.SearchInline(pb.SearchInlineRequest(query=pb.SearchQuery(text=text, top_k=10)), timeout=30)

        async def http_inline(text: str) -> None:
            response = await http.post(path, json={"query": {"text": text, "top_k": 10}})
            response.raise_for_status()

        calls = {"grpc Search": grpc_search, "grpc SearchInline": grpc_inline, "http SearchInline": http_inline}
        for kind in ("uncached", "cached"):
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for warm in range(5):  # connections, first encodes
                for call in calls.values():
                    await call(f"warm up {kind} {warm} {call.__name__}")
            for i in range(rounds):
                order = list(calls.items())
                random.Random(i).shuffle(order)  # no path always runs right after another
                for name, call in order:
                    text = "a red mug" if kind == "cached" else f"{COLOURS[i % 10]} {KINDS[i % 8]} {i} {name}"
                    samples[name].append(await timed(lambda c=call, t=text: c(t)))  # type: ignore[misc]
            stats: dict[str, object] = {name: summary(s) for name, s in samples.items()}
            http_p50 = statistics.median(samples["http SearchInline"]) * 1000
            grpc_p50 = statistics.median(samples["grpc Search"]) * 1000
            stats["http_minus_grpc_p50_ms"] = round(http_p50 - grpc_p50, 3)
            results[kind] = stats
    return results


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
