"""OpenVINO runtime for CLIP's towers: the loaded open_clip model's own weights, run by OpenVINO's CPU plugin.

Why (benchmarks/runtimes.py, ViT-B-32, 2 threads on an AVX-512 EPYC): OpenVINO runs the image tower ~1.7x faster
than torch fp32 at f32 and ~3x faster in bf16 where the CPU computes bf16 natively (AVX512_BF16 or AMX), at
cosine >= 0.9999 to torch fp32; int8 (opt-in, NNCF) ~4.5x at cosine >= 0.999. A one-query text forward beats the
lean torch text tower too. Its thread pool also degrades far less than torch's OpenMP team when other processes
compete for the cores.

How: the graph is derived from the loaded model every time, never from a second copy of the weights: the tower
+ L2 normalisation -> ONNX (torch's TorchScript exporter) -> OpenVINO IR, stored in a cache directory under a key
over everything the IR depends on (every weight byte, the module structure, the input size, the torch /
open_clip / onnx / OpenVINO (/ NNCF) versions, the opset, the precision and our format version), so another
model, weights file, runtime version or precision never reuses an entry. A start with a cache entry only
verifies, reads and compiles it (~1 s for ViT-B-32's image tower); without one, the export costs ~9 s (int8: a
minute or more, for calibration).

Precision is always set explicitly: OpenVINO's own default on a bf16-capable CPU is already bf16, so leaving it
unset would make "f32" mean bf16 on one machine and f32 on another.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
from PIL import Image, ImageDraw
from torch import nn

from imagesearch.errors import ModelLoadError
from imagesearch.model.text_tower import LeanTextTower

log = structlog.get_logger(__name__)

RequestedPrecision = Literal["auto", "bf16", "f32", "int8"]
Precision = Literal["bf16", "f32", "int8"]
Preprocess = Callable[[Image.Image], torch.Tensor]

# Bump when anything we write into an entry, or how we build it, changes: old entries then stop matching.
CACHE_FORMAT_VERSION = 1
ONNX_OPSET = 17
_MANIFEST = "manifest.json"
_XML = "model.xml"
_BIN = "model.bin"
# Half-written entries left by a build that was killed; older than this, nobody is still writing them.
_STALE_TEMP_S = 3600.0
# An entry no start has used for this long is deleted by the next start that looks at the cache: every change of
# model, weights, versions or precision leaves the old entry behind (~350 MB for a ViT-B-32 image tower), and a
# rollback within a month still finds its entry. A start that uses an entry marks it (its directory's mtime).
_UNUSED_ENTRY_S = 30 * 24 * 3600.0
# OpenVINO's LATENCY hint runs one request on one stream with every thread; THROUGHPUT splits the threads into
# streams for parallel requests, which one synchronous request cannot use: on 2 cores it was ~2x slower for one
# image and for a batch of 16 (ViT-B-32, f32 and bf16).
_PERFORMANCE_HINT = "LATENCY"
# int8 calibration: 128 images (with 64, the bundled model's worst cosine to fp32 fell to ~0.999), rendered
# deterministically; bump the version when the images change.
_CALIBRATION_VERSION = 1
_CALIBRATION_IMAGES = 128


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), as OpenVINO's CPU plugin sees it.

    OpenVINO lists "BF16" in the CPU's OPTIMIZATION_CAPABILITIES only where the hardware has it; where OpenVINO
    cannot be asked, the kernel's CPU flags decide.
    """
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # not installed, or a plugin that cannot load here: fall back to the kernel's view
        return cpuinfo_has_bf16(Path("/proc/cpuinfo"))


def cpuinfo_has_bf16(cpuinfo: Path) -> bool:
    """Whether a /proc/cpuinfo-format file lists avx512_bf16 or amx_bf16 (False when unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(set(line.partition(":")[2].split()) & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(requested: str, *, int8_allowed: bool = True) -> Precision:
    """The precision the runtime computes in: "auto" is bf16 where the CPU has it natively, else f32.

    Raises ModelLoadError for bf16 on a CPU without native bf16 (OpenVINO would quietly run something else), for
    int8 where the tower has no int8 path (`int8_allowed`), and for an unknown name.
    """
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "f32"
    if requested == "bf16":
        if not cpu_has_native_bf16():
            raise ModelLoadError(
                "OpenVINO precision bf16 was requested, but this CPU has no native bf16 (it needs AVX512_BF16 or "
                "AMX); use auto or f32"
            )
        return "bf16"
    if requested == "f32":
        return "f32"
    if requested == "int8" and int8_allowed:
        return "int8"
    choices = "auto, bf16, f32, int8" if int8_allowed else "auto, bf16, f32"
    raise ModelLoadError(f"OpenVINO precision {requested!r} is not one of {choices}")


@dataclass(frozen=True)
class CacheOutcome:
    """How a tower's IR was obtained at build time: for logs, the start-up report and tests."""

    key: str
    path: Path
    hit: bool  # True: read from the cache; False: exported and converted now (and stored)
    rebuilt_reason: str | None  # why an existing entry was not used (damaged); None when there was none
    stored: bool  # whether the entry is in the cache now (False: the cache directory could not be written)
    seconds: float  # the whole build: fingerprint, export + convert (or verify + read), compile


class _CompiledTower:
    """A compiled OpenVINO model with one reused InferRequest behind a lock.

    The encoder calls a tower from its one model thread, where the lock is never contended; concurrent callers
    queue instead of racing on the request's buffers.
    """

    def __init__(self, compiled: Any, precision: Precision, cache: CacheOutcome) -> None:
        self.precision: Precision = precision
        self.cache = cache
        self.dimension = int(compiled.output(0).get_partial_shape()[1].get_length())
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

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
    """CLIP's `encode_image(pixels, normalize=True)`, compiled by OpenVINO for this CPU. Build it with `build()`.

    Attributes: `precision` (what it computes in), `image_size`, `dimension`, `cache` (the CacheOutcome).
    """

    def __init__(self, compiled: Any, precision: Precision, cache: CacheOutcome, image_size: int) -> None:
        super().__init__(compiled, precision, cache)
        self.image_size = image_size

    @classmethod
    def build(
        cls,
        visual: nn.Module,
        *,
        cache_dir: Path,
        precision: RequestedPrecision = "auto",
        threads: int = 0,
        preprocess: Preprocess | None = None,
    ) -> OpenVinoImageTower:
        """Compile `visual` (an open_clip model's `model.visual`, fp32, on CPU) with OpenVINO.

        The IR comes from `cache_dir` when an entry for exactly these weights, structure, versions and precision
        is there and intact; otherwise it is exported, converted and stored (atomically) first. A damaged entry
        is logged and rebuilt. `threads` (0: torch's intra-op thread count, which the encoder sizes to the CPUs
        this process may use) sets OpenVINO's inference threads.

        `precision` "int8" (opt-in) quantises the tower with NNCF, calibrated on images generated here
        deterministically and put through `preprocess` (the model's own image transform, required for int8); the
        patch embedding and the output projection stay in f32 (see `_quantize`). Raises ModelLoadError when
        the tower cannot be run here (weights not fp32 on CPU, a torch-quantised tower, bf16 without native
        support, int8 without nncf or `preprocess`, or any export / conversion failure).
        """
        resolved = resolve_precision(precision)
        if resolved == "int8" and preprocess is None:
            raise ModelLoadError("OpenVINO int8 needs the model's preprocess transform to calibrate with")
        image_size = _image_size(visual)
        extra: dict[str, object] = {"image_size": image_size}
        quantize: Callable[[Any], Any] | None = None
        if resolved == "int8":
            assert preprocess is not None
            # The transform's repr names its resize, crop and normalisation: the calibration pixels' recipe.
            extra |= {"nncf": _version("nncf"), "calibration": [_CALIBRATION_VERSION, repr(preprocess)]}
            quantize = functools.partial(_quantize, preprocess=preprocess)
        compiled, outcome = _build(
            _NormalisedImageTower(visual),
            kind="image",
            example=torch.zeros(2, 3, image_size, image_size),
            dynamic_axes={"inputs": {0: "batch"}, "embedding": {0: "batch"}},
            cache_dir=cache_dir,
            precision=resolved,
            threads=threads,
            key_extra=extra,
            quantize=quantize,
        )
        return cls(compiled, resolved, outcome, image_size)

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
    with a dynamic sequence length. Build it with `build()`; `supports(model)` says whether the model's text
    tower has the layout it rebuilds (the same test as LeanTextTower's).

    Attributes: `precision`, `context_length`, `dimension`, `cache` (the CacheOutcome).
    """

    def __init__(self, compiled: Any, precision: Precision, cache: CacheOutcome, context_length: int) -> None:
        super().__init__(compiled, precision, cache)
        self.context_length = context_length

    @staticmethod
    def supports(model: Any) -> bool:
        """True for open_clip's CLIP with a causal text tower of standard blocks, pooled at end-of-text."""
        return LeanTextTower.supports(model)

    @classmethod
    def build(
        cls,
        model: Any,
        *,
        cache_dir: Path,
        precision: Literal["auto", "bf16", "f32"] = "auto",
        threads: int = 0,
    ) -> OpenVinoTextTower:
        """Compile the text tower of `model` (an open_clip CLIP, fp32, on CPU, for which `supports` is True).

        Caching, `threads` and errors as in OpenVinoImageTower.build; there is no int8 for this tower (int8 is
        known to break CLIP's text tower on pretrained weights).
        """
        resolved = resolve_precision(precision, int8_allowed=False)
        if not LeanTextTower.supports(model):
            raise ModelLoadError(f"the OpenVINO text tower does not support this text tower ({type(model).__name__})")
        context_length = int(model.positional_embedding.shape[0])
        # Pooling takes the highest token id (end-of-text is the last id in open_clip's vocabularies).
        end = int(model.token_embedding.num_embeddings) - 1
        compiled, outcome = _build(
            # fp32 weights: the lean tower then shares the model's tensors rather than converting them.
            _UnpaddedTextTower(LeanTextTower(model, "fp32")),
            kind="text",
            # Two rows of different real lengths: <start> a <end> <pad>, <start> a b <end>.
            example=torch.tensor([[end - 1, 1, end, 0], [end - 1, 1, 2, end]]),
            dynamic_axes={"inputs": {0: "batch", 1: "length"}, "embedding": {0: "batch"}},
            cache_dir=cache_dir,
            precision=resolved,
            threads=threads,
            key_extra={"context_length": context_length},
            quantize=None,
        )
        return cls(compiled, resolved, outcome, context_length)

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


def cache_key(module: nn.Module, *, kind: str, precision: str, extra: Mapping[str, object]) -> str:
    """sha256 over everything a compiled tower depends on (see the module docstring)."""
    import openvino as ov

    parts = {
        "format": CACHE_FORMAT_VERSION,
        "kind": kind,
        "opset": ONNX_OPSET,
        "precision": precision,
        "openvino": ov.get_version(),
        "torch": torch.__version__,
        "open_clip": _version("open_clip_torch"),
        "onnx": _version("onnx"),
        "structure": _structure(module),
        "weights": weights_fingerprint(module),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter's and buffer's name, dtype, shape and bytes.

    All the bytes, not a sample: it costs ~0.2 s for ViT-B-32's image tower (350 MB) on a 2-core EPYC, and a
    fine-tuned checkpoint can differ from its base in few enough values that a sample could miss them.
    """
    digest = hashlib.sha256()
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}\n".encode())
        # Viewed as bytes, so every dtype (bf16 included, which numpy lacks) hashes the same way.
        digest.update(value.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def calibration_images(count: int = _CALIBRATION_IMAGES, seed: int = 0) -> list[Image.Image]:
    """Deterministic int8 calibration images: half synthetic catalogue renders (objects on plain backgrounds),
    half photo-like scenes (texture, shapes, JPEG artefacts), so activation ranges cover both."""
    from imagesearch.synthetic.renderer import COLOURS, KINDS, PATTERNS, render

    rng = random.Random(seed)
    images = []
    for index in range(count):
        if index % 2 == 0:
            images.append(render(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(PATTERNS), rng, size=256))
        else:
            images.append(_photo_like(np.random.default_rng(rng.getrandbits(64))))
    return images


def _photo_like(rng: np.random.Generator, size: int = 256) -> Image.Image:
    pixels = (rng.random((size, size, 3)) * 60 + rng.integers(40, 200, size=3)).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, size - 80, size=2))
        draw.ellipse((x, y, x + 80, y + 60), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _build(
    module: nn.Module,
    *,
    kind: str,
    example: torch.Tensor,
    dynamic_axes: dict[str, dict[int, str]],
    cache_dir: Path,
    precision: Precision,
    threads: int,
    key_extra: Mapping[str, object],
    quantize: Callable[[Any], Any] | None,
) -> tuple[Any, CacheOutcome]:
    """The compiled model for `module`, from the cache or exported now; see OpenVinoImageTower.build."""
    started = time.perf_counter()
    try:
        import openvino as ov
    except ImportError as exc:
        raise ModelLoadError("the OpenVINO runtime needs the openvino package (pip install openvino)") from exc
    _check_exportable(module)
    try:
        key = cache_key(module, kind=kind, precision=precision, extra=key_extra)
        _remove_stale_temps(cache_dir)
        entry = cache_dir / f"openvino-{kind}-{key[:40]}"
        _remove_unused_entries(cache_dir, keep=entry)
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads if threads > 0 else torch.get_num_threads(),
            # int8: the quantised layers run int8 whatever the hint; the rest in f32 measured as fast as in bf16
            # and closer to fp32.
            "INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision,
            "PERFORMANCE_HINT": _PERFORMANCE_HINT,
        }
        compiled: Any = None
        rebuilt_reason: str | None = None
        if entry.exists():
            try:
                _verify_entry(entry, key)
                compiled = core.compile_model(core.read_model(str(entry / _XML)), "CPU", config)
                _mark_used(entry)
            except Exception as exc:  # a damaged entry (truncated, edited, half-deleted) must never stop a start
                rebuilt_reason = f"{type(exc).__name__}: {exc}"
                log.warning("openvino_cache_entry_unusable", path=str(entry), reason=rebuilt_reason)
        hit = stored = compiled is not None
        if compiled is None:
            model, stored = _export_and_store(core, module, example, dynamic_axes, key, entry, quantize, rebuilt_reason)
            compiled = core.compile_model(model, "CPU", config)
    except ModelLoadError:
        raise
    except Exception as exc:  # OpenVINO, ONNX and the file system raise many unrelated types
        raise ModelLoadError(f"OpenVINO could not build the {kind} tower: {type(exc).__name__}: {exc}") from exc
    outcome = CacheOutcome(key, entry, hit, rebuilt_reason, stored, time.perf_counter() - started)
    log.info(
        "openvino_tower_ready",
        tower=kind,
        cache_hit=hit,
        precision=precision,
        threads=config["INFERENCE_NUM_THREADS"],
        seconds=round(outcome.seconds, 3),
        path=str(entry),
    )
    return compiled, outcome


def _structure(module: nn.Module) -> str:
    """The module tree with each submodule's class and its plain settings (pooling, LayerNorm eps, activation,
    heads...): what the exported graph depends on besides the weights, read from the loaded model itself rather
    than from a config file it may have been built from with other defaults."""
    lines = []
    for name, sub in module.named_modules():
        settings = {
            k: v
            for k, v in sorted(vars(sub).items())
            if not k.startswith("_") and k != "training" and isinstance(v, int | float | str | bool | tuple | None)
        }
        lines.append(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}:{settings!r}")
    return "\n".join(lines)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _check_exportable(module: nn.Module) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.device.type != "cpu" or (tensor.is_floating_point() and tensor.dtype != torch.float32):
            raise ModelLoadError(
                f"the OpenVINO runtime takes the fp32 CPU model; {name} is {tensor.dtype} on {tensor.device}"
            )
    if any(type(sub).__module__.startswith("torch.ao.nn.quantized") for sub in module.modules()):
        raise ModelLoadError(
            "the tower is torch-quantised (int8); the OpenVINO runtime exports the fp32 tower: turn off torch "
            "quantisation of the image tower to use it"
        )


def _image_size(visual: nn.Module) -> int:
    size = getattr(visual, "image_size", None)
    if size is None:
        raise ModelLoadError(f"{type(visual).__name__} has no image_size; the OpenVINO runtime needs the input size")
    return int(size[0] if isinstance(size, tuple | list) else size)


class _NormalisedImageTower(nn.Module):
    """model.visual followed by CLIP's L2 normalisation: exactly encode_image(x, normalize=True)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.visual(pixels), dim=-1)


class _UnpaddedTextTower(nn.Module):
    """LeanTextTower's forward on tokens already cut to the batch's real length, so the length is an input
    dimension of the graph (LeanTextTower measures it from the values, which a trace would freeze)."""

    def __init__(self, lean: LeanTextTower) -> None:
        super().__init__()
        self.lean = lean

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        lean = self.lean
        x = lean.token_embedding(tokens) + lean.positional_embedding[: tokens.shape[1]]
        for block in lean.blocks:
            x = block(x)
        pooled = text_global_pool(lean.ln_final(x), tokens, lean.pool_type)
        return nn.functional.normalize(lean.projection(pooled), dim=-1)


def _export_and_store(
    core: Any,
    module: nn.Module,
    example: torch.Tensor,
    dynamic_axes: dict[str, dict[int, str]],
    key: str,
    entry: Path,
    quantize: Callable[[Any], Any] | None,
    damaged: str | None,
) -> tuple[Any, bool]:
    """Export -> convert (-> quantise) -> save into a temp dir beside the entry, then move it into place with one
    rename: a reader sees a complete entry or none. Returns the converted (uncompiled) model, and whether it was
    stored.

    The cache is best effort: where it cannot be written (read-only volume, disk full), the tower is built in
    the system's temp dir and served from memory, and the next start converts again.
    """
    import openvino as ov

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        storing = True
    except OSError as exc:
        log.warning("openvino_cache_unwritable", path=str(entry.parent), error=str(exc))
        temp, storing = Path(tempfile.mkdtemp(prefix="imagesearch-openvino-")), False
    try:
        onnx_path = temp / "tower.onnx"
        _export_onnx(module, example, dynamic_axes, onnx_path)
        # Core.read_model converts ONNX with the same frontend as openvino.convert_model, minus the latter's
        # Python tool layer, which also sends usage telemetry unless opted out (and spent ~1 s doing so here).
        model = core.read_model(str(onnx_path))
        if quantize is not None:
            model = quantize(model)
        if storing:
            try:
                # fp32 weights in the IR: precision is chosen when compiling; fp16 weights would cost accuracy.
                ov.save_model(model, str(temp / _XML), compress_to_fp16=False)
                onnx_path.unlink()
                manifest = {"key": key, "files": {name: _file_record(temp / name) for name in (_XML, _BIN)}}
                (temp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
                _move_into_place(temp, entry, replace=damaged is not None)
            except (OSError, RuntimeError) as exc:  # OpenVINO reports a failed write as RuntimeError
                log.warning("openvino_cache_not_stored", path=str(entry), error=f"{type(exc).__name__}: {exc}")
                storing = False
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return model, storing


def _export_onnx(module: nn.Module, example: torch.Tensor, dynamic_axes: dict[str, dict[int, str]], path: Path) -> None:
    # Batch 2 in the examples: with 1, the tracer may fold the batch dimension into constants.
    was_training = module.training
    # Without gradients, nn.MultiheadAttention takes its fused fast path, an op ONNX has no equivalent for; the
    # switch is global, so it is restored at once.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    module.eval()
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one; it is the route that converted
            # open_clip's towers cleanly here. TracerWarnings come from shape asserts in torch's attention, which
            # hold for every batch size.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The text tower's end-of-text pooling indexes with argmax positions, which are never negative.
            warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=["inputs"],
                output_names=["embedding"],
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except Exception as exc:
        raise ModelLoadError(f"could not export the tower for OpenVINO: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        module.train(was_training)


def _quantize(model: Any, *, preprocess: Preprocess) -> Any:
    """NNCF post-training int8 quantisation of the image tower's IR.

    The patch embedding (the first convolution) and the output projection (the last MatMul) stay in f32: on the
    bundled trained model, quantising them took the worst cosine to fp32 from 0.9996 to 0.984.
    """
    try:
        import nncf
    except ImportError as exc:
        raise ModelLoadError("OpenVINO int8 needs the nncf package (pip install nncf); or use precision auto") from exc
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "MatMul")]
    keep_float = [ops[0].get_friendly_name(), ops[-1].get_friendly_name()] if ops else []
    samples = [preprocess(image).unsqueeze(0).numpy() for image in calibration_images()]
    # NNCF logs each step and draws progress bars on stdout, which has no switch; a service logs through
    # structlog, and this runs once, at a start without a cache entry, before anything is served.
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.quantize(
            model,
            nncf.Dataset(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(samples),
            ignored_scope=nncf.IgnoredScope(names=keep_float, validate=False),
        )


def _file_record(path: Path) -> dict[str, object]:
    with path.open("rb") as handle:
        return {"size": path.stat().st_size, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


def _verify_entry(entry: Path, key: str) -> None:
    """Raise unless `entry` is complete and its files are byte for byte what was written. The digest costs
    ~0.2 s for ViT-B-32 at start, but a flipped byte in the weights would otherwise serve wrong vectors silently."""
    manifest = json.loads((entry / _MANIFEST).read_text())
    if manifest.get("key") != key:
        raise ValueError("manifest key does not match the entry's name")
    for name, expected in manifest["files"].items():
        path = entry / name
        if path.stat().st_size != expected["size"]:
            raise ValueError(f"{name} is {path.stat().st_size} bytes, expected {expected['size']}")
        if _file_record(path) != expected:
            raise ValueError(f"{name} does not match its recorded sha256")


def _move_into_place(temp: Path, entry: Path, *, replace: bool) -> None:
    if replace and entry.exists():
        _discard(entry)  # a damaged entry
    try:
        os.replace(temp, entry)
    except OSError:
        if not entry.is_dir():
            raise
        # Another process stored the same entry meanwhile (the rename found a non-empty directory); theirs is
        # equivalent, and this process keeps using the model it converted.
        log.info("openvino_cache_entry_raced", path=str(entry))


def _discard(entry: Path) -> None:
    """Delete a cache entry: moved aside first (a rename is atomic; deleting 350 MB is not), so that another start
    never reads half an entry, then deleted."""
    trash = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    os.replace(entry, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _mark_used(entry: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: its entries are never pruned by this server either
        os.utime(entry)


def _remove_unused_entries(cache_dir: Path, *, keep: Path) -> None:
    now = time.time()
    for entry in cache_dir.glob("openvino-*") if cache_dir.is_dir() else []:
        try:
            unused_s = now - entry.stat().st_mtime
            if entry == keep or unused_s <= _UNUSED_ENTRY_S:
                continue
            _discard(entry)
            log.info("openvino_cache_entry_removed", path=str(entry), unused_days=round(unused_s / 86400))
        except OSError:
            continue  # removed by another process meanwhile, or a read-only cache


def _remove_stale_temps(cache_dir: Path) -> None:
    now = time.time()
    for temp in cache_dir.glob(".tmp-*") if cache_dir.is_dir() else []:
        try:
            if now - temp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(temp, ignore_errors=True)
        except OSError:
            continue  # removed by another process meanwhile
