"""Problem answers over real HTTP (issue 16): every `application/problem+json` answer carries
the same fields, whether a handler, Tornado's method dispatch or the HTTP/1 layer (before any
handler exists) refuses the request; a 405 names the allowed methods in `Allow`; the caller's
`X-Request-Id` comes back in the header and the body."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import tornado.web

from handlers.base import BaseHandler
from server.common.problems import status_title
from tests.helpers.catalog import add_product
from tests.helpers.raw_http import Response, closed_by_server, connect, read_response

pytestmark = pytest.mark.usefixtures("clean_data")

FIELDS = {"type", "title", "status", "detail", "request_id"}


@pytest.fixture
def product(infra_env: dict[str, str]) -> int:
    return add_product(infra_env["FM_CATALOG_DSN"])


async def exchange(base_url: str, raw: bytes) -> Response:
    """Send `raw` bytes on a connection of their own; the one answer."""
    reader, writer = await connect(base_url)
    try:
        writer.write(raw)
        return await read_response(reader)
    finally:
        writer.close()


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def checked_problem(response: Response, status: int, kind: str) -> dict[str, Any]:
    """The problem of `response`, after checking the fields every problem has."""
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/problem+json"
    found: dict[str, Any] = response.json()
    assert set(found) >= FIELDS, found
    assert found["type"] == f"/problems/{kind}"
    assert found["title"] == status_title(status)
    assert found["status"] == status
    assert isinstance(found["detail"], str) and found["detail"]
    assert found["request_id"] and found["request_id"] == response.headers["x-request-id"]
    return found


@pytest.mark.gen_test(timeout=30)
async def test_a_405_names_the_allowed_methods(
    http_server: Any, base_url: str, product: int
) -> None:
    response = await exchange(base_url, request("DELETE", f"/api/v1/products/{product}"))
    found = checked_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "GET, PATCH"
    assert found["allowed"] == ["GET", "PATCH"]
    assert found["detail"] == f"DELETE is not allowed on /api/v1/products/{product}; use GET, PATCH"


@pytest.mark.gen_test(timeout=30)
async def test_a_method_unknown_to_tornado_is_a_405_with_a_request_id(
    http_server: Any, base_url: str
) -> None:
    """Tornado refuses it before `prepare()` names the request: the problem still has an id."""
    response = await exchange(base_url, request("PROPFIND", "/api/v1/products"))
    checked_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "GET, POST"


@pytest.mark.gen_test(timeout=30)
async def test_a_413_from_the_http_layer_carries_the_callers_request_id(
    http_server: Any, base_url: str
) -> None:
    """Refused after the head, before the body is sent and before any handler runs."""
    reader, writer = await connect(base_url)
    writer.write(
        request(
            "POST",
            "/api/v1/users",
            "Content-Type: application/json",
            "Content-Length: 1000000000",
            "X-Request-Id: shopper-42.retry:1",
        )
    )
    response = await read_response(reader)
    found = checked_problem(response, 413, "body-too-large")
    assert found["request_id"] == "shopper-42.retry:1"
    assert await closed_by_server(reader)


@pytest.mark.parametrize(
    ("raw", "status", "kind"),
    [
        (request("GET", "/no/such/page"), 404, "not-found"),
        (request("GET", "/api/v1/me", "Authorization: Basic eA=="), 401, "unauthorized"),
        (request("GET", "/api/v1/me"), 401, "unauthorized"),
        (request("POST", "/api/v1/users", "Content-Type: text/plain", body=b"x"), 415,
         "unsupported-media-type"),
        (request("POST", "/api/v1/users", "Content-Type: application/json", body=b"{"), 400,
         "malformed-json"),
        (request("POST", "/api/v1/users", "Content-Type: application/json", body=b"{}"), 422,
         "invalid-body"),
        (request("DELETE", "/api/v1/products"), 405, "method-not-allowed"),
        (request("POST", "/api/v1/users", "Content-Length: 1000000000"), 413, "body-too-large"),
        (request("GET", "/api/v1/me", "X-Filler: " + "y" * 70_000), 431, "headers-too-large"),
        (b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n", 400, "malformed-request"),
    ],
    ids=["404", "401-scheme", "401-anonymous", "415", "400-json", "422", "405", "413", "431",
         "400-http"],
)  # fmt: skip
@pytest.mark.gen_test(timeout=30)
async def test_every_problem_carries_the_same_fields(
    http_server: Any, base_url: str, raw: bytes, status: int, kind: str
) -> None:
    checked_problem(await exchange(base_url, raw), status, kind)


@pytest.mark.gen_test(timeout=30)
async def test_an_offered_request_id_comes_back_and_a_malformed_one_is_replaced(
    http_server: Any, base_url: str
) -> None:
    kept = await exchange(base_url, request("GET", "/nowhere", "X-Request-Id: trace-7"))
    assert checked_problem(kept, 404, "not-found")["request_id"] == "trace-7"
    replaced = await exchange(base_url, request("GET", "/nowhere", "X-Request-Id: a b{c}"))
    assert checked_problem(replaced, 404, "not-found")["request_id"] != "a b{c}"


@tornado.web.stream_request_body
class _StreamedProbe(BaseHandler):
    """A streamed-body route (as image uploads are) that lets the HTTP layer enforce a small
    body limit after `prepare()` has named the request; notes the id it was named by."""

    named: ClassVar[list[str]] = []

    def prepare(self) -> None:
        super().prepare()
        type(self).named.append(self.request_id)
        self.request.connection.set_max_body_size(64)

    def data_received(self, chunk: bytes) -> None:
        """Take the body (the HTTP layer counts it)."""

    def post(self) -> None:
        self.write_json({"ok": True})


@pytest.fixture
def probe_server(http_server: Any, app: tornado.web.Application) -> Any:
    """The node's app with `/probe` (a `_StreamedProbe` given the node's own gate)."""
    gate = next(
        rule.target_kwargs["gate"]
        for rule in app.wildcard_router.rules
        if "gate" in getattr(rule, "target_kwargs", {})
    )
    app.add_handlers(r".*", [(r"/probe", _StreamedProbe, {"gate": gate})])
    _StreamedProbe.named.clear()
    return http_server


@pytest.mark.gen_test(timeout=30)
async def test_a_413_after_prepare_carries_the_id_the_request_was_named_by(
    probe_server: Any, base_url: str
) -> None:
    """No `X-Request-Id` offered: the handler makes one; the HTTP layer's refusal of the
    streamed body past its limit answers with that one, not another (issue 16)."""
    reader, writer = await connect(base_url)
    writer.write(request("POST", "/probe", "Transfer-Encoding: chunked"))
    writer.write(b"100\r\n" + b"x" * 256 + b"\r\n")
    response = await read_response(reader)
    writer.close()
    found = checked_problem(response, 413, "body-too-large")
    assert _StreamedProbe.named and found["request_id"] == _StreamedProbe.named[-1]
