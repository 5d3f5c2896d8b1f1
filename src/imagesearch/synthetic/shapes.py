"""The silhouettes of the synthetic catalogue's product kinds, which the renderer draws.

Each kind is a list of parts in a unit frame (x right, y down, the object inside [-1, 1]^2). A part is either a
filled polygon or a thick polyline; "main" parts take the product colour and pattern, "trim" parts the kind's fixed
neutral colour. Kinds are told apart by silhouette alone, since colour and pattern are shared by all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RGB = tuple[int, int, int]
Point = tuple[float, float]


@dataclass(frozen=True)
class Part:
    points: tuple[Point, ...]
    role: str = "main"  # "main" or "trim"
    line_width: float = 0.0  # > 0: a polyline of this width (unit frame) instead of a polygon


@dataclass(frozen=True)
class Silhouette:
    trim: RGB  # the colour of the "trim" parts
    parts: tuple[Part, ...]


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, start_deg: float = 0.0, end_deg: float = 360.0, steps: int = 20
) -> tuple[Point, ...]:
    # Ellipses as polygons, so that one affine transform (rotation, flip) covers every part.
    span = end_deg - start_deg
    return tuple(
        (
            cx + rx * math.cos(math.radians(start_deg + span * i / steps)),
            cy + ry * math.sin(math.radians(start_deg + span * i / steps)),
        )
        for i in range(steps + 1)
    )


def _outline(points: str) -> tuple[Point, ...]:
    # "x,y x,y ...", as in SVG's <polygon points>: a long outline reads as one line, not a column of pairs.
    return tuple((float(x), float(y)) for x, y in (pair.split(",") for pair in points.split()))


def _rect(x0: float, y0: float, x1: float, y1: float) -> tuple[Point, ...]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


SILHOUETTES: dict[str, Silhouette] = {
    "t-shirt": Silhouette(
        (90, 90, 95),
        (
            Part(
                _outline(
                    "-0.22,-0.88 -0.55,-0.80 -1.0,-0.42 -0.78,-0.15 -0.55,-0.32 -0.55,0.92 "  # left, collar to hem
                    "0.55,0.92 0.55,-0.32 0.78,-0.15 1.0,-0.42 0.55,-0.80 0.22,-0.88 0.0,-0.68"  # right, then the neck
                )
            ),
        ),
    ),
    "mug": Silhouette(
        (60, 45, 35),
        (
            Part(_rect(-0.62, -0.72, 0.38, 0.82)),
            Part(_ellipse(0.38, 0.03, 0.42, 0.38, -90, 90, 12), line_width=0.16),
            Part(_ellipse(-0.12, -0.72, 0.5, 0.08), role="trim"),
        ),
    ),
    "shoe": Silhouette(
        (235, 235, 230),
        (
            Part(
                _outline(
                    "-0.98,0.28 -0.98,-0.38 -0.88,-0.50 -0.50,-0.42 -0.10,-0.12 0.45,0.00 0.85,0.08 0.98,0.22 0.98,0.28"
                )
            ),
            Part(_rect(-1.0, 0.26, 1.0, 0.44), role="trim"),
        ),
    ),
    "bag": Silhouette(
        (90, 90, 95),
        (
            Part(((-0.72, -0.22), (0.72, -0.22), (0.95, 0.88), (-0.95, 0.88))),
            Part(_ellipse(0.0, -0.22, 0.45, 0.62, 180, 360, 14), line_width=0.12),
        ),
    ),
    "lamp": Silhouette(
        (150, 150, 155),
        (
            Part(((-0.32, -0.95), (0.32, -0.95), (0.72, -0.22), (-0.72, -0.22))),
            Part(_rect(-0.07, -0.22, 0.07, 0.78), role="trim"),
            Part(_ellipse(0.0, 0.82, 0.48, 0.12)),
        ),
    ),
    "hat": Silhouette(
        (40, 40, 45),
        (
            Part(_ellipse(0.0, 0.32, 1.0, 0.2)),
            Part(_ellipse(0.0, 0.30, 0.58, 0.85, 180, 360, 16)),
            Part(_rect(-0.58, 0.08, 0.58, 0.22), role="trim"),
        ),
    ),
    "bottle": Silhouette(
        (140, 140, 145),
        (
            Part(_outline("-0.32,0.95 -0.32,-0.18 -0.12,-0.48 -0.12,-0.66 0.12,-0.66 0.12,-0.48 0.32,-0.18 0.32,0.95")),
            Part(_rect(-0.15, -0.92, 0.15, -0.64), role="trim"),
        ),
    ),
    "chair": Silhouette(
        (90, 90, 95),
        (
            Part(_rect(-0.55, -0.98, 0.55, -0.28)),
            Part(_rect(-0.50, -0.30, -0.38, 0.05)),
            Part(_rect(0.38, -0.30, 0.50, 0.05)),
            Part(_rect(-0.70, 0.0, 0.70, 0.20)),
            Part(((-0.66, 0.2), (-0.72, 0.98)), line_width=0.12),
            Part(((0.66, 0.2), (0.72, 0.98)), line_width=0.12),
            Part(((-0.30, 0.2), (-0.32, 0.80)), line_width=0.09),
            Part(((0.30, 0.2), (0.32, 0.80)), line_width=0.09),
        ),
    ),
}
