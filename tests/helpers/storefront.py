"""Shared by the storefront tests: a real asset build in a temporary directory (files, their
`.br`/`.gz` made with the brotli and gzip modules, and `manifest.json`), node settings that
point `FM_STATIC_DIR` at it, products written straight to the catalog, and form posts."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import brotli
import psycopg2
from tornado.httpclient import HTTPResponse

from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings

APP_JS = b"import './controllers.js';\n" + b"console.log('final market');\n" * 200
APP_CSS = b":root{--green:#0b5d1e}\n" + b".product-card{display:grid;gap:.5rem}\n" * 200
SW_JS = b"self.__WB_MANIFEST=[];\n" + b"self.addEventListener('fetch',()=>{});\n" * 100
WEBMANIFEST = json.dumps(
    {"name": "Final Market", "start_url": "/", "scope": "/", "display": "standalone"}
).encode()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def _hash8(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def build_dist(directory: Path) -> dict[str, str]:
    """Write a small asset build into `directory`; returns its logical -> file names."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "app.js": (f"app.{_hash8(APP_JS)}.js", APP_JS),
        "app.css": (f"app.{_hash8(APP_CSS)}.css", APP_CSS),
        "icon-192.png": (f"icon-192.{_hash8(PNG)}.png", PNG),
        "icon-512.png": (f"icon-512.{_hash8(PNG + b'5')}.png", PNG + b"5"),
    }
    for name, data in [*files.values(), ("sw.js", SW_JS), ("manifest.webmanifest", WEBMANIFEST)]:
        (directory / name).write_bytes(data)
        if not name.endswith(".png"):
            (directory / (name + ".br")).write_bytes(brotli.compress(data, quality=11))
            (directory / (name + ".gz")).write_bytes(gzip.compress(data, compresslevel=9))
    logical = {key: name for key, (name, _data) in files.items()}
    (directory / "manifest.json").write_text(
        json.dumps({"files": logical, "sw_version": "abcd1234", "source_hash": "0" * 64})
    )
    # Something that must never be served although it sits in the directory.
    (directory / "secret.txt").write_text("not an asset")
    return logical


def storefront_settings(env: dict[str, str], dist: Path, **overrides: Any) -> Settings:
    """Node settings for storefront tests: the build in `dist`, no rate limits in the way."""
    values: dict[str, Any] = {
        "static_dir": str(dist),
        "cookie_secure": False,
        "ratelimit_ip_per_second": 10_000.0,
        "ratelimit_ip_burst": 10_000,
        "ratelimit_user_per_second": 10_000.0,
        "ratelimit_user_burst": 10_000,
    }
    values.update(overrides)
    return make_settings(env, **values)


def insert_products(dsn: str, rows: list[tuple[str, str, int, int]]) -> list[int]:
    """Products (name, description, price_cents, stock) written straight to the catalog."""
    ids = []
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        for name, description, price_cents, stock in rows:
            cur.execute(
                "WITH p AS (INSERT INTO products (name, description, price_cents) "
                "VALUES (%s, %s, %s) RETURNING id) "
                "INSERT INTO inventory (product_id, stock) SELECT id, %s FROM p "
                "RETURNING product_id",
                (name, description, price_cents, stock),
            )
            ids.append(int(cur.fetchone()[0]))
    conn.close()
    return ids


def insert_image(dsn: str, product_id: int, width: int = 1200, height: int = 900) -> None:
    """An image row as the image pipeline records it (variants by size and format)."""
    digest = hashlib.sha1(str(product_id).encode()).hexdigest()
    variants = {
        size: {
            fmt: f"/images/{digest[:2]}/{digest}{size[0]}.{ext}"
            for fmt, ext in (("jpeg", "jpg"), ("webp", "webp"), ("avif", "avif"))
        }
        for size in ("thumbnail", "small", "medium", "large")
    }
    src = {size: f"/images/{digest}/{size}" for size in variants}
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO product_images (product_id, content_hash, placeholder, variants, src, "
            "width, height) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                product_id,
                digest,
                "data:image/webp;base64,UklGRg==",
                json.dumps(variants),
                json.dumps(src),
                width,
                height,
            ),
        )
    conn.close()


async def fetch(
    client: Any, url: str, method: str = "GET", body: bytes | None = None, **headers: str
) -> HTTPResponse:
    """One request, redirects not followed; error statuses are returned, not raised."""
    return await client.fetch(
        url,
        method=method,
        body=body,
        headers=headers,
        follow_redirects=False,
        decompress_response=False,
        allow_nonstandard_methods=True,
        raise_error=False,
    )


class Browser:
    """A cookie jar and form posts with the headers a browser sends (Origin, form type)."""

    def __init__(self, client: Any, base_url: str) -> None:
        self.client = client
        self.base_url = base_url
        self.cookies: dict[str, str] = {}

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        headers = dict(extra)
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return headers

    def _keep(self, response: HTTPResponse) -> None:
        for header in response.headers.get_list("Set-Cookie"):
            name, _, rest = header.partition("=")
            value = rest.split(";")[0]
            if (
                value in ("", '""')
                or "Max-Age=0" in header
                or "expires=Thu, 01 Jan 1970" in header.lower()
            ):
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value

    async def get(self, path: str, **headers: str) -> HTTPResponse:
        response = await fetch(self.client, self.base_url + path, **self._headers(headers))
        self._keep(response)
        return response

    async def post(
        self, path: str, fields: dict[str, Any], origin: str | None = "same", **headers: str
    ) -> HTTPResponse:
        extra = {"Content-Type": "application/x-www-form-urlencoded", **headers}
        if origin == "same":
            extra["Origin"] = self.base_url
        elif origin is not None:
            extra["Origin"] = origin
        response = await fetch(
            self.client,
            self.base_url + path,
            "POST",
            urlencode(fields).encode(),
            **self._headers(extra),
        )
        self._keep(response)
        return response

    async def api(
        self, path: str, method: str = "GET", body: Any = None, **headers: str
    ) -> HTTPResponse:
        extra = dict(headers)
        if body is not None:
            extra["Content-Type"] = "application/json"
        if method != "GET" and "fm_csrf" in self.cookies:
            extra["X-CSRF-Token"] = self.cookies["fm_csrf"]
        return await fetch(
            self.client,
            self.base_url + path,
            method,
            None if body is None else json.dumps(body).encode(),
            **self._headers(extra),
        )


def hidden_field(html: bytes, name: str) -> str:
    """The value of the hidden input `name` in a page."""
    found = re.search(rb'name="%s" value="([^"]*)"' % name.encode(), html)
    assert found, f"no {name} field in the page"
    return found.group(1).decode()
