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

from handlers.gate import Gate
from server.adapters.compression import etag_matches
from server.adapters.faults import as_domain_error
from server.common.errors import (
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from server.common.logs import get_logger

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


_STATUS_OF: dict[type[DomainError], int] = {
    InvalidInput: 422,
    NotFound: 404,
    Conflict: 409,
    Unauthenticated: 401,
    Unavailable: 503,
}


def problem_from(error: DomainError) -> ApiError:
    """The HTTP problem for a domain error (its kind and fields travel unchanged)."""
    status = next((code for cls, code in _STATUS_OF.items() if isinstance(error, cls)), 400)
    headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, Unavailable) else None
    return ApiError(status, error.kind, error.detail, headers=headers, **error.fields)


class BaseHandler(tornado.web.RequestHandler):
    """Parent of all handlers: binds the request id, counts requests, renders errors."""

    gate: Gate
    request_id: str

    def initialize(self, gate: Gate) -> None:
        """Receive the node's admission policy through the route (never module globals);
        subclasses take the domain services they use as further arguments."""
        self.gate = gate

    def prepare(self) -> Awaitable[None] | None:
        """Adopt the caller's `X-Request-Id` when it is well formed, or make one."""
        offered = self.request.headers.get("X-Request-Id", "")
        self.request_id = offered if _REQUEST_ID.match(offered) else new_request_id()
        self.set_header("X-Request-Id", self.request_id)
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        self.gate.lifecycle.request_started()
        self._counted_in_flight = True
        return None

    def on_finish(self) -> None:
        """Invoked after the response is sent: update metrics, drop the log context."""
        if getattr(self, "_counted_in_flight", False):
            self.gate.lifecycle.request_finished()
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

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        """Invoked by Tornado for an exception that left a handler method. Domain errors are
        answers, not failures: logged in one line without a traceback (a busy or unreachable
        backing service as a warning); anything else is logged as Tornado does."""
        domain = as_domain_error(value) if value is not None else None
        if isinstance(domain, Unavailable):
            _log.warning("unavailable", error=repr(value))
        elif domain is not None:
            _log.info("domain_error", kind=domain.kind, detail=domain.detail)
        else:
            super().log_exception(typ, value, tb)

    def answer_of(self, status_code: int, kwargs: dict[str, Any]) -> tuple[Any, int]:
        """The exception `send_error` was given and the status to answer with: a domain error
        (or a driver failure the adapters map to one) becomes the problem of its kind, with its
        status, and its traceback is dropped (an answer, not a failure)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if exc is not None and not isinstance(exc, tornado.web.HTTPError):
            domain = as_domain_error(exc)
            if domain is not None:
                exc = problem_from(domain)
                status_code = exc.status_code
                self.set_status(status_code)
                kwargs.pop("exc_info")
        return exc, status_code

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The single exit for errors: RFC 9457 problem details, tracebacks only in debug.

        A domain error (or a driver failure the adapters map to one) is rendered as the problem
        of its kind, with its status."""
        exc, status_code = self.answer_of(status_code, kwargs)
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
