"""Domain errors: what went wrong in the product's words, free of HTTP.

Handlers translate them into problem details (`handlers.base`); domain code raises them.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of errors a caller can act on. `kind` names the problem type; `fields` add detail."""

    kind = "domain-error"

    def __init__(self, detail: str, **fields: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fields = fields


class InvalidInput(DomainError):
    """The request asks for something malformed or out of range."""

    kind = "invalid-input"


class NotFound(DomainError):
    """The thing named does not exist (or is not the caller's to see)."""

    kind = "not-found"


class Conflict(DomainError):
    """The request contradicts the current state (taken email, stale version, no stock)."""

    kind = "conflict"


class Unauthenticated(DomainError):
    """The credentials given do not identify anyone."""

    kind = "unauthorized"


class Unavailable(DomainError):
    """A backing service (a database, Redis) is busy or briefly unreachable: the same request
    may succeed shortly, on this node or another. Adapters raise it in place of driver errors
    (`server.adapters.faults.as_domain_error`)."""

    kind = "temporarily-unavailable"
    retry_after_s = 1
