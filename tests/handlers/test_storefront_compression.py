"""Dynamic compression over real HTTP: Brotli or gzip by `Accept-Encoding` q-values for HTML,
REST JSON, GraphQL and problems above the threshold; bytes that decode to the identity body;
`Vary`; ETags per coding and their 304s; and cached bodies compressed once, not per request.
Also the negotiation rules themselves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import brotli
import pytest

from server.adapters.compression import (
    Compressor,
    choose_coding,
    etag_matches,
    parse_accept_encoding,
)
from server.wiring.settings import Settings
from tests.helpers.storefront import (
    build_dist,
    fetch,
    insert_products,
    storefront_settings,
)

pytestmark = pytest.mark.usefixtures("clean_data")

DECODE = {"br": brotli.decompress, "gzip": gzip.decompress, None: lambda body: body}


@pytest.fixture
def settings(infra_env: dict[str, str], tmp_path: Path) -> Settings:
    build_dist(tmp_path / "dist")
    return storefront_settings(infra_env, tmp_path / "dist")


@pytest.fixture
def products(infra_env: dict[str, str]) -> list[int]:
    rows = [(f"Product {n}", "a fine thing " * 20, 1000 + n, 5) for n in range(20)]
    return insert_products(infra_env["FM_CATALOG_DSN"], rows)


# --- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "identity"),
        ("", "identity"),
        ("br", "br"),
        ("gzip, br", "br"),  # equal q: the server's order
        ("gzip;q=0.9, br;q=0.8", "gzip"),
        ("BR;Q=0.5, GZIP;q=0.4", "br"),
        ("x-gzip", "gzip"),
        ("br;q=0", "identity"),
        ("*", "br"),
        ("*;q=0", None),
        ("*;q=0, identity", "identity"),
        ("identity;q=0", None),
        ("gzip;q=0, identity;q=0", None),
        ("br;q=abc, gzip", "gzip"),  # a garbled q refuses that coding
        ("br;q=2, gzip", "gzip"),
        ("deflate, zstd", "identity"),
        ("gzip;q=0.001", "gzip"),
    ],
)
def test_choose_coding(header: str | None, expected: str | None) -> None:
    assert choose_coding(header) == expected


def test_parse_and_etag_rules() -> None:
    assert parse_accept_encoding("gzip;q=0.5, br") == {"gzip": 0.5, "br": 1.0}
    assert etag_matches('"abc-br"', '"abc"') and etag_matches('W/"abc-gz"', '"abc"')
    assert etag_matches('"x", "abc"', '"abc"') and etag_matches("*", '"abc"')
    assert not etag_matches('"abcd"', '"abc"') and not etag_matches("", '"abc"')


def test_cached_bodies_are_compressed_once_per_coding() -> None:
    compressor = Compressor(min_bytes=10, cache_entries=2)
    body = b"hello world " * 100
    first = compressor.encode(body, "br", '"e1"')
    assert first is not None and brotli.decompress(first) == body
    assert compressor.encode(body, "br", '"e1"') is first
    assert compressor.stats.compressions == 1 and compressor.stats.cache_hits == 1
    compressor.encode(body, "gzip", '"e1"')
    compressor.encode(body, "br", None)  # no key: compressed every time
    compressor.encode(body, "br", None)
    assert compressor.stats.compressions == 4
    compressor.encode(b"x" * 100, "br", '"e2"')  # evicts the oldest (LRU of 2)
    compressor.encode(body, "br", '"e1"')
    assert compressor.stats.compressions == 6
    assert compressor.encode(b"tiny", "br", '"e3"') is None  # under min_bytes


# --- over HTTP ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    ("accept", "coding"),
    [("br, gzip", "br"), ("gzip", "gzip"), ("br;q=0, gzip;q=0", None), ("identity", None)],
)
async def test_rest_list_and_html_page_are_compressed_by_accept_encoding(
    http_client: Any, base_url: str, products: list[int], accept: str, coding: str | None
) -> None:
    for path in ("/api/v1/products?first=20", "/"):
        identity = await fetch(http_client, base_url + path, **{"Accept-Encoding": "identity"})
        response = await fetch(http_client, base_url + path, **{"Accept-Encoding": accept})
        assert response.code == 200
        assert len(identity.body) > 1024
        assert response.headers.get("Content-Encoding") == coding, path
        assert "Accept-Encoding" in response.headers["Vary"]
        assert DECODE[coding](response.body) == identity.body
        assert int(response.headers["Content-Length"]) == len(response.body)
        if coding is not None:
            assert len(response.body) < len(identity.body) / 3
            suffix = {"br": "-br", "gzip": "-gz"}[coding]
            assert response.headers["ETag"] == identity.headers["ETag"][:-1] + suffix + '"'
        revalidated = await fetch(
            http_client,
            base_url + path,
            **{"Accept-Encoding": accept, "If-None-Match": response.headers["ETag"]},
        )
        assert revalidated.code == 304, path
        assert revalidated.headers["ETag"] == response.headers["ETag"]


@pytest.mark.gen_test(timeout=30)
async def test_cached_product_read_is_compressed_once(
    http_client: Any, base_url: str, products: list[int], app: Any
) -> None:
    compressor: Compressor = app.settings["compressor"]
    big = products[0]
    url = f"{base_url}/api/v1/products?first=20"
    before = compressor.stats.compressions
    bodies = set()
    for _ in range(5):
        response = await fetch(http_client, url, **{"Accept-Encoding": "br"})
        assert response.headers["Content-Encoding"] == "br"
        bodies.add(response.body)
    assert compressor.stats.compressions == before + 1
    assert compressor.stats.cache_hits >= 4
    assert len(bodies) == 1
    for _ in range(3):  # the storefront page, likewise
        await fetch(http_client, base_url + "/", **{"Accept-Encoding": "gzip"})
    assert compressor.stats.compressions == before + 2
    assert big


@pytest.mark.gen_test(timeout=30)
async def test_small_and_personal_bodies(
    http_client: Any, base_url: str, products: list[int], app: Any
) -> None:
    small = await fetch(
        http_client, f"{base_url}/api/v1/products/{products[0]}", **{"Accept-Encoding": "br"}
    )
    assert len(small.body) < 1024
    assert "Content-Encoding" not in small.headers
    assert small.headers["Vary"] == "Accept-Encoding"
    problem = await fetch(
        http_client, base_url + "/api/v1/products?first=abc", **{"Accept-Encoding": "br"}
    )
    assert problem.code == 422 and "Accept-Encoding" in problem.headers["Vary"]
    json.loads(DECODE[problem.headers.get("Content-Encoding")](problem.body))
    # a personal page (no-store) is compressed per request, never kept
    compressor: Compressor = app.settings["compressor"]
    cached = compressor.stats.cache_hits
    for _ in range(2):
        page = await fetch(http_client, base_url + "/sign-up", **{"Accept-Encoding": "br"})
        assert page.headers["Cache-Control"] == "private, no-store"
        assert page.headers.get("Content-Encoding") == "br"
    assert compressor.stats.cache_hits == cached


@pytest.mark.gen_test(timeout=30)
async def test_graphql_and_openapi_are_compressed(
    http_client: Any, base_url: str, products: list[int]
) -> None:
    query = json.dumps(
        {"query": "{ products(first: 20) { edges { node { id name description } } } }"}
    )
    response = await fetch(
        http_client,
        base_url + "/graphql",
        "POST",
        query.encode(),
        **{"Content-Type": "application/json", "Accept-Encoding": "br"},
    )
    assert response.code == 200 and response.headers["Content-Encoding"] == "br"
    assert len(json.loads(brotli.decompress(response.body))["data"]["products"]["edges"]) == 20
    openapi = await fetch(
        http_client, base_url + "/api/v1/openapi.json", **{"Accept-Encoding": "gzip"}
    )
    assert openapi.headers["Content-Encoding"] == "gzip"
    json.loads(gzip.decompress(openapi.body))
