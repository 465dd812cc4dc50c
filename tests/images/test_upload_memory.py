"""An upload's body is never held whole in the node's memory: it streams to a spool file.

The node runs in this process (the `app` fixture); the client sends the body from a file with
`sendfile` on a thread, so the only memory the upload can cost this process is the node's.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pyvips

from server.wiring.settings import Settings
from tests.helpers.catalog import insert_products
from tests.helpers.deployment import make_settings
from tests.images.uploads import MULTIPART, form_body

pytestmark = pytest.mark.usefixtures("clean_data")

MIB = 1024 * 1024
UPLOAD_BYTES = 25 * MIB
# The node may buffer a few body chunks and reads the spool file in 1 MiB blocks; holding
# the upload whole would cost more than UPLOAD_BYTES.
MAX_PEAK_GROWTH_BYTES = 8 * MIB


@pytest.fixture
def settings(infra_env: dict[str, str], tmp_path: Path) -> Settings:
    return make_settings(
        infra_env,
        ratelimit_ip_burst=10_000,
        ratelimit_user_burst=10_000,
        image_storage_dir=str(tmp_path / "images"),
        image_max_upload_bytes=2 * UPLOAD_BYTES,
    )


def noise_jpeg() -> bytes:
    """A 12 MP JPEG of noise, which compresses badly: more than UPLOAD_BYTES."""
    noise = pyvips.Image.gaussnoise(4000, 3000, sigma=80, mean=128)
    rgb = noise.bandjoin([noise.rot180(), noise.fliphor()]).cast("uchar")
    data: bytes = rgb.copy(interpretation="srgb").jpegsave_buffer(Q=95, keep="none")
    return data


def peak_rss_reset() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def post_file(port: int, path: str, headers: dict[str, str], body: Path) -> tuple[int, bytes]:
    """POST the bytes of `body` with `sendfile` (never read into this process); status and
    response body."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        head += f"Content-Length: {body.stat().st_size}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        with body.open("rb") as file:
            sock.sendfile(file)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.gen_test(timeout=120)
async def test_a_25_mib_upload_is_never_held_whole_in_the_node(
    http_server: Any,
    base_url: str,
    admin: dict[str, str],
    infra_env: dict[str, str],
    settings: Settings,
    tmp_path: Path,
) -> None:
    product = insert_products(infra_env["FM_CATALOG_DSN"], [("Poster", "big", 3)])[0]
    body_path = tmp_path / "body"
    data = noise_jpeg()
    assert len(data) > UPLOAD_BYTES
    body_path.write_bytes(form_body(data))
    del data
    gc.collect()
    port = urlsplit(base_url).port
    assert port is not None
    baseline = peak_rss_reset()
    status, payload = await asyncio.to_thread(
        post_file,
        port,
        f"/api/v1/products/{product}/images",
        {**admin, "Content-Type": MULTIPART},
        body_path,
    )
    growth = status_bytes("VmHWM") - baseline
    assert status == 201, payload
    assert json.loads(payload)["width"] == 1200
    assert growth < MAX_PEAK_GROWTH_BYTES, f"peak RSS grew {growth / MIB:.1f} MiB"
    spool = Path(settings.image_storage_dir) / ".spool"
    assert list(spool.iterdir()) == []  # the spool file went with the request
