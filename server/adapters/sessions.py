"""Sessions: opaque bearer tokens kept server-side, so they can be revoked.

A token is 32 random bytes (URL-safe base64) handed to the client once; only its SHA-256 is
stored, so a copy of the database or of Redis does not hand out working tokens.

The record is a row of the catalog database's `sessions` table: a Redis that loses its data,
or fails over before replicating the last writes, signs nobody out. Redis holds a copy of each
session in use (`{session:<digest>}`, its own hash tag) for `COPY_TTL_S`, which requests read;
when it has none, the row is read (on the primary) and copied again, and an unknown token is
remembered as unknown for `UNKNOWN_TTL_S` so a flood of made-up tokens does not reach the
database. `revoke` deletes the row first, then the copy: a copy Redis brings back (a failover
that lost the delete) is trusted for at most `COPY_TTL_S`, not for the session's lifetime,
and on a Redis Cluster not even that: after an unplanned failover every node drops the copies
in the promoted master's slots (`redis_lost_writes`), so the next request reads the row.

A revoked token is refused by every node at once (each request reads Redis). Long-lived
connections authenticated by it are another matter: `revoke` then calls `on_revoked` with
the token's digest, which the wiring hands to the realtime layer to close them on every node.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from server.adapters.redis_client import keys_in_slots
from server.common.logs import get_logger

SESSION_TTL_S = 30 * 24 * 3600
COPY_TTL_S = 60  # how long Redis' copy of a session is trusted before the row is read again
UNKNOWN_TTL_S = 5  # how long a token with no row is remembered as unknown
_MAX_TOKEN_CHARS = 256
_log = get_logger("finalmarket.sessions")
# Redis' copy of a session: KEYS: the copy. ARGV: user id, admin (0/1), TTL, and 1 to leave
# a copy that exists alone (a row read before a revoke must not overwrite its tombstone).
_COPY = """
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[1] == '' then
  redis.call('HSET', KEYS[1], 'x', 1)
else
  redis.call('HSET', KEYS[1], 'u', ARGV[1], 'a', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


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


class SessionStore:
    """Creates, resolves and revokes session tokens: rows in the catalog database, copies in
    Redis."""

    def __init__(
        self,
        redis: Any,
        router: Any,
        ttl_s: int = SESSION_TTL_S,
        on_revoked: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`router` is the node's `ShardRouter` (the catalog database holds the rows)."""
        self._redis = redis
        self._copy_script = redis.register_script(_COPY)
        self._router = router
        self._ttl_s = ttl_s
        self.on_revoked = on_revoked

    async def create(self, user_id: int, is_admin: bool = False) -> str:
        """A new token for `user_id`, recorded before it is handed out."""
        token = secrets.token_urlsafe(32)
        digest = token_digest(token)
        async with self._router.catalog_write() as cur:
            await cur.execute(
                "INSERT INTO sessions (digest, user_id, is_admin, expires_at) "
                "VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
                (digest, user_id, is_admin, self._ttl_s),
            )
            if secrets.randbelow(100) == 0:  # now and then, forget sessions long expired
                await cur.execute("DELETE FROM sessions WHERE expires_at < now()")
        await self._copy(digest, user_id, is_admin, min(COPY_TTL_S, self._ttl_s), first=False)
        return token

    async def resolve(self, token: str) -> Session | None:
        """The session behind `token`, or None if it is unknown, expired or revoked."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = token_digest(token)
        fields = await self._redis.hgetall(_key_of_digest(digest))
        if fields:
            if b"u" not in fields:
                return None  # remembered as unknown
            return Session(int(fields[b"u"]), fields.get(b"a") == b"1", digest)
        row = await self._row(digest)
        if row is None:
            await self._copy(digest, None, False, UNKNOWN_TTL_S, first=True)
            return None
        user_id, is_admin, left_s = row
        await self._copy(digest, user_id, is_admin, max(1, min(COPY_TTL_S, left_s)), first=True)
        return Session(user_id, is_admin, digest)

    async def revoke(self, token: str) -> None:
        """Make `token` worthless at once, on every node, and have the connections it opened
        closed (`on_revoked`)."""
        digest = token_digest(token)
        async with self._router.catalog_write() as cur:
            await cur.execute("DELETE FROM sessions WHERE digest = %s", (digest,))
        # A tombstone, not a delete: a request that read the row just before cannot copy it
        # back while the copy it read would have been trusted.
        await self._copy(digest, None, False, COPY_TTL_S, first=False)
        if self.on_revoked is not None:
            await self.on_revoked(digest)

    async def live(self, digests: Iterable[str]) -> set[str]:
        """Which of the sessions `digests` still exist: Redis' copies, and the rows of those
        Redis has no copy of."""
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for digest in wanted:
            pipe.hgetall(_key_of_digest(digest))
        copies = await pipe.execute()
        found = {digest for digest, copy in zip(wanted, copies, strict=True) if b"u" in copy}
        unsure = [digest for digest, copy in zip(wanted, copies, strict=True) if not copy]
        if unsure:
            async with self._router.catalog_read(fresh=True) as cur:
                await cur.execute(
                    "SELECT digest FROM sessions WHERE digest = ANY(%s) AND expires_at > now()",
                    (unsure,),
                )
                found.update(row[0] for row in await cur.fetchall())
        return found

    async def _row(self, digest: str) -> tuple[int, bool, int] | None:
        """(user id, admin, seconds left) of the session's row, read on the primary (a
        replica might still show a session revoked a moment ago)."""
        async with self._router.catalog_read(fresh=True) as cur:
            await cur.execute(
                "SELECT user_id, is_admin, "
                "ceil(extract(epoch FROM expires_at - now()))::int FROM sessions "
                "WHERE digest = %s AND expires_at > now()",
                (digest,),
            )
            row = await cur.fetchone()
        return None if row is None else (int(row[0]), bool(row[1]), int(row[2]))

    async def _copy(
        self, digest: str, user_id: int | None, is_admin: bool, ttl_s: int, *, first: bool
    ) -> None:
        """Redis' copy of the session (None: "no such session") for `ttl_s`; with `first`,
        only where Redis has none."""
        await self._copy_script(
            keys=[_key_of_digest(digest)],
            args=["" if user_id is None else user_id, int(is_admin), ttl_s, int(first)],
        )

    async def redis_lost_writes(self, slots: Collection[int]) -> None:
        """Redis Cluster lost the last writes of `slots` (their master failed over unplanned),
        revocations' tombstones among them: drop every session copy there, so the next request
        of each reads its row (gone if revoked) instead of a copy the lost tombstone replaced.
        Every node does it; a copy dropped twice costs one more row read."""
        if not isinstance(self._redis, RedisCluster):
            return
        copies = await keys_in_slots(self._redis, slots, "{session:*}", "hash")
        for start in range(0, len(copies), 1000):
            pipe = self._redis.pipeline(transaction=False)
            for key in copies[start : start + 1000]:
                # as a plain command: the cluster client's `unlink` splits keys by slot itself
                # and is a coroutine, which a pipeline would never run
                pipe.execute_command("UNLINK", key)
            await pipe.execute()
        _log.warning("session_copies_dropped_after_lost_writes", copies=len(copies))
