"""Uploads for the image tests: photographs in every accepted format, tricky colour inputs,
and hostile files. All made here, in memory, in milliseconds (the photos in under a second)."""

from __future__ import annotations

import struct
import zlib

import pyvips

from tests.helpers.photos import photo

CAMERA_MAKE = "FinalCam"  # planted in EXIF and XMP; must not survive the pipeline
CAMERA_MODEL = "FC-1 Pro"
XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    f'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Make="{CAMERA_MAKE}"/></rdf:RDF>'
    "</x:xmpmeta>"
).encode()
RED, GREY, BLUE = [220, 30, 30], [128, 128, 128], [30, 30, 220]


def solid(width: int, height: int, colour: list[int]) -> pyvips.Image:
    """An sRGB 8-bit image of one colour."""
    return pyvips.Image.black(width, height).new_from_image(colour).copy(interpretation="srgb")


def with_camera_metadata(image: pyvips.Image, orientation: int = 1) -> pyvips.Image:
    """`image` carrying what a phone writes: EXIF make, model and orientation, and XMP."""
    image = image.copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Make", CAMERA_MAKE)
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Model", CAMERA_MODEL)
    image.set_type(pyvips.GValue.blob_type, "xmp-data", XMP)
    return image


def upright_marker(width: int = 800, height: int = 600) -> pyvips.Image:
    """Grey with a red band along the top edge: upright when the band is on top."""
    return solid(width, height, GREY).insert(solid(width, height // 5, RED), 0, 0)


def exif_rotated_jpeg() -> bytes:
    """`upright_marker()` stored turned 90 degrees anticlockwise with EXIF orientation 6
    ("rotate 90 clockwise to display"), as a phone held upright saves it."""
    stored = upright_marker().rot270()
    data: bytes = with_camera_metadata(stored, orientation=6).jpegsave_buffer(Q=90)
    return data


def camera_jpeg(width: int = 1600, height: int = 1200) -> bytes:
    """A photograph with camera EXIF and XMP (orientation 1)."""
    data: bytes = with_camera_metadata(photo("landscape", width, height)).jpegsave_buffer(Q=90)
    return data


def cmyk_jpeg(with_profile: bool) -> bytes:
    """Full cyan ink (C=100%, M=Y=K=0) as a CMYK JPEG, with or without an ICC profile."""
    image = pyvips.Image.black(400, 300, bands=4).new_from_image([255, 0, 0, 0])
    image = image.copy(interpretation="cmyk")
    if with_profile:
        image = image.icc_transform("cmyk", input_profile="cmyk", embedded=False)
        image = image.copy(interpretation="cmyk")
        data: bytes = image.jpegsave_buffer(Q=90, keep="icc")
    else:
        data = image.jpegsave_buffer(Q=90, keep="none")
    return data


def png16(width: int = 500, height: int = 400) -> bytes:
    """A 16-bit RGB PNG: left half orange (65535, 32896, 0), right half the photo."""
    left = solid(width // 2, height, [255, 128, 0]).cast("ushort") * 257
    right = photo("product", width - width // 2, height).cast("ushort") * 257
    image = left.join(right, "horizontal").cast("ushort").copy(interpretation="rgb16")
    data: bytes = image.pngsave_buffer(bitdepth=16)
    return data


def rgba_png(width: int = 400, height: int = 300) -> bytes:
    """Blue, transparent in the left half (a cut-out product shot)."""
    alpha = pyvips.Image.black(width, height).new_from_image(255)
    alpha = alpha.insert(pyvips.Image.black(width // 2, height), 0, 0)
    image = solid(width, height, BLUE).bandjoin(alpha).copy(interpretation="srgb")
    data: bytes = image.pngsave_buffer()
    return data


def animated_gif() -> bytes:
    """Two frames, red then blue: only the first must be used."""
    frames = pyvips.Image.arrayjoin([solid(200, 150, RED), solid(200, 150, BLUE)], across=1)
    frames = frames.copy()
    frames.set_type(pyvips.GValue.gint_type, "page-height", 150)
    data: bytes = frames.gifsave_buffer()
    return data


def in_format(image: pyvips.Image, fmt: str) -> bytes:
    """`image` saved as `fmt` (jpeg, progressive-jpeg, png, webp, avif)."""
    savers = {
        "jpeg": lambda: image.jpegsave_buffer(Q=90),
        "progressive-jpeg": lambda: image.jpegsave_buffer(Q=90, interlace=True),
        "png": lambda: image.pngsave_buffer(),
        "webp": lambda: image.webpsave_buffer(Q=90),
        "avif": lambda: image.heifsave_buffer(Q=70, compression="av1", effort=0),
    }
    data: bytes = savers[fmt]()
    return data


# --- hostile uploads --------------------------------------------------------------------------

TEXT_NAMED_JPG = b"This is a shopping list, not a photograph.\nmilk\neggs\n" * 40

SVG_WITH_EXTERNAL_ENTITY = b"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE svg [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">
  <text x="0" y="20">&secret;</text>
</svg>
"""


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header announcing `width` x `height` RGB pixels (10.8 GB decoded), with a
    first compressed scanline and no more: the header is all a decoder sees before it would
    allocate."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    first_row = zlib.compress(b"\x00" * (1 + 3 * width), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", first_row)
        + _png_chunk(b"IEND", b"")
    )


def truncated(data: bytes) -> bytes:
    """The first half of `data` (an upload cut off mid-way)."""
    return data[: len(data) // 2]
