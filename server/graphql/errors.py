"""GraphQL errors with a machine-readable `extensions.code`.

Two kinds:
- request errors (`GraphQLRequestError`) stop a request before any resolver runs: unreadable
  request, document too large, parse or validation failure, unknown operation, variables of
  the wrong type, cost or depth over the limit, throttled, unknown persisted query;
- field errors come from resolvers: domain errors (`server.common.errors`) keep their kind as the code
  (`NOT_FOUND`, `OUT_OF_STOCK`, `INVALID_INPUT`, ...) and their fields (`product_id`,
  `available`) beside it; unexpected exceptions become `INTERNAL_SERVER_ERROR` with a generic
  message (the exception goes to the log, not to the client).
"""

from __future__ import annotations

from typing import Any

import psycopg2
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tartiflette import TartifletteError

from server.common.errors import DomainError
from server.common.logs import get_logger

_log = get_logger("finalmarket.graphql")

# Codes of request errors (besides the domain kinds of field errors).
BAD_REQUEST = "BAD_REQUEST"
PARSE_FAILED = "GRAPHQL_PARSE_FAILED"
VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"
BAD_USER_INPUT = "BAD_USER_INPUT"
OPERATION_RESOLUTION_FAILURE = "OPERATION_RESOLUTION_FAILURE"
OPERATION_NOT_SUPPORTED = "OPERATION_NOT_SUPPORTED"
MAX_COST_EXCEEDED = "MAX_COST_EXCEEDED"
MAX_DEPTH_EXCEEDED = "MAX_DEPTH_EXCEEDED"
THROTTLED = "THROTTLED"
PERSISTED_QUERY_NOT_FOUND = "PERSISTED_QUERY_NOT_FOUND"
PERSISTED_QUERY_NOT_SUPPORTED = "PERSISTED_QUERY_NOT_SUPPORTED"
PERSISTED_QUERY_HASH_MISMATCH = "PERSISTED_QUERY_HASH_MISMATCH"
UNAUTHENTICATED = "UNAUTHENTICATED"
FORBIDDEN = "FORBIDDEN"
SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
SUBSCRIPTION_LAGGED = "SUBSCRIPTION_LAGGED"
INTERNAL_SERVER_ERROR = "INTERNAL_SERVER_ERROR"


def error(message: str, code: str, **extensions: Any) -> dict[str, Any]:
    """One GraphQL error object."""
    return {"message": message, "extensions": {"code": code, **extensions}}


class GraphQLRequestError(Exception):
    """The request is refused before execution; `errors` are the response's errors."""

    def __init__(self, code: str, message: str, **extensions: Any) -> None:
        super().__init__(message)
        self.code = code
        self.errors: list[dict[str, Any]] = [error(message, code, **extensions)]

    @classmethod
    def with_errors(cls, code: str, errors: list[dict[str, Any]]) -> GraphQLRequestError:
        """A refusal carrying several errors (validation), each stamped with `code`."""
        refused = cls(code, errors[0]["message"] if errors else code)
        refused.errors = [
            {**e, "extensions": {**(e.get("extensions") or {}), "code": code}} for e in errors
        ]
        return refused


class Unauthenticated(DomainError):
    """The field needs a signed-in caller."""

    kind = "unauthenticated"


class Forbidden(DomainError):
    """The caller may not do this (e.g. not an administrator)."""

    kind = "forbidden"


def code_of(kind: str) -> str:
    """`out-of-stock` -> `OUT_OF_STOCK` (domain kinds become GraphQL codes)."""
    if kind == "unauthorized":
        return UNAUTHENTICATED
    return kind.upper().replace("-", "_")


def is_overload(exc: BaseException) -> bool:
    """Failures meaning "busy or briefly unreachable": the client may retry."""
    return isinstance(
        exc, TimeoutError | psycopg2.OperationalError | RedisConnectionError | RedisTimeoutError
    )


def describe_exception(exc: BaseException | None) -> dict[str, Any]:
    """`{"code": ..., **fields}` and the client-facing message for an exception a resolver
    raised; unexpected ones are logged and hidden behind a generic message."""
    if isinstance(exc, DomainError):
        return {"message": exc.detail, "extensions": {"code": code_of(exc.kind), **exc.fields}}
    if exc is not None and is_overload(exc):
        _log.warning("graphql_unavailable", error=repr(exc))
        return {
            "message": "a backing service is busy or down; retry",
            "extensions": {"code": SERVICE_UNAVAILABLE},
        }
    _log.error("graphql_resolver_failed", error=repr(exc), exc_info=exc)
    return {"message": "internal error", "extensions": {"code": INTERNAL_SERVER_ERROR}}


async def coerce_error(exception: Exception, coerced: dict[str, Any]) -> dict[str, Any]:
    """tartiflette's error coercer: add `extensions.code` to every error it reports.

    Errors wrapping a resolver's exception are described by `describe_exception`; the
    engine's own errors (argument coercion, unknown operation) are `BAD_USER_INPUT`.
    """
    original = getattr(exception, "original_error", None)
    if original is None:
        if isinstance(exception, TartifletteError):
            # The engine's own complaint (a resolver broke its type's promise, e.g. null for
            # a non-null field): the message says what; the client cannot fix it.
            extensions = coerced.get("extensions") or {}
            coerced["extensions"] = {
                **extensions,
                "code": extensions.get("code", INTERNAL_SERVER_ERROR),
            }
            return coerced
        original = exception
    described = describe_exception(original)
    coerced["message"] = described["message"]
    coerced["extensions"] = described["extensions"]
    return coerced
