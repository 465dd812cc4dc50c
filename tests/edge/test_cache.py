"""nginx as a caching edge: a public answer is served from the cache (`X-Cache: HIT`), one
entry per content coding, and `GET /_edge/purge` with `X-Purge-Key: <path>|<coding>` from
this machine removes exactly that entry. Against the cluster's real OpenAPI document
(`public, max-age=300`) and, for `s-maxage` (which no node endpoint sends yet), a tiny origin
behind the same nginx configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.netutil import bind_sockets

from server.wiring.balancer import Nginx
from server.wiring.edge import Upstream
from tests.edge.conftest import Cluster, free_port_run, get, require_balancer, running_cluster

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


class _SharedCacheOnly(tornado.web.RequestHandler):
    """A page browsers must revalidate but shared caches may keep a minute (the storefront's
    HTML policy)."""

    def initialize(self, served: list[str]) -> None:
        self.served = served

    def get(self) -> None:
        self.served.append(self.request.path)
        self.set_header(
            "Cache-Control", "public, max-age=0, s-maxage=60, stale-while-revalidate=30"
        )
        self.write("<p>page</p>")


@pytest.fixture
def nginx_over_origin(io_loop: Any, tmp_path: Path) -> Iterator[tuple[Nginx, list[str]]]:
    """The repository's nginx configuration in front of a tiny origin on the test's loop."""
    require_balancer("nginx")
    served: list[str] = []
    app = tornado.web.Application([(r"/.*", _SharedCacheOnly, {"served": served})])
    sockets = bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    origin = f"127.0.0.1:{sockets[0].getsockname()[1]}"
    nginx = Nginx(tmp_path / "nginx", f"127.0.0.1:{free_port_run(1)}")
    nginx.start([Upstream(origin)])
    try:
        yield nginx, served
    finally:
        nginx.stop()
        server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_s_maxage_is_honoured_over_max_age_and_purge_clears_it(
    nginx_over_origin: tuple[Nginx, list[str]],
) -> None:
    nginx, served = nginx_over_origin
    client = AsyncHTTPClient()
    url = f"http://{nginx.listen}/products/7"

    async def x_cache() -> str:
        # (decompress_response would replace the header with its own `gzip`.)
        response = await client.fetch(
            url, headers={"Accept-Encoding": "br, gzip"}, decompress_response=False
        )
        return str(response.headers["X-Cache"])

    assert [await x_cache(), await x_cache()] == ["MISS", "HIT"]
    assert served == ["/products/7"]
    purge = await client.fetch(
        f"http://{nginx.listen}/_edge/purge", headers={"X-Purge-Key": "/products/7|br"}
    )
    assert purge.code == 200
    assert await x_cache() == "MISS"
    assert served == ["/products/7", "/products/7"]
