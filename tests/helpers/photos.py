"""Photo-like test images, made with pyvips (no package the project installs ships photographs).

Each kind has what makes photographs hard to compress and easy to get wrong: smooth gradients
(sky, backdrops: banding), fractal texture with a natural 1/f spectrum (grass, wood, clouds:
multi-octave Perlin noise), hard edges and small text (a product label: ringing), highlights
and deep shadows, a little optical softness and per-channel sensor grain. Deterministic for a
given seed, so sizes and timings compare across runs.

`photo(kind, width, height)` returns an sRGB 8-bit `pyvips.Image`; `photo_jpeg(...)` the same
as camera-like JPEG bytes (quality 92, 4:2:0, baseline, as phones save them).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pyvips

KINDS = ("landscape", "product", "wood", "night")


def fbm(
    width: int, height: int, seed: int, *, cell: int, octaves: int, gain: float
) -> pyvips.Image:
    """Fractal Brownian motion: Perlin octaves whose amplitude falls by `gain` per halving
    of the cell size (about -1..1)."""
    total: pyvips.Image | None = None
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        if cell < 2:
            break
        layer = pyvips.Image.perlin(width, height, cell_size=cell, seed=seed + octave) * amplitude
        total = layer if total is None else total + layer
        norm += amplitude
        amplitude *= gain
        cell //= 2
    assert total is not None
    return total / norm


def _rgb(channels: Sequence[pyvips.Image]) -> pyvips.Image:
    return channels[0].bandjoin(list(channels[1:]))


def _clip01(image: pyvips.Image) -> pyvips.Image:
    image = (image > 0).ifthenelse(image, 0)
    return (image < 1).ifthenelse(image, 1)


def _vertical(width: int, height: int) -> pyvips.Image:
    """0 at the top row to 1 at the bottom row."""
    return pyvips.Image.xyz(width, height)[1] / max(1, height - 1)


def _blend(top: Sequence[float], bottom: Sequence[float], t: pyvips.Image) -> pyvips.Image:
    return _rgb([t * (b - a) + a for a, b in zip(top, bottom, strict=True)])


def landscape(width: int, height: int, seed: int) -> pyvips.Image:
    """Sky with clouds over hills covered in grass and stones."""
    y = _vertical(width, height)
    sky = _blend((38, 88, 168), (175, 205, 232), y)
    clouds = _clip01(fbm(width, height, seed, cell=width // 3, octaves=8, gain=0.55) * 2 + 0.1)
    sky = sky * (1 - clouds * 0.85) + clouds * 0.85 * 246
    ridge = fbm(width, 1, seed + 20, cell=width // 2, octaves=9, gain=0.5).resize(
        1, vscale=height, kernel="nearest"
    )
    ground_mask = (y - (0.55 + ridge * 0.15)) > 0
    grass = fbm(width, height, seed + 40, cell=max(4, width // 16), octaves=8, gain=0.75)
    stones = pyvips.Image.worley(width, height, cell_size=max(8, width // 60), seed=seed + 60)
    stones = _clip01(stones / (stones.max() or 1) * 3 - 1.6)
    ground = _blend((62, 104, 36), (92, 132, 48), y) + grass * 55
    ground = ground * (1 - stones) + stones * 150
    ground = ground * (0.55 + y * 0.7)
    return ground_mask.ifthenelse(ground, sky)


def product(width: int, height: int, seed: int) -> pyvips.Image:
    """A labelled box on a seamless backdrop with a soft shadow and a specular highlight."""
    x = pyvips.Image.xyz(width, height)[0] / max(1, width - 1)
    y = _vertical(width, height)
    vignette = 1 - ((x - 0.5) ** 2 + (y - 0.45) ** 2) * 0.9
    image = _blend((236, 236, 240), (205, 205, 212), y) * vignette
    bw, bh = width * 2 // 5, height * 3 // 5
    left, top = (width - bw) // 2, (height - bh) // 4
    shadow = pyvips.Image.black(width, height)
    shadow = shadow.draw_rect(255, left + bw // 12, top + bh * 9 // 10, bw, bh // 8, fill=True)
    shadow = shadow.gaussblur(max(2.0, width / 60)) / 255 * 0.55
    image = image * (1 - shadow)
    rng = random.Random(seed)
    colour = (rng.randint(120, 200), rng.randint(20, 80), rng.randint(30, 90))
    across = pyvips.Image.xyz(bw, bh)[0] / max(1, bw - 1)
    shade = 0.55 + 0.6 * (1 - (across - 0.35) ** 2 * 2.2)
    body = _rgb([shade * c for c in colour])
    body = body + fbm(bw, bh, seed + 5, cell=max(4, bw // 8), octaves=6, gain=0.6) * 10
    label = pyvips.Image.text(
        "<b>FINAL MARKET</b>\nstoneground flour · 1 kg",
        width=bw * 3 // 4,
        dpi=max(72, width // 8),
        align="centre",
    )
    label_box = pyvips.Image.black(bw * 4 // 5, label.height + bh // 10) + 250
    ink = label.embed(
        (label_box.width - label.width) // 2,
        (label_box.height - label.height) // 2,
        label_box.width,
        label_box.height,
    )
    label_rgb = _rgb([label_box - ink / 255 * (250 - c) for c in (25, 40, 60)])
    body = body.insert(label_rgb, (bw - label_box.width) // 2, bh // 3)
    highlight = _clip01(1 - ((across - 0.25) ** 2) * 400) * 60
    body = body + highlight
    return image.insert(body, left, top)


def wood(width: int, height: int, seed: int) -> pyvips.Image:
    """Close-up of wood grain: warped rings and pores."""
    x = pyvips.Image.xyz(width, height)[0]
    warp = fbm(width, height, seed, cell=max(8, width // 4), octaves=6, gain=0.5) * width * 0.08
    period = max(4.0, width / 90)
    rings = ((x + warp) / period * 360).sin() * 0.5 + 0.5  # vips' sin() takes degrees
    pores = fbm(width, height, seed + 9, cell=4, octaves=2, gain=0.5)
    tone = rings * 0.6 + pores * 0.25 + 0.4
    return _rgb([tone * c for c in (150, 98, 56)])


def night(width: int, height: int, seed: int) -> pyvips.Image:
    """A dark street with out-of-focus lights (bokeh) and a lit window: low light, high noise."""
    rng = random.Random(seed)
    y = _vertical(width, height)
    image = _blend((8, 10, 26), (30, 24, 20), y)
    lights = pyvips.Image.black(width, height, bands=3)
    for _ in range(60):
        radius = rng.randint(max(2, width // 200), max(3, width // 40))
        colour = [rng.choice((255, 240, 200)), rng.randint(120, 220), rng.randint(40, 160)]
        cx, cy = rng.randrange(width), rng.randrange(height * 2 // 3)
        lights = lights.draw_circle(colour, cx, cy, radius, fill=True)
    lights = lights.gaussblur(max(1.0, width / 800))
    window = pyvips.Image.black(width // 6, height // 5).new_from_image([250, 200, 120])
    image = (image + lights * 0.8).insert(window, width // 2, height // 2)
    return image


_MAKERS: dict[str, Callable[[int, int, int], pyvips.Image]] = {
    "landscape": landscape,
    "product": product,
    "wood": wood,
    "night": night,
}
_GRAIN_SIGMA = {"landscape": 4.0, "product": 3.0, "wood": 4.0, "night": 9.0, "mixed": 5.0}


def mixed(width: int, height: int, seed: int) -> pyvips.Image:
    """The four kinds as quadrants of one frame: a photograph with varied content, the
    benchmark's stand-in for "a typical upload"."""
    half_w, half_h = width // 2, height // 2
    quadrants = [
        _MAKERS[kind](w, h, seed + index)
        for index, (kind, w, h) in enumerate(
            [
                ("landscape", half_w, half_h),
                ("product", width - half_w, half_h),
                ("wood", half_w, height - half_h),
                ("night", width - half_w, height - half_h),
            ]
        )
    ]
    top = quadrants[0].join(quadrants[1], "horizontal")
    return top.join(quadrants[2].join(quadrants[3], "horizontal"), "vertical")


def photo(kind: str, width: int, height: int, seed: int = 1) -> pyvips.Image:
    """A photo-like sRGB 8-bit image of `kind` (one of `KINDS`, or `mixed`)."""
    image = mixed(width, height, seed) if kind == "mixed" else _MAKERS[kind](width, height, seed)
    image = image.gaussblur(0.6)  # lens softness: photos have no single-pixel edges
    sigma = _GRAIN_SIGMA[kind]
    grain = [
        pyvips.Image.gaussnoise(width, height, sigma=sigma, mean=0, seed=seed * 10 + band)
        for band in range(3)
    ]
    image = image + _rgb(grain)
    return image.cast("uchar").copy(interpretation="srgb")


def photo_jpeg(kind: str, width: int, height: int, seed: int = 1, quality: int = 92) -> bytes:
    """`photo(...)` as a camera-like JPEG (baseline, 4:2:0)."""
    data: bytes = photo(kind, width, height, seed).jpegsave_buffer(Q=quality, keep="none")
    return data
