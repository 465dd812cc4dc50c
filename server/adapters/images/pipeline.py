"""The pixel pipeline: one decode, four sizes, three formats. Synchronous; run it in workers.

    decode()  the upload, once, shrunk while loading to just above the largest box, colour
              converted to sRGB 8-bit, turned upright (EXIF orientation), held in memory;
    derive()  each smaller size from the next larger one (cheap: 1200 -> 600 -> 300 -> 150);
    encode()  one size in one format, metadata stripped.

The steps are separate functions so the service can spread the twelve encodes over the
worker threads. Every image `decode` and `derive` return is in memory (`copy_memory`): libvips
images are lazy pipelines over a sequential decoder, and a second save of such a pipeline
fails with "out of order read".

Libvips traps this module avoids (all seen with libvips 8.18):
- `thumbnail_buffer` takes no `fail_on`, so a truncated JPEG comes out with a grey bottom;
  we load with the format's own loader and `fail_on="error"`.
- JPEG cannot hold alpha: flattening RGBA without a background turns transparent pixels
  black; we flatten onto white.
- Resizing RGBA without premultiplying bleeds the colour of transparent pixels into edges.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Executor
from dataclasses import dataclass

import pyvips

from server.adapters.images.intake import (
    FAIL_ON,
    JPEG,
    WEBP,
    ImageProbe,
    Source,
    UnreadableImage,
    vips_reason,
)
from server.adapters.images.placeholder import placeholder_data_url

__all__ = ["FORMATS", "SIZES", "Encoding", "Rendition", "decode", "derive", "encode", "render"]

# Boxes the variants fit inside (long edge, pixels), largest first. Never upscaled.
SIZES: dict[str, int] = {"large": 1200, "medium": 600, "small": 300, "thumbnail": 150}
FORMATS = ("jpeg", "webp", "avif")
EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}
MEDIA_TYPES = {"jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}
WHITE = [255.0, 255.0, 255.0]
# Encodes started most expensive first (AVIF of the large size), so threads finish together.
ENCODE_ORDER = sorted(
    ((size, fmt) for size in SIZES for fmt in FORMATS),
    key=lambda job: -(SIZES[job[0]] ** 2) * {"avif": 3.0, "webp": 1.5, "jpeg": 0.2}[job[1]],
)


@dataclass(frozen=True, slots=True)
class Encoding:
    """Encoder settings; the defaults were chosen by measurement (docs/decisions.md, Images).

    AVIF effort 2 costs a third of the default effort 4 for files ~7-10% larger; WebP
    effort 4 (libwebp's default) is ~6% smaller than effort 2 for ~0.05 s more at 1200 px;
    baseline JPEG with optimised Huffman tables is smaller than progressive at these sizes.
    """

    jpeg_quality: int = 80
    webp_quality: int = 80
    webp_effort: int = 4
    avif_quality: int = 60
    avif_effort: int = 2


@dataclass(frozen=True, slots=True)
class Rendition:
    """Everything made from one upload: the large size's dimensions, the placeholder, and
    the encoded variants as (size, format, bytes) in `ENCODE_ORDER`."""

    width: int
    height: int
    placeholder: str
    variants: list[tuple[str, str, bytes]]


def render(source: Source, probe: ImageProbe, encoding: Encoding, threads: Executor) -> Rendition:
    """Decode once, derive every size, then the 12 encodes and the placeholder on `threads`
    (pyvips releases the GIL, so they run in parallel). `source` is the upload's bytes or
    the path of its file (read as it decodes). Raises `UnreadableImage`."""
    sizes = derive(decode(source, probe, SIZES["large"]))
    encodes = [threads.submit(encode, sizes[size], fmt, encoding) for size, fmt in ENCODE_ORDER]
    placeholder = threads.submit(placeholder_data_url, sizes["thumbnail"])
    variants = [
        (size, fmt, future.result())
        for (size, fmt), future in zip(ENCODE_ORDER, encodes, strict=True)
    ]
    large = sizes["large"]
    return Rendition(large.width, large.height, placeholder.result(), variants)


def decode(source: Source, probe: ImageProbe, box: int) -> pyvips.Image:
    """The upload as an upright sRGB 8-bit image fitting inside `box` x `box`, in memory.

    Raises `UnreadableImage` if the pixels do not decode (truncated or corrupt data).
    """
    long_edge = max(probe.width, probe.height)
    options: dict[str, object] = {"access": "sequential", "fail_on": FAIL_ON}
    shrink = _load_shrink(long_edge, box)
    if probe.type is JPEG and shrink > 1:
        options["shrink"] = shrink  # DCT scaling: decodes 1/shrink of the pixels
    elif probe.type is WEBP and shrink > 1:
        options["scale"] = 1 / shrink
    try:
        image = probe.type.load(source, **options)
        image = to_srgb8(image)
        image = fit(image, box)
        image = image.copy_memory()  # the decode happens here, once
        image = image.autorot()  # after shrinking: rotating 1200 px is cheaper than 12 MP
        image = _without_opaque_alpha(image.copy_memory())
    except pyvips.Error as exc:
        raise UnreadableImage(
            f"the {probe.type.name.upper()} does not decode: {vips_reason(exc)}"
        ) from None
    return image


def derive(large: pyvips.Image) -> dict[str, pyvips.Image]:
    """Every size of `SIZES` from the decoded image, each made from the next larger one."""
    images: dict[str, pyvips.Image] = {}
    previous = large
    for name, box in SIZES.items():
        previous = fit(previous, box)
        if previous is not large:
            previous = previous.copy_memory()
        images[name] = previous
    return images


def encode(image: pyvips.Image, fmt: str, encoding: Encoding) -> bytes:
    """`image` as `fmt` (one of `FORMATS`), with no metadata (EXIF, XMP, ICC, comments)."""
    data: bytes
    if fmt == "jpeg":
        if image.hasalpha():
            image = image.flatten(background=WHITE)
        data = image.jpegsave_buffer(
            Q=encoding.jpeg_quality, optimize_coding=True, keep="none", interlace=False
        )
    elif fmt == "webp":
        data = image.webpsave_buffer(
            Q=encoding.webp_quality, effort=encoding.webp_effort, keep="none"
        )
    elif fmt == "avif":
        data = image.heifsave_buffer(
            Q=encoding.avif_quality,
            effort=encoding.avif_effort,
            compression="av1",
            bitdepth=8,
            keep="none",
        )
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return data


# --- steps ------------------------------------------------------------------------------------


def to_srgb8(image: pyvips.Image) -> pyvips.Image:
    """sRGB, 8 bits per band, alpha kept: embedded profiles applied, CMYK and 16-bit converted."""
    if image.get_typeof("icc-profile-data"):
        # A broken profile falls through to the interpretation's standard conversion below.
        with contextlib.suppress(pyvips.Error):
            # depth 8: 16-bit inputs come out 8-bit; an alpha band is carried along.
            image = image.icc_transform("srgb", embedded=True, intent="relative", depth=8)
    elif image.interpretation == "cmyk":
        image = image.icc_transform("srgb", input_profile="cmyk", intent="relative", depth=8)
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if image.format != "uchar":
        if image.format == "ushort":
            image = image >> 8  # sRGB values of a 16-bit image that claims sRGB
        image = image.cast("uchar")
    return image


def fit(image: pyvips.Image, box: int) -> pyvips.Image:
    """`image` shrunk to fit inside `box` x `box` (unchanged if it already fits)."""
    long_edge = max(image.width, image.height)
    if long_edge <= box:
        return image
    scale = box / long_edge
    if image.hasalpha():
        # Premultiplied, so transparent pixels' colours do not bleed into the edges.
        resized = image.premultiply().resize(scale, kernel="lanczos3").unpremultiply()
        return resized.cast("uchar").copy(interpretation="srgb")
    return image.resize(scale, kernel="lanczos3")


def _load_shrink(long_edge: int, box: int) -> int:
    """The largest shrink-on-load factor (8, 4, 2) that still leaves the image above `box`."""
    for factor in (8, 4, 2):
        if long_edge // factor >= box:
            return factor
    return 1


def _without_opaque_alpha(image: pyvips.Image) -> pyvips.Image:
    """Drop an alpha band that is opaque everywhere (it only costs bytes)."""
    if image.hasalpha() and image[image.bands - 1].min() >= 255:
        return image.extract_band(0, n=image.bands - 1)
    return image
