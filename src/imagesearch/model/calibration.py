"""int8 calibration of the image tower (opt-in, IMAGESEARCH_PRECISION=int8): NNCF post-training quantisation of the
converted IR, on images the caller supplies. The model layer has no images of its own: the server hands in the
synthetic renders (imagesearch.synthetic.calibration), a deployment could hand in its own catalogue's.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from imagesearch.errors import ModelLoadError

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Calibration:
    """The images an int8 tower is calibrated on.

    `name` identifies the set in the conversion cache's key: another name, another entry. Change it whenever the
    images change. `images` is called only when a tower is quantised (a start without a cache entry), since
    rendering or reading them takes a while.
    """

    name: str
    images: Callable[[], Sequence[Image.Image]]


def quantize(model: Any, *, preprocess: Preprocess, calibration: Calibration) -> Any:
    """NNCF post-training int8 quantisation of the image tower's IR, calibrated on `calibration`'s images put
    through `preprocess` (the model's own transform).

    The patch embedding (the first convolution) and the output projection (the last MatMul) stay in f32: on the
    bundled trained model, quantising them took the worst cosine to fp32 from 0.9996 to 0.984.
    """
    try:
        import nncf
    except ImportError as exc:
        raise ModelLoadError("OpenVINO int8 needs the nncf package (pip install nncf); or use precision auto") from exc
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "MatMul")]
    keep_float = [ops[0].get_friendly_name(), ops[-1].get_friendly_name()] if ops else []
    samples = [preprocess(image).unsqueeze(0).numpy() for image in calibration.images()]
    if not samples:
        raise ModelLoadError(f"the int8 calibration set {calibration.name!r} has no images")
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
