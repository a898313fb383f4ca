"""Animal silhouettes for the synthetic camouflage set, drawn with PIL at random pose.

Each category is a function that draws into a ``_Pen``: body parts in a local frame where the animal
fits inside the unit circle (+x right, +y down), mapped to image pixels by a rotation, a scale and a
translation. Two layers are drawn: the body mask (what the box is measured on) and a "markings"
layer (eyes, wing bands, midribs) that the compositor renders slightly darker so that the shape stays
recognisable once its colour and texture match the background.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]

_ELLIPSE_VERTICES = 28


class _Pen:
    """Maps local unit-circle coordinates to a supersampled canvas and draws body/markings layers."""

    def __init__(self, *, size: int, supersample: int, center: Point, radius: float, angle: float,
                 aspect: float) -> None:
        self.scale = supersample
        self.body = Image.new("L", (size * supersample, size * supersample), 0)
        self.marks = Image.new("L", (size * supersample, size * supersample), 0)
        self._body_draw = ImageDraw.Draw(self.body)
        self._marks_draw = ImageDraw.Draw(self.marks)
        self._cx, self._cy = center[0] * supersample, center[1] * supersample
        self._r = radius * supersample
        self._cos, self._sin = math.cos(angle), math.sin(angle)
        self._aspect = aspect  # stretches local x: individuals are a little longer or stouter

    def _map(self, points: Sequence[Point]) -> list[Point]:
        out = []
        for u, v in points:
            u, v = u * self._aspect * self._r, v * self._r
            out.append((self._cx + u * self._cos - v * self._sin, self._cy + u * self._sin + v * self._cos))
        return out

    def _draw(self, layer: str) -> ImageDraw.ImageDraw:
        return self._marks_draw if layer == "marks" else self._body_draw

    def polygon(self, points: Sequence[Point], *, layer: str = "body", erase: bool = False) -> None:
        self._draw(layer).polygon(self._map(points), fill=0 if erase else 255)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, *, tilt: float = 0.0,
                layer: str = "body", erase: bool = False) -> None:
        c, s = math.cos(tilt), math.sin(tilt)
        pts = []
        for k in range(_ELLIPSE_VERTICES):
            t = 2 * math.pi * k / _ELLIPSE_VERTICES
            x, y = rx * math.cos(t), ry * math.sin(t)
            pts.append((cx + x * c - y * s, cy + x * s + y * c))
        self.polygon(pts, layer=layer, erase=erase)

    def line(self, points: Sequence[Point], width: float, *, layer: str = "body") -> None:
        """A polyline of constant local ``width`` with round joints and ends (legs, antennae)."""
        pixel_width = max(1, round(width * self._r))
        mapped = self._map(points)
        draw = self._draw(layer)
        draw.line(mapped, fill=255, width=pixel_width, joint="curve")
        half = pixel_width / 2
        for x, y in (mapped[0], mapped[-1]):
            draw.ellipse((x - half, y - half, x + half, y + half), fill=255)

    def stroke(self, spine: Sequence[Point], widths: Sequence[float], *, layer: str = "body") -> None:
        """A tapering band along ``spine`` (bodies of snakes, tails): ``widths`` per spine point."""
        left, right = [], []
        for i, (x, y) in enumerate(spine):
            xa, ya = spine[max(i - 1, 0)]
            xb, yb = spine[min(i + 1, len(spine) - 1)]
            dx, dy = xb - xa, yb - ya
            norm = math.hypot(dx, dy) or 1.0
            nx, ny = -dy / norm * widths[i] / 2, dx / norm * widths[i] / 2
            left.append((x + nx, y + ny))
            right.append((x - nx, y - ny))
        self.polygon(left + right[::-1], layer=layer)


def _both(points: Sequence[Point]) -> tuple[list[Point], list[Point]]:
    """A part and its mirror image across the animal's long (y) axis."""
    return list(points), [(-x, y) for x, y in points]


def _moth(pen: _Pen) -> None:  # wings spread, head towards -y
    pen.ellipse(0, 0.08, 0.09, 0.42)
    pen.ellipse(0, -0.38, 0.08, 0.07)
    for side in (1, -1):
        pen.polygon([(0.05 * side, -0.3), (0.62 * side, -0.5), (0.98 * side, -0.3), (0.78 * side, 0.05),
                     (0.06 * side, 0.12)])
        pen.ellipse(0.42 * side, 0.32, 0.38, 0.27, tilt=0.45 * side)
        pen.line([(0.03 * side, -0.42), (0.18 * side, -0.7), (0.3 * side, -0.86)], 0.035)
        pen.line([(0.18 * side, -0.18), (0.78 * side, -0.26)], 0.06, layer="marks")
        pen.ellipse(0.45 * side, 0.34, 0.1, 0.08, layer="marks")


def _fish(pen: _Pen) -> None:  # swimming towards +x
    pen.ellipse(0.1, 0, 0.7, 0.32)
    pen.polygon([(-0.5, 0), (-0.97, -0.4), (-0.82, 0), (-0.97, 0.4)])
    pen.polygon([(-0.2, -0.26), (0.1, -0.58), (0.38, -0.28)])
    pen.polygon([(-0.25, 0.24), (-0.08, 0.5), (0.1, 0.28)])
    pen.ellipse(0.56, -0.07, 0.07, 0.07, layer="marks")
    pen.line([(0.4, -0.22), (0.35, 0), (0.4, 0.22)], 0.04, layer="marks")


def _frog(pen: _Pen) -> None:  # seen from above, head towards -y
    pen.ellipse(0, 0.12, 0.42, 0.5)
    pen.ellipse(0, -0.33, 0.34, 0.26)
    for side in (1, -1):
        pen.ellipse(0.22 * side, -0.5, 0.11, 0.1)
        pen.line([(0.3 * side, 0.42), (0.8 * side, 0.22), (0.58 * side, 0.7), (0.9 * side, 0.86)], 0.13)
        pen.line([(0.3 * side, -0.08), (0.62 * side, -0.18), (0.74 * side, -0.45)], 0.09)
        pen.ellipse(0.22 * side, -0.52, 0.06, 0.05, layer="marks")
        pen.ellipse(0.18 * side, 0.2, 0.08, 0.1, layer="marks")


def _leaf_insect(pen: _Pen) -> None:  # flat leaf-shaped abdomen, head towards -y
    profile = [(0.44 * math.sin(math.pi * t) ** 0.8, -0.5 + 1.4 * t) for t in np.linspace(0, 1, 15)]
    right, left = _both(profile)
    pen.polygon(right + left[::-1])
    pen.ellipse(0, -0.6, 0.08, 0.15)
    pen.ellipse(0, -0.78, 0.08, 0.07)
    for side in (1, -1):
        pen.line([(0.05 * side, -0.62), (0.34 * side, -0.72), (0.46 * side, -0.94)], 0.06)
        pen.line([(0.3 * side, -0.22), (0.64 * side, -0.34), (0.72 * side, -0.08)], 0.06)
        pen.line([(0.34 * side, 0.22), (0.68 * side, 0.32), (0.72 * side, 0.62)], 0.06)
        pen.line([(0.03 * side, -0.83), (0.12 * side, -0.98)], 0.03)
        for y in (-0.2, 0.15, 0.5):
            pen.line([(0, y), (0.26 * side, y - 0.18)], 0.025, layer="marks")
    pen.line([(0, -0.45), (0, 0.85)], 0.035, layer="marks")


def _crab(pen: _Pen) -> None:  # carapace wider than long, claws towards -y
    pen.ellipse(0, 0.08, 0.55, 0.38)
    for side in (1, -1):
        pen.line([(0.35 * side, -0.16), (0.58 * side, -0.42)], 0.12)
        pen.ellipse(0.66 * side, -0.6, 0.2, 0.14, tilt=-0.7 * side)
        pen.polygon([(0.74 * side, -0.66), (0.9 * side, -0.82), (0.62 * side, -0.8)], erase=True)
        for k in range(4):
            y0 = -0.02 + 0.12 * k
            pen.line([(0.45 * side, y0), (0.78 * side, y0 - 0.1 + 0.06 * k),
                      (0.95 * side, y0 + 0.12 + 0.08 * k)], 0.07)
        pen.line([(0.12 * side, -0.24), (0.16 * side, -0.38)], 0.05)
        pen.ellipse(0.16 * side, -0.38, 0.05, 0.05, layer="marks")
        pen.ellipse(0.25 * side, 0.1, 0.1, 0.07, layer="marks")


def _snake(pen: _Pen) -> None:  # sinuous body, head at +x
    xs = np.linspace(-0.95, 0.72, 24)
    spine = [(float(x), 0.34 * math.sin(2.6 * math.pi * (x + 0.95) / 1.67)) for x in xs]
    widths = [0.04 + 0.13 * (i / (len(xs) - 1)) ** 0.6 for i in range(len(xs))]
    pen.stroke(spine, widths)
    head_x, head_y = spine[-1]
    pen.ellipse(head_x + 0.1, head_y, 0.16, 0.11)
    pen.ellipse(head_x + 0.15, head_y - 0.04, 0.035, 0.035, layer="marks")
    for x, y in spine[4:-2:3]:
        pen.ellipse(x, y, 0.035, 0.035, layer="marks")


def _lizard(pen: _Pen) -> None:  # head at +x, tail curling towards -x
    pen.ellipse(0.08, 0, 0.38, 0.14)
    pen.polygon([(0.38, -0.11), (0.66, -0.08), (0.82, 0), (0.66, 0.08), (0.38, 0.11)])
    tail = [(-0.25, 0), (-0.55, 0.08), (-0.8, 0.24), (-0.92, 0.44), (-0.86, 0.62)]
    pen.stroke(tail, [0.2, 0.13, 0.08, 0.05, 0.03])
    for side in (1, -1):
        pen.line([(0.28, 0.08 * side), (0.38, 0.34 * side), (0.52, 0.42 * side)], 0.07)
        pen.line([(-0.16, 0.08 * side), (-0.32, 0.36 * side), (-0.16, 0.5 * side)], 0.08)
    pen.ellipse(0.62, -0.04, 0.03, 0.03, layer="marks")
    for x in (-0.15, 0.05, 0.25):
        pen.ellipse(x, 0, 0.05, 0.04, layer="marks")


_DRAWERS: dict[str, Callable[[_Pen], None]] = {
    "moth": _moth,
    "fish": _fish,
    "frog": _frog,
    "leaf_insect": _leaf_insect,
    "crab": _crab,
    "snake": _snake,
    "lizard": _lizard,
}
CATEGORIES: tuple[str, ...] = tuple(_DRAWERS)
"""Object categories of the synthetic set: the prompt vocabulary and the category reward's labels."""


def draw_animal(category: str, *, size: int, center: Point, radius: float, angle: float,
                aspect: float = 1.0, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Render one animal; returns (body coverage, markings coverage), float32 (size, size) in [0, 1].

    The animal lies within ``radius`` pixels of ``center`` (for ``aspect`` <= 1, which shortens local x).
    Coverage is anti-aliased by drawing at ``supersample`` times the resolution and box-filtering.
    """
    if category not in _DRAWERS:
        raise ValueError(f"category: unknown {category!r} (expected one of {CATEGORIES})")
    pen = _Pen(size=size, supersample=supersample, center=center, radius=radius / _extent(category),
               angle=angle, aspect=aspect)
    _DRAWERS[category](pen)
    body = np.asarray(pen.body.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    marks = np.asarray(pen.marks.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return body, np.minimum(marks, body)


@functools.cache
def _extent(category: str) -> float:
    """How far the drawn animal reaches, in units of the pen radius (legs and tips poke out of the
    unit circle): measured once by drawing it, so that edits to a shape can never break placement."""
    reference, size = 100.0, 320
    pen = _Pen(size=size, supersample=1, center=(size / 2, size / 2), radius=reference, angle=0.0, aspect=1.0)
    _DRAWERS[category](pen)
    rows, cols = np.nonzero(np.asarray(pen.body))
    # + 1.5: a pixel's far corner lies up to sqrt(2) pixels beyond its index
    return float(np.hypot(rows - size / 2, cols - size / 2).max() + 1.5) / reference
