"""The base of every HTTP handler: request ids, problem+json errors, metrics, JSON bodies."""

from __future__ import annotations

import traceback
from collections.abc import Awaitable
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
from server.common.problems import (
    PROBLEM_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    adopt_request_id,
    problem,
    status_kind,
    status_title,
)

_log = get_logger("finalmarket.http")
_METHOD_DEFAULTS = {
    method: getattr(tornado.web.RequestHandler, method.lower())
    for method in tornado.web.RequestHandler.SUPPORTED_METHODS
}


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
        super().__init__(status, reason=status_title(status))
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
        """Adopt the caller's `X-Request-Id` when it is well formed, or make one. A made one
        is written into the request's headers too, so a refusal the HTTP layer makes after
        this point (a streamed body passing its limit: `server.adapters.http1`) answers with
        the id this request is logged under, not yet another one."""
        offered = self.request.headers.get(REQUEST_ID_HEADER)
        self.request_id = adopt_request_id(offered)
        if self.request_id != offered:
            self.request.headers[REQUEST_ID_HEADER] = self.request_id
        self.set_header(REQUEST_ID_HEADER, self.request_id)
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

    def allowed_methods(self) -> list[str]:
        """The methods this handler implements (the `Allow` header of its 405s)."""
        return [
            method
            for method in self.SUPPORTED_METHODS
            if getattr(type(self), method.lower(), None) is not _METHOD_DEFAULTS.get(method)
        ]

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
                kwargs.pop("exc_info")  # an answer, not a failure: no traceback even in debug
        return exc, status_code

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The single exit for errors: RFC 9457 problem details (`server.common.problems`:
        the same fields on every answer), tracebacks only in debug.

        A domain error (or a driver failure the adapters map to one) is rendered as the problem
        of its kind, with its status; Tornado's own errors (a 405 for a method the handler does
        not implement, a 400 for a missing argument, a 500) get the kind of their status."""
        exc, status_code = self.answer_of(status_code, kwargs)
        if not isinstance(exc, ApiError):
            exc = self._problem_of_status(status_code, exc)
        for name, value in exc.headers.items():
            self.set_header(name, value)
        # A method outside SUPPORTED_METHODS is refused before prepare() names the request.
        if not getattr(self, "request_id", None):
            self.request_id = adopt_request_id(self.request.headers.get(REQUEST_ID_HEADER))
        self.set_header(REQUEST_ID_HEADER, self.request_id)  # send_error() cleared the headers
        body = problem(status_code, exc.kind, exc.detail, self.request_id, **exc.extra)
        if self.settings.get("serve_traceback") and "exc_info" in kwargs:
            body["traceback"] = traceback.format_exception(*kwargs["exc_info"])
        self.set_header("Content-Type", PROBLEM_CONTENT_TYPE)
        self.finish(tornado.escape.json_encode(body))

    def _problem_of_status(self, status: int, exc: BaseException | None) -> ApiError:
        """The problem of an error that is not an `ApiError`: Tornado's `HTTPError`s and
        failures (500), with a detail a client can act on."""
        method, path = self.request.method, self.request.path
        if status == 405:
            allowed = self.allowed_methods()
            return ApiError(
                405,
                "method-not-allowed",
                f"{method} is not allowed on {path}; use {', '.join(allowed) or 'nothing'}",
                headers={"Allow": ", ".join(allowed)},
                allowed=allowed,
            )
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            detail = exc.log_message % exc.args if exc.args else exc.log_message
        elif status >= 500:
            detail = "the server failed to answer; the request id names the failure in its logs"
        else:
            detail = f"{method} {path} was refused ({status})"
        return ApiError(status, status_kind(status), detail)


class NotFoundHandler(BaseHandler):
    """Answers every unknown path with a 404 problem."""

    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "not-found", f"no resource at {self.request.path}")
