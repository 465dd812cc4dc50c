"""The pixel pipeline on real files: sizes, formats, orientation, metadata, colour, alpha."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import pyvips

from server.adapters.images.intake import IntakeLimits, probe
from server.adapters.images.pipeline import FORMATS, SIZES, Encoding, decode, derive, encode
from server.adapters.images.placeholder import MAX_PLACEHOLDER_CHARS, placeholder_data_url
from server.adapters.images.workers import configure_libvips
from tests.helpers import image_samples as samples
from tests.helpers.photos import KINDS, photo

LIMITS = IntakeLimits(max_bytes=25 * 1024 * 1024, max_pixels=50_000_000)
SIGNATURES = {"jpeg": b"\xff\xd8\xff", "webp": b"RIFF", "avif": b"ftypavif"}


@pytest.fixture(autouse=True, scope="module")
def _libvips_as_served() -> Iterator[None]:
    configure_libvips()
    yield


def render(data: bytes) -> tuple[dict[str, pyvips.Image], dict[tuple[str, str], bytes], str]:
    """Every size, every encoded variant and the placeholder of an upload."""
    sizes = derive(decode(data, probe(data, LIMITS), SIZES["large"]))
    variants = {
        (size, fmt): encode(sizes[size], fmt, Encoding()) for size in SIZES for fmt in FORMATS
    }
    return sizes, variants, placeholder_data_url(sizes["thumbnail"])


def load(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


def colour_at(image: pyvips.Image, x: int, y: int) -> list[float]:
    return list(image(x, y))


def close_to(actual: list[float], expected: list[int], tolerance: float = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=False))


@pytest.fixture(scope="module", params=KINDS)
def rendered_photo(
    request: pytest.FixtureRequest,
) -> tuple[dict[str, pyvips.Image], dict[tuple[str, str], bytes], str]:
    return render(photo(request.param, 1600, 1200).jpegsave_buffer(Q=92))


def test_photo_becomes_twelve_variants_of_the_right_type_and_size(
    rendered_photo: tuple[dict[str, pyvips.Image], dict[tuple[str, str], bytes], str],
) -> None:
    _, variants, _ = rendered_photo
    assert len(variants) == 12
    for (size, fmt), data in variants.items():
        assert SIGNATURES[fmt] in data[:12], (size, fmt)
        image = load(data)
        box = SIZES[size]
        assert max(image.width, image.height) == box, (size, fmt)
        assert abs(image.width / image.height - 4 / 3) < 0.02
        assert image.bands == 3 and image.format == "uchar"


def test_avif_and_webp_are_smaller_than_jpeg_at_the_large_size(
    rendered_photo: tuple[dict[str, pyvips.Image], dict[tuple[str, str], bytes], str],
) -> None:
    _, variants, _ = rendered_photo
    jpeg = len(variants[("large", "jpeg")])
    assert len(variants[("large", "webp")]) < jpeg
    assert len(variants[("large", "avif")]) < jpeg


def test_placeholder_is_a_small_webp_data_url_of_the_same_shape(
    rendered_photo: tuple[dict[str, pyvips.Image], dict[tuple[str, str], bytes], str],
) -> None:
    _, _, placeholder = rendered_photo
    assert len(placeholder) <= MAX_PLACEHOLDER_CHARS
    prefix, _, payload = placeholder.partition(",")
    assert prefix == "data:image/webp;base64"
    tiny = load(base64.b64decode(payload))
    assert max(tiny.width, tiny.height) <= 24
    assert abs(tiny.width / tiny.height - 4 / 3) < 0.2


def test_placeholder_of_noise_still_fits_the_budget() -> None:
    noise = pyvips.Image.gaussnoise(600, 400, sigma=120, mean=128).cast("uchar")
    noise = noise.bandjoin([noise.rot180(), noise.fliphor()]).copy(interpretation="srgb")
    assert len(placeholder_data_url(noise)) <= MAX_PLACEHOLDER_CHARS


def test_small_images_are_never_upscaled() -> None:
    sizes, variants, _ = render(samples.in_format(photo("product", 500, 400), "png"))
    assert (sizes["large"].width, sizes["large"].height) == (500, 400)
    assert (sizes["medium"].width, sizes["medium"].height) == (500, 400)
    assert (sizes["small"].width, sizes["small"].height) == (300, 240)
    assert variants[("large", "jpeg")] == variants[("medium", "jpeg")]  # stored once


def test_exif_rotated_jpeg_comes_out_upright() -> None:
    sizes, variants, _ = render(samples.exif_rotated_jpeg())
    assert (sizes["large"].width, sizes["large"].height) == (800, 600)
    for fmt in FORMATS:
        image = load(variants[("large", fmt)])
        assert (image.width, image.height) == (800, 600), fmt
        assert close_to(colour_at(image, 400, 30), samples.RED, 30), fmt  # band on top
        assert close_to(colour_at(image, 400, 570), samples.GREY, 30), fmt
        assert not image.get_typeof("orientation") or image.get("orientation") == 1


def test_camera_metadata_is_gone_from_every_variant() -> None:
    _, variants, placeholder = render(samples.camera_jpeg())
    for key, data in variants.items():
        assert samples.CAMERA_MAKE.encode() not in data, key
        assert b"Exif" not in data and b"xmpmeta" not in data, key
        fields = set(load(data).get_fields())
        assert not {"exif-data", "xmp-data", "icc-profile-data", "iptc-data"} & fields, key
    assert samples.CAMERA_MAKE.encode() not in base64.b64decode(placeholder.partition(",")[2])


@pytest.mark.parametrize("with_profile", [True, False], ids=["icc-profile", "no-profile"])
def test_cmyk_jpeg_comes_out_srgb_8_bit(with_profile: bool) -> None:
    data = samples.cmyk_jpeg(with_profile)
    assert load(data).interpretation == "cmyk"
    _, variants, _ = render(data)
    for fmt in FORMATS:
        image = load(variants[("large", fmt)])
        assert (image.bands, image.format, image.interpretation) == (3, "uchar", "srgb"), fmt
        red, green, blue = colour_at(image, 200, 150)
        assert red < 100 and 120 < green < 210 and blue > 200, (fmt, red, green, blue)  # cyan


def test_16_bit_png_comes_out_srgb_8_bit() -> None:
    data = samples.png16()
    assert load(data).format == "ushort"
    _, variants, _ = render(data)
    for fmt in FORMATS:
        image = load(variants[("large", fmt)])
        assert (image.bands, image.format, image.interpretation) == (3, "uchar", "srgb"), fmt
        assert close_to(colour_at(image, 60, 200), [255, 128, 0], 16), fmt


def test_transparency_becomes_white_in_jpeg_and_stays_in_webp_and_avif() -> None:
    _, variants, _ = render(samples.rgba_png())
    jpeg = load(variants[("large", "jpeg")])
    assert jpeg.bands == 3
    assert close_to(colour_at(jpeg, 50, 150), [255, 255, 255], 8)  # not black
    assert close_to(colour_at(jpeg, 350, 150), samples.BLUE, 16)
    for fmt in ("webp", "avif"):
        image = load(variants[("large", fmt)])
        assert image.bands == 4, fmt
        assert colour_at(image, 50, 150)[3] < 8, fmt
        assert colour_at(image, 350, 150)[3] > 247, fmt


def test_gif_uses_its_first_frame() -> None:
    sizes, variants, _ = render(samples.animated_gif())
    assert (sizes["large"].width, sizes["large"].height) == (200, 150)
    image = load(variants[("large", "jpeg")])
    assert close_to(colour_at(image, 100, 75), samples.RED, 20)


@pytest.mark.parametrize("fmt", ["png", "webp", "avif", "progressive-jpeg"])
def test_every_accepted_format_renders(fmt: str) -> None:
    sizes, variants, _ = render(samples.in_format(photo("night", 1400, 1000), fmt))
    assert (sizes["large"].width, sizes["large"].height) == (1200, 857)
    assert len(set(variants)) == 12
