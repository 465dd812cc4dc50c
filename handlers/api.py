"""The base of `/api/v1` handlers: authentication, CSRF, rate limits, JSON bodies.

Authentication (CONTRACT "Auth"): `Authorization: Bearer <token>` or the HTTP-only session
cookie. Unsafe methods authenticated by the cookie must carry the double-submit CSRF token
(`X-CSRF-Token` equal to the `fm_csrf` cookie), so another site cannot ride the cookie;
bearer tokens are not sent by browsers on their own and need no CSRF token.

Rate limits: every request draws from a per-IP GCRA bucket; authenticated requests also from
a per-user bucket. Refusals are 429 problems with `Retry-After` and `RateLimit*` headers;
allowed requests carry the `RateLimit*` headers of the tighter bucket.
"""

from __future__ import annotations

import hmac
import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from handlers.base import ApiError, BaseHandler
from handlers.openapi import Documented
from server.adapters.ratelimit import Decision, Limit
from server.adapters.sessions import Session
from server.common import jsontext
from server.common.logs import get_logger

SESSION_COOKIE = "fm_session"
CSRF_COOKIE = "fm_csrf"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Body = TypeVar("Body", bound=BaseModel)
_log = get_logger("finalmarket.api")


class SessionHandler(BaseHandler):
    """Parent of handlers that authenticate like the REST API (bearer token or session cookie
    with CSRF) and share its rate limits; `self.session` is the caller's session or None."""

    session: Session | None = None
    token: str | None = None
    _authenticated_by_cookie = False

    async def prepare(self) -> None:
        super().prepare()
        length = int(self.request.headers.get("Content-Length") or 0)
        if length > self.max_body_bytes():
            raise ApiError(
                413,
                "body-too-large",
                f"request body is {length} bytes; at most {self.max_body_bytes()} are accepted",
            )
        await self._rate_limit(self.gate.ip_limit, f"ip:{self.request.remote_ip}")
        await self._authenticate()
        if self.session is not None:
            await self._rate_limit(self.gate.user_limit, f"user:{self.session.user_id}")
        if self._authenticated_by_cookie and self.request.method not in _SAFE_METHODS:
            self._check_csrf()

    def max_body_bytes(self) -> int:
        """The largest request body this handler accepts (413 beyond it). Override for
        handlers that take more than JSON, such as uploads."""
        return self.gate.max_body_bytes

    # --- authentication ---------------------------------------------------------------------

    async def _authenticate(self) -> None:
        authorization = self.request.headers.get("Authorization", "")
        token: str | None = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise ApiError(401, "unauthorized", "Authorization must be `Bearer <token>`")
            token = value.strip()
        elif cookie := self.get_cookie(SESSION_COOKIE):
            token = cookie
            self._authenticated_by_cookie = True
        if token is None:
            return
        self.session = await self.gate.sessions.resolve(token)
        if self.session is None:
            raise ApiError(401, "unauthorized", "the token is unknown, expired or revoked")
        self.token = token

    def require_user(self) -> Session:
        """The signed-in caller, or a 401 problem."""
        if self.session is None:
            raise ApiError(
                401,
                "unauthorized",
                "sign in first (Authorization: Bearer <token> or the session cookie)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return self.session

    def require_admin(self) -> Session:
        """The signed-in admin, or a 401/403 problem."""
        session = self.require_user()
        if not session.is_admin:
            raise ApiError(403, "forbidden", "this needs an administrator")
        return session

    def _check_csrf(self) -> None:
        expected = self.get_cookie(CSRF_COOKIE) or ""
        offered = self.request.headers.get(CSRF_HEADER, "")
        if not expected or not hmac.compare_digest(expected, offered):
            raise ApiError(
                403,
                "csrf",
                f"cookie-authenticated {self.request.method} needs the {CSRF_HEADER} header "
                f"equal to the {CSRF_COOKIE} cookie",
            )

    # --- rate limits ------------------------------------------------------------------------

    async def _rate_limit(self, limit: Limit, key: str) -> None:
        decision: Decision = await self.gate.rate_limiter.check(limit, key)
        for name, value in decision.headers().items():
            if name != "Retry-After" or not decision.allowed:
                self.set_header(name, value)
        if not decision.allowed:
            headers = decision.headers()
            wait = headers.get("Retry-After")  # the body says what the header says
            raise ApiError(
                429,
                "rate-limited",
                f"too many requests; retry after {wait}s"
                if wait
                else f"this request costs more than the {limit.name} limit allows at once",
                headers=headers,
            )

    # --- bodies -------------------------------------------------------------------------------

    def json_body(self, model: type[Body]) -> Body:
        """The request body parsed as JSON and validated by `model` (400/415/422 otherwise)."""
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "unsupported-media-type", "send the body as application/json")
        try:
            raw = jsontext.loads(self.request.body or b"null")
        except json.JSONDecodeError as exc:
            raise ApiError(
                400, "malformed-json", f"body is not JSON: {exc.msg} at position {exc.pos}"
            ) from None
        except jsontext.LoneSurrogate as exc:
            raise ApiError(400, "malformed-json", f"body is not valid JSON text: {exc}") from None
        except UnicodeDecodeError:
            raise ApiError(400, "malformed-json", "body is not UTF-8") from None
        if not isinstance(raw, dict):
            raise ApiError(422, "invalid-body", "the body must be a JSON object")
        try:
            return model.model_validate(raw, strict=False)
        except ValidationError as exc:
            errors = [
                {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
                for e in exc.errors()
            ]
            raise ApiError(
                422,
                "invalid-body",
                "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                errors=errors,
            ) from None


class ApiHandler(SessionHandler, Documented):
    """Parent of REST handlers (each documented in the OpenAPI document)."""
