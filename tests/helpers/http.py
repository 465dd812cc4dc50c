"""HTTP helpers of the REST tests: one request with error statuses returned rather than raised,
and the JSON bodies of answers and problems (RFC 9457)."""

from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import HTTPResponse


async def call(
    http_client: Any, url: str, method: str = "GET", body: Any = None, **headers: str
) -> HTTPResponse:
    """One request; error statuses are returned, not raised."""
    payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
    if payload is not None:
        headers.setdefault("Content-Type", "application/json")
    return await http_client.fetch(
        url,
        method=method,
        body=payload,
        headers=headers,
        allow_nonstandard_methods=True,
        raise_error=False,
    )


def problem(response: HTTPResponse) -> dict[str, Any]:
    """The body of a problem response (checks its content type only)."""
    assert response.headers["Content-Type"] == "application/problem+json", response.body
    return json.loads(response.body)  # type: ignore[no-any-return]


async def get_json(http_client: Any, url: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of `GET url`; error statuses are returned, not raised."""
    response = await http_client.fetch(url, raise_error=False)
    return response.code, json.loads(response.body)


def body(response: HTTPResponse) -> Any:
    """The JSON body of a response (checks its content type)."""
    assert response.headers["Content-Type"].startswith("application/json"), response.body
    return json.loads(response.body)
