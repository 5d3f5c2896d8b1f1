"""JPEG decoding on the model's device (model/device_decode.py), checked on the CPU.

No GPU runs the tests: torchvision's CPU JPEG decoder stands in for nvJPEG (the same entry point,
`decode_jpeg(device=...)`), so what is tested here is everything but the device itself: the header limits, the
fallbacks, EXIF orientation, and that the tensor pipeline gives the PIL path's pixels within resampling
differences, for both kinds of open_clip preprocessing (squash-resize, and resize + centre crop).
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision import transforms

from imagesearch.errors import ImageTooLarge, InvalidArgument
from imagesearch.model.device_decode import DeviceJpegPreprocessor
from imagesearch.model.encoder import ClipEncoder
from imagesearch.synthetic import make_catalogue

MAX_PIXELS = 40_000_000


def _jpeg(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def _photos() -> list[bytes]:
    # Synthetic product renders at several sizes and aspect ratios, like catalogue photos.
    items = make_catalogue(6, seed=21)
    images = [item.image(size) for item, size in zip(items, (128, 200, 333, 480, 640, 96), strict=True)]
    images.append(items[0].image(400).crop((0, 50, 400, 350)))  # landscape: exercises the centre crop
    return [_jpeg(image) for image in images]


@pytest.fixture(scope="module")
def on_device(encoder: ClipEncoder) -> ClipEncoder:
    return ClipEncoder.load("synthetic-clip", device="cpu", device_jpeg_decode=True)


def test_device_path_embeds_like_the_pil_path(encoder: ClipEncoder, on_device: ClipEncoder) -> None:
    for data in _photos():
        pil = encoder.pixels_from_bytes(data, field="image_chunk", max_pixels=MAX_PIXELS)
        tensor = on_device.pixels_from_bytes(data, field="image_chunk", max_pixels=MAX_PIXELS)
        assert tensor.shape == pil.shape
        # Normalised units (~4 per 255 levels): resampling from full size vs PIL's DCT-scaled decode.
        assert float((tensor - pil).abs().mean()) < 0.05
        vectors = encoder.encode_pixels(torch.stack([pil, tensor]))
        assert float(vectors[0] @ vectors[1]) > 0.995


def test_device_path_replays_resize_and_centre_crop() -> None:
    # ViT-B-32's preprocessing (resize the short side, then crop the centre) on a landscape photo.
    preprocess = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
        ]
    )
    image = make_catalogue(1, seed=3)[0].image(600).crop((0, 100, 600, 420))
    data = _jpeg(image)
    device = DeviceJpegPreprocessor(preprocess, "cpu")
    tensor = device(data, field="image_chunk", max_pixels=MAX_PIXELS)
    assert tensor is not None
    reference = preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
    assert tensor.shape == reference.shape == (3, 224, 224)
    assert float((tensor - reference).abs().mean()) < 0.02


def test_device_path_honours_exif_orientation(encoder: ClipEncoder, on_device: ClipEncoder) -> None:
    image = make_catalogue(1, seed=5)[0].image(300).crop((0, 0, 300, 180))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = _jpeg(image, exif=exif.tobytes())
    pil = encoder.pixels_from_bytes(data, field="image_chunk", max_pixels=MAX_PIXELS)
    tensor = on_device.pixels_from_bytes(data, field="image_chunk", max_pixels=MAX_PIXELS)
    assert float((tensor - pil).abs().mean()) < 0.05
    unrotated = on_device.pixels_from_bytes(_jpeg(image), field="image_chunk", max_pixels=MAX_PIXELS)
    assert float((tensor - unrotated).abs().mean()) > 0.1  # the orientation was applied, not ignored


def test_device_path_refuses_too_many_pixels_from_the_header(on_device: ClipEncoder) -> None:
    data = _jpeg(Image.new("RGB", (400, 300), (200, 30, 30)))
    with pytest.raises(ImageTooLarge):
        on_device.pixels_from_bytes(data, field="image_chunk", max_pixels=400 * 300 - 1)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_jpeg(Image.new("CMYK", (64, 64), (0, 200, 200, 0))), id="cmyk-jpeg"),
        pytest.param(_jpeg(Image.new("L", (64, 64), 128)), id="greyscale-jpeg"),
    ],
)
def test_other_jpegs_agree_with_the_pil_path(encoder: ClipEncoder, on_device: ClipEncoder, data: bytes) -> None:
    pil = encoder.pixels_from_bytes(data, field="image_chunk", max_pixels=MAX_PIXELS)
    tensor = on_device.pixels_from_bytes(data, field="image_chunk", max_pixels=MAX_PIXELS)
    assert float((tensor - pil).abs().mean()) < 0.05


def test_other_formats_take_the_cpu_path(on_device: ClipEncoder) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 64), (10, 200, 30, 128)).save(buffer, format="PNG")
    device = DeviceJpegPreprocessor(transforms.Compose([transforms.Resize(48), transforms.ToTensor()]), "cpu")
    assert device(buffer.getvalue(), field="image_chunk", max_pixels=MAX_PIXELS) is None
    pixels = on_device.pixels_from_bytes(buffer.getvalue(), field="image_chunk", max_pixels=MAX_PIXELS)
    assert pixels.shape == (3, on_device.image_size, on_device.image_size)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_jpeg(Image.new("RGB", (300, 200), (10, 200, 30)))[:300], id="truncated"),
        pytest.param(b"\xff\xd8\xff" + b"junk" * 10, id="jpeg-magic-then-junk"),
        pytest.param(b"", id="empty"),
    ],
)
def test_bad_jpegs_get_the_cpu_paths_errors(on_device: ClipEncoder, data: bytes) -> None:
    with pytest.raises(InvalidArgument) as err:
        on_device.pixels_from_bytes(data, field="image_chunk", max_pixels=MAX_PIXELS)
    assert [v.field for v in err.value.violations] == ["image_chunk"]


def test_unknown_preprocessing_keeps_every_image_on_the_cpu_path() -> None:
    preprocess = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    assert DeviceJpegPreprocessor.for_model(preprocess, "cpu") is None
