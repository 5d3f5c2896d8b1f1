"""The server under benchmark (benchmarks/service.py, http_port.py): a catalogue of stand-in products, the server
as a subprocess, waiting for it to serve, a free port, its CPU time."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch.domain import Product as DomainProduct
from imagesearch.images import ProductImage
from imagesearch.store import EdgeStore

CATEGORIES = ["mugs", "shoes", "bags", "lamps", "shirts", "hats", "bottles", "chairs"]


# A day, and a fixed "now" for the catalogue's creation dates and the rules' newness decay.
DAY_S = 86_400.0
NOW_S = 1_764_547_200.0


async def fill_catalogue(data_dir: Path, model_id: str, dimension: int, size: int, images: int = 1) -> None:
    """`size` stand-in products with `images` image vectors each, numeric attributes (popularity, created_at) for
    ranking rules, categories, prices and a colour attribute."""
    # Random unit vectors stand in for indexed products: the store's cost depends on count and filters, not on
    # what the vectors mean, and encoding 10k images with ViT-B-32 on 2 cores would take ~10 minutes.
    store = await EdgeStore.open(data_dir / "qdrant-edge", dimension=dimension, model_id=model_id)
    rng = np.random.default_rng(0)
    try:
        for start in range(0, size, 1000):
            count = min(1000, size - start)
            vectors = rng.standard_normal((count, images, dimension)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
            items = [
                (
                    DomainProduct(
                        id=f"bench-{start + i}",
                        name=f"product {start + i}",
                        category=CATEGORIES[(start + i) % len(CATEGORIES)],
                        price=float((start + i) % 200),
                        attributes={"colour": ["red", "blue", "green"][(start + i) % 3]},
                        images=tuple(ProductImage(id=f"view-{k}") for k in range(images)),
                        numeric_attributes={
                            "popularity": float(rng.integers(0, 10_000)),
                            "created_at": NOW_S - float(rng.integers(0, 365)) * DAY_S,
                        },
                    ),
                    product_vectors,
                )
                for i, product_vectors in enumerate(vectors)
            ]
            await store.upsert(items)
    finally:
        await store.close()


def rss_mb(process: subprocess.Popen[bytes]) -> float:
    """The resident memory of a running process, MB (Linux: /proc/PID/status)."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_mb(directory: Path) -> float:
    """Space the files under `directory` take on disk, MB (allocated blocks: the store preallocates sparse files)."""
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file()) / 1e6


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


def process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used, all threads (Linux: /proc/PID/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
