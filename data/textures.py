"""Natural-looking background textures ("biomes") for the synthetic camouflage set, in numpy.

A biome is a palette plus a pattern: fractal value noise mapped through the palette, then a
biome-specific layer (bark cracks, fallen leaves, moss speckle, sand ripples, lichen blotches, pebbles).
Calling ``render_biome`` twice with different generators gives two independent patches with the
same statistics: that is how an object gets a texture that matches its surroundings.
All images are float32 (size, size, 3) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

Rgb = tuple[int, int, int]

PALETTES: dict[str, tuple[Rgb, ...]] = {
    "bark": ((48, 38, 30), (86, 70, 54), (122, 104, 84), (150, 136, 116), (98, 88, 72)),
    "leaf_litter": ((72, 44, 22), (128, 78, 34), (170, 118, 52), (120, 110, 48), (196, 152, 86)),
    "moss": ((36, 58, 24), (70, 100, 36), (112, 136, 52), (150, 160, 70), (58, 80, 40)),
    "sand": ((150, 126, 92), (184, 160, 120), (206, 186, 146), (168, 146, 110), (128, 108, 80)),
    "lichen": ((84, 88, 84), (120, 124, 116), (156, 160, 146), (110, 118, 92), (186, 190, 170)),
    "seabed": ((38, 74, 82), (62, 108, 104), (110, 140, 118), (150, 150, 118), (84, 96, 78)),
}
BIOMES: tuple[str, ...] = tuple(PALETTES)
_SUPERSAMPLE = 2  # drawn leaves and pebbles are anti-aliased by drawing at twice the size


def value_noise(rng: np.random.Generator, size: int, *, cells: int, octaves: int = 4,
                persistence: float = 0.55, stretch: float = 1.0) -> np.ndarray:
    """Fractal value noise, float32 (size, size) rescaled to [0, 1].

    Octave k is a random grid of about ``cells * 2**k`` cells per side, bicubically upsampled by
    PIL (fast, in C). ``stretch`` > 1 elongates features vertically (bark grain).
    """
    total = np.zeros((size, size), dtype=np.float32)
    amplitude = 1.0
    for k in range(octaves):
        across = max(2, min(size, round(cells * 2**k)))
        down = max(2, min(size, round(cells * 2**k / stretch)))
        grid = rng.random((down, across), dtype=np.float32)
        upsampled = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
        total += amplitude * np.asarray(upsampled, dtype=np.float32)
        amplitude *= persistence
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def colour_map(values: np.ndarray, palette: tuple[Rgb, ...]) -> np.ndarray:
    """Map values in [0, 1] through a piecewise-linear palette gradient; (..., 3) float32.

    Values are quantised to 256 levels and looked up in a table (4x faster than interpolating each
    pixel; 256 levels are all an 8-bit image can show anyway).
    """
    colours = np.asarray(palette, dtype=np.float32) / 255.0
    levels = np.linspace(0.0, 1.0, 256)
    stops = np.linspace(0.0, 1.0, len(colours))
    table = np.stack([np.interp(levels, stops, colours[:, c]) for c in range(3)], axis=-1).astype(np.float32)
    return table[np.clip(np.rint(values * 255.0), 0, 255).astype(np.intp)]


def _base(rng: np.random.Generator, size: int, palette: tuple[Rgb, ...], *, cells: int,
          stretch: float = 1.0, grain: float = 0.18) -> np.ndarray:
    image = colour_map(value_noise(rng, size, cells=cells, stretch=stretch), palette)
    fine = value_noise(rng, size, cells=max(4, size // 6), octaves=2)
    return image * (1.0 - grain / 2 + grain * fine[..., None])


def _bark(rng: np.random.Generator, size: int) -> np.ndarray:
    image = _base(rng, size, PALETTES["bark"], cells=3, stretch=5.0)
    warp = value_noise(rng, size, cells=3, octaves=2)
    x = np.arange(size, dtype=np.float32)[None, :] / size
    ridges = np.abs(np.sin((x * rng.uniform(4, 8) + warp * 1.5) * np.pi))
    return image * (0.6 + 0.4 * np.clip(ridges * 3.0, 0, 1))[..., None]


def _leaf_litter(rng: np.random.Generator, size: int) -> np.ndarray:
    palette = PALETTES["leaf_litter"]
    canvas, draw = _supersampled(_base(rng, size, palette, cells=4))
    count = int(size * size / 180)
    # All leaves at once: a leaf is a lens of 16 outline points, rotated and placed.
    centres = rng.uniform(-4, size + 4, (count, 1, 2)) * _SUPERSAMPLE
    length = rng.uniform(0.05, 0.12, (count, 1)) * size * _SUPERSAMPLE
    half_width = rng.uniform(0.018, 0.04, (count, 1)) * size * _SUPERSAMPLE
    angle = rng.uniform(0, np.pi, (count, 1))
    t = np.linspace(0, np.pi, 8)
    u = np.concatenate([np.cos(t), np.cos(t[::-1])])[None, :] * length / 2
    v = np.concatenate([np.sin(t), -np.sin(t[::-1])])[None, :] * half_width
    outline = np.stack([u * np.cos(angle) - v * np.sin(angle), u * np.sin(angle) + v * np.cos(angle)], axis=-1)
    outline += centres
    colours = np.asarray(palette)[rng.integers(len(palette), size=count)] * rng.uniform(0.75, 1.1, (count, 1))
    for points, colour in zip(outline.tolist(), colours):
        draw.polygon([tuple(p) for p in points], fill=_rgb(colour))
    return _downsampled(canvas, size)


def _moss(rng: np.random.Generator, size: int) -> np.ndarray:
    image = _base(rng, size, PALETTES["moss"], cells=5, grain=0.3)
    speckle = rng.random((size, size), dtype=np.float32)
    light = (speckle > 0.93)[..., None] * 0.22
    dark = (speckle < 0.07)[..., None] * 0.22
    return image * (1.0 + light - dark)


def _sand(rng: np.random.Generator, size: int) -> np.ndarray:
    image = _base(rng, size, PALETTES["sand"], cells=3, grain=0.22)
    warp = value_noise(rng, size, cells=2, octaves=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(6, 11) + warp * 2.0
    return image * (0.9 + 0.1 * np.sin(phase * 2 * np.pi))[..., None]


def _lichen(rng: np.random.Generator, size: int) -> np.ndarray:
    palette = PALETTES["lichen"]
    image = _base(rng, size, palette, cells=3)
    blotch = value_noise(rng, size, cells=6, octaves=3)
    pale = np.asarray(palette[-1], dtype=np.float32) / 255.0
    weight = np.clip((blotch - 0.6) * 5.0, 0, 1)[..., None]
    return image * (1 - weight) + pale * weight


def _seabed(rng: np.random.Generator, size: int) -> np.ndarray:
    palette = PALETTES["seabed"]
    canvas, draw = _supersampled(_base(rng, size, palette, cells=4))
    count = int(size * size / 300)
    centres = rng.uniform(0, size, (count, 2)) * _SUPERSAMPLE
    radii = rng.uniform(0.01, 0.035, count) * size * _SUPERSAMPLE
    colours = np.asarray(palette)[rng.integers(len(palette), size=count)] * rng.uniform(0.8, 1.15, (count, 1))
    for (cx, cy), r, colour in zip(centres.tolist(), radii.tolist(), colours):
        draw.ellipse((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=_rgb(colour))
    return _downsampled(canvas, size)


def _supersampled(image: np.ndarray) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A canvas at _SUPERSAMPLE times the size: shapes drawn on it get anti-aliased edges."""
    canvas = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    canvas = canvas.resize((canvas.width * _SUPERSAMPLE, canvas.height * _SUPERSAMPLE), Image.Resampling.BILINEAR)
    return canvas, ImageDraw.Draw(canvas)


def _downsampled(canvas: Image.Image, size: int) -> np.ndarray:
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in np.clip(colour, 0, 255))
    return r, g, b


_RENDERERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "bark": _bark,
    "leaf_litter": _leaf_litter,
    "moss": _moss,
    "sand": _sand,
    "lichen": _lichen,
    "seabed": _seabed,
}


def render_biome(biome: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size, 3) float32 patch of ``biome`` in [0, 1]."""
    if biome not in _RENDERERS:
        raise ValueError(f"biome: unknown {biome!r} (expected one of {BIOMES})")
    return np.clip(_RENDERERS[biome](rng, size), 0.0, 1.0).astype(np.float32)


def foreign_material(biome: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A cheap patch in ``biome``'s colours (palette-mapped noise, no pattern layer): the "wrong"
    material mixed into easy objects so that they differ from their surroundings."""
    if biome not in PALETTES:
        raise ValueError(f"biome: unknown {biome!r} (expected one of {BIOMES})")
    return colour_map(value_noise(rng, size, cells=4, octaves=3), PALETTES[biome])
