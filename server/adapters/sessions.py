"""Sessions: opaque bearer tokens kept server-side in Redis, so they can be revoked.

A token is 32 random bytes (URL-safe base64) handed to the client once; Redis stores only its
SHA-256, so a copy of Redis does not hand out working tokens. Keys carry a hash tag of their
own (`{session}:<digest>`) and so live on one cluster slot group per digest.

A revoked token is refused by every node at once (each request reads Redis). Long-lived
connections authenticated by it are another matter: `revoke` then calls `on_revoked` with
the token's digest, which the wiring hands to the realtime layer to close them on every node.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

SESSION_TTL_S = 30 * 24 * 3600
_MAX_TOKEN_CHARS = 256


@dataclass(frozen=True, slots=True)
class Session:
    """Who a token speaks for; `digest` names the session (the token's SHA-256) without
    being a credential."""

    user_id: int
    is_admin: bool
    digest: str = ""


def token_digest(token: str) -> str:
    """The name of the session behind `token` (what Redis keys it by)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _key_of_digest(digest: str) -> str:
    return f"{{session:{digest}}}"


def _key(token: str) -> str:
    return _key_of_digest(token_digest(token))


class SessionStore:
    """Creates, resolves and revokes session tokens in Redis."""

    def __init__(
        self,
        redis: Any,
        ttl_s: int = SESSION_TTL_S,
        on_revoked: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self.on_revoked = on_revoked

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
        return Session(
            user_id=int(fields[b"u"]), is_admin=fields.get(b"a") == b"1", digest=token_digest(token)
        )

    async def revoke(self, token: str) -> None:
        """Make `token` worthless at once, on every node, and have the connections it opened
        closed (`on_revoked`)."""
        await self._redis.delete(_key(token))
        if self.on_revoked is not None:
            await self.on_revoked(token_digest(token))

    async def live(self, digests: Iterable[str]) -> set[str]:
        """Which of the sessions `digests` still exist (one pipelined EXISTS per session)."""
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for digest in wanted:
            pipe.exists(_key_of_digest(digest))
        found = await pipe.execute()
        return {digest for digest, exists in zip(wanted, found, strict=True) if exists}
