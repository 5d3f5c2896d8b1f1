"""The encoder outside gRPC: image decoding rules, the unpadded text path, micro-batching."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from imagesearch.errors import ImageTooLarge, InvalidArgument, ModelLoadError
from imagesearch.model import encoder as encoder_module
from imagesearch.model import loading as loading_module
from imagesearch.model.batching import MicroBatcher
from imagesearch.model.encoder import ClipEncoder
from imagesearch.model.imaging import decode_image

TEXTS = [
    "a red mug",
    "striped blue t-shirt on a white background, photographed from above, studio light",
    "x",
    "👟 زوج أحذية",  # emoji and right-to-left text
    "word " * 200,  # longer than the context: truncated identically by both paths
]


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        pytest.param("RGB", "JPEG", id="jpeg"),
        pytest.param("CMYK", "JPEG", id="cmyk-jpeg"),
        pytest.param("RGBA", "PNG", id="alpha-png"),
        pytest.param("P", "GIF", id="palette-gif"),
        pytest.param("I;16", "PNG", id="16-bit-png"),
        pytest.param("L", "WEBP", id="grey-webp"),
        pytest.param("1", "BMP", id="bilevel-bmp"),
        pytest.param("RGB", "TIFF", id="tiff"),
    ],
)
def test_decode_accepts_common_modes_and_formats(mode: str, fmt: str) -> None:
    image = decode_image(encoded(Image.new(mode, (300, 200)), fmt), field="f", max_pixels=10**7, target_size=48)
    assert image.mode == "RGB"
    assert min(image.size) >= 96  # shrunk cheaply, but never below twice the model input


def test_decode_composites_transparency_on_white() -> None:
    transparent = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    image = decode_image(encoded(transparent, "PNG"), field="f", max_pixels=10**7, target_size=16)
    assert image.getpixel((10, 10)) == (255, 255, 255)


def test_decode_honours_exif_orientation() -> None:
    wide = Image.new("RGB", (120, 60), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    image = decode_image(encoded(wide, "JPEG", exif=exif), field="f", max_pixels=10**7, target_size=16)
    assert image.size[0] < image.size[1]


@pytest.mark.parametrize("side", [pytest.param(8000, id="over-our-limit"), pytest.param(20000, id="over-pil-limit")])
def test_decode_refuses_pixel_bombs_before_decoding(side: int) -> None:
    # A 20000 x 20000 PNG of one colour is ~400 KB on disk and would be 1.2 GB decoded as RGB.
    bomb = encoded(Image.new("1", (side, side)), "PNG")
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, field="image_chunk", max_pixels=40_000_000, target_size=224)


def test_decode_accepts_a_one_pixel_image() -> None:
    assert decode_image(encoded(Image.new("RGB", (1, 1)), "PNG"), field="f", max_pixels=10, target_size=224).size == (
        1,
        1,
    )


@pytest.mark.parametrize("data", [b"", b"GIF89a garbage", b"\x89PNG\r\n\x1a\n" + b"\0" * 50])
def test_decode_rejects_non_images(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        decode_image(data, field="f", max_pixels=10**7, target_size=48)


def assert_lean_path_matches_padded(model: ClipEncoder, tolerance: float) -> None:
    """Each text alone (where the lean path runs a few positions instead of 77) and all short ones together."""
    for text in TEXTS:
        lean, padded = model.encode_texts([text]), model.encode_texts_padded([text])
        assert np.abs(lean - padded).max() < tolerance, text
    short = TEXTS[:4]
    assert np.abs(model.encode_texts(short) - model.encode_texts_padded(short)).max() < tolerance


def test_lean_text_path_equals_open_clip_padded_path(encoder: ClipEncoder) -> None:
    exact = ClipEncoder.load("synthetic-clip", device="cpu", runtime="torch", text_weights="fp32")
    assert exact.text_path == "unpadded, fp32 weights"
    assert_lean_path_matches_padded(exact, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-32-quickgelu"])  # the second: OpenAI's weights' layout
def test_lean_text_path_on_real_architectures_is_exact_in_fp32_and_close_in_fp16(arch: str) -> None:
    # Real architectures with random weights: agreement, not relevance, is what is tested. Random weights are
    # not fp16-representable, so the fp16 check is a real one (the synthetic model's are).
    torch.manual_seed(0)
    exact = ClipEncoder.load(f"{arch}:random", device="cpu", runtime="torch", text_weights="fp32")
    assert_lean_path_matches_padded(exact, 1e-5)
    if not loading_module.fp16_weight_kernels_available():
        pytest.skip("fp16 text weights need fbgemm, which this CPU build of torch lacks (x86 only)")
    torch.manual_seed(0)
    half = ClipEncoder.load(f"{arch}:random", device="cpu", runtime="torch", text_weights="fp16")
    assert half.text_path == "unpadded, fp16 weights"
    reference = exact.encode_texts_padded(TEXTS)
    assert np.sum(half.encode_texts(TEXTS) * reference, axis=1).min() >= 0.9999
    assert np.sum(half.encode_texts_padded(TEXTS) * reference, axis=1).min() > 0.99999  # the model itself is fp32


def test_text_weights_auto_falls_back_to_fp32_without_fp16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # fbgemm (and so fp16 weights) exists on x86 only; this machine is x86, so an ARM CPU is simulated.
    monkeypatch.setattr(loading_module, "fp16_weight_kernels_available", lambda: False)
    assert ClipEncoder.load("synthetic-clip", device="cpu", runtime="torch").text_path == "unpadded, fp32 weights"
    with pytest.raises(ModelLoadError, match="fp16 kernels"):
        ClipEncoder.load("synthetic-clip", device="cpu", runtime="torch", text_weights="fp16")


def test_embeddings_are_normalised_float32(encoder: ClipEncoder) -> None:
    vectors = encoder.encode_texts(["a red mug", "a blue shoe"])
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


async def test_micro_batcher_runs_lone_request_alone_and_gathers_concurrent_ones() -> None:
    seen: list[int] = []

    def run(items: Sequence[int]) -> np.ndarray:
        seen.append(len(items))
        return np.array([[i * 2.0] for i in items], dtype=np.float32)

    with ThreadPoolExecutor(max_workers=1) as pool:
        batcher: MicroBatcher[int] = MicroBatcher(run, pool, max_batch=8)
        assert float((await batcher.submit(21))[0]) == 42.0
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert [float(r[0]) for r in results] == [i * 2.0 for i in range(20)]
    assert seen[0] == 1  # the lone request did not wait for company
    assert max(seen) == 8 and sum(seen) == 21


async def test_micro_batcher_waits_for_announced_items_but_never_for_a_lone_request() -> None:
    seen: list[int] = []

    def run(items: Sequence[int]) -> np.ndarray:
        seen.append(len(items))
        return np.array([[float(i)] for i in items], dtype=np.float32)

    async def decoded_later(batcher: MicroBatcher[int], item: int) -> np.ndarray:
        with batcher.incoming():  # like an image still being decoded
            await asyncio.sleep(0.05)
        return await batcher.submit(item)

    with ThreadPoolExecutor(max_workers=1) as pool:
        # A long max wait: if a lone request waited for it, this would time out.
        batcher: MicroBatcher[int] = MicroBatcher(run, pool, max_batch=8, max_wait_s=30.0)
        assert float((await asyncio.wait_for(batcher.submit(1), timeout=10))[0]) == 1.0
        # One item ready, one announced: the forward waits for the announced one and takes both.
        results = await asyncio.wait_for(asyncio.gather(batcher.submit(2), decoded_later(batcher, 3)), timeout=10)
        assert [float(r[0]) for r in results] == [2.0, 3.0]
        assert seen == [1, 2]

        # An announced item that fails on its way (a bad image) releases the wait at once.
        async def fails_on_the_way() -> None:
            with batcher.incoming():
                await asyncio.sleep(0.05)
                raise ValueError("not an image")

        outcome = await asyncio.wait_for(
            asyncio.gather(batcher.submit(4), fails_on_the_way(), return_exceptions=True), timeout=10
        )
        assert float(outcome[0][0]) == 4.0 and isinstance(outcome[1], ValueError)
        assert seen == [1, 2, 1]

        # Without a max wait, the ready item goes alone.
        eager: MicroBatcher[int] = MicroBatcher(run, pool, max_batch=8)
        await asyncio.gather(eager.submit(5), decoded_later(eager, 6))
        assert seen[-2:] == [1, 1]


async def test_micro_batcher_gives_every_caller_the_batch_error() -> None:
    def run(items: Sequence[int]) -> np.ndarray:
        raise RuntimeError("model failed")

    with ThreadPoolExecutor(max_workers=1) as pool:
        batcher: MicroBatcher[int] = MicroBatcher(run, pool)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


def test_precision_other_than_auto_needs_the_openvino_runtime() -> None:
    with pytest.raises(ModelLoadError, match="runtime openvino"):
        ClipEncoder.load("synthetic-clip", device="cpu", runtime="torch", precision="f32")


def test_torch_runtime_keeps_both_towers_on_torch() -> None:
    fp32 = ClipEncoder.load("synthetic-clip", device="cpu", runtime="torch", text_weights="fp32")
    assert (fp32.image_runtime, fp32.image_precision) == ("torch", "fp32")
    assert (fp32.text_runtime, fp32.text_path) == ("torch", "unpadded, fp32 weights")


def test_half_precision_towers_take_half_precision_inputs(
    encoder: ClipEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fp16 path is what runs on a GPU, and no GPU runs the tests: the half-precision model is built on the
    # CPU here (torch has CPU fp16 kernels, slow but exact enough) to check that both towers get inputs in the
    # dtype of their weights. open_clip keeps embeddings and norms in fp32 when it halves the matrices.
    for module in (encoder_module, loading_module):
        monkeypatch.setattr(module, "precision_for", lambda device: "fp16")
    half = ClipEncoder.load("synthetic-clip", device="cpu", runtime="torch")
    images = [Image.new("RGB", (64, 64), (i * 40 % 256, 90, 200 - i * 20)) for i in range(4)]
    image_cosines = np.sum(encoder.encode_images(images) * half.encode_images(images), axis=1)
    text_cosines = np.sum(encoder.encode_texts(TEXTS) * half.encode_texts(TEXTS), axis=1)
    assert image_cosines.min() >= 0.999
    assert text_cosines.min() >= 0.999
    assert np.abs(half.encode_texts(TEXTS) - half.encode_texts_padded(TEXTS)).max() < 2e-3


@pytest.mark.slow
def test_random_weights_are_the_same_in_every_process() -> None:
    # A ":random" model is built from its own fixed seed: whatever the caller's random state, the same weights
    # (so a restarted server's stored vectors and its cached converted graph still match).
    torch.manual_seed(1)
    first = ClipEncoder.load("RN50:random", device="cpu", runtime="torch")
    torch.manual_seed(2)
    second = ClipEncoder.load("RN50:random", device="cpu", runtime="torch")
    assert np.array_equal(first.encode_texts(TEXTS), second.encode_texts(TEXTS))
