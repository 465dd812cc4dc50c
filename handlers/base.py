"""The base of every HTTP handler: request ids, problem+json errors, metrics, JSON bodies."""

from __future__ import annotations

import itertools
import re
import traceback
import uuid
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any

import structlog
import tornado.web

from server.adapters.compression import etag_matches
from server.common.logs import get_logger
from server.wiring.services import Services

_log = get_logger("finalmarket.http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROBLEM_CONTENT_TYPE = "application/problem+json"
# Request ids: a random prefix per process and a counter. Unique without a getrandom()
# system call per request (uuid4 was 2% of a hot read's CPU).
_ID_PREFIX = uuid.uuid4().hex[:12]
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id unique across processes and nodes (random prefix, then a counter)."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


class ApiError(tornado.web.HTTPError):
    """An error a client can act on, rendered as RFC 9457 problem details.

    `kind` becomes the problem `type` (`/problems/<kind>`); `extra` adds fields of our own
    (`product_id`, `available`, ...).
    """

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status, reason=HTTPStatus(status).phrase)
        self.kind = kind
        self.detail = detail
        self.extra = extra
        self.headers = headers or {}


class BaseHandler(tornado.web.RequestHandler):
    """Parent of all handlers: binds the request id, counts requests, renders errors."""

    services: Services
    request_id: str

    def initialize(self, services: Services) -> None:
        """Receive the node's services through the route (never module globals)."""
        self.services = services

    def prepare(self) -> Awaitable[None] | None:
        """Adopt the caller's `X-Request-Id` when it is well formed, or make one."""
        offered = self.request.headers.get("X-Request-Id", "")
        self.request_id = offered if _REQUEST_ID.match(offered) else new_request_id()
        self.set_header("X-Request-Id", self.request_id)
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        self.services.state.request_started()
        self._counted_in_flight = True
        return None

    def on_finish(self) -> None:
        """Invoked after the response is sent: update metrics, drop the log context."""
        if getattr(self, "_counted_in_flight", False):
            self.services.state.request_finished()
            self._counted_in_flight = False
        structlog.contextvars.unbind_contextvars("request_id")

    def check_etag_header(self) -> bool:
        """Tornado's automatic 304, also for the compressed forms of the ETag (`-br`, `-gz`)
        that the compression transform sends."""
        etag = self._headers.get("Etag") or ""
        header = self.request.headers.get("If-None-Match", "")
        return bool(etag and header) and etag_matches(header, etag)

    def write_json(self, body: Any, status: int = 200) -> None:
        """Send `body` as JSON."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(tornado.escape.json_encode(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The single exit for errors: RFC 9457 problem details, tracebacks only in debug."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        problem: dict[str, Any]
        if isinstance(exc, ApiError):
            problem = {
                "type": f"/problems/{exc.kind}",
                "title": exc.reason,
                "status": status_code,
                "detail": exc.detail,
                **exc.extra,
            }
            for name, value in exc.headers.items():
                self.set_header(name, value)
        else:
            title = (
                HTTPStatus(status_code).phrase
                if status_code in HTTPStatus._value2member_map_
                else "Error"
            )
            problem = {"type": "about:blank", "title": title, "status": status_code}
            if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
                problem["detail"] = exc.log_message % exc.args if exc.args else exc.log_message
        request_id = getattr(self, "request_id", None)
        if request_id:
            self.set_header("X-Request-Id", request_id)  # send_error() cleared the headers
        problem["request_id"] = request_id
        if self.settings.get("serve_traceback") and "exc_info" in kwargs:
            problem["traceback"] = traceback.format_exception(*kwargs["exc_info"])
        self.set_header("Content-Type", PROBLEM_CONTENT_TYPE)
        self.finish(tornado.escape.json_encode(problem))


class NotFoundHandler(BaseHandler):
    """Answers every unknown path with a 404 problem."""

    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "not-found", f"no resource at {self.request.path}")
