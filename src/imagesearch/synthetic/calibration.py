"""The images the server calibrates an int8 image tower on (model/calibration.py takes them from its caller)."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw

from imagesearch.synthetic.renderer import COLOURS, KINDS, PATTERNS, render

# The name the set goes by in the conversion cache's key: change it whenever the images below change.
CALIBRATION_SET = "synthetic-v1"
# 128 images: with 64, the bundled model's worst cosine to fp32 fell to ~0.999.
CALIBRATION_IMAGES = 128


def calibration_images(count: int = CALIBRATION_IMAGES, seed: int = 0) -> list[Image.Image]:
    """Deterministic int8 calibration images: half synthetic catalogue renders (objects on plain backgrounds),
    half photo-like scenes (texture, shapes, JPEG artefacts), so activation ranges cover both."""
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
