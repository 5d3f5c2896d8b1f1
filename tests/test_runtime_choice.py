"""The runtime choice (model/runtime_choice.py) through ClipEncoder.load on the bundled model: which candidate wins
for given forward times, the second hyper-thread, explicit settings, a disagreeing candidate, and the stored choice.

The forward times are the test's (the measuring function is replaced): what is checked is the rule that turns
times into a choice, and that the towers served are the ones chosen. One test measures for real.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openvino")

from imagesearch.model import runtime_choice
from imagesearch.model.cpus import CpuBudget
from imagesearch.model.encoder import ClipEncoder
from imagesearch.model.openvino_runtime import OpenVinoImageTower

MODEL = "synthetic-clip"
Times = dict[str, float]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runtime cache holding the bundled model's converted towers (no choice): copied into each test's cache."""
    directory = tmp_path_factory.mktemp("converted")
    ClipEncoder.load(MODEL, device="cpu", runtime="openvino", precision="f32", threads=1, runtime_cache_dir=directory)
    return directory


@pytest.fixture
def cache_dir(converted: Path, tmp_path: Path) -> Path:
    shutil.copytree(converted, tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def two_cores_with_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same candidates on every machine: 2 CPUs on 2 cores, and bf16 offered (where the CPU lacks it, OpenVINO
    # runs the bf16 candidate in f32, which changes nothing here: the times are the test's).
    monkeypatch.setattr(CpuBudget, "detect", classmethod(lambda cls: CpuBudget(logical=2, physical=2)))
    monkeypatch.setattr(runtime_choice, "native_precisions", lambda: frozenset({"bf16"}))


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[list[Any]]]:
    """Replace the measurement with given medians, in the order the chooser asks: the image tower's candidates,
    the thread counts (when there are two), the text tower's candidates. Returns what was measured."""

    def install(*tables: dict[Any, float]) -> list[list[Any]]:
        remaining: Iterator[dict[Any, float]] = iter(tables)
        asked: list[list[Any]] = []

        def fake(runners: dict[Any, Callable[[], object]], warm: Any = ()) -> dict[Any, float]:
            for run in runners.values():
                run()  # the candidate really runs once: a broken one fails the test
            table = next(remaining)
            asked.append(list(runners))
            return {key: table[key if isinstance(key, int) else key.label] for key in runners}

        monkeypatch.setattr(runtime_choice, "_measure", fake)
        return asked

    return install


def never_measured(runners: dict[Any, Callable[[], object]], warm: Any = ()) -> dict[Any, float]:
    raise AssertionError("measured, though nothing was left to choose")


def load(cache_dir: Path, **options: Any) -> ClipEncoder:
    return ClipEncoder.load(MODEL, device="cpu", runtime_cache_dir=cache_dir, **options)


IMAGE_BF16_FAST: Times = {"openvino f32": 51.0, "openvino bf16": 27.0, "torch fp32": 92.0}
TEXT_CLOSE: Times = {"openvino f32": 8.0, "openvino bf16": 7.5, "torch fp16": 10.0, "torch fp32": 10.0}


def test_auto_takes_bf16_where_it_is_clearly_faster_and_f32_where_it_is_not(
    cache_dir: Path, measured: Callable[..., list[list[Any]]]
) -> None:
    asked = measured(IMAGE_BF16_FAST, TEXT_CLOSE)
    encoder = load(cache_dir)
    assert (encoder.image_runtime, encoder.image_precision) == ("openvino", "bf16")
    # bf16's 7.5 ms is within 10% of f32's 8.0: the more accurate f32 serves queries.
    assert (encoder.text_runtime, encoder.text_precision) == ("openvino", "fp32")
    assert [c.label for c in asked[0]] == ["openvino f32", "openvino bf16", "torch fp32"]
    assert "image forward openvino bf16 27.0 ms" in encoder.runtime_reason
    assert encoder.cpu and encoder.torch_threads == 2


def test_auto_keeps_f32_where_bf16_is_no_faster(cache_dir: Path, measured: Callable[..., list[list[Any]]]) -> None:
    # An Intel Xeon without AMX: AVX512_BF16's dot product is no faster than its two f32 FMA units.
    measured({"openvino f32": 30.0, "openvino bf16": 33.0, "torch fp32": 56.0}, TEXT_CLOSE)
    encoder = load(cache_dir)
    assert (encoder.image_runtime, encoder.image_precision) == ("openvino", "fp32")


def test_auto_takes_torch_where_openvino_is_clearly_slower(
    cache_dir: Path, measured: Callable[..., list[list[Any]]]
) -> None:
    measured(
        {"openvino f32": 80.0, "openvino bf16": 70.0, "torch fp32": 50.0},
        {"openvino f32": 12.0, "openvino bf16": 12.0, "torch fp16": 6.0, "torch fp32": 6.0},
    )
    encoder = load(cache_dir)
    assert (encoder.image_runtime, encoder.image_precision) == ("torch", "fp32")
    assert encoder.text_runtime == "torch" and encoder.text_path.startswith("unpadded")


@pytest.mark.parametrize(
    ("two_threads_ms", "expected"),
    [pytest.param(40.0, 2, id="second-hyper-thread-pays"), pytest.param(47.0, 1, id="second-hyper-thread-idle")],
)
def test_second_hyper_thread_is_used_only_where_it_pays(
    cache_dir: Path,
    measured: Callable[..., list[list[Any]]],
    monkeypatch: pytest.MonkeyPatch,
    two_threads_ms: float,
    expected: int,
) -> None:
    # A VM whose 2 vCPUs are the two hyper-threads of one core.
    monkeypatch.setattr(CpuBudget, "detect", classmethod(lambda cls: CpuBudget(logical=2, physical=1)))
    asked = measured(IMAGE_BF16_FAST, {1: 50.0, 2: two_threads_ms}, TEXT_CLOSE)
    encoder = load(cache_dir)
    assert asked[1] == [1, 2]
    assert encoder.torch_threads == expected
    assert encoder._image_tower is not None and encoder._image_tower.threads == expected


def test_explicit_settings_are_used_without_measuring(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_choice, "_measure", never_measured)
    encoder = load(cache_dir, runtime="openvino", precision="f32", threads=1)
    assert (encoder.image_runtime, encoder.image_precision, encoder.torch_threads) == ("openvino", "fp32", 1)
    assert encoder.runtime_reason.endswith("as configured")
    torch_only = load(cache_dir, runtime="torch")
    assert torch_only.image_runtime == "torch" and "runtime torch was requested" in torch_only.runtime_reason


def test_choice_is_stored_and_reused_until_the_thread_budget_changes(
    cache_dir: Path, measured: Callable[..., list[list[Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    measured(IMAGE_BF16_FAST, TEXT_CLOSE)
    first = load(cache_dir)
    assert len(list(cache_dir.glob("choice-*.json"))) == 1
    monkeypatch.setattr(runtime_choice, "_measure", never_measured)
    again = load(cache_dir)
    assert (again.image_precision, again.text_precision) == (first.image_precision, first.text_precision)
    assert again.runtime_reason.endswith("reused")
    # Another CPU budget (a container given one CPU) is another choice.
    monkeypatch.setattr(CpuBudget, "detect", classmethod(lambda cls: CpuBudget(logical=1, physical=1)))
    measured({"openvino f32": 60.0, "openvino bf16": 58.0, "torch fp32": 150.0}, TEXT_CLOSE)
    single = load(cache_dir)
    assert (single.image_precision, single.torch_threads) == ("fp32", 1)
    assert len(list(cache_dir.glob("choice-*.json"))) == 2


def test_candidate_disagreeing_with_torch_fp32_is_dropped(
    cache_dir: Path, measured: Callable[..., list[list[Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = OpenVinoImageTower.__call__

    def broken_bf16(self: OpenVinoImageTower, pixels: Any) -> np.ndarray:
        vectors = served(self, pixels)
        return -vectors if self.precision == "bf16" else vectors  # as an overflow or a broken kernel might

    monkeypatch.setattr(OpenVinoImageTower, "__call__", broken_bf16)
    asked = measured({"openvino f32": 51.0, "torch fp32": 92.0}, TEXT_CLOSE)
    encoder = load(cache_dir)
    assert [c.label for c in asked[0]] == ["openvino f32", "torch fp32"]
    assert encoder.image_precision == "fp32"


@pytest.mark.slow
def test_measured_choice_on_this_cpu_serves_vectors_that_agree_with_torch_fp32(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # this CPU as it is: its own budget and precisions, measured for real
    encoder = load(cache_dir)
    reference = ClipEncoder.load(MODEL, device="cpu", runtime="torch", text_weights="fp32")
    texts = ["a red mug", "a striped blue shirt"]
    assert np.sum(encoder.encode_texts(texts) * reference.encode_texts(texts), axis=1).min() >= 0.999
    assert "measured on this CPU" in encoder.runtime_reason


def test_measuring_stops_running_a_hopeless_candidate() -> None:
    calls = {"fast": 0, "slower": 0, "slowest": 0}

    def runner(name: str, seconds: float) -> Callable[[], object]:
        def run() -> None:
            calls[name] += 1
            time.sleep(seconds)

        return run

    times = runtime_choice._measure(
        {"fast": runner("fast", 0.002), "slower": runner("slower", 0.004), "slowest": runner("slowest", 0.03)}
    )
    assert times["slowest"] > 5 * times["slower"] > 5 * times["fast"] / 2
    # A warm-up and one round for the one 15x slower; the two within 3x of each other keep alternating.
    assert calls["slowest"] == 2
    assert calls["slower"] == calls["fast"] >= 4
