"""Resumable sessions of the extended protocol (AnyCable's), kept in Redis for every node.

A session is what a connection would need to come back without asking again: who it speaks
for and which subscriptions (identifier and stream) it holds. Each extended connection gets a
session id (`sid`, in its `welcome`); the session is written when its subscriptions change,
rewritten every third of the TTL while the connection lives and once more when it goes, and
expires `FM_CABLE_SESSION_TTL_S` after the last write. A client that reconnects with
`?sid=<previous>` (or `X-AnyCable-Restore-SID`) to any node gets those subscriptions back
without their channels' authorisation running again.

A sid is not a credential: a session is restored only for a connection that signs in as the
same user as the one that left it (or, for an anonymous session, signs in as nobody).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import msgpack

from server.common.logs import get_logger

_log = get_logger("finalmarket.cable_sessions")
_SID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_sid() -> str:
    """A fresh session id (128 random bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def session_key(sid: str) -> str:
    """The Redis key of a session (its own hash tag: one slot per session on a cluster)."""
    return "{cable-session:" + sid + "}"


@dataclass(frozen=True, slots=True)
class CableSession:
    """What a connection left behind: its user (None: anonymous) and its subscriptions as
    (identifier, stream) pairs, in the order they were made."""

    user_id: int | None
    subscriptions: list[tuple[str, str]]

    def to_bytes(self) -> bytes:
        """The stored form (msgpack)."""
        packed: bytes = msgpack.packb({"u": self.user_id, "s": self.subscriptions})
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> CableSession:
        """Parse the stored form; raises ValueError when it is not one."""
        try:
            raw = msgpack.unpackb(data)
            user_id, subscriptions = raw["u"], raw["s"]
            pairs = [(str(identifier), str(stream)) for identifier, stream in subscriptions]
        except Exception as exc:
            raise ValueError(f"not a stored cable session: {exc!r}") from None
        if user_id is not None and not isinstance(user_id, int):
            raise ValueError("not a stored cable session: bad user id")
        return cls(user_id, pairs)


class CableSessions:
    """Stores and loads sessions in Redis; a TTL of 0 stores nothing (nothing can be restored)."""

    def __init__(self, redis: Any, ttl_s: int) -> None:
        self._redis = redis
        self.ttl_s = ttl_s

    async def save(self, sessions: dict[str, CableSession]) -> None:
        """Write `sessions` (by sid), each expiring after the TTL, in one round trip."""
        if not sessions or self.ttl_s <= 0:
            return
        pipe = self._redis.pipeline(transaction=False)
        for sid, session in sessions.items():
            pipe.set(session_key(sid), session.to_bytes(), ex=self.ttl_s)
        await pipe.execute()

    async def load(self, sid: str) -> CableSession | None:
        """The session left under `sid`, or None (unknown, expired, malformed sid or data)."""
        if self.ttl_s <= 0 or not _SID.fullmatch(sid):
            return None
        data = await self._redis.get(session_key(sid))
        if data is None:
            return None
        try:
            return CableSession.from_bytes(data)
        except ValueError as exc:
            _log.warning("cable_session_unreadable", error=str(exc))
            return None
