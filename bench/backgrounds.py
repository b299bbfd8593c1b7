"""Procedural background renderers of the synthetic world, one per scene word.

    from bench.backgrounds import RENDERERS; img = RENDERERS["snow"](rng, 32)  # (32, 32, 3) floats

Each renderer has its own palette and texture (noise, stripes, dots, gradients, shapes) so a small conv net
tells them apart, and draws its own colour and layout jitter from `rng`, so no two images are alike.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

Renderer = Callable[[np.random.Generator, int], np.ndarray]


@lru_cache(maxsize=64)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells + 1) linear interpolation weights from a coarse grid to `size` pixels."""
    t = np.linspace(0, cells, size, endpoint=False) + cells / size / 2
    i0 = np.clip(np.floor(t).astype(int), 0, cells - 1)
    frac = t - i0
    m = np.zeros((size, cells + 1))
    m[np.arange(size), i0] = 1 - frac
    m[np.arange(size), i0 + 1] = frac
    return m


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row and column indices, (size, size) each."""
    return np.mgrid[0:size, 0:size]


def _noise(rng: np.random.Generator, size: int, cy: int, cx: int) -> np.ndarray:
    """Smooth value noise in [0, 1] with `cy` x `cx` cells."""
    g = rng.random((cy + 1, cx + 1))
    return _interp_matrix(size, cy) @ g @ _interp_matrix(size, cx).T


def _colour(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float = 0.06) -> np.ndarray:
    """A palette colour with a little per-image jitter."""
    return np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0, 1)


def _vgradient(size: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    t = np.linspace(0, 1, size)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()


def grass(rng: np.random.Generator, s: int) -> np.ndarray:
    blades = _noise(rng, s, 3, max(s // 2, 2))  # vertical streaks
    v = 0.55 + 0.45 * blades + 0.25 * rng.random((s, s))
    return _colour(rng, (0.28, 0.58, 0.2)) * v[..., None]


def snow(rng: np.random.Generator, s: int) -> np.ndarray:
    img = _colour(rng, (0.92, 0.94, 0.98), 0.03) * (0.9 + 0.1 * _noise(rng, s, 2, 2))[..., None]
    n = int(rng.integers(8, 20))
    ys, xs = rng.integers(0, s, n), rng.integers(0, s, n)
    img[ys, xs] = 1.0
    img[rng.integers(0, s, n), rng.integers(0, s, n)] = (0.78, 0.82, 0.9)
    return img


def beach(rng: np.random.Generator, s: int) -> np.ndarray:
    img = _colour(rng, (0.88, 0.77, 0.55))[None, None] * (1 + rng.normal(0, 0.05, (s, s)))[..., None]
    horizon = int(s * rng.uniform(0.18, 0.35))
    sea = _colour(rng, (0.15, 0.5, 0.78))
    img[:horizon] = sea * (0.9 + 0.15 * _noise(rng, s, 2, 6)[:horizon, :, None])
    img[horizon : horizon + 1] = (0.97, 0.97, 0.95)
    return img


def water(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    period = rng.uniform(4, 7)
    waves = np.sin(
        2 * np.pi * (yy / period + 0.25 * np.sin(2 * np.pi * xx / rng.uniform(8, 16) + rng.uniform(0, 6)))
    )
    img = _colour(rng, (0.12, 0.35, 0.72)) * (0.8 + 0.2 * waves)[..., None]
    img[waves > 0.93] = (0.6, 0.78, 0.95)
    return img


def desert(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    dunes = np.sin(
        2 * np.pi * (yy / s * rng.uniform(1.2, 2.5) + xx / s * rng.uniform(-0.8, 0.8)) + rng.uniform(0, 6)
    )
    ripples = np.sin(2 * np.pi * (yy + 0.5 * xx) / rng.uniform(2.5, 3.5))
    return _colour(rng, (0.87, 0.6, 0.3)) * (0.82 + 0.15 * dunes + 0.04 * ripples)[..., None]


def forest(rng: np.random.Generator, s: int) -> np.ndarray:
    img = _colour(rng, (0.1, 0.32, 0.12)) * (0.55 + 0.8 * _noise(rng, s, 6, 6))[..., None]
    trunk = _colour(rng, (0.33, 0.2, 0.1))
    for _ in range(int(rng.integers(3, 6))):
        x, w = int(rng.integers(0, s)), int(rng.integers(1, 4))
        img[int(rng.integers(0, s // 3)) :, x : x + w] = trunk
    return img


def city(rng: np.random.Generator, s: int) -> np.ndarray:
    img = _vgradient(s, _colour(rng, (0.62, 0.7, 0.8)), _colour(rng, (0.8, 0.82, 0.85)))
    x = 0
    while x < s:
        w, h = int(rng.integers(4, 10)), int(s * rng.uniform(0.45, 0.95))
        img[s - h :, x : x + w] = _colour(rng, (0.38, 0.4, 0.46), 0.1)
        lit = rng.random((h // 3 + 1, w // 2 + 1)) < 0.5
        for wy in range(s - h + 1, s - 1, 3):
            for wx in range(x + 1, min(x + w - 1, s), 2):
                if lit[(wy - (s - h)) // 3, (wx - x) // 2]:
                    img[wy, wx] = (0.96, 0.86, 0.4)
        x += w + int(rng.integers(0, 2))
    return img


def mountains(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    img = _vgradient(s, _colour(rng, (0.5, 0.7, 0.95)), _colour(rng, (0.8, 0.88, 0.98)))
    for _ in range(int(rng.integers(2, 4))):
        x0, y0, slope = rng.uniform(0, s), rng.uniform(0.12, 0.45) * s, rng.uniform(0.8, 1.6)
        inside = yy > y0 + np.abs(xx - x0) * slope
        img[inside] = _colour(rng, (0.42, 0.42, 0.5), 0.08)
        img[inside & (yy < y0 + 0.18 * s)] = (0.96, 0.97, 1.0)
    return img


def sky(rng: np.random.Generator, s: int) -> np.ndarray:
    img = _vgradient(s, _colour(rng, (0.3, 0.55, 0.92)), _colour(rng, (0.65, 0.82, 0.98)))
    clouds = np.clip((_noise(rng, s, 3, 4) - 0.55) * 5, 0, 1)[..., None]
    return img * (1 - clouds) + clouds * 0.98


def field(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, _ = _grid(s)
    rows = 0.5 + 0.5 * np.sin(2 * np.pi * yy / rng.uniform(3, 5))
    img = _colour(rng, (0.86, 0.74, 0.3)) * (0.72 + 0.3 * rows + 0.1 * rng.random((s, s)))[..., None]
    img[: int(s * rng.uniform(0.08, 0.22))] = _colour(rng, (0.6, 0.78, 0.95))
    return img


def road(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    img = _colour(rng, (0.3, 0.3, 0.33), 0.04) * (1 + rng.normal(0, 0.08, (s, s)))[..., None]
    c, dash = s // 2 + int(rng.integers(-3, 4)), int(rng.integers(3, 6))
    img[(np.abs(xx - c) <= 1) & ((yy // dash) % 2 == 0)] = (0.95, 0.8, 0.15)
    img[:, 1] = img[:, s - 2] = (0.92, 0.92, 0.92)
    return img


def brick(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    hb = int(rng.integers(4, 6))
    wb = 2 * hb
    row = (yy + int(rng.integers(0, hb))) // hb
    shifted = xx + (row % 2) * (wb // 2) + int(rng.integers(0, wb))
    shade = rng.uniform(0.8, 1.15, (s // hb + 3, s // wb + 4))[row, shifted // wb]
    img = _colour(rng, (0.62, 0.26, 0.18)) * shade[..., None]
    img[((yy + 1) % hb == 0) | (shifted % wb == 0)] = _colour(rng, (0.8, 0.78, 0.72), 0.04)
    return img


def wood(rng: np.random.Generator, s: int) -> np.ndarray:
    _yy, xx = _grid(s)
    grain = np.sin(2 * np.pi * (xx / s * rng.uniform(5, 9) + 0.5 * _noise(rng, s, 3, 2)))
    img = _colour(rng, (0.58, 0.38, 0.2)) * (0.82 + 0.16 * grain)[..., None]
    plank = int(s / rng.uniform(2, 4))
    img[(xx + int(rng.integers(0, plank))) % plank == 0] *= 0.55
    return img


def kitchen(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    t = int(rng.integers(4, 7))
    light = _colour(rng, (0.94, 0.94, 0.94), 0.03)
    dark = _colour(rng, [(0.2, 0.35, 0.7), (0.15, 0.15, 0.15)][int(rng.integers(0, 2))])
    ox, oy = rng.integers(0, t, 2)
    check = (((yy + oy) // t + (xx + ox) // t) % 2 == 0)[..., None]
    img = np.where(check, light, dark)
    img[((yy + oy) % t == 0) | ((xx + ox) % t == 0)] = (0.6, 0.6, 0.6)
    return img


def rocks(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    n = int(rng.integers(8, 15))
    pts = rng.uniform(-2, s + 2, (n, 2))
    d = np.sqrt((yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2)
    order = np.sort(d, axis=0)
    shade = rng.uniform(0.6, 1.1, n)[np.argmin(d, axis=0)]
    img = _colour(rng, (0.52, 0.48, 0.43)) * (shade + 0.08 * rng.random((s, s)))[..., None]
    img[order[1] - order[0] < 1.0] = (0.18, 0.17, 0.16)
    return img


def ice(rng: np.random.Generator, s: int) -> np.ndarray:
    img = _colour(rng, (0.76, 0.9, 0.96), 0.03) * (0.9 + 0.12 * _noise(rng, s, 3, 3))[..., None]
    crack = _colour(rng, (0.42, 0.58, 0.75), 0.05)
    for _ in range(int(rng.integers(3, 6))):
        y, x, a = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(10, 30))):
            if 0 <= int(y) < s and 0 <= int(x) < s:
                img[int(y), int(x)] = crack
            a += rng.normal(0, 0.4)
            y, x = y + np.sin(a), x + np.cos(a)
    return img


def night(rng: np.random.Generator, s: int) -> np.ndarray:
    yy, xx = _grid(s)
    img = _vgradient(s, _colour(rng, (0.02, 0.03, 0.12), 0.02), _colour(rng, (0.08, 0.1, 0.25), 0.03))
    n = int(rng.integers(15, 30))
    img[rng.integers(0, s, n), rng.integers(0, s, n)] = rng.uniform(0.7, 1.0, (n, 1)) * (1.0, 0.97, 0.85)
    if rng.random() < 0.5:
        cy, cx, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(2.5, 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (0.95, 0.93, 0.75)
    return img


def lava(rng: np.random.Generator, s: int) -> np.ndarray:
    img = _colour(rng, (0.16, 0.05, 0.03), 0.03) * (0.7 + 0.6 * _noise(rng, s, 4, 4))[..., None]
    veins = np.abs(_noise(rng, s, 5, 5) - 0.5) < rng.uniform(0.05, 0.09)
    img[veins] = _colour(rng, (1.0, 0.55, 0.1), 0.05)
    return img


def flowers(rng: np.random.Generator, s: int) -> np.ndarray:
    img = _colour(rng, (0.25, 0.5, 0.2)) * (0.6 + 0.5 * _noise(rng, s, 5, 5))[..., None]
    palette = np.array([(0.95, 0.2, 0.2), (0.98, 0.9, 0.2), (0.95, 0.5, 0.8), (0.6, 0.3, 0.85), (1, 1, 1)])
    for _ in range(int(rng.integers(25, 40))):
        y, x = rng.integers(0, s - 1, 2)
        img[y : y + 2, x : x + 2] = palette[int(rng.integers(0, len(palette)))]
    return img


RENDERERS: dict[str, Renderer] = {
    "grass": grass,
    "snow": snow,
    "beach": beach,
    "water": water,
    "desert": desert,
    "forest": forest,
    "city": city,
    "mountains": mountains,
    "sky": sky,
    "field": field,
    "road": road,
    "brick": brick,
    "wood": wood,
    "kitchen": kitchen,
    "rocks": rocks,
    "ice": ice,
    "night": night,
    "lava": lava,
    "flowers": flowers,
}


def render_background(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float image in [0, 1] of background type `name`."""
    return np.clip(RENDERERS[name](rng, size), 0.0, 1.0)
