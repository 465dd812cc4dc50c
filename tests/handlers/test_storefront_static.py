"""Storefront assets over real HTTP: only names the build's manifest lists, immutable caching,
precompressed Brotli/gzip chosen by `Accept-Encoding`, ETags and 304s, the service worker and
web manifest headers, and a loud failure when the build is missing."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import brotli
import pytest

from server.wiring.settings import Settings
from tests.helpers.storefront import (
    APP_JS,
    PNG,
    SW_JS,
    build_dist,
    fetch,
    storefront_settings,
)

pytestmark = pytest.mark.usefixtures("clean_data")
IMMUTABLE = "public, max-age=31536000, immutable"


@pytest.fixture
def dist(tmp_path: Path) -> dict[str, str]:
    return build_dist(tmp_path / "dist")


@pytest.fixture
def settings(infra_env: dict[str, str], tmp_path: Path, dist: dict[str, str]) -> Settings:
    return storefront_settings(infra_env, tmp_path / "dist")


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("br, gzip", "br"),
        ("gzip, deflate, br, zstd", "br"),
        ("gzip", "gzip"),
        ("br;q=0, gzip", "gzip"),
        ("gzip;q=1.0, br;q=0.5", "gzip"),
        ("*", "br"),
        ("*;q=0.5, br;q=0", "gzip"),
        ("identity", None),
        ("br;q=0, gzip;q=0", None),
        ("", None),
        (None, None),
        ("identity;q=0, *;q=0", None),  # refuses everything: identity anyway (RFC 9110)
    ],
)
async def test_fingerprinted_asset_by_accept_encoding(
    http_client: Any, base_url: str, dist: dict[str, str], accept: str | None, coding: str | None
) -> None:
    headers = {} if accept is None else {"Accept-Encoding": accept}
    response = await fetch(http_client, f"{base_url}/static/{dist['app.js']}", **headers)
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.headers["Cache-Control"] == IMMUTABLE
    assert response.headers["Vary"] == "Accept-Encoding"
    assert response.headers.get("Content-Encoding") == coding
    decoded = {
        None: lambda body: body,
        "br": brotli.decompress,
        "gzip": gzip.decompress,
    }[coding](response.body)
    assert decoded == APP_JS
    assert int(response.headers["Content-Length"]) == len(response.body)
    etag = response.headers["ETag"]
    assert etag.startswith('"') and etag.endswith({None: '"', "br": '-br"', "gzip": '-gz"'}[coding])
    again = await fetch(
        http_client, f"{base_url}/static/{dist['app.js']}", **headers, **{"If-None-Match": etag}
    )
    assert again.code == 304 and again.headers["ETag"] == etag and again.body == b""


@pytest.mark.gen_test(timeout=30)
async def test_binary_asset_has_one_representation(
    http_client: Any, base_url: str, dist: dict[str, str]
) -> None:
    response = await fetch(
        http_client, f"{base_url}/static/{dist['icon-192.png']}", **{"Accept-Encoding": "br"}
    )
    assert response.code == 200 and response.body == PNG
    assert response.headers["Content-Type"] == "image/png"
    assert "Content-Encoding" not in response.headers and "Vary" not in response.headers


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    "path",
    [
        "/static/manifest.json",  # in the directory, not an asset
        "/static/secret.txt",
        "/static/sw.js",  # served at /sw.js only
        "/static/app.00000000.js",
        "/static/..%2Fmanifest.json",
        "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/static/../../etc/passwd",
        "/static/app.js",  # logical names are not URLs
        "/static/",
    ],
)
async def test_only_listed_names_are_served(http_client: Any, base_url: str, path: str) -> None:
    response = await fetch(http_client, base_url + path)
    assert response.code == 404, path


@pytest.mark.gen_test(timeout=30)
async def test_service_worker_and_web_manifest(http_client: Any, base_url: str) -> None:
    sw = await fetch(http_client, base_url + "/sw.js", **{"Accept-Encoding": "gzip"})
    assert sw.code == 200 and gzip.decompress(sw.body) == SW_JS
    assert sw.headers["Cache-Control"] == "no-cache"
    assert sw.headers["Service-Worker-Allowed"] == "/"
    assert sw.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert sw.headers["Vary"] == "Accept-Encoding"
    revalidated = await fetch(
        http_client,
        base_url + "/sw.js",
        **{"Accept-Encoding": "gzip", "If-None-Match": sw.headers["ETag"]},
    )
    assert revalidated.code == 304
    manifest = await fetch(http_client, base_url + "/manifest.webmanifest")
    assert manifest.code == 200
    assert manifest.headers["Content-Type"] == "application/manifest+json"
    assert manifest.headers["Cache-Control"] == "public, max-age=300"
    assert b'"start_url": "/"' in manifest.body


@pytest.mark.gen_test(timeout=30)
async def test_head_sends_headers_only(
    http_client: Any, base_url: str, dist: dict[str, str]
) -> None:
    response = await fetch(
        http_client, f"{base_url}/static/{dist['app.js']}", "HEAD", **{"Accept-Encoding": "br"}
    )
    assert response.code == 200 and response.body == b""
    assert response.headers["Content-Encoding"] == "br"
