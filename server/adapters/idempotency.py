"""Replay protection for cart changes sent with an `Idempotency-Key` (offline replays).

The storefront's service worker queues cart requests made offline and replays them when the
network returns; a replay of a request that did reach the server (the answer was lost) must
not add the item twice. So `POST/PATCH/DELETE /api/v1/cart/items*` accept an optional
`Idempotency-Key`: the first request with a key claims it in Redis (`SET NX`, 24 h), runs,
and stores its answer under the key; a later request by the same user with the same key gets
that answer back without running again.

- A replay while the first is still running: `InProgress` (the handler answers 409 with
  `Retry-After`), so two copies racing on two nodes still apply once.
- The same key with a different request (method, path or body): `KeyReused` (422): a key
  names one request, and silently answering another one's result would hide a client bug.
- A request that fails (a domain error or a crash) releases its claim, so the client's retry
  runs again: only answers that changed the cart are remembered.

Keys live per user (`{idem}:cart:<user>:<sha256 of the key>`), so one user cannot see or
block another's answers. Redis is the fast path, not the guarantee: a master's death can lose
a key it acknowledged, so each cart change also records its key in its own shard transaction
(`server.domain.carts.Once`) and a replay Redis forgot is answered from there. (Checkout has
its own, durable idempotency in the user's shard.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

TTL_S = 24 * 3600
MAX_KEY_CHARS = 255
_PENDING = "pending"


class InProgress(Exception):
    """Another request with this key is still running."""


class KeyReused(Exception):
    """This key was used for a different request."""


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """The first answer to a keyed request."""

    status: int
    body: Any


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same request" for a key."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class IdempotencyStore:
    """Claims, answers and releases of idempotency keys in Redis (shared by every node)."""

    def __init__(self, redis: Any, scope: str = "cart", ttl_s: int = TTL_S) -> None:
        self._redis = redis
        self.scope = scope
        self.ttl_s = ttl_s

    def _key(self, user_id: int, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{{idem}}:{self.scope}:{user_id}:{digest}"

    async def claim(self, user_id: int, key: str, request_fingerprint: str) -> StoredAnswer | None:
        """None: the key is ours now, run the request then `store` or `release`. Otherwise
        the first answer; raises `InProgress` or `KeyReused` as described above."""
        name = self._key(user_id, key)
        pending = json.dumps({"state": _PENDING, "fingerprint": request_fingerprint})
        if await self._redis.set(name, pending, nx=True, ex=self.ttl_s):
            return None
        raw = await self._redis.get(name)
        if raw is None:  # released or expired between the two commands: try once more
            if await self._redis.set(name, pending, nx=True, ex=self.ttl_s):
                return None
            raise InProgress()
        entry = json.loads(raw)
        if entry.get("fingerprint") != request_fingerprint:
            raise KeyReused()
        if entry.get("state") == _PENDING:
            raise InProgress()
        return StoredAnswer(int(entry["status"]), entry["body"])

    async def store(
        self, user_id: int, key: str, request_fingerprint: str, status: int, body: Any
    ) -> None:
        """Remember the answer of a claimed key (for the rest of its 24 h)."""
        entry = {"state": "done", "fingerprint": request_fingerprint, "status": status}
        entry["body"] = body
        await self._redis.set(self._key(user_id, key), json.dumps(entry), ex=self.ttl_s)

    async def release(self, user_id: int, key: str) -> None:
        """Forget a claim whose request failed, so a retry runs."""
        await self._redis.delete(self._key(user_id, key))
