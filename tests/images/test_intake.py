"""Intake refuses what must not be decoded: judged by content, sized from the header, fast."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import pytest

from server.adapters.images.intake import (
    GIF,
    HEIF,
    JPEG,
    PNG,
    SCAN_BLOCK_BYTES,
    WEBP,
    ImageRejected,
    IntakeLimits,
    TooManyPixels,
    UnreadableImage,
    UnsupportedImageType,
    UploadTooLarge,
    probe,
    probe_file,
    sniff,
)
from tests.helpers import image_samples as samples
from tests.helpers.photos import photo

LIMITS = IntakeLimits(max_bytes=25 * 1024 * 1024, max_pixels=50_000_000)
REFUSAL_BOUND_S = 0.05


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("jpeg", JPEG), ("progressive-jpeg", JPEG), ("png", PNG), ("webp", WEBP), ("avif", HEIF)],
)
def test_type_is_sniffed_from_content(fmt: str, expected: object) -> None:
    assert sniff(samples.in_format(photo("product", 64, 48), fmt)) is expected


def test_gif_is_sniffed() -> None:
    assert sniff(samples.animated_gif()) is GIF


@pytest.mark.parametrize(
    "data",
    [samples.TEXT_NAMED_JPG, samples.SVG_WITH_EXTERNAL_ENTITY, b"", b"\xff\xd8", b"RIFF0000AVI "],
    ids=["text-named-jpg", "svg-external-entity", "empty", "two-bytes-of-jpeg", "riff-not-webp"],
)
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImageType):
        probe(data, LIMITS)


def test_png_bomb_is_refused_from_its_header_without_allocating() -> None:
    bomb = samples.png_bomb()
    assert len(bomb) < 200_000
    before = rss_bytes()
    started = time.perf_counter()
    with pytest.raises(TooManyPixels) as caught:
        probe(bomb, LIMITS)
    assert time.perf_counter() - started < REFUSAL_BOUND_S
    assert rss_bytes() - before < 20 * 1024 * 1024  # 10.8 GB if it had been decoded
    assert caught.value.fields["width"] == 60_000


def test_pixel_cap_is_exact_for_streamed_formats() -> None:
    data = samples.in_format(photo("product", 100, 50), "jpeg")
    assert probe(data, IntakeLimits(LIMITS.max_bytes, 5000)).pixels == 5000
    with pytest.raises(TooManyPixels):
        probe(data, IntakeLimits(LIMITS.max_bytes, 4999))


def test_progressive_jpeg_gets_half_the_pixel_allowance() -> None:
    data = samples.in_format(photo("product", 100, 50), "progressive-jpeg")
    assert probe(data, IntakeLimits(LIMITS.max_bytes, 10_000)).whole_decode
    with pytest.raises(TooManyPixels):
        probe(data, IntakeLimits(LIMITS.max_bytes, 9_999))


def test_byte_cap_is_checked_before_anything_else() -> None:
    with pytest.raises(UploadTooLarge):
        probe(b"\xff\xd8\xff" + bytes(2000), IntakeLimits(max_bytes=1024, max_pixels=10))


def test_truncated_jpeg_is_refused_before_decoding() -> None:
    data = samples.truncated(samples.in_format(photo("landscape", 800, 600), "jpeg"))
    started = time.perf_counter()
    with pytest.raises(UnreadableImage, match="truncated"):
        probe(data, LIMITS)
    assert time.perf_counter() - started < 0.005  # no pixel was decoded


def test_truncated_png_is_refused_before_decoding() -> None:
    data = samples.truncated(samples.in_format(photo("landscape", 800, 600), "png"))
    with pytest.raises(UnreadableImage, match="IEND"):
        probe(data, LIMITS)


def test_garbage_after_a_png_signature_is_unreadable() -> None:
    with pytest.raises(UnreadableImage):
        probe(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, LIMITS)


def _outcome(judge: Any) -> object:
    """What a probe says: its fields, or the kind of refusal and its fields."""
    try:
        found = judge()
    except ImageRejected as refused:
        return type(refused), refused.fields
    return found.type, found.width, found.height, found.whole_decode


FILE_SAMPLES = {
    "jpeg": lambda: samples.in_format(photo("product", 640, 480), "jpeg"),
    "progressive-jpeg": lambda: samples.in_format(photo("product", 640, 480), "progressive-jpeg"),
    "png": lambda: samples.in_format(photo("product", 320, 240), "png"),
    "webp": lambda: samples.in_format(photo("product", 320, 240), "webp"),
    "avif": lambda: samples.in_format(photo("product", 320, 240), "avif"),
    "gif": samples.animated_gif,
    "text": lambda: samples.TEXT_NAMED_JPG,
    "empty": lambda: b"",
    "png-bomb": samples.png_bomb,
    "truncated-jpeg": lambda: samples.truncated(
        samples.in_format(photo("night", 800, 600), "jpeg")
    ),
    "truncated-png": lambda: samples.truncated(samples.in_format(photo("night", 800, 600), "png")),
    "png-garbage": lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
}


@pytest.mark.parametrize("name", list(FILE_SAMPLES))
def test_probing_a_spooled_file_says_what_probing_its_bytes_says(name: str, tmp_path: Path) -> None:
    data = FILE_SAMPLES[name]()
    path = tmp_path / "upload"
    path.write_bytes(data)
    assert _outcome(lambda: probe_file(str(path), LIMITS)) == _outcome(lambda: probe(data, LIMITS))


def test_a_file_is_refused_by_its_size_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "upload"
    path.write_bytes(b"\xff\xd8\xff" + bytes(2000))
    with pytest.raises(UploadTooLarge):
        probe_file(str(path), IntakeLimits(max_bytes=1024, max_pixels=10))


@pytest.mark.parametrize("split", [0, 1], ids=["marker-at-block-end", "marker-across-blocks"])
def test_the_end_marker_is_found_wherever_the_file_blocks_fall(split: int, tmp_path: Path) -> None:
    """A JPEG grown with comment segments so its end-of-image marker lies at the end of the
    first block the file is read in, or across the first two blocks."""
    jpeg = samples.in_format(photo("product", 64, 48), "jpeg")
    padding = SCAN_BLOCK_BYTES - len(jpeg) + split
    sizes = [60_000] * ((padding - 4) // 60_000)
    sizes.append(padding - sum(sizes))  # 4 .. 60,003 bytes: a whole segment
    segments = [b"\xff\xfe" + (size - 2).to_bytes(2, "big") + bytes(size - 4) for size in sizes]
    data = jpeg[:2] + b"".join(segments) + jpeg[2:]
    assert data.rindex(b"\xff\xd9") == SCAN_BLOCK_BYTES - 2 + split
    path = tmp_path / "upload"
    path.write_bytes(data)
    assert probe_file(str(path), LIMITS).type is JPEG
    path.write_bytes(data[:-2])  # without its end marker
    with pytest.raises(UnreadableImage, match="truncated"):
        probe_file(str(path), LIMITS)
