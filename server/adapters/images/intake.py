"""Intake: what an upload is, judged by its bytes, and whether it is safe to decode.

The type comes from the magic bytes, never from the file name or the part's Content-Type, and
each type is opened with its own libvips loader (never libvips' guess), so a file cannot pick
a loader we did not mean to run. Only JPEG, PNG, WebP, AVIF/HEIF and GIF (first frame) are
accepted; SVG, text and everything else are refused before any parser sees them.

Sizes are checked from the header, before a single pixel is decoded: loaders in libvips are
lazy, so opening an image reads its header and allocates nothing for its pixels. A 60000 x
60000 PNG is refused here in microseconds. Formats that must be decoded whole (progressive
JPEG, interlaced PNG, HEIF/AVIF, WebP, GIF) need memory for every pixel at once instead of a
few scanlines, so they get half of the pixel allowance.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

# Must be set before libvips initialises (importing pyvips does): loaders marked untrusted
# (ImageMagick, PDF, SVG, Matlab, ...) are then refused even if a build includes them.
os.environ.setdefault("VIPS_BLOCK_UNTRUSTED", "1")

import pyvips

from server.common.errors import DomainError

__all__ = [
    "ImageProbe",
    "ImageRejected",
    "ImageType",
    "IntakeLimits",
    "TooManyPixels",
    "UnreadableImage",
    "UnsupportedImageType",
    "UploadTooLarge",
    "probe",
    "probe_file",
    "sniff",
    "vips_reason",
]

# Formats decoded whole get this share of the pixel allowance (see the module docstring).
WHOLE_DECODE_PIXEL_SHARE = 0.5
FAIL_ON = "error"  # truncated or corrupt data fails the decode instead of coming out grey


class ImageRejected(DomainError):
    """An upload refused at intake; nothing has been written for it."""

    kind = "image-rejected"


class UnsupportedImageType(ImageRejected):
    """The bytes are not one of the accepted image types (whatever the name says)."""

    kind = "unsupported-media-type"


class UploadTooLarge(ImageRejected):
    """The upload has more bytes than `image_max_upload_bytes`."""

    kind = "upload-too-large"


class TooManyPixels(ImageRejected):
    """The header announces more pixels than the allowance (a decompression bomb or just huge)."""

    kind = "too-many-pixels"


class UnreadableImage(ImageRejected):
    """The bytes start like an image but do not decode (truncated, corrupt)."""

    kind = "unreadable-image"


Source = bytes | bytearray | str  # an upload's bytes, or the path of the file holding them
SCAN_BLOCK_BYTES = 1024 * 1024  # read size when looking for markers in a file


@dataclass(frozen=True, slots=True)
class ImageType:
    """An accepted input type and the one libvips loader that opens it."""

    name: str
    mime: str
    loader: str  # a pyvips.Image class method taking the bytes

    def open(self, data: bytes | bytearray, **options: object) -> pyvips.Image:
        """The image, lazily: its header is read, its pixels when first needed."""
        image: pyvips.Image = getattr(pyvips.Image, self.loader)(data, **options)
        return image

    def open_file(self, path: str, **options: object) -> pyvips.Image:
        """The image in the file at `path`, lazily, with this type's file loader."""
        loader = self.loader.removesuffix("_buffer")
        image: pyvips.Image = getattr(pyvips.Image, loader)(path, **options)
        return image

    def load(self, source: Source, **options: object) -> pyvips.Image:
        """`open_file` for a path, `open` for bytes."""
        if isinstance(source, str):
            return self.open_file(source, **options)
        return self.open(source, **options)


JPEG = ImageType("jpeg", "image/jpeg", "jpegload_buffer")
PNG = ImageType("png", "image/png", "pngload_buffer")
WEBP = ImageType("webp", "image/webp", "webpload_buffer")
HEIF = ImageType("heif", "image/heif", "heifload_buffer")
GIF = ImageType("gif", "image/gif", "gifload_buffer")
ACCEPTED = (JPEG, PNG, WEBP, HEIF, GIF)

# ISO BMFF brands of still images libheif reads (AVIF and HEIC and their generic brands).
_HEIF_BRANDS = frozenset(
    {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
)
SNIFF_BYTES = 64  # enough for every signature below, including a few ftyp brands


def sniff(head: bytes | bytearray) -> ImageType:
    """The type of an upload from its first bytes; `UnsupportedImageType` if none fits."""
    head = bytes(head[:SNIFF_BYTES])
    if not head:
        raise UnsupportedImageType("the upload is empty; send a JPEG, PNG, WebP, AVIF or GIF")
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return WEBP
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if head[4:8] == b"ftyp" and _heif_brands(head) & _HEIF_BRANDS:
        return HEIF
    raise UnsupportedImageType(
        "the upload is not a JPEG, PNG, WebP, AVIF/HEIF or GIF image (judged by its content, "
        "not its name)"
    )


def _heif_brands(head: bytes) -> set[bytes]:
    """Major and compatible brands of an ISO BMFF `ftyp` box at the start of `head`."""
    size = int.from_bytes(head[0:4], "big")
    end = min(len(head), max(16, size))
    brands = {head[8:12]}
    brands.update(head[offset : offset + 4] for offset in range(16, end - 3, 4))
    return brands


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    """What an upload may be: bytes and pixels."""

    max_bytes: int
    max_pixels: int


@dataclass(frozen=True, slots=True)
class ImageProbe:
    """What the header of an accepted upload says."""

    type: ImageType
    width: int
    height: int
    whole_decode: bool  # the decoder needs every pixel in memory at once

    @property
    def pixels(self) -> int:
        """Width times height (of the first frame)."""
        return self.width * self.height


def probe(data: bytes | bytearray, limits: IntakeLimits) -> ImageProbe:
    """Type and dimensions of an upload, refusing what must not be decoded.

    Raises `UnsupportedImageType`, `UploadTooLarge`, `TooManyPixels` or `UnreadableImage`.
    Reads the header only (no pixel is decoded), so it is cheap for any input.
    """
    if len(data) > limits.max_bytes:
        raise UploadTooLarge(
            f"the upload has {len(data)} bytes; at most {limits.max_bytes} are accepted"
        )
    image_type = sniff(data)
    _refuse_if_cut_short(image_type, lambda needle, start: data.find(needle, start))
    return _judge(image_type, data, limits)


def probe_file(path: str, limits: IntakeLimits) -> ImageProbe:
    """`probe` of the upload in the file at `path`, reading it in blocks (never whole)."""
    size = os.stat(path).st_size
    if size > limits.max_bytes:
        raise UploadTooLarge(
            f"the upload has {size} bytes; at most {limits.max_bytes} are accepted"
        )
    with open(path, "rb") as file:
        image_type = sniff(file.read(SNIFF_BYTES))
        _refuse_if_cut_short(image_type, lambda needle, start: _find_in_file(file, needle, start))
    return _judge(image_type, path, limits)


def _find_in_file(file: BinaryIO, needle: bytes, start: int) -> int:
    """The offset of `needle` in `file` at or after `start`, or -1 (`bytes.find` on a file)."""
    overlap = len(needle) - 1
    offset = start
    file.seek(offset)
    while block := file.read(SCAN_BLOCK_BYTES):
        found = block.find(needle)
        if found >= 0:
            return offset + found
        if len(block) < SCAN_BLOCK_BYTES:
            return -1
        offset += len(block) - overlap
        file.seek(offset)
    return -1


def _judge(image_type: ImageType, source: Source, limits: IntakeLimits) -> ImageProbe:
    """The header's dimensions against the pixel allowance."""
    try:
        header = image_type.load(source, access="sequential", fail_on=FAIL_ON)
        width, height = header.width, header.height
    except pyvips.Error as exc:
        raise UnreadableImage(
            f"the {image_type.name.upper()} header cannot be read: {vips_reason(exc)}"
        ) from None
    whole = _decoded_whole(image_type, header)
    allowance = limits.max_pixels
    if whole:
        allowance = int(allowance * WHOLE_DECODE_PIXEL_SHARE)
    if width * height > allowance:
        how = " (decoded whole in memory, so it gets half the allowance)" if whole else ""
        raise TooManyPixels(
            f"the image is {width} x {height} = {width * height} pixels; at most {allowance} "
            f"are accepted for this kind of {image_type.name.upper()}{how}",
            width=width,
            height=height,
            max_pixels=allowance,
        )
    return ImageProbe(image_type, width, height, whole)


def _refuse_if_cut_short(image_type: ImageType, find: Callable[[bytes, int], int]) -> None:
    """Refuse a JPEG or PNG whose end marker is missing, without decoding it.

    A valid JPEG has an end-of-image marker after its first scan and a valid PNG an IEND
    chunk, so this never refuses a whole file; a truncated one would otherwise be found only
    by decoding up to where its data stops (tens of milliseconds for a photo). Files that
    pass (a truncated JPEG whose embedded EXIF thumbnail has its own end marker, say) are
    still caught by decoding with `fail_on`.
    `find(needle, start)` searches the upload, as `bytes.find` does.
    """
    if image_type is JPEG:
        first_scan = find(b"\xff\xda", 0)
        if first_scan < 0 or find(b"\xff\xd9", first_scan) < 0:
            raise UnreadableImage(
                "the JPEG has no end-of-image marker after its image data: the upload is truncated"
            )
    elif image_type is PNG and find(b"IEND", 8) < 0:
        raise UnreadableImage("the PNG has no IEND chunk: the upload is truncated")


def _decoded_whole(image_type: ImageType, header: pyvips.Image) -> bool:
    if image_type in (JPEG, PNG):
        # Progressive JPEGs and interlaced PNGs are decoded whole; baseline ones stream.
        return bool(header.get_typeof("interlaced") and header.get("interlaced"))
    return True  # WebP, HEIF and GIF frames are decoded into one buffer


def vips_reason(exc: pyvips.Error) -> str:
    """The libvips reason without the generic first line ("unable to call ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = [line for line in lines if not line.startswith("unable to")]
    return (detail or lines or ["unknown error"])[0][:200]
