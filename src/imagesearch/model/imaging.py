"""Image decoding: bytes from a caller -> an RGB PIL image small enough to preprocess cheaply.

Untrusted input: the pixel count is checked from the header before any pixel is decoded, so a tiny file that
claims a huge canvas (a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import io
import math
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from imagesearch.errors import FieldViolation, ImageTooLarge, InvalidArgument
from imagesearch.images import NormalizedBox

# Formats a catalogue image realistically comes in. Limiting the decoders PIL may try shrinks the attack surface
# (PIL otherwise probes dozens of exotic formats).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F")


def decode_image(
    data: bytes, *, field: str, max_pixels: int, target_size: int, region: NormalizedBox | None = None
) -> Image.Image:
    """Decode `data` into an RGB image, honouring EXIF orientation; with `region`, that box of it (cropped after
    the orientation is applied, as the caller sees the image).

    `target_size` is the model's input side: JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, nearly
    free) as long as the result (the region's part of it) stays at least twice that size, so resampling quality
    is unaffected. Raises InvalidArgument (naming `field`) for empty, undecodable or oversized images.
    """
    # The whole image is decoded large enough that the region's shorter side keeps twice the model's input.
    decode_size = target_size if region is None else math.ceil(target_size / min(region.width, region.height))
    if not data:
        raise InvalidArgument(FieldViolation(field, "the image is empty: send its bytes in image_chunk messages"))
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) before it errors; our own limit below is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            check_pixel_count(image.size, max_pixels, field)
            if image.format == "JPEG":
                # draft() picks the largest 1/2, 1/4 or 1/8 scale that is still >= the requested size.
                image.draft("RGB", (decode_size * 2, decode_size * 2))
            image.load()
            oriented = ImageOps.exif_transpose(image) or image
            rgb = _to_rgb(_shrink(oriented, decode_size))
            if region is not None:
                rgb = rgb.crop(region.pixels(*rgb.size))
            return _shrink(rgb, target_size)
    except InvalidArgument:
        raise
    except Image.DecompressionBombError as exc:
        # PIL's own, coarser guard (2x its MAX_IMAGE_PIXELS) fired before ours could read the size.
        raise ImageTooLarge(
            FieldViolation(field, f"the image has too many pixels; the limit is {max_pixels}: {exc}")
        ) from None
    except UnidentifiedImageError as exc:
        raise InvalidArgument(
            FieldViolation(field, f"not a decodable image (supported: {', '.join(ALLOWED_FORMATS)}): {exc}")
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated or corrupt data through these.
        raise InvalidArgument(FieldViolation(field, f"the image data is corrupt or truncated: {exc}")) from None


def check_pixel_count(size: tuple[int, int], max_pixels: int, field: str) -> None:
    """Refuse an image whose header declares more than `max_pixels`, before any pixel is decoded."""
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLarge(
            FieldViolation(field, f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
        )


def _shrink(image: Image.Image, target_size: int) -> Image.Image:
    # Box-reduce by an integer factor while the short side stays >= 2x the model input: far cheaper than a
    # bicubic resize of the full image, and the final resize still has twice the pixels it needs.
    factor = min(image.size) // (2 * target_size)
    if factor >= 2 and image.mode in _REDUCIBLE_MODES:
        return image.reduce(factor)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour values: composite on white, as catalogue images are shown.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale into 8 bits instead of clipping (convert('L') would clip at 255).
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
