"""Synthetic catalogue product images and captions, drawn with PIL.

The project cannot download pretrained CLIP weights in its test environment, so it trains a small CLIP on these
renders (`tools/train_synthetic_clip.py`) and tests relevance against them. Everything here is deterministic:
the same `random.Random` state gives the same image, caption and catalogue, byte for byte.

Every product is one of `KINDS` (which stands for its category) in one of `COLOURS` with one of `PATTERNS`.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from imagesearch.synthetic.shapes import RGB, SILHOUETTES, Point

__all__ = [
    "COLOURS",
    "KINDS",
    "PATTERNS",
    "CatalogueItem",
    "caption",
    "make_catalogue",
    "render",
]

# Each kind is drawn as its silhouette in shapes.py.
KINDS: tuple[str, ...] = ("t-shirt", "mug", "shoe", "bag", "lamp", "hat", "bottle", "chair")

# Saturated, well-separated hues; every one differs from the light backgrounds (white gets a dark outline).
COLOURS: dict[str, RGB] = {
    "red": (205, 30, 35),
    "orange": (245, 130, 15),
    "yellow": (245, 215, 25),
    "green": (35, 150, 55),
    "blue": (30, 80, 205),
    "purple": (120, 45, 170),
    "pink": (240, 115, 180),
    "brown": (115, 68, 30),
    "black": (22, 22, 26),
    "white": (250, 250, 250),
}

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")


def _blend(a: RGB, b: RGB, t: float) -> RGB:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _accent(rgb: RGB) -> RGB:
    # Stripes and dots must not read as another catalogue colour: a lighter tint of dark colours, a darker shade of
    # light ones, so the product colour stays the dominant one.
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return _blend(rgb, (255, 255, 255), 0.55) if lum < 128 else _blend(rgb, (0, 0, 0), 0.4)


def _fill_layer(colour: RGB, pattern: str, size: int, rng: random.Random) -> Image.Image:
    layer = Image.new("RGB", (size, size), colour)
    if pattern == "plain":
        return layer
    draw = ImageDraw.Draw(layer)
    accent = _accent(colour)
    period = rng.uniform(0.08, 0.12) * size
    offset = rng.uniform(0.0, period)
    if pattern == "striped":
        # Stripes at a random angle: draw them as wide lines across a diagonal-safe extent.
        angle = math.radians(rng.choice((0.0, 90.0, 45.0, -45.0)) + rng.uniform(-10.0, 10.0))
        dx, dy = math.cos(angle), math.sin(angle)
        nx, ny = -dy, dx
        c = size / 2
        n = int(size / period) + 2
        for i in range(-n, n + 1):
            t = i * period + offset
            px, py = c + nx * t, c + ny * t
            draw.line(
                ((px - dx * size, py - dy * size), (px + dx * size, py + dy * size)),
                fill=accent,
                width=max(1, round(period * 0.45)),
            )
    elif pattern == "dotted":
        r = period * 0.28
        y = offset - period
        row = 0
        while y < size + period:
            x = offset - period + (period / 2 if row % 2 else 0.0)
            while x < size + period:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=accent)
                x += period
            y += period
            row += 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    return layer


def _transform(
    points: Sequence[Point], cx: float, cy: float, half: float, sx: float, angle: float, flip: bool
) -> list[Point]:
    cos, sin = math.cos(angle), math.sin(angle)
    out: list[Point] = []
    for x, y in points:
        x = (-x if flip else x) * sx
        out.append((cx + half * (x * cos - y * sin), cy + half * (x * sin + y * cos)))
    return out


def _tint(base: float, rng: random.Random) -> int:
    return round(min(255.0, base + rng.uniform(-10.0, 10.0)))


def render(kind: str, colour: str, pattern: str, rng: random.Random, size: int = 128) -> Image.Image:
    """Draw one product photo: the `kind` silhouette in `colour` with `pattern` on a random light background.

    Position, scale, rotation, mirroring and background are drawn from `rng`, then mild noise is added. The object
    stays inside the central ~90% of the frame, so resizing or a centre crop to a square keeps it whole.
    Deterministic given the state of `rng`. Returns an RGB image of `size` x `size` pixels.
    """
    if kind not in SILHOUETTES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")

    base = rng.uniform(192.0, 232.0)
    background: RGB = (_tint(base, rng), _tint(base, rng), _tint(base, rng))
    image = Image.new("RGB", (size, size), background)

    # Half-extent 28-40% of the frame, kept away from the edges (rotation grows the footprint by up to ~1.3x).
    half = rng.uniform(0.28, 0.40) * size
    slack = max(0.0, 0.45 * size - half * 1.1)
    cx = size / 2 + rng.uniform(-slack, slack)
    cy = size / 2 + rng.uniform(-slack, slack)
    sx = rng.uniform(0.88, 1.12)  # aspect jitter
    angle = math.radians(rng.uniform(-15.0, 15.0))
    flip = rng.random() < 0.5

    main_mask = Image.new("L", (size, size), 0)
    trim_mask = Image.new("L", (size, size), 0)
    main_draw, trim_draw = ImageDraw.Draw(main_mask), ImageDraw.Draw(trim_mask)
    silhouette = SILHOUETTES[kind]
    for part in silhouette.parts:
        pts = _transform(part.points, cx, cy, half, sx, angle, flip)
        draw = main_draw if part.role == "main" else trim_draw
        if part.line_width > 0:
            draw.line(pts, fill=255, width=max(1, round(part.line_width * half)), joint="curve")
        else:
            draw.polygon(pts, fill=255)
        if part.role == "trim":
            # Trim sits on top of the body: clear it from the main mask so the pattern does not show through.
            if part.line_width > 0:
                main_draw.line(pts, fill=0, width=max(1, round(part.line_width * half)))
            else:
                main_draw.polygon(pts, fill=0)

    rgb = COLOURS[colour]
    # A dark rim around the whole object lets white and yellow products stand out from light backgrounds.
    image.paste(_blend(rgb, (0, 0, 0), 0.6), mask=_dilate(np.maximum(np.asarray(main_mask), np.asarray(trim_mask))))
    image.paste(_fill_layer(rgb, pattern, size, rng), mask=main_mask)
    image.paste(silhouette.trim, mask=trim_mask)

    noise_rng = np.random.default_rng(rng.getrandbits(64))
    noise = noise_rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(2.0, 5.0)
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0.0, 255.0).astype(np.uint8), "RGB")


def _dilate(mask: np.ndarray) -> Image.Image:
    # 3x3 max filter with numpy: several times faster than ImageFilter.MaxFilter at these sizes.
    grown = mask.copy()
    grown[1:] = np.maximum(grown[1:], mask[:-1])
    grown[:-1] = np.maximum(grown[:-1], mask[1:])
    rows = grown.copy()
    grown[:, 1:] = np.maximum(grown[:, 1:], rows[:, :-1])
    grown[:, :-1] = np.maximum(grown[:, :-1], rows[:, 1:])
    return Image.fromarray(grown, "L")


# --- Captions -----------------------------------------------------------------------------------------------------

_KIND_WORDS: dict[str, tuple[str, ...]] = {
    # The canonical name comes first and is drawn most often, since queries use it.
    "t-shirt": ("t-shirt", "tee", "t shirt", "tshirt"),
    "mug": ("mug", "coffee mug", "cup"),
    "shoe": ("shoe", "sneaker", "trainer"),
    "bag": ("bag", "handbag", "tote bag"),
    "lamp": ("lamp", "table lamp", "desk lamp"),
    "hat": ("hat", "bowler hat", "sun hat"),
    "bottle": ("bottle", "water bottle", "flask"),
    "chair": ("chair", "dining chair", "seat"),
}

_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "blue": ("blue", "navy"),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
    "brown": ("brown", "chocolate"),
    "black": ("black",),
    "white": ("white",),
}

_PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "polka dot", "spotted"),
}

# {a} is the article for the word after it, fixed up in `_articles`; {desc} is "[pattern] colour kind".
_TEMPLATES: tuple[str, ...] = (
    "{a} {desc}",
    "a photo of {a} {desc}",
    "{desc}",
    "{desc} on a white background",
    "product photo of {a} {desc}",
    "a picture of {a} {desc}",
    "catalogue image of {a} {desc}",
    "{kind}, {colour}",
    "{a} {kind} in {colour}",
    "{colour} coloured {kind}",
    "buy {a} {desc}",
    "studio shot of {a} {desc}",
    "the {desc}",
    "an image of {a} {desc}",
    "{desc} for sale",
    "{a} {pattern} {kind} in {colour}",
)


def _pick(words: tuple[str, ...], rng: random.Random) -> str:
    # The canonical word half the time, a synonym otherwise.
    return words[0] if len(words) == 1 or rng.random() < 0.5 else rng.choice(words[1:])


def _articles(text: str) -> str:
    words = text.split(" ")
    for i, word in enumerate(words[:-1]):
        if word == "{a}":
            words[i] = "an" if words[i + 1][:1] in "aeiou" else "a"
    return " ".join(words)


def caption(kind: str, colour: str, pattern: str, rng: random.Random) -> str:
    """A random caption for a product, e.g. "a red t-shirt" or "striped blue mug on a white background".

    Templates and synonyms vary; the pattern is mentioned about half the time. Deterministic given `rng`.
    """
    kind_word = _pick(_KIND_WORDS[kind], rng)
    colour_word = _pick(_COLOUR_WORDS[colour], rng)
    pattern_word = _pick(_PATTERN_WORDS[pattern], rng)
    template = rng.choice(_TEMPLATES)
    with_pattern = rng.random() < 0.5
    desc = f"{pattern_word} {colour_word} {kind_word}" if with_pattern else f"{colour_word} {kind_word}"
    text = template.replace("{desc}", desc).replace("{kind}", kind_word).replace("{colour}", colour_word)
    text = text.replace("{pattern}", pattern_word)
    return _articles(text)


# --- Catalogue ----------------------------------------------------------------------------------------------------

_JPEG_QUALITY = 90


@dataclass(frozen=True)
class CatalogueItem:
    """One synthetic catalogue product. Its image is rendered on demand from `image_seed`."""

    product_id: str
    name: str
    kind: str
    colour: str
    pattern: str
    category: str
    price: float
    attributes: dict[str, str] = field(hash=False)
    image_seed: int
    model_code: str = ""  # e.g. "RM-4471"; also at the end of `name` (make_catalogue(..., model_codes=True))

    def image(self, size: int = 128) -> Image.Image:
        """The product photo (deterministic)."""
        return render(self.kind, self.colour, self.pattern, random.Random(self.image_seed), size)

    def jpeg(self, size: int = 128) -> bytes:
        """The product photo as JPEG bytes (deterministic for a given Pillow build)."""
        buffer = io.BytesIO()
        self.image(size).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        return buffer.getvalue()


def make_catalogue(n: int, seed: int, *, model_codes: bool = False) -> list[CatalogueItem]:
    """`n` products that cycle through every (colour, kind) pair in a shuffled order, with random patterns.

    Any `n >= 80 * k` covers every pair at least `k` times. Prices spread over 5..200 with two decimals.
    With `model_codes`, every third product (positions 1, 4, 7, ...) gets a model code in its name, e.g.
    "Red mug RM-4471": colour and kind initials (shared by several products) and four digits, unique in catalogues
    of up to 27,000 products. Codes leave everything else as it is without them.
    """
    rng = random.Random(seed)
    combos = [(colour, kind) for colour in COLOURS for kind in KINDS]
    items: list[CatalogueItem] = []
    order: list[tuple[str, str]] = []
    for i in range(n):
        if not order:
            order = combos[:]
            rng.shuffle(order)
        colour, kind = order.pop()
        pattern = rng.choice(PATTERNS)
        name = (f"{colour} {kind}" if pattern == "plain" else f"{pattern} {colour} {kind}").capitalize()
        # Not drawn from `rng`, so that the rest of the catalogue is the same with or without codes.
        code = _model_code(colour, kind, i, seed) if model_codes and i % 3 == 1 else ""
        items.append(
            CatalogueItem(
                product_id=f"p{i:05d}",
                name=f"{name} {code}" if code else name,
                kind=kind,
                colour=colour,
                pattern=pattern,
                category=kind,
                price=round(rng.uniform(5.0, 200.0), 2),
                attributes={"colour": colour, "pattern": pattern},
                image_seed=rng.getrandbits(32),
                model_code=code,
            )
        )
    return items


def _model_code(colour: str, kind: str, i: int, seed: int) -> str:
    # 7919 is prime, so j -> 7919 * j mod 9000 is one to one: every third product of up to 27,000 has its own digits.
    digits = (7919 * (i // 3) + seed) % 9000 + 1000
    return f"{colour[0]}{kind[0]}-{digits}".upper()
