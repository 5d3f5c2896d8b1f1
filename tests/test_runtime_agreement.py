"""The OpenVINO image tower ranks like torch fp32 on the trained test model: the held-out evaluation and the
top-10 results over a demo catalogue, at f32 and (where the CPU computes it natively) bf16.

Embedding-level agreement (cosines, batch sizes, the conversion cache) is in test_openvino_runtime.py; this file
checks what a user sees: rankings. The model is the bundled synthetic-clip (real, learned weights), so a
ranking difference here would be a relevance difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from conftest import load_eval_tool

from imagesearch.model.encoder import ClipEncoder
from imagesearch.synthetic import make_catalogue

pytest.importorskip("openvino")
from imagesearch.model.openvino_runtime import cpu_has_native_bf16

PRECISIONS = [
    pytest.param("f32", id="f32"),
    pytest.param(
        "bf16",
        id="bf16",
        marks=pytest.mark.skipif(
            not cpu_has_native_bf16(), reason="bf16 skipped: this CPU has no native bf16 (AVX512_BF16 or AMX)"
        ),
    ),
]


@pytest.fixture(scope="module")
def torch_fp32() -> ClipEncoder:
    return ClipEncoder.load("synthetic-clip", device="cpu", runtime="torch", text_weights="fp32")


@pytest.fixture(scope="module", params=PRECISIONS)
def openvino(request: pytest.FixtureRequest) -> ClipEncoder:
    encoder = ClipEncoder.load("synthetic-clip", device="cpu", runtime="openvino", precision=request.param)
    assert encoder.image_runtime == "openvino"
    return encoder


@pytest.fixture(scope="module")
def eval_tool() -> ModuleType:
    return load_eval_tool()


class _ImageTowerOf:
    """The open_clip model, with encode_image answered by an encoder's image tower (the eval tool's interface)."""

    def __init__(self, encoder: ClipEncoder, model: Any) -> None:
        self._encoder = encoder
        self._model = model

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.from_numpy(self._encoder.encode_pixels(pixels))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._model.encode_text(tokens, normalize=normalize)


def test_held_out_evaluation_matches_torch_fp32_within_001(
    eval_tool: ModuleType, torch_fp32: ClipEncoder, openvino: ClipEncoder
) -> None:
    model, preprocess, tokenizer = eval_tool.load_model(eval_tool.DEFAULT_MODEL_DIR)
    images, labels = eval_tool.gallery(400, seed=4242)
    reference = eval_tool.evaluate(_ImageTowerOf(torch_fp32, model), preprocess, tokenizer, images, labels)
    runtime = eval_tool.evaluate(_ImageTowerOf(openvino, model), preprocess, tokenizer, images, labels)
    for metric in ("text_to_image_p_at_5", "text_to_image_top1", "image_to_image_p_at_5", "zero_shot_accuracy"):
        assert abs(getattr(runtime, metric) - getattr(reference, metric)) <= 0.01, metric


def _top10(queries: np.ndarray, gallery: np.ndarray) -> list[set[int]]:
    return [set(np.argsort(-row)[:10].tolist()) for row in queries @ gallery.T]


def _agreement(a: Sequence[set[int]], b: Sequence[set[int]]) -> float:
    return float(np.mean([len(x & y) / 10 for x, y in zip(a, b, strict=True)]))


def test_top10_over_the_demo_catalogue_agrees_with_torch_fp32(torch_fp32: ClipEncoder, openvino: ClipEncoder) -> None:
    catalogue = [item.image() for item in make_catalogue(480, seed=11)]
    gallery_ref, gallery_rt = torch_fp32.encode_images(catalogue), openvino.encode_images(catalogue)
    # 50 text queries: the text tower is torch for both, so what differs is the catalogue's image vectors.
    items = make_catalogue(50, seed=12)
    texts = torch_fp32.encode_texts([f"a {item.colour} {item.kind}" for item in items])
    assert _agreement(_top10(texts, gallery_ref), _top10(texts, gallery_rt)) >= 0.95
    # 50 image queries: fresh renders, each embedded by its own runtime.
    queries = [item.image() for item in make_catalogue(50, seed=13)]
    by_ref = _top10(torch_fp32.encode_images(queries), gallery_ref)
    by_rt = _top10(openvino.encode_images(queries), gallery_rt)
    assert _agreement(by_ref, by_rt) >= 0.95
