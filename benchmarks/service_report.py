"""The table of benchmarks/service.py: a row per path (percentiles, throughput, the floor and the torch fp32
reference sampled alongside), and the machine it ran on."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np


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


def percentiles(samples_s: list[float]) -> tuple[float, float, float]:
    ms = np.array(samples_s) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), float(np.percentile(ms, 99))


def row(path: str, samples_s: list[float], floor_ms: float | None = None, wall_s: float | None = None) -> Row:
    p50, p95, p99 = percentiles(samples_s)
    per_s = len(samples_s) / wall_s if wall_s else 1.0 / statistics.mean(samples_s)
    return Row(path, len(samples_s), p50, p95, p99, per_s, floor_ms)


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
    print_rows(rows)
    batched, reference = floor["batch32_images_per_s"], floor["reference_batch32_images_per_s"]
    for r in rows:
        if r.path.startswith(("image search, 32", "bulk import")):
            print(
                f"  {r.path}: {r.per_s:.1f}/s = {r.per_s / batched:.2f} x the bare batched encoder ({batched:.1f}/s)"
                f" = {r.per_s / reference:.2f} x torch fp32 batched ({reference:.1f}/s)"
            )


def print_rows(rows: list[Row]) -> None:
    """The table: one line per path, its percentiles, rate, and ratios to the floor and the reference if it has
    them."""
    header_row = f"{'path':<48} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'per s':>8} {'p50/floor':>10}"
    print(header_row + f" {'vs torch fp32':>14}")
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        vs_reference = f"{r.p50_ms / r.reference_ms:.2f}" if r.reference_ms and "concurrent" not in r.path else ""
        print(
            f"{r.path:<48} {r.n:>5} {r.p50_ms:>9.2f} {r.p95_ms:>9.2f} {r.p99_ms:>9.2f} {r.per_s:>8.1f} {ratio:>10}"
            f" {vs_reference:>14}"
        )
