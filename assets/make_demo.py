"""Render the demo first-frame images: a stylised lake at sunset (sky, sun, hills, a tree, a boat).

    python assets/make_demo.py            # rewrites assets/demo.png and assets/demo_portrait.png
    python assets/make_demo.py --out DIR  # writes them into DIR instead

Pure numpy arithmetic (float64, no randomness, no fonts, no drawing library), so the pixels are
the same on every machine; PIL only encodes the PNG. Shapes are signed distances turned into
coverage with a one-pixel smooth edge, so every edge is anti-aliased.

Coordinates: ``y`` runs 0 (top) .. 1 (bottom) and ``x`` runs 0 .. width/height,
so circles stay round at any aspect ratio. The scene is laid out from the horizon line and the
image's width, which keeps every element in view in the 992x544 landscape and the 544x992
portrait variant.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
SIZES = {"demo.png": (992, 544), "demo_portrait.png": (544, 992)}     # name -> (width, height)


def _coverage(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Signed distance (negative inside) -> coverage in [0, 1] with a one-pixel soft edge."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour) -> None:
    """Blend ``colour`` ([3] or [H, W, 3]) over ``canvas`` [H, W, 3] with ``alpha`` [H, W]."""
    canvas[:] = canvas * (1 - alpha[..., None]) + np.asarray(colour, dtype=np.float64) * alpha[..., None]


def _mix(a, b, t: np.ndarray) -> np.ndarray:
    """Per-pixel linear mix of two colours: ``t`` [H, W] -> [H, W, 3]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a + (b - a) * t[..., None]


def render(width: int, height: int) -> np.ndarray:
    """The scene as ``[height, width, 3]`` uint8 RGB."""
    pixel = 1.0 / height
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = (y + 0.5) * pixel, (x + 0.5) * pixel
    aspect = width / height
    horizon = 0.58 if aspect > 1 else 0.52
    canvas = np.zeros((height, width, 3))

    # 1. sky: deep blue at the top to a warm glow at the horizon
    t = np.clip(y / horizon, 0, 1) ** 1.4
    canvas[:] = _mix((28, 44, 110), (250, 170, 110), t)

    # 2. sun with a soft halo, low over the water
    sun_x, sun_y, sun_r = aspect * 0.62, horizon - 0.16, 0.075
    d_sun = np.hypot(x - sun_x, y - sun_y)
    _paint(canvas, 0.55 * np.exp(-((d_sun - sun_r).clip(0) / 0.09) ** 2), (255, 210, 140))
    _paint(canvas, _coverage(d_sun - sun_r, pixel), (255, 236, 170))

    # 3. two ranges of hills; the far one paler (aerial perspective)
    for base, amp, freq, phase, near, far in ((horizon - 0.05, 0.06, 7.0, 0.3, (120, 96, 140), (170, 130, 150)),
                                              (horizon - 0.01, 0.08, 4.3, 1.9, (46, 92, 70), (84, 128, 84))):
        ridge = base - amp * (0.55 + 0.45 * np.sin(freq * x / aspect * np.pi + phase)) \
            - 0.4 * amp * np.sin(2.7 * freq * x / aspect + 2 * phase) ** 2
        shade = np.clip((y - ridge) / 0.12, 0, 1)
        _paint(canvas, _coverage(np.maximum(ridge - y, y - horizon - pixel), pixel), _mix(far, near, shade))

    # 4. water: darker with depth, the sun's reflection as broken horizontal streaks
    depth = np.clip((y - horizon) / (1 - horizon), 0, 1)
    water = _mix((232, 150, 120), (24, 52, 96), depth ** 0.7)
    _paint(canvas, _coverage(horizon - y, pixel), water)
    streaks = 0.5 + 0.5 * np.sin(y * 260.0 + 3.0 * np.sin(x * 23.0))
    column = np.exp(-((x - sun_x) / (0.05 + 0.25 * depth)) ** 2) * (1 - depth) ** 1.2
    _paint(canvas, (y > horizon) * np.clip(column * streaks ** 3 * 1.4, 0, 1), (255, 220, 160))

    # 5. a tree on the near hill, left: trunk and a crown of three overlapping discs
    tree_x = aspect * (0.16 if aspect > 1 else 0.22)
    ground = horizon + 0.005
    trunk = np.maximum(np.abs(x - tree_x) - 0.012, np.maximum(y - ground, ground - 0.2 - y))
    _paint(canvas, _coverage(trunk, pixel), (70, 46, 34))
    crown = np.full_like(x, np.inf)
    for dx, dy, r in ((0.0, -0.27, 0.075), (-0.055, -0.22, 0.06), (0.055, -0.215, 0.062)):
        crown = np.minimum(crown, np.hypot(x - tree_x - dx, y - ground - dy) - r)
    light = np.clip((tree_x + 0.06 - x + (ground - 0.3 - y)) / 0.2, 0, 1)
    _paint(canvas, _coverage(crown, pixel), _mix((30, 70, 40), (90, 150, 70), light))

    # 6. a sailing boat on the water, right of centre: hull, mast, sail and its reflection
    boat_x, boat_y = aspect * (0.72 if aspect > 1 else 0.6), horizon + (0.16 if aspect > 1 else 0.2)
    half = 0.085
    top, bottom = boat_y - 0.025, boat_y
    widening = (bottom - y) / (bottom - top) * 0.03          # the hull is wider at the deck
    hull = np.maximum(np.abs(x - boat_x) - (half - 0.03 + widening), np.maximum(top - y, y - bottom))
    _paint(canvas, _coverage(hull, pixel), (110, 40, 36))
    mast = np.maximum(np.abs(x - boat_x) - 0.004, np.maximum(top - 0.2 - y, y - top))
    _paint(canvas, _coverage(mast, pixel), (60, 40, 30))
    # sail: the triangle (boat_x + 0.006, top - 0.19) .. (boat_x + 0.006, top - 0.01) .. (boat_x + 0.075, top - 0.01)
    sail = np.maximum(np.maximum(boat_x + 0.006 - x, y - (top - 0.01)),
                      (x - boat_x - 0.006) * 0.18 - (y - top + 0.19) * 0.069)
    _paint(canvas, _coverage(sail / np.hypot(0.18, 0.069) * 0.18, pixel),
           _mix((250, 244, 230), (220, 200, 190), np.clip((x - boat_x) / 0.08, 0, 1)))
    reflection = np.maximum(np.abs(x - boat_x) - half * (1 - (y - bottom) / 0.04).clip(0), np.maximum(bottom - y,
                                                                                                     y - bottom - 0.04))
    _paint(canvas, 0.35 * _coverage(reflection, pixel) * streaks, (40, 20, 30))

    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def write(folder: Path) -> Tuple[Path, ...]:
    """Render every size in :data:`SIZES` into ``folder``; returns the written paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (width, height) in SIZES.items():
        path = folder / name
        Image.fromarray(render(width, height)).save(path, optimize=True)
        paths.append(path)
    return tuple(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: this script's folder)")
    for path in write(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
