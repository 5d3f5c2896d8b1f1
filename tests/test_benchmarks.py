"""The benchmark scripts still run end to end (a smoke run on the small bundled model, minimal sizes).

Their figures are not checked: speed lives in the benchmarks' own output, never in asserts. What is checked is
that the scripts work, so that the numbers in the README can be reproduced with the code as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_service_benchmark_runs_and_writes_its_table(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCHMARKS / "service.py"), "--quick", "--model", "synthetic-clip"]
    command += ["--catalogue", "300", "--port", str(free_port()), "--results-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "text search, uncached" in done.stdout and "x the bare batched encoder" in done.stdout
    [written] = tmp_path.glob("service-*.json")
    table = json.loads(written.read_text())
    assert table["model"] == "synthetic-clip" and table["text_path"].startswith("unpadded")
    paths = [row["path"] for row in table["rows"]]
    assert any(path.startswith("image search, 32 concurrent") for path in paths)
    assert all(row["n"] > 0 and row["p50_ms"] > 0 for row in table["rows"])
    assert table["floor"]["text_ms"] > 0 and table["floor"]["batch32_images_per_s"] > 0
    # The torch fp32 reference is sampled in the same run, and both start-ups are timed.
    assert table["floor"]["reference_image_ms"] > 0 and table["floor"]["reference_batch32_images_per_s"] > 0
    assert table["startup_s"] > 0 and table["cached_startup_s"] > 0
    assert "x torch fp32 batched" in done.stdout
    # The CPU and the server's runtime choice head the output and go into the JSON.
    assert done.stdout.index("cpu: ") < done.stdout.index("runtime choice: ") < done.stdout.index("p50 ms")
    assert table["cpu"]["name"] and table["cpu"]["logical"] >= table["cpu"]["physical"] >= 1
    # Hybrid search with and without ranking rules, alternating, and the ratio of their p50s.
    assert {"text search, uncached, hybrid, plain (alternating)"} < set(paths)
    assert "text search, uncached, hybrid, with 3 ranking rules (alternating)" in paths
    assert "hybrid + 3 ranking rules p50 / plain hybrid p50" in done.stdout
    # One image per product against several: searches, bulk imports, store size and memory.
    images = table["images"]
    assert [row["path"] for row in images["rows"]] == [
        "image search, uncached, 1 image per product (alternating)",
        "image search, uncached, 5 images per product (alternating)",
        "bulk import, 32 products x 1 image (IndexProducts)",
        "bulk import, 32 products x 5 images (IndexProducts)",
    ]
    figures = images["figures"]
    assert figures["store_disk_mb, 5 images"] > figures["store_disk_mb, 1 image"] > 0
    assert figures["server_rss_mb, 5 images"] > 0 and figures["bulk_images_per_s, 5 images"] > 0
    assert figures["search_p50_ratio"] > 0
    assert table["runtime_reason"] and table["served"]["image_tower"] == table["image_tower"]


@pytest.mark.slow
def test_service_benchmark_with_tracing_compares_with_an_untraced_twin(tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra is not installed")
    command = [sys.executable, str(BENCHMARKS / "service.py"), "--quick", "--model", "synthetic-clip", "--tracing"]
    command += ["-n", "3", "--catalogue", "300", "--port", str(free_port()), "--results-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [written] = tmp_path.glob("service-*.json")
    tracing = json.loads(written.read_text())["tracing"]
    # Every request of the traced server was sampled and exported: the stand-in collector received the spans.
    assert tracing["spans_exported"] > 0
    assert [row["path"] for row in tracing["rows"]] == [
        "text search, uncached, tracing off",
        "text search, uncached, tracing on",
    ]
    assert "median of the per-round differences" in done.stdout


@pytest.mark.slow
@pytest.mark.slow
def test_http_port_benchmark_runs_and_writes_its_table(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCHMARKS / "http_port.py"), "--model", "synthetic-clip", "-n", "3"]
    command += ["--catalogue", "20", "--results-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [written] = tmp_path.glob("http-*.json")
    table = json.loads(written.read_text())
    for kind in ("uncached", "cached"):
        assert all(table[kind][path]["n"] == 3 for path in ("grpc Search", "grpc SearchInline", "http SearchInline"))
        assert "http_minus_grpc_p50_ms" in table[kind]


@pytest.mark.parametrize("script", ["store_edge.py", "features.py"])
def test_store_benchmarks_run(script: str) -> None:
    command = [sys.executable, str(BENCHMARKS / script), "--n", "2000", "--dim", "64", "--queries", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " p50 " in done.stdout
