"""RFC 9457 problem details: the one shape of every HTTP error answer, and request ids.

Every problem carries the same fields, whoever answers: `type` (`/problems/<kind>`),
`title` (the status phrase), `status`, `detail` (what is wrong and what would be right) and
`request_id` (also sent as `X-Request-Id`, and in the log lines of the request), plus fields
of its own kind (`available`, `errors`, ...). Handlers answer through `handlers.base`'s
`write_error`; the HTTP/1 layer (`server.adapters.http1`) refuses requests no handler sees
(413 before the body, 431, 408, malformed requests) with the same builder.
"""

from __future__ import annotations

import itertools
import re
import uuid
from http import HTTPStatus
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids: a random prefix per process and a counter. Unique without a getrandom()
# system call per request (uuid4 was 2% of a hot read's CPU).
_ID_PREFIX = uuid.uuid4().hex[:12]
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id unique across processes and nodes (random prefix, then a counter)."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def adopt_request_id(offered: str | None) -> str:
    """The caller's `X-Request-Id` when it is well formed (1-128 of `[A-Za-z0-9._:-]`, so it
    is safe in headers and logs), else a new one."""
    return offered if offered and _REQUEST_ID.match(offered) else new_request_id()


# RFC 9110's names where Python 3.11's `HTTPStatus` still has the older ones.
_RFC_9110_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


def status_title(status: int) -> str:
    """The problem `title` of a status (also the reason phrase of its status line)."""
    if status in _RFC_9110_TITLES:
        return _RFC_9110_TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def status_kind(status: int) -> str:
    """The problem kind of an error that has no kind of its own (`405` ->
    `method-not-allowed`): its phrase in lower case, words joined by hyphens."""
    return re.sub(r"[^a-z0-9]+", "-", status_title(status).lower()).strip("-")


def problem(status: int, kind: str, detail: str, request_id: str, **extra: Any) -> dict[str, Any]:
    """The problem details of one error answer (`extra`: fields of its kind)."""
    return {
        "type": f"/problems/{kind}",
        "title": status_title(status),
        "status": status,
        "detail": detail,
        "request_id": request_id,
        **extra,
    }
