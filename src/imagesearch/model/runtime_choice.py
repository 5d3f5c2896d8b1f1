"""How the towers run on this CPU: OpenVINO or torch, at which precision, on how many threads. Measured on the CPU
at hand, once per model, CPU and thread budget (the choice is kept in the runtime cache beside the converted
towers, so later starts read it); explicit settings always win.

Why measure rather than read the CPU's flags: the flags say what a CPU can compute, not what pays.
- bf16: AVX512_BF16 doubles the f32 rate on AMD Zen 4 (ViT-B-32's image tower on OpenVINO, 2 threads: bf16 27 ms,
  f32 51 ms), but Intel Xeons have two f32 FMA units per core and, without AMX (often hidden in cloud VMs), only
  AVX512_BF16's dot product for bf16, reported no faster and up to 2x slower than f32 (libxsmm/tpp-mlir#1025 on
  Emerald Rapids; intel/intel-extension-for-pytorch#637 on a Sapphire Rapids 8481C).
- f16: AVX512_FP16 (Intel Sapphire Rapids and later) computes f16 at twice the f32 rate; AMD has no such thing.
- threads: one thread per physical core (torch's default and OpenVINO's LATENCY hint); on a VM whose vCPUs are the
  hyper-threads of fewer cores, whether the second hyper-thread speeds a forward up (or only takes the core from
  image decoding and gRPC) depends on the CPU.

Candidates: OpenVINO at f32 and at each reduced precision the CPU computes natively, and torch (fp32 for the image
tower, the lean text path for the text tower). Each runs a forward on one input, in alternating rounds (a slow
spell hits all alike), and the median counts. The most accurate, simplest candidate within 10% of the fastest
wins: f32 before f16 before bf16, OpenVINO before torch (under contention torch's OpenMP team degrades far more),
fewer threads before more. An OpenVINO candidate whose output disagrees with torch fp32 (cosine < 0.99 on that
input: an overflow, a broken kernel) is dropped, and one 3x slower than the fastest after a round (1.5x after 3) is
not run further. Measuring costs seconds at the first start (ViT-B-32 on 2 cores: two more compilations and ~2 s of
forwards); later starts compile only what was chosen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import structlog
import torch

from imagesearch.errors import ModelLoadError
from imagesearch.model import runtime_cache
from imagesearch.model.calibration import Calibration
from imagesearch.model.cpus import CpuBudget, CpuModel
from imagesearch.model.loading import Runtime, precision_for, resolve_runtime
from imagesearch.model.openvino_runtime import (
    Conversion,
    ConvertedTower,
    OpenVinoImageTower,
    OpenVinoTextTower,
    native_precisions,
    resolve_precision,
)
from imagesearch.model.text_tower import LeanTextTower, TextWeights

log = structlog.get_logger(__name__)

T = TypeVar("T")
Tower = OpenVinoImageTower | OpenVinoTextTower
# A candidate within this fraction of the fastest counts as fast: the preference order decides among those.
MARGIN = 0.10
_MIN_AGREEMENT = 0.99
# Rounds of forwards: at least 5, more while 1.5 s last (a small model: up to 50). A candidate 3x slower than the
# fastest after a round, or 1.5x after 3 rounds, is left out of the rest (torch under contention: 10-20x).
_MIN_ROUNDS, _MAX_ROUNDS, _BUDGET_S = 5, 50, 1.5
_SETTLE, _HOPELESS, _FAR_SLOWER = 3, 1.5, 3.0
# Bump when what a stored choice means, or how it is measured, changes: stored choices then stop matching.
_CHOICE_VERSION = 1
_QUERY = "a photo of a red leather bag"


@dataclass(frozen=True)
class Candidate:
    """One way to run a tower: OpenVINO at a precision, or torch ("fp32"; the text tower: its weights' precision)."""

    runtime: Runtime
    precision: str

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"


@dataclass
class RuntimeChoice:
    """The towers to serve with (None: torch runs that tower), the thread count, and why."""

    image: OpenVinoImageTower | None
    text: OpenVinoTextTower | None
    threads: int
    reason: str  # one sentence: what was chosen and why, with the measured times
    cpu: str  # the CPU model and the flags that matter (cpus.CpuModel.describe)


def choose_runtime(
    model: Any,
    preprocess: Any,
    tokenizer: Any,
    *,
    device: str,
    runtime: Literal["auto", "torch", "openvino"],
    precision: Literal["auto", "bf16", "f32", "int8"],
    threads: int,
    text_weights: TextWeights,
    cache_dir: Path | None,
    calibration: Calibration | None,
) -> RuntimeChoice:
    """Decide how `model`'s towers run and build them; sets torch's thread count on the calling thread (the model
    thread). `cache_dir` None: converted and measured in a temporary directory, nothing kept."""
    budget = CpuBudget.detect()
    cpu = CpuModel.read().describe(budget)
    # Physical cores first: the preferred count, and the one the choice falls back to without measuring.
    thread_options = [threads] if threads > 0 else sorted({budget.physical, budget.logical})
    if resolve_runtime(runtime, device) == "torch":
        if runtime == "torch":
            why = "runtime torch was requested"
        elif device != "cpu":
            why = f"the towers run on torch on {device}"
        else:
            why = "the openvino package is not installed"
        return _torch_only(thread_options[0], f"torch {precision_for(device)}, {{threads}} threads: {why}", cpu)
    with _directory(cache_dir) as directory:
        explicit = runtime == "openvino"
        image = _attempt(
            lambda: OpenVinoImageTower.conversion(
                model.visual,
                cache_dir=directory,
                int8=precision == "int8",
                preprocess=preprocess,
                calibration=calibration,
            ),
            "image",
            explicit,
        )
        text = None
        if OpenVinoTextTower.supports(model):
            text = _attempt(lambda: OpenVinoTextTower.conversion(model, cache_dir=directory), "text", explicit)
        if image is None and text is None:
            return _torch_only(thread_options[0], "torch fp32, {threads} threads: OpenVINO cannot run this model", cpu)
        chooser = _Chooser(model, tokenizer, image, text, thread_options, text_weights, cpu)
        chooser.candidates(runtime, precision)
        return chooser.choose(directory)


class _Chooser:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image: Conversion | None,
        text: Conversion | None,
        thread_options: list[int],
        text_weights: TextWeights,
        cpu: str,
    ) -> None:
        self.model = model
        self.tokens = tokenizer([_QUERY])
        self.conversions = {"image": image, "text": text}
        self.converted: dict[str, ConvertedTower] = {}
        self.thread_options = thread_options
        self.text_weights = text_weights
        self.cpu = cpu
        self.options: dict[str, list[Candidate]] = {}
        self.towers: dict[tuple[str, str, int], Tower] = {}
        self.lean_text: LeanTextTower | None = None

    def candidates(self, runtime: str, precision: str) -> None:
        """Each tower's candidates, most preferred first, within what the settings leave open."""
        floats = ["f32", *(p for p in ("f16", "bf16") if p in native_precisions())]
        # An explicit precision is OpenVINO's: it leaves torch out; int8 is the image tower's alone.
        image_precisions = floats if precision == "auto" else [resolve_precision(precision)]
        text_precisions = floats if precision in ("auto", "int8") else [resolve_precision(precision)]
        with_torch = runtime == "auto" and precision == "auto"
        for kind, precisions, torch_precision in (
            ("image", image_precisions, "fp32"),
            ("text", text_precisions, self.text_weights if LeanTextTower.supports(self.model) else "fp32"),
        ):
            openvino = [Candidate("openvino", p) for p in precisions] if self.conversions[kind] else []
            self.options[kind] = openvino + (
                [Candidate("torch", torch_precision)] if with_torch or not openvino else []
            )

    def choose(self, directory: Path) -> RuntimeChoice:
        if all(len(options) == 1 for options in self.options.values()) and len(self.thread_options) == 1:
            image, text, threads = self.options["image"][0], self.options["text"][0], self.thread_options[0]
            return self._result(image, text, threads, f"{_summary(image, text, threads)}: as configured")
        key = self._key()
        record = runtime_cache.read_choice(directory, key)
        if record is not None and self._valid(record):
            image, text = Candidate(**record["image"]), Candidate(**record["text"])
            reason = f"{record['reason']}; measured at the first start ({record['measured_at']}), reused"
            return self._result(image, text, int(record["threads"]), reason)
        return self._measure_and_store(directory, key)

    def _measure_and_store(self, directory: Path, key: str) -> RuntimeChoice:
        started = time.perf_counter()
        load = os.getloadavg()[0]
        # Threads first on the heavier tower's winner at the preferred count, then the second count if there is one.
        image_ms, image = self._time("image", self.options["image"], self.thread_options[0])
        threads, thread_ms = self.thread_options[0], {}
        if len(self.thread_options) > 1:
            thread_ms = _measure({t: self._runner("image", image, t) for t in self.thread_options})
            threads = _pick(thread_ms, self.thread_options)
        text_ms, text = self._time("text", self.options["text"], threads)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        measured = [f"image forward {_times(image_ms)}"] if image_ms else []
        if thread_ms:
            measured.append(
                f"{image.label} on {' vs '.join(f'{t} threads {ms:.1f} ms' for t, ms in thread_ms.items())}"
            )
        if text_ms:
            measured.append(f"text forward {_times(text_ms)}")
        reason = (
            f"{_summary(image, text, threads)}: the most accurate within {MARGIN:.0%} of the fastest, measured on "
            f"this CPU ({'; '.join(measured)}; load {load:.1f})"
        )
        log.info(
            "runtime_measured",
            image_ms=_ms(image_ms),
            text_ms=_ms(text_ms),
            threads_ms=thread_ms,
            seconds=round(time.perf_counter() - started, 2),
        )
        runtime_cache.write_choice(
            directory,
            key,
            {"image": asdict(image), "text": asdict(text), "threads": threads, "reason": reason, "measured_at": when},
        )
        return self._result(image, text, threads, reason)

    def _time(
        self, kind: str, candidates: Sequence[Candidate], threads: int
    ) -> tuple[dict[Candidate, float], Candidate]:
        """Median ms of each candidate that agrees with torch fp32 ({} when one is left: nothing to compare), and
        the one to take: the most accurate within MARGIN of the fastest."""
        if len(candidates) == 1:
            return {}, candidates[0]
        reference = _unit_rows(self._reference(kind, threads)())
        runners = {}
        for candidate in candidates:
            run = self._runner(kind, candidate, threads)
            if candidate.runtime == "openvino":
                agreement = float(np.min(np.sum(_unit_rows(run()) * reference, axis=1)))
                if not agreement >= _MIN_AGREEMENT:
                    log.warning("runtime_candidate_disagrees", tower=kind, candidate=candidate.label, cosine=agreement)
                    continue
            runners[candidate] = run
        if not runners:  # only OpenVINO was allowed, and no precision agreed: the settings must change
            raise ModelLoadError(f"OpenVINO's {kind} tower disagrees with torch fp32 at every precision allowed")
        times = _measure(runners, warm=[Candidate("torch", "fp32")] if kind == "image" else [])
        return times, _pick(times, list(runners))

    def _runner(self, kind: str, candidate: Candidate, threads: int) -> Callable[[], Any]:
        """One forward of `kind` on one input, the way `candidate` runs it."""
        if candidate.runtime == "openvino":
            tower = self._tower(kind, candidate, threads)
            inputs = self.tokens if isinstance(tower, OpenVinoTextTower) else _pixels(tower.image_size)
            return lambda: tower(inputs)
        if kind == "image":
            return self._reference(kind, threads)  # the torch fp32 image tower is the reference itself
        if self.lean_text is None and LeanTextTower.supports(self.model):
            self.lean_text = LeanTextTower(self.model, self.text_weights).eval()
        lean = self.lean_text
        return _on_torch(lambda: lean(self.tokens) if lean is not None else self._padded_text(), threads)

    def _reference(self, kind: str, threads: int) -> Callable[[], Any]:
        """open_clip's own fp32 forward: what every candidate must agree with."""
        if kind == "text":
            return _on_torch(self._padded_text, threads)
        pixels = _pixels(_image_size(self.model))
        return _on_torch(lambda: self.model.encode_image(pixels, normalize=True), threads)

    def _padded_text(self) -> Any:
        return self.model.encode_text(self.tokens, normalize=True)

    def _tower(self, kind: str, candidate: Candidate, threads: int) -> Tower:
        """A compiled tower, kept by (kind, precision, threads): the one chosen is served without compiling again."""
        key = (kind, candidate.precision, threads)
        if key not in self.towers:
            if kind not in self.converted:
                conversion = self.conversions[kind]
                assert conversion is not None
                self.converted[kind] = conversion.run()
            tower_class = OpenVinoImageTower if kind == "image" else OpenVinoTextTower
            self.towers[key] = tower_class.compile(
                self.converted[kind],
                precision=candidate.precision,  # type: ignore[arg-type]
                threads=threads,
            )
        return self.towers[key]

    def _result(self, image: Candidate, text: Candidate, threads: int, reason: str) -> RuntimeChoice:
        torch.set_num_threads(threads)
        image_tower = self._tower("image", image, threads) if image.runtime == "openvino" else None
        text_tower = self._tower("text", text, threads) if text.runtime == "openvino" else None
        assert not isinstance(image_tower, OpenVinoTextTower) and not isinstance(text_tower, OpenVinoImageTower)
        return RuntimeChoice(image_tower, text_tower, threads, reason, self.cpu)

    def _key(self) -> str:
        """What a stored choice depends on: the towers (their conversion keys), the CPU, the thread budget, the
        candidates the settings leave open, and the torch version (its speed is measured too)."""
        parts = {
            "version": _CHOICE_VERSION,
            "towers": {kind: c.key if c else None for kind, c in self.conversions.items()},
            "cpu": self.cpu,
            "threads": self.thread_options,
            "options": {kind: [asdict(c) for c in options] for kind, options in self.options.items()},
            "torch": torch.__version__,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _valid(self, record: dict[str, Any]) -> bool:
        try:
            return (
                Candidate(**record["image"]) in self.options["image"]
                and Candidate(**record["text"]) in self.options["text"]
                and record["threads"] in self.thread_options
                and isinstance(record["reason"], str)
            )
        except (KeyError, TypeError):
            return False


def _measure(runners: dict[T, Callable[[], object]], warm: Sequence[T] = ()) -> dict[T, float]:
    """Median ms per runner over alternating rounds, after a warm-up call each (kernels are set up on first use).
    A runner far slower than the fastest stops running (it cannot come within MARGIN; under contention torch's
    forward can take ten times OpenVINO's). A lone runner is not timed ({}: nothing to compare)."""
    if len(runners) <= 1:
        return {}
    for key, run in runners.items():
        if key not in warm:  # `warm`: run once already (the reference run is torch's first image forward)
            run()
    samples: dict[T, list[float]] = {key: [] for key in runners}
    active = list(runners)
    started = time.perf_counter()
    for round_ in range(1, _MAX_ROUNDS + 1):
        # Rotate the order each round: no candidate always runs right after the same other one.
        for key in active[round_ % len(active) :] + active[: round_ % len(active)]:
            begun = time.perf_counter()
            runners[key]()
            samples[key].append(time.perf_counter() - begun)
        # Far slower after one round, or clearly slower once the medians settle: it cannot come within MARGIN.
        hopeless = _HOPELESS if round_ >= _SETTLE else _FAR_SLOWER
        fastest = min(statistics.median(samples[key]) for key in active)
        active = [key for key in active if statistics.median(samples[key]) <= hopeless * fastest]
        if len(active) == 1 or (round_ >= _MIN_ROUNDS and time.perf_counter() - started > _BUDGET_S):
            break
    return {key: statistics.median(values) * 1000.0 for key, values in samples.items()}


def _pick(times: dict[T, float], preference: Sequence[T]) -> T:
    """The first of `preference` (most preferred first) among those timed within MARGIN of the fastest; the first
    of all when nothing was timed."""
    if not times:
        return preference[0]
    fastest = min(times.values())
    return next(option for option in preference if option in times and times[option] <= fastest * (1 + MARGIN))


def _times(times: dict[Candidate, float]) -> str:
    return ", ".join(f"{candidate.label} {ms:.1f} ms" for candidate, ms in sorted(times.items(), key=lambda i: i[1]))


def _ms(times: dict[Candidate, float]) -> dict[str, float]:
    return {candidate.label: round(ms, 2) for candidate, ms in times.items()}


def _summary(image: Candidate, text: Candidate, threads: int) -> str:
    return f"image tower {image.label}, text tower {text.label}, {threads} thread{'s' * (threads != 1)}"


def _on_torch(forward: Callable[[], T], threads: int) -> Callable[[], T]:
    def run() -> T:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return forward()

    return run


def _torch_only(threads: int, reason: str, cpu: str) -> RuntimeChoice:
    torch.set_num_threads(threads)
    return RuntimeChoice(None, None, threads, reason.format(threads=threads), cpu)


def _attempt(build: Callable[[], T], tower: str, explicit: bool) -> T | None:
    """`build()`; where it fails with runtime auto, None (torch runs that tower), so that auto never stops a start
    that torch can serve. With runtime openvino it is an error."""
    try:
        return build()
    except ModelLoadError as exc:
        if explicit:
            raise
        log.warning("openvino cannot run a tower of this model; torch runs it", tower=tower, error=str(exc))
        return None


@contextlib.contextmanager
def _directory(cache_dir: Path | None) -> Iterator[Path]:
    if cache_dir is not None:
        yield cache_dir
        return
    with tempfile.TemporaryDirectory(prefix="imagesearch-openvino-") as scratch:
        yield Path(scratch)


def _pixels(size: int) -> torch.Tensor:
    """One preprocessed-looking image (unit-variance noise, as normalised pixels are), the same at every start."""
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _image_size(model: Any) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def _unit_rows(features: Any) -> np.ndarray:
    array = features.float().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)
