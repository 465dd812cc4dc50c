"""Sign-up, sign-in and sign-out (CONTRACT "Auth")."""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, Field
from tornado.web import RequestHandler

from handlers.api import CSRF_COOKIE, SESSION_COOKIE, ApiHandler
from handlers.gate import Gate
from handlers.openapi import Operation
from server.adapters.sessions import SESSION_TTL_S, Session
from server.domain.users import MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS, User, UserService


class SignUp(BaseModel):
    """`POST /api/v1/users` body."""

    email: str = Field(min_length=3, max_length=254)
    password: str = Field(min_length=MIN_PASSWORD_CHARS, max_length=MAX_PASSWORD_CHARS)
    name: str = Field(default="", max_length=200)


class SignIn(BaseModel):
    """`POST /api/v1/sessions` body."""

    email: str = Field(min_length=1, max_length=254)
    password: str = Field(min_length=1, max_length=1024)


def set_session_cookies(handler: RequestHandler, token: str, secure: bool) -> None:
    """Set the HTTP-only session cookie and the script-readable CSRF cookie (shared by the
    REST sign-up/sign-in and the storefront's forms)."""
    handler.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        secure=secure,
        samesite="Lax",
        expires_days=SESSION_TTL_S / 86400,
    )
    # Readable by the page's script, which echoes it in X-CSRF-Token (double submit).
    handler.set_cookie(
        CSRF_COOKIE,
        secrets.token_urlsafe(24),
        secure=secure,
        samesite="Lax",
        expires_days=SESSION_TTL_S / 86400,
    )


class _UsersHandler(ApiHandler):
    """Handlers of accounts: they get the node's `UserService`."""

    users: UserService

    def initialize(self, gate: Gate, users: UserService) -> None:  # type: ignore[override]
        super().initialize(gate)
        self.users = users


class _SessionIssuer(_UsersHandler):
    """Shared by sign-up and sign-in: issue a token and the cookies that carry it."""

    async def issue(self, user: User, status: int) -> None:
        token = await self.gate.sessions.create(user.id, user.is_admin)
        set_session_cookies(self, token, self.gate.cookie_secure)
        self.write_json({"user": user.to_dict(), "token": token}, status=status)


class UsersHandler(_SessionIssuer):
    """`POST /api/v1/users`: create an account and sign it in."""

    openapi_path = "/api/v1/users"
    openapi = {
        "POST": Operation(
            "Create an account; answers {user, token} and sets the session cookie",
            ok=201,
            body=SignUp,
            auth="none",
            problems={409: "email taken"},
        )
    }

    async def post(self) -> None:
        body = self.json_body(SignUp)
        user = await self.users.create_user(body.email, body.password, body.name)
        await self.issue(user, 201)


class SessionsHandler(_SessionIssuer):
    """`POST /api/v1/sessions` signs in; `DELETE /api/v1/sessions` signs out."""

    openapi_path = "/api/v1/sessions"
    openapi = {
        "POST": Operation(
            "Sign in; answers {user, token} and sets the session cookie",
            body=SignIn,
            auth="none",
            problems={401: "email or password is wrong"},
        ),
        "DELETE": Operation("Sign out: revoke the token on every node", ok=204, auth="user"),
    }

    async def post(self) -> None:
        body = self.json_body(SignIn)
        user = await self.users.authenticate(body.email, body.password)
        await self.issue(user, 200)

    async def delete(self) -> None:
        self.require_user()
        assert self.token is not None
        await self.gate.sessions.revoke(self.token)
        self.clear_cookie(SESSION_COOKIE)
        self.clear_cookie(CSRF_COOKIE)
        self.set_status(204)
        self.finish()


class MeHandler(_UsersHandler):
    """`GET /api/v1/me`: the caller's account."""

    openapi_path = "/api/v1/me"
    openapi = {"GET": Operation("The caller's account", auth="user")}

    async def get(self) -> None:
        session: Session = self.require_user()
        user = await self.users.get(session.user_id)
        self.write_json(user.to_dict())


def routes(gate: Gate, users: UserService) -> list[Any]:
    """The account and session routes, for `server.wiring.app.make_app`."""
    args = {"gate": gate, "users": users}
    return [
        (r"/api/v1/users", UsersHandler, args),
        (r"/api/v1/sessions", SessionsHandler, args),
        (r"/api/v1/me", MeHandler, args),
    ]
