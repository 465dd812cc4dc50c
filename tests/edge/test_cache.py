"""nginx as a caching edge in front of a real `finalmarket cluster`: a public answer is served
from the cache (`X-Cache: HIT`), one entry per content coding; `GET /_edge/purge` with
`X-Purge-Key: <path>|<coding>` from this machine removes exactly that entry; a product write
purges the storefront page that shows it (cached by its `s-maxage`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cluster import Cluster, admin_token, get, running_cluster, send

OPENAPI = "/api/v1/openapi.json"


@pytest.fixture(scope="module")
def cluster(
    infra_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with running_cluster(infra_env, tmp_path_factory.mktemp("cache")) as running:
        yield running


def _x_cache(cluster: Cluster, path: str, coding: str | None = None) -> str:
    headers = {"Accept-Encoding": coding} if coding else {"Accept-Encoding": "identity"}
    status, response_headers, _ = get(cluster.url(path), headers)
    assert status == 200
    return response_headers["X-Cache"]


def _purge(cluster: Cluster, key: str) -> int:
    return get(cluster.url("/_edge/purge"), {"X-Purge-Key": key})[0]


def test_a_public_answer_is_served_from_the_edge_cache(cluster: Cluster) -> None:
    path = f"{OPENAPI}?v=hit"
    assert _x_cache(cluster, path) == "MISS"
    assert _x_cache(cluster, path) == "HIT"


def test_purge_removes_exactly_the_entry_of_one_path_and_coding(cluster: Cluster) -> None:
    path = f"{OPENAPI}?v=purge"
    assert [_x_cache(cluster, path), _x_cache(cluster, path, "gzip")] == ["MISS", "MISS"]
    assert [_x_cache(cluster, path), _x_cache(cluster, path, "gzip")] == ["HIT", "HIT"]
    assert _purge(cluster, f"{path}|gzip") == 200
    assert _purge(cluster, f"{path}|gzip") == 404  # gone already
    assert _x_cache(cluster, path, "gzip") == "MISS"
    assert _x_cache(cluster, path) == "HIT"  # the identity entry stays


def test_answers_for_a_signed_in_caller_are_not_cached(cluster: Cluster) -> None:
    """A personal answer (`private`) passes through every time."""
    path = "/api/v1/me?v=private"
    first = get(cluster.url(path))
    second = get(cluster.url(path))
    assert (first[0], second[0]) == (401, 401)
    assert "HIT" not in (first[1].get("X-Cache"), second[1].get("X-Cache"))


def test_a_product_write_purges_its_page_from_the_edge(
    cluster: Cluster, infra_env: dict[str, str], tmp_path: Path
) -> None:
    """The storefront's product page is cached by its `s-maxage` (HIT while it lasts), and a
    price change through the API purges it (the nodes run `FM_EDGE_PURGE=nginx` against the
    cluster's nginx): the next view through the edge shows the new price, in every coding."""
    token = admin_token(cluster, infra_env, tmp_path)
    path = "/products/1"
    for coding in ("br", "gzip", "identity"):
        assert _x_cache(cluster, path, coding) in ("MISS", "EXPIRED")
        assert _x_cache(cluster, path, coding) == "HIT"
    status, body = send(cluster, "PATCH", "/api/v1/products/1", {"price_cents": 98_765}, token)
    assert status == 200, body
    deadline = time.monotonic() + 10
    while True:  # the purge leaves the node in the background, after the write's answer
        status, headers, page = get(cluster.url(path), {"Accept-Encoding": "identity"})
        if b"$987.65" in page:
            break
        assert time.monotonic() < deadline, (headers.get("X-Cache"), page[:400])
        time.sleep(0.05)
    assert headers["X-Cache"] == "MISS"
    for coding in ("br", "gzip"):
        assert _x_cache(cluster, path, coding) == "MISS"  # purged too, not served stale
