"""Resolvers of `users.graphql`: the caller's own account."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.graphql.compiled import direct, renamed
from server.graphql.context import RequestContext

SDL = Path(__file__).with_suffix(".graphql")


async def me(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Query.me`: null for anonymous callers."""
    if ctx.session is None:
        return None
    return await ctx.loaders.user.load(ctx.session.user_id)


is_admin = renamed("is_admin")


@direct
def created_at(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    return parent.created_at.isoformat()


RESOLVERS = {"Query.me": me, "User.isAdmin": is_admin, "User.createdAt": created_at}
SUBSCRIPTIONS: dict[str, Any] = {}
