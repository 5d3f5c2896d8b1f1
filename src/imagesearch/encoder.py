"""CLIP encoder: loads an open_clip model and turns images and texts into L2-normalised float32 vectors.

Knows nothing of gRPC. `ClipEncoder` is synchronous (call it from a worker thread); `AsyncEncoder` runs it off
the event loop so a slow forward pass never blocks health checks or other RPCs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from imagesearch.batching import MicroBatcher
from imagesearch.cpus import available_cpus
from imagesearch.errors import ModelLoadError
from imagesearch.imaging import decode_image
from imagesearch.text_tower import LeanTextTower, TextWeights, fp16_weight_kernels_available

# Models that ship inside the package, addressable by a short name in IMAGESEARCH_MODEL.
BUNDLED_MODELS_DIR = Path(__file__).parent / "models"
LOCAL_DIR_PREFIX = "local-dir:"
# "ARCH:random" builds the architecture with random weights: same compute as the real model, meaningless
# rankings. For benchmarks only.
RANDOM_WEIGHTS_TAG = "random"

SpecKind = Literal["local-dir", "pretrained", "checkpoint", "random"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed IMAGESEARCH_MODEL value."""

    raw: str
    kind: SpecKind
    arch: str = ""
    pretrained: str = ""
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """Parse "local-dir:DIR", a bundled model name, "ARCH:/path/weights.pt", "ARCH:TAG" or "ARCH:random"."""
        spec = spec.strip()
        bundled = BUNDLED_MODELS_DIR / spec
        if spec and "/" not in spec and ":" not in spec and (bundled / "open_clip_config.json").is_file():
            return cls(raw=spec, kind="local-dir", path=bundled)
        if spec.startswith(LOCAL_DIR_PREFIX):
            return cls(raw=spec, kind="local-dir", path=Path(spec[len(LOCAL_DIR_PREFIX) :]).expanduser())
        arch, sep, tag = spec.partition(":")
        if not sep or not arch or not tag:
            raise ModelLoadError(
                f"model spec {spec!r} is not understood: use ARCH:PRETRAINED_TAG (e.g. ViT-B-32:laion2b_s34b_b79k), "
                f"ARCH:/path/to/weights.pt, local-dir:/path/to/dir, or a bundled model ({', '.join(bundled_models())})"
            )
        if tag == RANDOM_WEIGHTS_TAG:
            return cls(raw=spec, kind="random", arch=arch)
        if "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
            return cls(raw=spec, kind="checkpoint", arch=arch, path=Path(tag).expanduser())
        return cls(raw=spec, kind="pretrained", arch=arch, pretrained=tag)


def bundled_models() -> list[str]:
    if not BUNDLED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_MODELS_DIR.iterdir() if (p / "open_clip_config.json").is_file())


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was requested but CUDA is not available on this machine")
    return device


class ClipEncoder:
    """A loaded open_clip model with its preprocessing and tokenizer. Thread-compatible, not thread-safe:
    call it from one thread at a time (`AsyncEncoder` does)."""

    def __init__(
        self,
        spec: ModelSpec,
        model: Any,
        preprocess: Any,
        tokenizer: Any,
        device: str,
        text_weights: TextWeights = "fp32",
        image_int8: bool = False,
    ) -> None:
        self.spec = spec
        self.device = device
        # The intra-op pool of the thread that builds the encoder, which is the one that runs it (AsyncEncoder).
        self.torch_threads = torch.get_num_threads()
        # Images go in at the precision the towers were created with (fp16 on CUDA). Not "the first parameter's
        # dtype": open_clip keeps embeddings and norms in fp32 when it halves the matrix weights.
        self._image_dtype = torch.float16 if _precision(device) == "fp16" else torch.float32
        self._model = model
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        # Queries run through the lean text tower (unpadded, optionally fp16 weights) when the model's layout
        # allows it, else through open_clip's own padded path.
        self._lean_text = LeanTextTower(model, text_weights).eval() if LeanTextTower.supports(model) else None
        # How each tower's weights are held (GetServiceInfo); fp16 weights on CPU exist only on the lean path.
        self.image_precision = "int8" if image_int8 else _precision(device)
        self.text_precision = text_weights if self._lean_text is not None else _precision(device)
        self.image_size = _image_size(model)
        # Repeated queries ("red shoes") are common; BPE tokenizing is pure Python, so memoise it.
        self._tokens = functools.lru_cache(maxsize=4096)(lambda text: tokenizer([text])[0])
        # One pass through each tower at start: torch and oneDNN set up kernels on first use, which would
        # otherwise land on the first caller (hundreds of ms on CPU).
        self.dimension = int(self.encode_texts(["warm-up"]).shape[1])
        self.encode_images([Image.new("RGB", (self.image_size, self.image_size))])

    @property
    def text_path(self) -> str:
        """Which text path queries take, for logs and benchmarks, e.g. "unpadded, fp16 weights"."""
        return f"unpadded, {self.text_precision} weights" if self._lean_text is not None else "padded (open_clip)"

    @property
    def model_id(self) -> str:
        """The spec as configured: identifies the embedding space (cache keys, store metadata)."""
        return self.spec.raw

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        device: str = "auto",
        offline: bool = False,
        threads: int = 0,
        quantize_image_tower: bool = False,
        text_weights: Literal["auto", "fp16", "fp32"] = "auto",
    ) -> ClipEncoder:
        """Load a model by spec. Raises ModelLoadError with instructions when the weights cannot be had.

        `quantize_image_tower` (CPU only): int8 dynamic quantisation of the image tower's linear layers, faster
        at a small cost in precision (benchmarks/quantization.py). `text_weights` (see text_tower.py): "fp16"
        keeps the CPU text tower's weights in half precision, halving what a query forward reads; "auto" picks
        it where the CPU has the kernels. On CUDA the whole model is fp16 and "fp32" is refused.
        """
        parsed = ModelSpec.parse(spec)
        resolved_device = resolve_device(device)
        resolved_text_weights = _resolve_text_weights(text_weights, resolved_device)
        if quantize_image_tower and resolved_device != "cpu":
            raise ModelLoadError(f"int8 quantisation is a CPU option; the device is {resolved_device}")
        # torch sizes its pool by the host's cores; a container's CPU quota can be far lower (see cpus.py).
        torch.set_num_threads(threads if threads > 0 else min(torch.get_num_threads(), available_cpus()))
        if offline:
            _enable_hub_offline_mode()
        try:
            model, preprocess, tokenizer = _create(parsed, resolved_device)
            if quantize_image_tower:
                model.visual = _int8_linears(model.visual)
        except ModelLoadError:
            raise
        except Exception as exc:  # open_clip / huggingface_hub raise many unrelated types
            raise ModelLoadError(_load_failure_message(parsed, exc)) from exc
        return cls(parsed, model, preprocess, tokenizer, resolved_device, resolved_text_weights, quantize_image_tower)

    def decode(self, data: bytes, *, field: str, max_pixels: int) -> Image.Image:
        """Decode untrusted image bytes (see imaging.decode_image) at a size suited to this model."""
        return decode_image(data, field=field, max_pixels=max_pixels, target_size=self.image_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize, crop and normalise one image into the model's input tensor (C, H, W)."""
        tensor: torch.Tensor = self._preprocess(image)
        return tensor

    @torch.inference_mode()
    def encode_pixels(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a batch of preprocessed images (N, C, H, W) -> (N, dim) float32, L2-normalised."""
        features = self._model.encode_image(batch.to(self.device, dtype=self._image_dtype), normalize=True)
        return _to_numpy(features)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images -> (N, dim) float32, L2-normalised."""
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts -> (N, dim) float32, L2-normalised. Text past the context length is truncated."""
        if self._lean_text is None:
            return self.encode_texts_padded(texts)
        return _to_numpy(self._lean_text(self._token_batch(texts)))

    @torch.inference_mode()
    def encode_texts_padded(self, texts: Sequence[str]) -> np.ndarray:
        """open_clip's own text path over the full padded context (the reference for the lean path)."""
        return _to_numpy(self._model.encode_text(self._token_batch(texts), normalize=True))

    def _token_batch(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._tokens(text) for text in texts]).to(self.device)


def model_thread() -> ThreadPoolExecutor:
    """The one thread that loads the model and runs every forward pass (see AsyncEncoder)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-forward")


def default_decode_threads(device: str) -> int:
    """Decode threads when not configured. On CPU two: the model's forward passes need the cores, and two keep
    one image decoding while another waits for the model. On a GPU the model is fast and decoding is what
    limits throughput, so up to 8, leaving a core for the event loop."""
    if device == "cpu":
        return 2
    return max(2, min(8, available_cpus() - 1))


async def load_on_model_thread(spec: str, **load_options: Any) -> tuple[ClipEncoder, ThreadPoolExecutor]:
    """ClipEncoder.load(spec, **load_options) run on a new model thread; returns the encoder and that thread, to
    be handed to AsyncEncoder (see its docstring: the thread that loads the model must be the one that runs it)."""
    forward_thread = model_thread()
    try:
        encoder = await asyncio.get_running_loop().run_in_executor(
            forward_thread, functools.partial(ClipEncoder.load, spec, **load_options)
        )
    except BaseException:
        forward_thread.shutdown(wait=False)
        raise
    return encoder, forward_thread


class AsyncEncoder:
    """Runs a ClipEncoder off the event loop, micro-batching concurrent requests.

    Model forwards go to one dedicated thread: torch already spreads one forward over all cores, so two
    concurrent forwards would only fight for them; instead, requests that arrive during a forward share the
    next one (see batching.py). Image decoding and preprocessing run in a small pool of their own, so they
    overlap with a forward.

    Threads and OpenMP: every thread that runs a parallel torch op gets its own OpenMP team, and on a small
    machine idle teams steal cores from the busy one (measured on 2 cores: a one-query ViT-B-32 text forward
    took 21-23 ms with one team, 30-39 ms once the preprocessing threads had teams too). So the model is
    loaded on the model thread (`load_on_model_thread`, whose thread is passed here as `forward_thread`), and the
    preprocessing threads run torch single-threaded.
    """

    def __init__(
        self,
        encoder: ClipEncoder,
        *,
        max_batch: int = 32,
        on_batch: Callable[[Literal["text", "image"], int, float], None] | None = None,
        forward_thread: ThreadPoolExecutor | None = None,
        decode_threads: int = 0,
        batch_max_wait_s: float = 0.0,
    ) -> None:
        self.encoder = encoder
        self._model_thread = forward_thread or model_thread()
        self._decode_pool = ThreadPoolExecutor(
            max_workers=decode_threads or default_decode_threads(encoder.device),
            thread_name_prefix="clip-decode",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self.images: MicroBatcher[torch.Tensor] = MicroBatcher(
            lambda pixels: encoder.encode_pixels(torch.stack(list(pixels))),
            self._model_thread,
            max_batch,
            functools.partial(on_batch, "image") if on_batch else None,
            # Images being decoded are announced to the batcher, which may wait this long for them.
            max_wait_s=batch_max_wait_s,
        )
        self.texts: MicroBatcher[str] = MicroBatcher(
            lambda texts: encoder.encode_texts(texts),
            self._model_thread,
            max_batch,
            functools.partial(on_batch, "text") if on_batch else None,
        )

    async def encode_image_bytes(self, data: bytes, *, field: str, max_pixels: int) -> np.ndarray:
        """Decode, preprocess and embed one image -> (dim,) float32."""
        loop = asyncio.get_running_loop()
        with self.images.incoming():
            pixels = await loop.run_in_executor(self._decode_pool, self._decode_and_preprocess, data, field, max_pixels)
        return await self.images.submit(pixels)

    async def encode_text(self, text: str) -> np.ndarray:
        """Embed one text -> (dim,) float32."""
        return await self.texts.submit(text)

    def close(self) -> None:
        self._model_thread.shutdown(wait=True, cancel_futures=True)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)

    def _decode_and_preprocess(self, data: bytes, field: str, max_pixels: int) -> torch.Tensor:
        return self.encoder.preprocess(self.encoder.decode(data, field=field, max_pixels=max_pixels))


def _create(spec: ModelSpec, device: str) -> tuple[Any, Any, Any]:
    import open_clip  # imported late: importing it is slow and the hub offline switch must come first

    precision = _precision(device)
    if spec.kind == "local-dir":
        assert spec.path is not None
        if not (spec.path / "open_clip_config.json").is_file():
            raise ModelLoadError(
                f"{spec.raw}: {spec.path} has no open_clip_config.json; a local-dir model needs "
                "open_clip_config.json and open_clip_model.safetensors (or open_clip_pytorch_model.bin)"
            )
        name = LOCAL_DIR_PREFIX + str(spec.path)
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, precision=precision)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        if spec.kind == "checkpoint":
            assert spec.path is not None
            if not spec.path.is_file():
                raise ModelLoadError(f"{spec.raw}: checkpoint file {spec.path} does not exist")
        pretrained = None if spec.kind == "random" else str(spec.path or spec.pretrained)
        # OpenAI's weights were trained with QuickGELU; the plain config loads them silently but computes wrong.
        quick_gelu = spec.pretrained == "openai" and not spec.arch.endswith("-quickgelu")
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.arch, pretrained=pretrained, device=device, precision=precision, force_quick_gelu=quick_gelu
        )
        tokenizer = open_clip.get_tokenizer(spec.arch)
    model.eval()
    return model, preprocess, tokenizer


def _resolve_text_weights(requested: Literal["auto", "fp16", "fp32"], device: str) -> TextWeights:
    if device != "cpu":
        if requested == "fp32":
            raise ModelLoadError(f"text weights fp32 is a CPU option; on {device} the whole model runs in fp16")
        return "fp16"  # on a GPU the whole model is already half precision
    if requested == "auto":
        return "fp16" if fp16_weight_kernels_available() else "fp32"
    if requested == "fp16" and not fp16_weight_kernels_available():
        raise ModelLoadError(
            "text weights fp16 needs fbgemm's fp16 kernels, which this CPU build of torch lacks (they are x86 only); "
            "use auto or fp32"
        )
    return requested


def _precision(device: str) -> Literal["fp16", "fp32"]:
    """Half precision on GPUs (twice the speed, same rankings); fp32 on CPU, where fp16 kernels are slow."""
    return "fp16" if device.startswith("cuda") else "fp32"


def _enable_hub_offline_mode() -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; set both the variable (for a later import) and the
    # already-imported constant, so a missing download fails at once instead of after ~45 s of DNS retries.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def _load_failure_message(spec: ModelSpec, exc: Exception) -> str:
    how = (
        "Provide the weights in one of these ways: run once with internet access so open_clip caches them "
        "(under ~/.cache/huggingface); or set IMAGESEARCH_MODEL=ARCH:/path/to/weights.pt for a checkpoint file; "
        "or IMAGESEARCH_MODEL=local-dir:/path/to/dir for a directory holding open_clip_config.json and "
        "open_clip_model.safetensors. To try the service without any download, use the bundled test model: "
        "IMAGESEARCH_MODEL=synthetic-clip (it only knows synthetic catalogue images)."
    )
    return f"could not load model {spec.raw!r}: {type(exc).__name__}: {exc}. {how}"


def _image_size(model: Any) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def _int8_linears(module: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which we do not depend on; the eager API
        # still works on the torch versions we support, and this is an opt-in.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantized: torch.nn.Module = torch.ao.quantization.quantize_dynamic(
            module, {torch.nn.Linear}, dtype=torch.qint8
        )
    return quantized


def _to_numpy(features: torch.Tensor) -> np.ndarray:
    return features.float().cpu().numpy().astype(np.float32, copy=False)
