"""How well an object is hidden: colour and texture distance between it and its surroundings.

For one object mask the statistic compares the object's interior with a ring of background around it:
  * colour distance: CIELAB ΔE (1976) between the mean colours of the two regions. About 2.3 is a
    just-noticeable difference; beyond about 10 the colours are plainly different.
  * texture distance: total-variation distance, in [0, 1], between the histograms of per-pixel
    lightness-gradient magnitude of the two regions (same distribution of fine detail → 0).
  * separability = colour_distance / COLOUR_SCALE + texture_distance / TEXTURE_SCALE. Lower is better
    hidden. The scales make a plainly different colour (ΔE 10) and a clearly different texture
    (TV 0.25) count the same.
Pixels within ``EDGE_GAP`` of the mask boundary are excluded from both regions, so a soft edge's
transition does not count as texture. The ring is a quarter of the object's equivalent side wide.
The statistic ignores object size and outline shape; the generator's knob also changes those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion

COLOUR_SCALE = 10.0  # ΔE that counts as one unit of separability
TEXTURE_SCALE = 0.25  # texture TV distance that counts as one unit of separability
EDGE_GAP = 2  # pixels next to the boundary that belong to neither region
# Gradient-magnitude histogram bin edges in lightness units (L* 0..100) per pixel.
GRADIENT_BINS = np.array([0.0, 1.0, 2.0, 3.0, 4.5, 6.5, 9.0, 13.0, np.inf])
# Calibrated on the synthetic set (data.synth defaults, 112 px): easy objects score 3.1 on average,
# hard ones 2.1 (standard deviation about 0.9 in both), the same mask laid on an empty scene 0.8-1.2
# (the statistic's noise floor). Real images scored below this are labelled hard by the importers'
# "auto" difficulty.
HARD_BELOW = 2.6


@dataclass(frozen=True)
class CamouflageStats:
    """Object-versus-surroundings statistic of one object (see the module docstring)."""

    colour_distance: float  # CIELAB ΔE between mean colours, >= 0
    texture_distance: float  # TV distance of gradient-magnitude histograms, in [0, 1]
    separability: float  # combined; lower = better hidden

    @property
    def difficulty(self) -> str:
        """The split label: hard when the object is better hidden than ``HARD_BELOW``, else easy."""
        return "hard" if self.separability < HARD_BELOW else "easy"


def srgb_to_lab(image: np.ndarray) -> np.ndarray:
    """uint8 sRGB (..., 3) → CIELAB (..., 3) float64 under the D65 white point."""
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])],
                    axis=-1)


def camouflage_stats(image: np.ndarray, mask: np.ndarray) -> CamouflageStats | None:
    """Statistic of one object: ``image`` uint8 (H, W, 3), ``mask`` bool (H, W) of that object.

    Returns None when either region is empty (no mask, or an object that fills the image), or the image
    is a single pixel wide or high.
    """
    mask = np.asarray(mask, dtype=bool)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask: shape {mask.shape} differs from the image's {image.shape[:2]}")
    area = int(mask.sum())
    if area == 0 or min(mask.shape) < 2:  # np.gradient below needs two pixels along each axis
        return None
    inside = binary_erosion(mask, iterations=EDGE_GAP)
    if not inside.any():  # a thin object: keep its pixels rather than measure nothing
        inside = mask
    ring_width = max(2, round(0.25 * math.sqrt(area)))
    near = binary_dilation(mask, iterations=EDGE_GAP)
    ring = binary_dilation(near, iterations=ring_width) & ~near
    if not ring.any():
        return None
    lab = srgb_to_lab(image)
    colour = float(np.linalg.norm(lab[inside].mean(axis=0) - lab[ring].mean(axis=0)))
    gy, gx = np.gradient(lab[..., 0])
    magnitude = np.hypot(gx, gy)
    texture = _histogram_distance(magnitude[inside], magnitude[ring])
    return CamouflageStats(colour_distance=colour, texture_distance=texture,
                           separability=colour / COLOUR_SCALE + texture / TEXTURE_SCALE)


def _histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance between the binned distributions of two samples, in [0, 1]."""
    pa = np.histogram(a, bins=GRADIENT_BINS)[0] / a.size
    pb = np.histogram(b, bins=GRADIENT_BINS)[0] / b.size
    return float(0.5 * np.abs(pa - pb).sum())


def image_stats(image: np.ndarray, masks: list[np.ndarray]) -> CamouflageStats | None:
    """The best-separable object of an image decides it (finding one object is enough to answer);
    None when no object can be measured."""
    stats = [s for s in (camouflage_stats(image, m) for m in masks) if s is not None]
    return max(stats, key=lambda s: s.separability, default=None)
