"""Accounts for the tests: users created through the domain service, signed in with a bearer
token."""

from __future__ import annotations

from server.domain.users import UserService
from server.wiring.services import Services


async def token_for(services: Services, email: str, *, admin: bool) -> str:
    user = await UserService(services.router).create_user(
        email, "correct horse", "Tester", is_admin=admin
    )
    return await services.sessions.create(user.id, admin)
