"""Sessions: opaque bearer tokens kept server-side in Redis, so they can be revoked.

A token is 32 random bytes (URL-safe base64) handed to the client once; Redis stores only its
SHA-256, so a copy of Redis does not hand out working tokens. Keys carry a hash tag of their
own (`{session}:<digest>`) and so live on one cluster slot group per digest.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

SESSION_TTL_S = 30 * 24 * 3600
_MAX_TOKEN_CHARS = 256


@dataclass(frozen=True, slots=True)
class Session:
    """Who a token speaks for."""

    user_id: int
    is_admin: bool


def _key(token: str) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f"{{session:{digest}}}"


class SessionStore:
    """Creates, resolves and revokes session tokens in Redis."""

    def __init__(self, redis: Any, ttl_s: int = SESSION_TTL_S) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def create(self, user_id: int, is_admin: bool = False) -> str:
        """A new token for `user_id`."""
        token = secrets.token_urlsafe(32)
        await self._redis.hset(_key(token), mapping={"u": user_id, "a": int(is_admin)})
        await self._redis.expire(_key(token), self._ttl_s)
        return token

    async def resolve(self, token: str) -> Session | None:
        """The session behind `token`, or None if it is unknown, expired or revoked."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        fields = await self._redis.hgetall(_key(token))
        if not fields:
            return None
        return Session(user_id=int(fields[b"u"]), is_admin=fields.get(b"a") == b"1")

    async def revoke(self, token: str) -> None:
        """Make `token` worthless at once, on every node."""
        await self._redis.delete(_key(token))
