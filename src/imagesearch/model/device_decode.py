"""JPEG decoding and preprocessing on the model's device (nvJPEG through torchvision on CUDA).

Why: on a GPU the model is no longer the limit (ViT-B-32 fp16 embeds ~6,000 images/s on an H200), decoding JPEGs
on the CPU is (one Python process measured 367 images/s in bulk). torchvision decodes JPEGs on the device and
its transforms run there too, so the image never returns to the host.

Same rules as the CPU path (imaging.decode_image): the pixel limit is checked from the header before decoding,
and EXIF orientation is honoured. Everything else falls back to the CPU path, which also produces the errors:
formats other than baseline JPEG, JPEGs that are not RGB or greyscale (CMYK), and anything the device decoder
refuses. The preprocessing replays the model's own transforms (Resize, CenterCrop, Normalize) on the tensor, so
pixels agree with the PIL path within resampling differences (tests compare both on the CPU, where torchvision's
CPU decoder stands in for nvJPEG).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from imagesearch.model.imaging import check_pixel_count

_JPEG_MAGIC = b"\xff\xd8\xff"
# open_clip's own conversions before its Normalize: ours are the decode mode (RGB) and the float scaling below.
_CONVERSIONS = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "PILToTensor", "ConvertImageDtype")


class DeviceJpegPreprocessor:
    """Turns JPEG bytes into the model's input tensor (C, H, W) on `device`; None means "use the CPU path"."""

    def __init__(self, preprocess: Any, device: str) -> None:
        self.device = device
        self._steps = _tensor_steps(preprocess)

    @classmethod
    def for_model(cls, preprocess: Any, device: str) -> DeviceJpegPreprocessor | None:
        """None when the model's transforms cannot be replayed on tensors (then every image takes the CPU path)."""
        try:
            return cls(preprocess, device)
        except ValueError:
            return None

    def __call__(self, data: bytes, *, field: str, max_pixels: int) -> torch.Tensor | None:
        if not data.startswith(_JPEG_MAGIC):
            return None
        try:
            header = Image.open(io.BytesIO(data), formats=("JPEG",))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None  # the CPU path names what is wrong
        check_pixel_count(header.size, max_pixels, field)
        if header.mode not in ("RGB", "L"):
            return None  # CMYK and friends: PIL converts them faithfully
        try:
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            image = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except RuntimeError:
            return None  # progressive or damaged data the device decoder refuses: the CPU path decides
        pixels: torch.Tensor = image
        for step in self._steps:
            pixels = step(pixels)
        return pixels


def _tensor_steps(preprocess: Any) -> list[Any]:
    """The model's preprocessing as tensor operations: resize and crop on uint8 pixels (as PIL does), then
    scaling to [0, 1] and normalisation. Raises ValueError for a transform it does not know."""
    steps: list[Any] = []
    for transform in getattr(preprocess, "transforms", [preprocess]):
        name = type(transform).__name__
        if isinstance(transform, transforms.Resize):
            steps.append(
                transforms.Resize(
                    transform.size,
                    interpolation=transform.interpolation,
                    max_size=transform.max_size,
                    antialias=True,
                )
            )
        elif isinstance(transform, transforms.CenterCrop):
            steps.append(transform)
        elif isinstance(transform, transforms.Normalize):
            steps.append(_to_unit_float)
            steps.append(transform)
        elif name in _CONVERSIONS:
            continue
        else:
            raise ValueError(f"no tensor equivalent for the preprocessing step {name}")
    return steps


def _to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.to(torch.float32) / 255.0
