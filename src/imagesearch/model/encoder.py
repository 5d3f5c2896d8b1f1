"""CLIP encoder: loads an open_clip model and turns images and texts into L2-normalised float32 vectors.

Knows nothing of gRPC. `ClipEncoder` is synchronous (call it from a worker thread); `AsyncEncoder` runs it off
the event loop so a slow forward pass never blocks health checks or other RPCs.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import structlog
import torch
from PIL import Image

from imagesearch.domain import ModelDescription
from imagesearch.errors import ModelLoadError
from imagesearch.images import NormalizedBox
from imagesearch.model.batching import MicroBatcher
from imagesearch.model.calibration import Calibration
from imagesearch.model.cpus import CpuBudget, available_cpus
from imagesearch.model.device_decode import DeviceJpegPreprocessor
from imagesearch.model.imaging import decode_image
from imagesearch.model.loading import (
    ModelSpec,
    Runtime,
    create_model,
    enable_hub_offline_mode,
    load_failure_message,
    precision_for,
    resolve_device,
    resolve_runtime,
    resolve_text_weights,
)
from imagesearch.model.runtime_choice import choose_runtime
from imagesearch.model.text_tower import LeanTextTower, TextWeights
from imagesearch.tracing import IMAGE_BYTES, tracer

if TYPE_CHECKING:
    from imagesearch.model.openvino_runtime import OpenVinoImageTower, OpenVinoTextTower

log = structlog.get_logger(__name__)


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
        image_tower: OpenVinoImageTower | None = None,
        text_tower: OpenVinoTextTower | None = None,
        device_jpeg_decode: bool | None = None,
        runtime_reason: str = "",
        cpu: str = "",
    ) -> None:
        self.spec = spec
        self.device = device
        # How the towers' runtime, precision and threads were chosen (runtime_choice.py), and on what CPU.
        self.runtime_reason = runtime_reason
        self.cpu = cpu
        # The intra-op pool of the thread that builds the encoder, which is the one that runs it (AsyncEncoder).
        self.torch_threads = torch.get_num_threads()
        # Images go in at the precision the towers were created with (fp16 on CUDA). Not "the first parameter's
        # dtype": open_clip keeps embeddings and norms in fp32 when it halves the matrix weights.
        self._image_dtype = torch.float16 if precision_for(device) == "fp16" else torch.float32
        self._model = model
        # The towers' runtime where it is not torch (OpenVINO); their graphs were derived from this model.
        self._image_tower = image_tower
        self._text_tower = text_tower
        self.image_runtime: Runtime = "openvino" if image_tower is not None else "torch"
        self.text_runtime: Runtime = "openvino" if text_tower is not None else "torch"
        self._preprocess = preprocess
        # On CUDA, JPEGs decode and preprocess on the GPU (device_decode.py); everything else on the CPU. None
        # means on CUDA only; True also on the CPU (torchvision's CPU decoder: how the tests check the pixels).
        on_device = device.startswith("cuda") if device_jpeg_decode is None else device_jpeg_decode
        self._device_jpeg = DeviceJpegPreprocessor.for_model(preprocess, device) if on_device else None
        self._tokenizer = tokenizer
        # On torch, queries run through the lean text tower (unpadded, optionally fp16 weights) when the model's
        # layout allows it, else through open_clip's own padded path.
        lean = text_tower is None and LeanTextTower.supports(model)
        self._lean_text = LeanTextTower(model, text_weights).eval() if lean else None
        # The precision each tower computes in (GetServiceInfo); fp16 weights on CPU exist only on the lean path.
        self.image_precision = _precision_name(image_tower.precision) if image_tower else precision_for(device)
        if text_tower is not None:
            self.text_precision = _precision_name(text_tower.precision)
        else:
            self.text_precision = text_weights if self._lean_text is not None else precision_for(device)
        self.image_size = image_tower.image_size if image_tower is not None else _image_size(model)
        # Repeated queries ("red shoes") are common; BPE tokenizing is pure Python, so memoise it.
        self._tokens = functools.lru_cache(maxsize=4096)(lambda text: tokenizer([text])[0])
        # One pass through each tower at start: torch and oneDNN set up kernels on first use, which would
        # otherwise land on the first caller (hundreds of ms on CPU).
        self.dimension = int(self.encode_texts(["warm-up"]).shape[1])
        self.encode_images([Image.new("RGB", (self.image_size, self.image_size))])

    @property
    def text_path(self) -> str:
        """Which text path queries take, for logs and benchmarks, e.g. "unpadded, fp16 weights"."""
        if self._text_tower is not None:
            return f"unpadded, {self.text_precision}"
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
        text_weights: Literal["auto", "fp16", "fp32"] = "auto",
        runtime: Literal["auto", "torch", "openvino"] = "auto",
        precision: Literal["auto", "bf16", "f32", "int8"] = "auto",
        runtime_cache_dir: Path | None = None,
        device_jpeg_decode: bool | None = None,
        calibration: Calibration | None = None,
    ) -> ClipEncoder:
        """Load a model by spec. Raises ModelLoadError with instructions when the weights cannot be had.

        How the towers run on CPU is decided by runtime_choice.choose_runtime: with everything at auto, OpenVINO
        at f32 or at a precision the CPU computes natively (bf16, f16), or torch, on one thread per physical core
        or per CPU, whichever measures fastest on this CPU (the choice is kept in `runtime_cache_dir` with the
        converted graphs, for the next start; None: a temporary directory, nothing kept). An explicit `runtime`
        (see loading.resolve_runtime), `precision` (OpenVINO's: "bf16", "f32", or "int8", which quantises the
        image tower with NNCF on `calibration`'s images, and leaves the text tower at auto) or `threads` is
        used as given. On CUDA the towers run on torch.

        On torch, `text_weights` (see text_tower.py): "fp16" keeps the CPU text tower's weights in half
        precision, halving what a query forward reads; "auto" picks it where the CPU has the kernels. On CUDA the
        whole model is fp16 and "fp32" is refused. `device_jpeg_decode`: JPEGs decode on the model's device
        (None: on CUDA only; False: never).
        """
        parsed = ModelSpec.parse(spec)
        resolved_device = resolve_device(device)
        resolved_text_weights = resolve_text_weights(text_weights, resolved_device)
        resolved_runtime = resolve_runtime(runtime, resolved_device)
        if precision != "auto" and resolved_runtime != "openvino":
            raise ModelLoadError(
                f"precision {precision} is the OpenVINO runtime's; this model runs on {resolved_runtime} "
                f"(runtime {runtime}, device {resolved_device}): use precision auto, or runtime openvino on a CPU"
            )
        # torch sizes its pool by the host's cores; a container's CPU quota can be far lower (see cpus.py). The
        # runtime choice below sets the final count.
        torch.set_num_threads(threads if threads > 0 else CpuBudget.detect().physical)
        if offline:
            enable_hub_offline_mode()
        try:
            model, preprocess, tokenizer = create_model(parsed, resolved_device)
        except ModelLoadError:
            raise
        except Exception as exc:  # open_clip / huggingface_hub raise many unrelated types
            raise ModelLoadError(load_failure_message(parsed, exc)) from exc
        choice = choose_runtime(
            model,
            preprocess,
            tokenizer,
            device=resolved_device,
            runtime=runtime,
            precision=precision,
            threads=threads,
            text_weights=resolved_text_weights,
            cache_dir=runtime_cache_dir,
            calibration=calibration,
        )
        log.info("runtime_chosen", cpu=choice.cpu, reason=choice.reason)
        return cls(
            parsed,
            model,
            preprocess,
            tokenizer,
            resolved_device,
            resolved_text_weights,
            choice.image,
            choice.text,
            device_jpeg_decode,
            choice.reason,
            choice.cpu,
        )

    def decode(self, data: bytes, *, field: str, max_pixels: int, region: NormalizedBox | None = None) -> Image.Image:
        """Decode untrusted image bytes (see imaging.decode_image), or a region of them, at a size suited to this
        model."""
        return decode_image(data, field=field, max_pixels=max_pixels, target_size=self.image_size, region=region)

    def pixels_from_bytes(
        self, data: bytes, *, field: str, max_pixels: int, region: NormalizedBox | None = None
    ) -> torch.Tensor:
        """Decode and preprocess untrusted image bytes (or a region of them) into the model's input tensor
        (C, H, W): on the model's device for whole JPEGs where it decodes them, else on the CPU (same limits,
        same errors)."""
        on_device = None
        if self._device_jpeg is not None and region is None:
            on_device = self._device_jpeg(data, field=field, max_pixels=max_pixels)
        if on_device is not None:
            return on_device
        pixels = self.preprocess(self.decode(data, field=field, max_pixels=max_pixels, region=region))
        # One batch stacks tensors of one device: the CPU path's join the device's.
        return pixels if self._device_jpeg is None else pixels.to(self.device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize, crop and normalise one image into the model's input tensor (C, H, W)."""
        tensor: torch.Tensor = self._preprocess(image)
        return tensor

    @torch.inference_mode()
    def encode_pixels(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a batch of preprocessed images (N, C, H, W) -> (N, dim) float32, L2-normalised."""
        if self._image_tower is not None:
            return self._image_tower(batch)
        features = self._model.encode_image(batch.to(self.device, dtype=self._image_dtype), normalize=True)
        return _to_numpy(features)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images -> (N, dim) float32, L2-normalised."""
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts -> (N, dim) float32, L2-normalised. Text past the context length is truncated."""
        if self._text_tower is not None:
            return self._text_tower(self._token_batch(texts))
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
            kind="image",
        )
        self.texts: MicroBatcher[str] = MicroBatcher(
            lambda texts: encoder.encode_texts(texts),
            self._model_thread,
            max_batch,
            functools.partial(on_batch, "text") if on_batch else None,
            kind="text",
        )

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    def describe(self) -> ModelDescription:
        e = self.encoder
        return ModelDescription(
            model_id=e.model_id,
            dimension=e.dimension,
            device=e.device,
            image_size=e.image_size,
            image_precision=e.image_precision,
            text_precision=e.text_precision,
            torch_threads=e.torch_threads,
            image_runtime=e.image_runtime,
            text_runtime=e.text_runtime,
            text_path=e.text_path,
            runtime_reason=e.runtime_reason,
            cpu=e.cpu,
        )

    async def encode_image_bytes(
        self, data: bytes, *, field: str, max_pixels: int, region: NormalizedBox | None = None
    ) -> np.ndarray:
        """Decode, preprocess and embed one image (or the `region` of it) -> (dim,) float32."""
        loop = asyncio.get_running_loop()
        decode = functools.partial(
            self.encoder.pixels_from_bytes, data, field=field, max_pixels=max_pixels, region=region
        )
        with self.images.incoming(), tracer.start_as_current_span("image.decode", attributes={IMAGE_BYTES: len(data)}):
            pixels = await loop.run_in_executor(self._decode_pool, decode)
        return await self.images.submit(pixels)

    async def encode_text(self, text: str) -> np.ndarray:
        """Embed one text -> (dim,) float32."""
        return await self.texts.submit(text)

    def close(self) -> None:
        self._model_thread.shutdown(wait=True, cancel_futures=True)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)


def _precision_name(precision: str) -> str:
    # The names GetServiceInfo has always used: "fp32", not OpenVINO's "f32" (and "fp16" for its "f16").
    return {"f32": "fp32", "f16": "fp16"}.get(precision, precision)


def _image_size(model: Any) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def _to_numpy(features: torch.Tensor) -> np.ndarray:
    return features.float().cpu().numpy().astype(np.float32, copy=False)
