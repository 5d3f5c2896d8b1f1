"""OpenVINO runtime for CLIP's towers: the loaded open_clip model's own weights, run by OpenVINO's CPU plugin.

Why (benchmarks/runtimes.py, ViT-B-32, 2 threads on an AVX-512 EPYC): OpenVINO runs the image tower ~1.7x faster
than torch fp32 at f32 and ~3x faster in bf16 on that CPU, at cosine >= 0.9999 to torch fp32; int8 (opt-in, NNCF)
~4.5x at cosine >= 0.999. Its thread pool also degrades far less than torch's OpenMP team when other processes
compete for the cores. Whether bf16 (or f16) pays depends on the CPU, not on its flags alone: runtime_choice.py
measures it.

How: the graph is derived from the loaded model every time, never from a second copy of the weights: the tower
+ L2 normalisation -> ONNX (torch's TorchScript exporter) -> OpenVINO IR, kept in the runtime cache
(runtime_cache.py) under a key over everything the IR depends on. A tower is built in steps: `conversion()` (the
cache key, from a fingerprint of the weights), its `run()` (the IR, from the cache or exported now: ~5 s for
ViT-B-32's image tower, a minute or more for int8) and `compile()` (at a precision and a thread count: ~1 s), so
that one IR can be compiled at several precisions to compare them.

Precision is always set explicitly: OpenVINO's own default on a bf16-capable CPU is already bf16, so leaving it
unset would make "f32" mean bf16 on one machine and f32 on another.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import structlog
import torch
from torch import nn

from imagesearch.errors import ModelLoadError
from imagesearch.model import runtime_cache
from imagesearch.model.calibration import Calibration, Preprocess, quantize
from imagesearch.model.cpus import CpuModel, physical_cores
from imagesearch.model.onnx_export import NormalisedImageTower, UnpaddedTextTower, check_exportable, export_onnx
from imagesearch.model.runtime_cache import CacheOutcome
from imagesearch.model.text_tower import LeanTextTower

log = structlog.get_logger(__name__)

RequestedPrecision = Literal["auto", "bf16", "f32", "int8"]
# f16 is never requested by name: runtime_choice.py offers it where OpenVINO computes it natively (AVX512_FP16 or
# AMX-FP16), and keeps it only when it measures faster and agrees with torch fp32.
Precision = Literal["bf16", "f16", "f32", "int8"]
FloatPrecision = Literal["bf16", "f16", "f32"]
# OpenVINO's LATENCY hint runs one request on one stream with every thread; THROUGHPUT splits the threads into
# streams for parallel requests, which one synchronous request cannot use: on 2 cores it was ~2x slower for one
# image and for a batch of 16 (ViT-B-32, f32 and bf16).
_PERFORMANCE_HINT = "LATENCY"
# OpenVINO pins its threads to CPUs on Linux by default. This process runs other threads beside the model's (image
# decoding, gRPC, the event loop) and often shares the machine with other processes: a pinned thread cannot move
# off a CPU that another thread holds, and every process pins to the same first CPUs (Intel's knowledge base
# article 000058227: two pinned processes doubled each one's inference time). OpenVINO's own guide: "Disabling
# thread pinning may be beneficial in complex applications where several workloads are executed in parallel".
_CPU_PINNING = False


@functools.cache
def native_precisions() -> frozenset[str]:
    """The reduced float precisions this CPU computes natively, as OpenVINO's CPU plugin sees it: "bf16"
    (AVX512_BF16 or AMX-BF16) and "f16" (AVX512_FP16 or AMX-FP16), from its OPTIMIZATION_CAPABILITIES; where
    OpenVINO cannot be asked, from the kernel's CPU flags."""
    try:
        import openvino as ov

        capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        return frozenset(name for name, cap in (("bf16", "BF16"), ("f16", "FP16")) if cap in capabilities)
    except Exception:  # not installed, or a plugin that cannot load here: fall back to the kernel's view
        flags = set(CpuModel.read().flags)
        found = {"bf16"} if flags & {"avx512_bf16", "amx_bf16"} else set()
        return frozenset(found | ({"f16"} if flags & {"avx512_fp16", "amx_fp16"} else set()))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), as OpenVINO's CPU plugin sees it."""
    return "bf16" in native_precisions()


def cpuinfo_has_bf16(cpuinfo: Path) -> bool:
    """Whether a /proc/cpuinfo-format file lists avx512_bf16 or amx_bf16 (False when unreadable)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(CpuModel.read(cpuinfo).flags))


def resolve_precision(requested: str, *, int8_allowed: bool = True) -> Precision:
    """The precision a tower built directly (without runtime_choice's measurement) computes in: "auto" is bf16
    where the CPU has it natively, else f32.

    Raises ModelLoadError for bf16 on a CPU without native bf16 (OpenVINO would quietly run something else), for
    int8 where the tower has no int8 path (`int8_allowed`), and for an unknown name.
    """
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "f32"
    if requested in ("bf16", "f16"):
        if not (cpu_has_native_bf16() if requested == "bf16" else "f16" in native_precisions()):
            raise ModelLoadError(
                f"OpenVINO precision {requested} was requested, but this CPU does not compute it natively "
                f"({'AVX512_BF16 or AMX' if requested == 'bf16' else 'AVX512_FP16 or AMX-FP16'}); use auto or f32"
            )
        return requested  # type: ignore[return-value]
    if requested == "f32":
        return "f32"
    if requested == "int8" and int8_allowed:
        return "int8"
    choices = "auto, bf16, f32, int8" if int8_allowed else "auto, bf16, f32"
    raise ModelLoadError(f"OpenVINO precision {requested!r} is not one of {choices}")


def compile_config(precision: Precision, threads: int) -> dict[str, object]:
    """The CPU plugin's properties for one tower. `threads` 0: torch's intra-op thread count (which the encoder
    sizes to the CPUs this process may use)."""
    count = threads if threads > 0 else torch.get_num_threads()
    return {
        "INFERENCE_NUM_THREADS": count,
        # int8: the quantised layers run int8 whatever the hint; the rest in f32 measured as fast as in bf16 and
        # closer to fp32.
        "INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision,
        "PERFORMANCE_HINT": _PERFORMANCE_HINT,
        "ENABLE_CPU_PINNING": _CPU_PINNING,
        # The LATENCY hint uses one hyper-thread per core, whatever INFERENCE_NUM_THREADS says: more threads than
        # cores must say so to be run.
        "ENABLE_HYPER_THREADING": count > physical_cores(),
    }


@dataclass(frozen=True)
class ConvertedTower:
    """A tower's IR, ready to compile at any precision it allows (an int8 IR: int8 only)."""

    kind: Literal["image", "text"]
    model: Any  # openvino.Model
    cache: CacheOutcome
    int8: bool
    size: int  # the image size (image tower) or the context length (text tower)


class _CompiledTower:
    """A compiled OpenVINO model with one reused InferRequest behind a lock.

    The encoder calls a tower from its one model thread, where the lock is never contended; concurrent callers
    queue instead of racing on the request's buffers.
    """

    kind: Literal["image", "text"]

    def __init__(self, compiled: Any, precision: Precision, cache: CacheOutcome, threads: int, size: int) -> None:
        self.precision: Precision = precision
        self.cache = cache
        self.threads = threads
        self.size = size  # the image size (image tower) or the context length (text tower)
        self.dimension = int(compiled.output(0).get_partial_shape()[1].get_length())
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    @classmethod
    def compile(cls, converted: ConvertedTower, *, precision: Precision, threads: int = 0) -> Self:
        """Compile an IR of this tower at `precision` (see resolve_precision; a float one for the text tower) on
        `threads` threads (0: torch's count)."""
        if converted.kind != cls.kind:
            raise ValueError(f"{cls.__name__} cannot compile a {converted.kind} tower")
        compiled, outcome, count = _compile(converted, precision, threads)
        return cls(compiled, precision, outcome, count, converted.size)

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        with self._lock:
            self._request.infer({0: inputs}, share_inputs=True)
            # The output tensor is the request's own buffer, overwritten by the next call: copy it out.
            features = np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        # The graph normalises already, but in the precision it ran in; once more in fp32 keeps the contract
        # (unit norm to float32 rounding) whatever that was, for the price of a few hundred multiplications.
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        return features


class OpenVinoImageTower(_CompiledTower):
    """CLIP's `encode_image(pixels, normalize=True)`, compiled by OpenVINO for this CPU. Build it with `build()`,
    or `convert()` then `compile()`.

    Attributes: `precision` (what it computes in), `threads`, `image_size`, `dimension`, `cache` (CacheOutcome).
    """

    kind = "image"

    @property
    def image_size(self) -> int:
        return self.size

    @staticmethod
    def conversion(
        visual: nn.Module,
        *,
        cache_dir: Path,
        int8: bool = False,
        preprocess: Preprocess | None = None,
        calibration: Calibration | None = None,
    ) -> Conversion:
        """The conversion of `visual` (an open_clip model's `model.visual`, fp32, on CPU); its `run()` gives the
        IR: from `cache_dir` when an entry
        for exactly these weights, structure and versions is there and intact; otherwise exported, converted and
        stored (atomically) first. A damaged entry is logged and rebuilt.

        `int8` quantises the tower with NNCF on `calibration`'s images put through `preprocess` (the model's own
        image transform; both required). Raises ModelLoadError when the tower cannot be run here (weights not
        fp32 on CPU, a torch-quantised tower, int8 without nncf, `preprocess` or `calibration`, or any export or
        conversion failure).
        """
        image_size = _image_size(visual)
        extra: dict[str, object] = {"image_size": image_size}
        quantise: Callable[[Any], Any] | None = None
        if int8:
            if preprocess is None or calibration is None:
                raise ModelLoadError("OpenVINO int8 needs the model's preprocess transform and calibration images")
            # The transform's repr names its resize, crop and normalisation: the calibration pixels' recipe.
            extra |= {"nncf": runtime_cache.version("nncf"), "calibration": [calibration.name, repr(preprocess)]}
            quantise = functools.partial(quantize, preprocess=preprocess, calibration=calibration)
        return _conversion(
            NormalisedImageTower(visual),
            kind="image",
            example=torch.zeros(2, 3, image_size, image_size),
            dynamic_axes={"inputs": {0: "batch"}, "embedding": {0: "batch"}},
            cache_dir=cache_dir,
            key_extra=extra,
            quantise=quantise,
            size=image_size,
        )

    @classmethod
    def build(
        cls,
        visual: nn.Module,
        *,
        cache_dir: Path,
        precision: RequestedPrecision | Precision = "auto",
        threads: int = 0,
        preprocess: Preprocess | None = None,
        calibration: Calibration | None = None,
    ) -> OpenVinoImageTower:
        """conversion().run() then compile() at `precision` ("auto": bf16 where native, else f32; see
        resolve_precision)."""
        resolved = resolve_precision(precision)
        conversion = cls.conversion(
            visual, cache_dir=cache_dir, int8=resolved == "int8", preprocess=preprocess, calibration=calibration
        )
        return cls.compile(conversion.run(), precision=resolved, threads=threads)

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed preprocessed images (N, 3, H, W) -> (N, dim) float32, L2-normalised. Any N >= 0."""
        array = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels
        array = np.ascontiguousarray(array, dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if array.ndim != 4 or array.shape[1:] != expected:
            raise ValueError(f"pixels must be (N, {', '.join(map(str, expected))}); got {array.shape}")
        if array.shape[0] == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self._run(array)


class OpenVinoTextTower(_CompiledTower):
    """CLIP's `encode_text(tokens, normalize=True)`, unpadded like text_tower.LeanTextTower, compiled by OpenVINO
    with a dynamic sequence length. Build it with `build()`, or `conversion()`, its `run()`, then `compile()`;
    `supports(model)` says whether the model's text tower has the layout it rebuilds (LeanTextTower's test).

    Attributes: `precision`, `threads`, `context_length`, `dimension`, `cache` (the CacheOutcome).
    """

    kind = "text"

    @property
    def context_length(self) -> int:
        return self.size

    @staticmethod
    def supports(model: Any) -> bool:
        """True for open_clip's CLIP with a causal text tower of standard blocks, pooled at end-of-text."""
        return LeanTextTower.supports(model)

    @staticmethod
    def conversion(model: Any, *, cache_dir: Path) -> Conversion:
        """The conversion of the text tower of `model` (an open_clip CLIP, fp32, on CPU, for which `supports` is True).
        Caching and errors as in OpenVinoImageTower.conversion; there is no int8 for this tower (int8 is known to
        break CLIP's text tower on pretrained weights)."""
        if not LeanTextTower.supports(model):
            raise ModelLoadError(f"the OpenVINO text tower does not support this text tower ({type(model).__name__})")
        context_length = int(model.positional_embedding.shape[0])
        # Pooling takes the highest token id (end-of-text is the last id in open_clip's vocabularies).
        end = int(model.token_embedding.num_embeddings) - 1
        return _conversion(
            # fp32 weights: the lean tower then shares the model's tensors rather than converting them.
            UnpaddedTextTower(LeanTextTower(model, "fp32")),
            kind="text",
            # Two rows of different real lengths: <start> a <end> <pad>, <start> a b <end>.
            example=torch.tensor([[end - 1, 1, end, 0], [end - 1, 1, 2, end]]),
            dynamic_axes={"inputs": {0: "batch", 1: "length"}, "embedding": {0: "batch"}},
            cache_dir=cache_dir,
            key_extra={"context_length": context_length},
            quantise=None,
            size=context_length,
        )

    @classmethod
    def build(
        cls, model: Any, *, cache_dir: Path, precision: Literal["auto"] | FloatPrecision = "auto", threads: int = 0
    ) -> OpenVinoTextTower:
        """conversion().run() then compile() at `precision` ("auto": bf16 where native, else f32)."""
        resolved = resolve_precision(precision, int8_allowed=False)
        return cls.compile(cls.conversion(model, cache_dir=cache_dir).run(), precision=resolved, threads=threads)

    def __call__(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed token rows (N, L) as the tokenizer pads them (0 after end-of-text) -> (N, dim) float32,
        L2-normalised. Only the longest row's real length is run: the tower is causal and pools end-of-text."""
        array = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens
        if array.ndim != 2 or array.shape[1] > self.context_length:
            raise ValueError(f"tokens must be (N, L <= {self.context_length}); got {array.shape}")
        if array.shape[0] == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        length = max(1, int((array != 0).sum(axis=1).max()))
        return self._run(np.ascontiguousarray(array[:, :length], dtype=np.int64))


@functools.cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


@dataclass(frozen=True)
class Conversion:
    """A tower about to be converted: its cache key is known (a fingerprint of the weights), its IR not yet read
    or exported. `run()` gets the IR: from the cache, or converted now and stored."""

    kind: Literal["image", "text"]
    key: str
    cache_dir: Path
    size: int  # the image size (image tower) or the context length (text tower)
    int8: bool
    _convert: Callable[[Path], Any]
    _started: float

    def run(self) -> ConvertedTower:
        try:
            model, outcome = runtime_cache.load_or_convert(
                _core(), self.cache_dir, kind=self.kind, key=self.key, convert=self._convert
            )
        except ModelLoadError:
            raise
        except Exception as exc:  # OpenVINO, ONNX and the file system raise many unrelated types
            raise ModelLoadError(
                f"OpenVINO could not build the {self.kind} tower: {type(exc).__name__}: {exc}"
            ) from exc
        return ConvertedTower(
            self.kind, model, replace(outcome, seconds=time.perf_counter() - self._started), self.int8, self.size
        )


def _conversion(
    module: nn.Module,
    *,
    kind: Literal["image", "text"],
    example: torch.Tensor,
    dynamic_axes: dict[str, dict[int, str]],
    cache_dir: Path,
    key_extra: Mapping[str, object],
    quantise: Callable[[Any], Any] | None,
    size: int,
) -> Conversion:
    started = time.perf_counter()
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("the OpenVINO runtime needs the openvino package (pip install openvino)") from exc
    check_exportable(module)

    def convert(scratch: Path) -> Any:
        onnx_path = scratch / "tower.onnx"
        export_onnx(module, example, dynamic_axes, onnx_path)
        # Core.read_model converts ONNX with the same frontend as openvino.convert_model, minus the latter's
        # Python tool layer, which also sends usage telemetry unless opted out (and spent ~1 s doing so here).
        model = _core().read_model(str(onnx_path))
        return quantise(model) if quantise is not None else model

    # The IR holds fp32 weights whatever the precision it will be compiled at: one entry serves f32, bf16 and f16.
    ir_precision = "f32" if quantise is None else "int8"
    try:
        key = runtime_cache.cache_key(module, kind=kind, precision=ir_precision, extra=key_extra)
    except Exception as exc:
        raise ModelLoadError(f"OpenVINO could not build the {kind} tower: {type(exc).__name__}: {exc}") from exc
    return Conversion(kind, key, cache_dir, size, quantise is not None, convert, started)


def _compile(converted: ConvertedTower, precision: Precision, threads: int) -> tuple[Any, CacheOutcome, int]:
    if converted.int8 != (precision == "int8"):
        raise ValueError(f"a {'int8' if converted.int8 else 'float'} IR cannot be compiled at {precision}")
    config = compile_config(precision, threads)
    started = time.perf_counter()
    try:
        compiled = _core().compile_model(converted.model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError with the plugin's message
        raise ModelLoadError(f"OpenVINO could not compile the {converted.kind} tower: {exc}") from exc
    seconds = converted.cache.seconds + time.perf_counter() - started
    count = int(config["INFERENCE_NUM_THREADS"])  # type: ignore[call-overload]
    log.info(
        "openvino_tower_ready",
        tower=converted.kind,
        cache_hit=converted.cache.hit,
        precision=precision,
        threads=count,
        seconds=round(seconds, 3),
        path=str(converted.cache.path),
    )
    return compiled, replace(converted.cache, seconds=seconds), count


def _image_size(visual: nn.Module) -> int:
    size = getattr(visual, "image_size", None)
    if size is None:
        raise ModelLoadError(f"{type(visual).__name__} has no image_size; the OpenVINO runtime needs the input size")
    return int(size[0] if isinstance(size, tuple | list) else size)
