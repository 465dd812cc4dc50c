"""Upload test helpers: multipart bodies, the upload call, what storage and the catalog hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg2
from tornado.httpclient import HTTPResponse

from tests.helpers.http import call

BOUNDARY = "fm-test-7MA4YWxkTrZu0gW"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def form_body(
    data: bytes, filename: str = "photo.jpg", field: str = "file", part_type: str = "image/jpeg"
) -> bytes:
    """A multipart/form-data body with one file field (and a text field, as browsers send)."""
    return (
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="alt"\r\n\r\n'
            "A product photo\r\n"
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {part_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


async def upload(
    http_client: Any,
    base_url: str,
    product_id: int | str,
    data: bytes,
    headers: dict[str, str],
    filename: str = "photo.jpg",
) -> HTTPResponse:
    """`POST /api/v1/products/{id}/images` with `data` as the file; errors are returned."""
    return await call(
        http_client,
        f"{base_url}/api/v1/products/{product_id}/images",
        "POST",
        form_body(data, filename),
        **headers,
        **{"Content-Type": MULTIPART},
    )


def stored_files(root: Path) -> list[Path]:
    """Every file under the image storage directory (temporary files included)."""
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def image_rows(catalog_dsn: str) -> int:
    """Rows in product_images."""
    with psycopg2.connect(catalog_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM product_images")
        (count,) = cur.fetchone()
    conn.close()
    return int(count)
