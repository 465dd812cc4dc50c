"""Image uploads and serving over real HTTP, against real PostgreSQL and Redis.

Admins upload photographs and get the 12 variants and the placeholder back; the product page
shows the image at once (its cache is bumped); variants are served by content address
(immutable) and per size with `Accept` negotiation; hostile uploads are refused with problem
details, quickly, without memory growth, leaving no file and no row, while the node keeps
serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pyvips

from server.adapters.images import ImagesBusy
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers import image_samples as samples
from tests.helpers.catalog import insert_products
from tests.helpers.deployment import make_settings
from tests.helpers.http import body, call, problem
from tests.helpers.photos import photo
from tests.images.uploads import (
    MULTIPART,
    form_body,
    image_rows,
    stored_files,
    upload,
)

pytestmark = pytest.mark.usefixtures("clean_data")

MAX_UPLOAD_BYTES = 4 * 1024 * 1024
SIZE_NAMES = ("thumbnail", "small", "medium", "large")
MEDIA_TYPES = {"jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}
CHROME_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


@pytest.fixture
def settings(infra_env: dict[str, str], tmp_path: Path) -> Settings:
    return make_settings(
        infra_env,
        ratelimit_ip_burst=10_000,
        ratelimit_user_burst=10_000,
        image_storage_dir=str(tmp_path / "images"),
        image_max_upload_bytes=MAX_UPLOAD_BYTES,
    )


@pytest.fixture
def storage_root(settings: Settings) -> Path:
    return Path(settings.image_storage_dir)


@pytest.fixture
def lamp(infra_env: dict[str, str]) -> int:
    return insert_products(infra_env["FM_CATALOG_DSN"], [("Desk Lamp", "brass", 10)])[0]


@pytest.fixture(scope="module")
def landscape_jpeg() -> bytes:
    return samples.in_format(photo("landscape", 1600, 1200), "jpeg")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def fetch(http_client: Any, base_url: str, path: str, **headers: str) -> Any:
    return await call(http_client, base_url + path, "GET", **headers)


# --- uploads -------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_upload_answers_201_with_every_variant_and_each_url_serves_its_type(
    http_client: Any, base_url: str, lamp: int, admin: dict[str, str], landscape_jpeg: bytes
) -> None:
    response = await upload(http_client, base_url, lamp, landscape_jpeg, admin)
    assert response.code == 201, response.body
    image = body(response)
    assert set(image) == {"id", "placeholder", "variants", "src", "width", "height"}
    assert image["id"].isdigit() and (image["width"], image["height"]) == (1200, 900)
    assert image["placeholder"].startswith("data:image/webp;base64,")
    assert len(image["placeholder"]) <= 400
    assert set(image["variants"]) == set(SIZE_NAMES) == set(image["src"])
    for size, formats in image["variants"].items():
        assert set(formats) == set(MEDIA_TYPES)
        for fmt, url in formats.items():
            served = await fetch(http_client, base_url, url)
            assert served.code == 200, (size, fmt, served.body)
            assert served.headers["Content-Type"] == MEDIA_TYPES[fmt]
            assert served.headers["Cache-Control"] == "public, max-age=2592000, immutable"
            decoded = pyvips.Image.new_from_buffer(served.body, "")
            assert (
                max(decoded.width, decoded.height)
                == {
                    "thumbnail": 150,
                    "small": 300,
                    "medium": 600,
                    "large": 1200,
                }[size]
            )


@pytest.mark.gen_test(timeout=60)
async def test_cached_product_page_shows_the_new_image(
    http_client: Any, base_url: str, lamp: int, admin: dict[str, str], landscape_jpeg: bytes
) -> None:
    page = f"{base_url}/api/v1/products/{lamp}"
    before = await call(http_client, page)
    assert body(before)["images"] == []
    image = body(await upload(http_client, base_url, lamp, landscape_jpeg, admin))
    after = await call(http_client, page)
    assert body(after)["images"] == [image]
    assert after.headers["ETag"] != before.headers["ETag"]
    listed = body(await call(http_client, f"{base_url}/api/v1/products"))
    assert listed["items"][0]["images"] == [image]


@pytest.mark.gen_test(timeout=60)
async def test_same_file_twice_returns_the_first_image_and_adds_nothing(
    http_client: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    landscape_jpeg: bytes,
    infra_env: dict[str, str],
    storage_root: Path,
) -> None:
    first = await upload(http_client, base_url, lamp, landscape_jpeg, admin)
    files = stored_files(storage_root)
    again = await upload(http_client, base_url, lamp, landscape_jpeg, admin, filename="b.jpg")
    assert (first.code, again.code) == (201, 200)
    assert body(again) == body(first)
    assert image_rows(infra_env["FM_CATALOG_DSN"]) == 1
    assert stored_files(storage_root) == files
    assert len(files) == 13  # 12 variants and the manifest


@pytest.mark.gen_test(timeout=60)
async def test_same_file_on_another_product_reuses_the_rendition(
    http_client: Any,
    base_url: str,
    admin: dict[str, str],
    landscape_jpeg: bytes,
    infra_env: dict[str, str],
    storage_root: Path,
) -> None:
    lamp, desk = insert_products(infra_env["FM_CATALOG_DSN"], [("Lamp", "", 1), ("Desk", "", 1)])
    first = body(await upload(http_client, base_url, lamp, landscape_jpeg, admin))
    files = stored_files(storage_root)
    second = body(await upload(http_client, base_url, desk, landscape_jpeg, admin))
    assert second["id"] != first["id"]
    assert second["variants"] == first["variants"] and second["src"] == first["src"]
    assert stored_files(storage_root) == files


@pytest.mark.gen_test(timeout=60)
async def test_upload_needs_an_admin_and_an_existing_product(
    http_client: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    shopper: dict[str, str],
    landscape_jpeg: bytes,
) -> None:
    anonymous = await upload(http_client, base_url, lamp, landscape_jpeg, {})
    assert anonymous.code == 401 and problem(anonymous)["type"] == "/problems/unauthorized"
    not_admin = await upload(http_client, base_url, lamp, landscape_jpeg, shopper)
    assert not_admin.code == 403 and problem(not_admin)["type"] == "/problems/forbidden"
    missing = await upload(http_client, base_url, 999_999, landscape_jpeg, admin)
    assert missing.code == 404 and problem(missing)["type"] == "/problems/not-found"
    bad_id = await upload(http_client, base_url, "lamp", landscape_jpeg, admin)
    assert bad_id.code == 404


@pytest.mark.gen_test(timeout=60)
async def test_body_must_be_multipart_with_a_file_field(
    http_client: Any, base_url: str, lamp: int, admin: dict[str, str], landscape_jpeg: bytes
) -> None:
    url = f"{base_url}/api/v1/products/{lamp}/images"
    raw = await call(
        http_client, url, "POST", landscape_jpeg, **admin, **{"Content-Type": "image/jpeg"}
    )
    assert raw.code == 415 and problem(raw)["type"] == "/problems/unsupported-media-type"
    wrong_field = form_body(b"a caption", field="photo")
    no_file = await call(
        http_client, url, "POST", wrong_field, **admin, **{"Content-Type": MULTIPART}
    )
    assert no_file.code == 422 and problem(no_file)["type"] == "/problems/missing-file"
    garbage = await call(
        http_client, url, "POST", b"--nope", **admin, **{"Content-Type": MULTIPART}
    )
    assert garbage.code in (400, 422) and problem(garbage)["status"] == garbage.code


# --- hostile uploads -----------------------------------------------------------------------------


HOSTILE = {
    "text-named-jpg": (samples.TEXT_NAMED_JPG, 415, "unsupported-media-type"),
    "truncated-jpeg": (None, 422, "unreadable-image"),  # made from the landscape photo
    "png-bomb-60000x60000": (samples.png_bomb(), 422, "too-many-pixels"),
    "svg-external-entity": (samples.SVG_WITH_EXTERNAL_ENTITY, 415, "unsupported-media-type"),
    "empty-file": (b"", 415, "unsupported-media-type"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.gen_test(timeout=60)
async def test_hostile_upload_is_refused_quickly_leaving_nothing_while_node_serves(
    name: str,
    http_client: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    landscape_jpeg: bytes,
    infra_env: dict[str, str],
    storage_root: Path,
    services: Services,
) -> None:
    data, status, kind = HOSTILE[name]
    data = samples.truncated(landscape_jpeg) if data is None else data
    rss_before, cpu_before, started = rss_bytes(), cpu_s(), time.perf_counter()
    response, health = await asyncio.gather(
        upload(http_client, base_url, lamp, data, admin, filename="photo.jpg"),
        fetch(http_client, base_url, "/healthz"),
    )
    elapsed, cpu = time.perf_counter() - started, cpu_s() - cpu_before
    assert response.code == status, response.body
    assert problem(response)["type"] == f"/problems/{kind}"
    assert health.code == 200
    assert elapsed < 1.0 and cpu < 0.5, (elapsed, cpu)
    assert rss_bytes() - rss_before < 50 * 1024 * 1024
    assert stored_files(storage_root) == []
    assert image_rows(infra_env["FM_CATALOG_DSN"]) == 0
    assert services.images.workers.admitted == 0


@pytest.mark.gen_test(timeout=60)
async def test_oversize_body_is_refused_before_it_is_read(
    http_client: Any, base_url: str, lamp: int, admin: dict[str, str], storage_root: Path
) -> None:
    """Content-Length over the cap: 413 from the headers alone (the client, expecting
    100-continue, never sends the body)."""
    oversize = form_body(b"\xff\xd8\xff" + bytes(MAX_UPLOAD_BYTES + 100_000))
    started = time.perf_counter()
    response = await http_client.fetch(
        f"{base_url}/api/v1/products/{lamp}/images",
        method="POST",
        body=oversize,
        headers={**admin, "Content-Type": MULTIPART},
        expect_100_continue=True,
        raise_error=False,
    )
    assert response.code == 413, response.body
    assert problem(response)["type"] == "/problems/body-too-large"
    assert time.perf_counter() - started < 1.0
    assert stored_files(storage_root) == []


async def _raw_post_chunked(
    port: int, path: str, headers: dict[str, str], body: bytes, chunk: int = 64 * 1024
) -> tuple[bytes, int]:
    """POST `body` with chunked transfer encoding, stopping once the server answers.

    Returns (the response bytes, how many body bytes were sent before the answer).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    writer.write(head.encode())
    sent, answer = 0, b""
    try:
        for offset in range(0, len(body), chunk):
            piece = body[offset : offset + chunk]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            sent += len(piece)
            try:
                answer = await asyncio.wait_for(reader.read(65536), 0.005)
            except TimeoutError:
                continue
            break
        while True:
            more = await asyncio.wait_for(reader.read(65536), 5)
            if not more:
                break
            answer += more
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
    return answer, sent


@pytest.mark.gen_test(timeout=60)
async def test_oversize_streamed_body_is_cut_off_as_soon_as_it_passes_the_cap(
    http_server: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    storage_root: Path,
    infra_env: dict[str, str],
) -> None:
    """No Content-Length (chunked): the file is counted while it streams and refused with a
    413 problem at the cap, not after the whole body."""
    oversize = form_body(b"\xff\xd8\xff" + bytes(3 * MAX_UPLOAD_BYTES))
    port = urlsplit(base_url).port
    assert port is not None
    answer, sent = await _raw_post_chunked(
        port, f"/api/v1/products/{lamp}/images", {**admin, "Content-Type": MULTIPART}, oversize
    )
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"application/problem+json" in head
    assert json.loads(payload)["type"] == "/problems/upload-too-large"
    assert sent < MAX_UPLOAD_BYTES + 2 * 1024 * 1024  # refused near the cap, not at the end
    assert stored_files(storage_root) == []
    assert image_rows(infra_env["FM_CATALOG_DSN"]) == 0


@pytest.mark.gen_test(timeout=60)
async def test_full_queue_answers_503_with_retry_after_before_reading_the_body(
    http_client: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    services: Services,
    landscape_jpeg: bytes,
) -> None:
    slots = [services.images.admit() for _ in range(services.images.workers.capacity)]
    try:
        busy = await upload(http_client, base_url, lamp, landscape_jpeg, admin)
    finally:
        for slot in slots:
            slot.release()
    assert busy.code == 503, busy.body
    assert busy.headers["Retry-After"] == "2"
    assert problem(busy)["type"] == "/problems/images-busy"
    after = await upload(http_client, base_url, lamp, landscape_jpeg, admin)
    assert after.code == 201
    assert services.images.workers.admitted == 0


@pytest.mark.gen_test(timeout=60)
async def test_an_unwritable_spool_answers_503_and_the_next_upload_succeeds(
    http_client: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    services: Services,
    storage_root: Path,
    infra_env: dict[str, str],
    landscape_jpeg: bytes,
) -> None:
    """The spool directory cannot be made (a file is in its place): 503 with `Retry-After`,
    nothing recorded, the place given back; once the path is free, uploads work again."""
    spool = Path(services.images.spool_dir)
    _put_file_at(spool)
    refused = await upload(http_client, base_url, lamp, landscape_jpeg, admin)
    assert refused.code == 503, refused.body
    assert refused.headers["Retry-After"] == "30"
    assert problem(refused)["type"] == "/problems/images-busy"
    assert image_rows(infra_env["FM_CATALOG_DSN"]) == 0
    assert services.images.workers.admitted == 0
    _remove_file_at(spool)
    after = await upload(http_client, base_url, lamp, landscape_jpeg, admin)
    assert after.code == 201, after.body
    assert stored_files(spool) == []  # the upload's spool file went with its request


def _put_file_at(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a directory")


def _remove_file_at(path: Path) -> None:
    path.unlink()


@pytest.mark.gen_test(timeout=60)
async def test_a_crashed_image_worker_is_replaced_and_the_node_keeps_serving(
    http_client: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    services: Services,
    product_jpeg: bytes,
) -> None:
    """A decoder crash (here: the worker process aborts) fails only the uploads in flight,
    with 503; the next upload gets a fresh worker process."""
    workers = services.images.workers
    first_pid = await workers.run(os.getpid)
    with pytest.raises(ImagesBusy):
        await workers.run(os.abort)
    assert (await fetch(http_client, base_url, "/healthz")).code == 200
    after = await upload(http_client, base_url, lamp, product_jpeg, admin)
    assert after.code == 201, after.body
    assert workers.restarts == 1 and workers.pid not in (None, first_pid)


# --- serving --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def product_jpeg() -> bytes:
    return samples.in_format(photo("product", 1300, 1000), "jpeg")


@pytest.fixture
def uploaded(
    io_loop: Any,
    http_client: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    product_jpeg: bytes,
) -> dict[str, Any]:
    """An uploaded image (the product photo, small enough to be quick)."""
    response = io_loop.run_sync(lambda: upload(http_client, base_url, lamp, product_jpeg, admin))
    assert response.code == 201, response.body
    image: dict[str, Any] = json.loads(response.body)
    return image


@pytest.mark.parametrize(
    ("accept", "fmt"),
    [
        (CHROME_ACCEPT, "avif"),
        ("image/webp,*/*", "webp"),
        ("image/avif;q=0,image/webp;q=0.9", "webp"),
        ("*/*", "jpeg"),
        ("", "jpeg"),
        ("image/png", "jpeg"),
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_size_url_negotiates_avif_then_webp_then_jpeg(
    accept: str, fmt: str, http_client: Any, base_url: str, uploaded: dict[str, Any]
) -> None:
    response = await fetch(http_client, base_url, uploaded["src"]["medium"], Accept=accept)
    assert response.code == 200
    assert response.headers["Content-Type"] == MEDIA_TYPES[fmt]
    assert response.headers["Vary"] == "Accept"
    assert response.headers["Cache-Control"] == "public, max-age=2592000"
    direct = await fetch(http_client, base_url, uploaded["variants"]["medium"][fmt])
    assert response.body == direct.body
    assert response.headers["ETag"] == direct.headers["ETag"]


@pytest.mark.gen_test(timeout=60)
async def test_etag_gives_304_on_both_kinds_of_url(
    http_client: Any, base_url: str, uploaded: dict[str, Any]
) -> None:
    for path, accept in (
        (uploaded["variants"]["small"]["webp"], "*/*"),
        (uploaded["src"]["small"], CHROME_ACCEPT),
    ):
        first = await fetch(http_client, base_url, path, Accept=accept)
        etag = first.headers["ETag"]
        assert etag.startswith('"') and len(etag) == 42
        again = await fetch(http_client, base_url, path, Accept=accept, **{"If-None-Match": etag})
        assert again.code == 304 and again.body == b""
        assert again.headers["ETag"] == etag
        other = await fetch(http_client, base_url, path, Accept=accept, **{"If-None-Match": '"x"'})
        assert other.code == 200
    negotiated = uploaded["src"]["small"]
    jpeg = await fetch(http_client, base_url, negotiated, Accept="*/*")
    stale = await fetch(
        http_client,
        base_url,
        negotiated,
        Accept=CHROME_ACCEPT,
        **{"If-None-Match": jpeg.headers["ETag"]},
    )
    assert stale.code == 200 and stale.headers["Content-Type"] == "image/avif"


@pytest.mark.gen_test(timeout=60)
async def test_head_and_unknown_images(
    http_client: Any, base_url: str, uploaded: dict[str, Any]
) -> None:
    url = uploaded["variants"]["large"]["jpeg"]
    head = await call(http_client, base_url + url, "HEAD")
    assert head.code == 200 and head.body == b""
    assert head.headers["Content-Type"] == "image/jpeg" and int(head.headers["Content-Length"]) > 0
    unknown = await fetch(http_client, base_url, "/images/ab/" + "ab" + "0" * 38 + ".jpg")
    assert unknown.code == 404 and problem(unknown)["type"] == "/problems/not-found"
    misfiled = await fetch(http_client, base_url, "/images/cd/" + url.rsplit("/", 1)[1])
    assert misfiled.code == 404
    no_key = await fetch(http_client, base_url, "/images/" + "0" * 40 + "/large")
    assert no_key.code == 404
