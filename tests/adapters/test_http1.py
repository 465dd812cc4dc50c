"""The HTTP/1.1 connection layer (server/adapters/http1.py) over real sockets, byte for byte.

The behaviour Tornado's own server has (keep-alive, pipelining, chunked bodies both ways,
HEAD, 304, HTTP/1.0, forwarded headers) is checked against both `FM_HTTP_SERVER` backends;
the refusals only ours makes (413 before the body, 431, 408, idle close, drain) against
`httptools`.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
import tornado.web

from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings
from tests.helpers.raw_http import closed_by_server, connect, read_response


class Echo(tornado.web.RequestHandler):
    """GET: who asked and how; POST: the body's length and digest."""

    def get(self) -> None:
        self.write(
            {
                "remote_ip": self.request.remote_ip,
                "protocol": self.request.protocol,
                "uri": self.request.uri,
            }
        )

    def head(self) -> None:
        self.get()

    def post(self) -> None:
        body = self.request.body
        self.write({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()})


class Stream(tornado.web.RequestHandler):
    """A body written in `n` flushed pieces of `size` bytes (no Content-Length)."""

    async def get(self) -> None:
        count = int(self.get_query_argument("n", "3"))
        size = int(self.get_query_argument("size", "10"))
        for index in range(count):
            self.write(bytes([97 + index % 26]) * size)
            await self.flush()


class Tagged(tornado.web.RequestHandler):
    """A body with Tornado's automatic ETag (304 on If-None-Match)."""

    def get(self) -> None:
        self.write("tagged body")


class Slow(tornado.web.RequestHandler):
    """Answers when the test says so; notes a client that went away first."""

    release: asyncio.Event
    closed: list[str]

    async def get(self) -> None:
        await type(self).release.wait()
        self.write("late")

    def on_connection_close(self) -> None:
        type(self).closed.append(self.request.uri or "")


@pytest.fixture(params=["httptools", "tornado"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(infra_env: dict[str, str], backend: str) -> Settings:
    return make_settings(
        infra_env,
        http_server=backend,
        trust_forwarded_headers=True,
        max_body_bytes=64 * 1024,
        http_max_header_bytes=8 * 1024,
        http_header_timeout_s=0.5,
        http_body_timeout_s=0.5,
        http_idle_timeout_s=1.0,
    )


@pytest.fixture
def app() -> tornado.web.Application:
    Slow.release = asyncio.Event()
    Slow.closed = []
    return tornado.web.Application(
        [("/echo", Echo), ("/stream", Stream), ("/tagged", Tagged), ("/slow", Slow)]
    )


pytestmark = pytest.mark.usefixtures("backend")
only_ours = pytest.mark.parametrize("backend", ["httptools"], indirect=True)


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- what both servers do ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_keep_alive_serves_requests_in_turn(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    for index in range(3):
        writer.write(get(f"/echo?i={index}"))
        response = await read_response(reader)
        assert response.status == 200 and response.json()["uri"] == f"/echo?i={index}"
        assert response.headers.get("connection", "") != "close"
    writer.close()


@pytest.mark.gen_test(timeout=20)
async def test_pipelined_requests_are_answered_in_order(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(b"".join(get(f"/echo?i={index}") for index in range(5)))
    uris = [(await read_response(reader)).json()["uri"] for _ in range(5)]
    assert uris == [f"/echo?i={index}" for index in range(5)]
    writer.close()


@pytest.mark.gen_test(timeout=20)
async def test_chunked_request_body_arrives_whole(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    payload = b"0123456789" * 1000
    pieces = [payload[i : i + 777] for i in range(0, len(payload), 777)]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    answer = (await read_response(reader)).json()
    assert answer == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    writer.close()


@pytest.mark.gen_test(timeout=20)
async def test_flushed_response_is_chunked_and_head_has_no_body(
    http_server: Any, base_url: str
) -> None:
    reader, writer = await connect(base_url)
    writer.write(get("/stream?n=4&size=5"))
    response = await read_response(reader)
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.body == b"aaaaabbbbbcccccddddd"
    writer.write(b"HEAD /echo HTTP/1.1\r\nHost: test\r\n\r\n")
    head = await read_response(reader, head_request=True)
    writer.write(get("/echo?after=head"))
    assert head.status == 200 and int(head.headers["content-length"]) > 0
    assert (await read_response(reader)).json()["uri"] == "/echo?after=head"  # framing intact
    writer.close()


@pytest.mark.gen_test(timeout=20)
async def test_not_modified_has_no_body_and_keeps_the_connection(
    http_server: Any, base_url: str
) -> None:
    reader, writer = await connect(base_url)
    writer.write(get("/tagged"))
    first = await read_response(reader)
    writer.write(get("/tagged", f"If-None-Match: {first.headers['etag']}"))
    second = await read_response(reader)
    writer.write(get("/tagged"))
    third = await read_response(reader)
    assert (first.status, second.status, third.status) == (200, 304, 200)
    assert third.body == b"tagged body"
    writer.close()


@pytest.mark.gen_test(timeout=20)
async def test_http10_closes_unless_asked_to_keep_alive(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(get("/echo", version="1.0"))
    assert (await read_response(reader)).status == 200
    assert await closed_by_server(reader)
    reader, writer = await connect(base_url)
    writer.write(get("/echo", "Connection: keep-alive", version="1.0"))
    response = await read_response(reader)
    assert response.headers["connection"].lower() == "keep-alive"
    writer.write(get("/echo?again", "Connection: keep-alive", version="1.0"))
    assert (await read_response(reader)).json()["uri"] == "/echo?again"
    writer.close()


@pytest.mark.gen_test(timeout=20)
async def test_forwarded_headers_apply_to_one_request(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(get("/echo", "X-Forwarded-For: 203.0.113.7", "X-Forwarded-Proto: https"))
    proxied = (await read_response(reader)).json()
    writer.write(get("/echo"))
    direct = (await read_response(reader)).json()
    assert (proxied["remote_ip"], proxied["protocol"]) == ("203.0.113.7", "https")
    assert (direct["remote_ip"], direct["protocol"]) == ("127.0.0.1", "http")
    writer.close()


@pytest.mark.gen_test(timeout=20)
async def test_client_leaving_early_is_noticed(http_server: Any, base_url: str) -> None:
    _reader, writer = await connect(base_url)
    writer.write(get("/slow?gone"))
    await asyncio.sleep(0.2)
    writer.close()
    for _ in range(100):
        if Slow.closed:
            break
        await asyncio.sleep(0.02)
    Slow.release.set()
    assert Slow.closed == ["/slow?gone"]


# --- what only ours does -------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_declared_body_over_the_limit_is_refused_before_it_is_sent(
    http_server: Any, base_url: str
) -> None:
    reader, writer = await connect(base_url)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 70000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    response = await read_response(reader)  # not "100 Continue": the body is never sent
    assert response.status == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/body-too-large"
    assert "65536" in response.json()["detail"]
    assert await closed_by_server(reader)


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_chunked_body_over_the_limit_is_cut_off(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 16384
    for _ in range(5):
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
    response = await read_response(reader)
    assert response.status == 413 and response.json()["type"] == "/problems/body-too-large"


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_expect_continue_within_the_limit(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await read_response(reader)
    writer.write(b"hello")
    final = await read_response(reader)
    assert interim.status == 100
    assert final.json()["length"] == 5


@pytest.mark.gen_test(timeout=20)
async def test_garbage_is_a_400_problem_and_others_are_served(
    http_server: Any, base_url: str
) -> None:
    reader, writer = await connect(base_url)
    writer.write(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
    response = await read_response(reader)
    assert response.status == 400 and response.json()["type"] == "/problems/malformed-request"
    assert await closed_by_server(reader)
    reader, writer = await connect(base_url)
    writer.write(get("/echo"))
    assert (await read_response(reader)).status == 200
    writer.close()


@pytest.mark.parametrize("backend", ["tornado"], indirect=True)
@pytest.mark.parametrize(
    "raw",
    [
        b"GET /echo HTTP/1.1\r\nHost: test\r\nno colon here\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 70000\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["bad-header", "body-over-the-limit", "bad-chunk"],
)
@pytest.mark.gen_test(timeout=20)
async def test_tornados_own_refusals_are_400_problems_too(
    http_server: Any, base_url: str, raw: bytes
) -> None:
    """Tornado's server answers what it cannot read with a bare `400 Bad Request`; ours
    swaps it for a problem. (It gives no reason, so a body past the limit is a 400 here,
    where our server says 413.)"""
    reader, writer = await connect(base_url)
    writer.write(raw)
    response = await read_response(reader)
    assert response.status == 400
    assert response.headers["content-type"] == "application/problem+json"
    found = response.json()
    assert found["type"] == "/problems/malformed-request" and found["status"] == 400
    assert found["request_id"] == response.headers["x-request-id"] and found["detail"]
    assert await closed_by_server(reader)


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_oversized_headers_are_a_431(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(get("/echo", "X-Filler: " + "y" * 9000))
    response = await read_response(reader)
    assert response.status == 431 and response.json()["type"] == "/problems/headers-too-large"


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_headers_that_trickle_in_get_a_408(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: te")  # and never the rest (slowloris)
    response = await read_response(reader)
    assert response.status == 408 and response.json()["type"] == "/problems/request-timeout"


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_idle_keep_alive_connection_is_closed(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(get("/echo"))
    assert (await read_response(reader)).status == 200
    assert await closed_by_server(reader, within_s=4.0)  # idle timeout 1 s, swept each second


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_stop_closes_idle_connections_and_finishes_busy_ones(
    http_server: Any, base_url: str
) -> None:
    idle_reader, idle_writer = await connect(base_url)
    idle_writer.write(get("/echo"))
    await read_response(idle_reader)
    busy_reader, busy_writer = await connect(base_url)
    busy_writer.write(get("/slow?busy"))
    await asyncio.sleep(0.2)
    http_server.stop()
    assert await closed_by_server(idle_reader)
    Slow.release.set()
    late = await read_response(busy_reader)
    assert late.body == b"late" and late.headers["connection"] == "close"
    assert await closed_by_server(busy_reader)


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_a_body_that_stops_arriving_gets_a_408(http_server: Any, base_url: str) -> None:
    reader, writer = await connect(base_url)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nonly ten..")
    response = await read_response(reader)
    assert response.status == 408 and response.json()["type"] == "/problems/request-timeout"
    assert "body" in response.json()["detail"]
    assert await closed_by_server(reader)


@pytest.mark.gen_test(timeout=20)
@only_ours
@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",  # CL.TE smuggling
        b"Content-Length: 4\r\nContent-Length: 40\r\n",  # two lengths
        b"Transfer-Encoding: chunked, identity\r\n",  # chunked not last
    ],
)
async def test_ambiguous_body_framing_is_refused(
    http_server: Any, base_url: str, framing: bytes
) -> None:
    """Requests a proxy in front could frame differently (request smuggling) get a 400."""
    reader, writer = await connect(base_url)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: test\r\n"
        + framing
        + b"\r\n0\r\n\r\nGET /echo HTTP/1.1\r\n\r\n"
    )
    response = await read_response(reader)
    assert response.status == 400 and response.json()["type"] == "/problems/malformed-request"
    assert await closed_by_server(reader)


@pytest.mark.gen_test(timeout=20)
@only_ours
async def test_closing_all_connections_does_not_wait_for_a_client_that_stopped_reading(
    http_server: Any, base_url: str
) -> None:
    _reader, writer = await connect(base_url)
    writer.write(get(f"/stream?n=32&size={1024 * 1024}"))  # 32 MiB it never reads
    await asyncio.sleep(0.5)
    await asyncio.wait_for(http_server.close_all_connections(), 3)
    assert not http_server.connections
    writer.close()


@pytest.mark.gen_test(timeout=20)
async def test_header_values_with_trailing_space_or_control_characters(
    http_server: Any, base_url: str
) -> None:
    """Found by schemathesis (tests/handlers/test_fuzz_openapi.py): `Authorization: Bearer `
    closed our server's connection without an answer. Whitespace around a value is not part
    of it; a control character inside one is a malformed request, answered as one."""
    reader, writer = await connect(base_url)
    writer.write(get("/echo", "X-Note: spaced   "))
    assert (await read_response(reader)).status == 200
    writer.close()
    reader, writer = await connect(base_url)
    writer.write(get("/echo", "X-Note: bell\x07inside"))
    response = await read_response(reader)
    assert response.status == 400 and response.json()["type"] == "/problems/malformed-request"
    assert await closed_by_server(reader)


@pytest.mark.gen_test(timeout=20)
async def test_a_host_header_tornado_cannot_parse_is_a_malformed_request(
    http_server: Any, base_url: str
) -> None:
    """Found by the fuzzer (scripts/fuzz/http1): llhttp passes a Host of non-ASCII bytes,
    Tornado refuses it when it builds the request, and the connection was closed without an
    answer, logged as an error of ours."""
    reader, writer = await connect(base_url)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: fuz\xbc\xbcz\r\n\r\n")
    response = await read_response(reader)
    assert response.status == 400 and response.json()["type"] == "/problems/malformed-request"
    assert await closed_by_server(reader)
