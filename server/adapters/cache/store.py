"""The cache's Redis side: versioned reads, load locks and writes, one script each.

A read is one round trip: the script resolves the namespace and entity versions, GETs the value
at that version with its PTTL, and on a miss tries to take the load lock (`SET NX PX`) in the
same call, so the node that misses first learns at once that it is the one to load. The value
and lock keys are derived inside the script from the declared version keys; all of them carry
the namespace's hash tag, so they are on the declared keys' slot and the script is Cluster-safe.

Values are msgpack `[value, delta_s]`: the payload and how long its load took (for XFetch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from server.adapters.cache import keys

_READ = """
local nv = redis.call('GET', KEYS[1]) or '0'
local ev = redis.call('GET', KEYS[2]) or '0'
local version = nv .. '.' .. ev
local vkey = ARGV[1] .. 'v' .. version .. ':' .. ARGV[2]
local raw = redis.call('GET', vkey)
if raw then
  return {version, raw, redis.call('PTTL', vkey), 0}
end
local lkey = ARGV[1] .. 'lock:v' .. version .. ':' .. ARGV[2]
local locked = redis.call('SET', lkey, ARGV[3], 'NX', 'PX', ARGV[4])
return {version, false, 0, locked and 1 or 0}
"""

_POLL = """
local raw = redis.call('GET', KEYS[1])
if raw then
  return {raw, redis.call('PTTL', KEYS[1]), 0}
end
local locked = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
return {false, 0, locked and 1 or 0}
"""

_STORE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Found:
    """A value read from Redis: payload, load duration and time left before it expires."""

    value: Any
    delta_s: float
    ttl_left_s: float


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What a read saw: the version resolved, the value if present, and on a miss whether
    this caller now holds the load lock."""

    version: str
    found: Found | None
    locked: bool


def pack(value: Any, delta_s: float) -> bytes:
    """The stored form of `value` (msgpack) with its load duration."""
    return msgpack.packb([value, delta_s], use_bin_type=True)


def _found(raw: bytes, pttl_ms: int) -> Found:
    value, delta_s = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    ttl_left = pttl_ms / 1000 if pttl_ms >= 0 else float("inf")  # -1: no expiry
    return Found(value, float(delta_s), ttl_left)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """Reads, locks and writes cached values of any namespace."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._read = redis.register_script(_READ)
        self._poll = redis.register_script(_POLL)
        self._store = redis.register_script(_STORE)
        self._unlock = redis.register_script(_UNLOCK)

    async def read(self, ns: str, ident: str, token: str, lock_ms: int) -> ReadResult:
        """The current value of `ident`; on a miss, also try to take its load lock."""
        version, raw, pttl, locked = await self._read(
            keys=[keys.version_key(ns, ident), keys.entity_version_key(ns, ident)],
            args=[keys.prefix(ns, ident), ident, token, lock_ms],
        )
        found = None if raw is None else _found(raw, int(pttl))
        return ReadResult(_text(version), found, bool(locked))

    async def poll(
        self, ns: str, ident: str, version: str, token: str, lock_ms: int
    ) -> tuple[Found | None, bool]:
        """(value, None) once another loader stored it; else whether the lock is now ours."""
        raw, pttl, locked = await self._poll(
            keys=[keys.value_key(ns, version, ident), keys.lock_key(ns, version, ident)],
            args=[token, lock_ms],
        )
        return (None if raw is None else _found(raw, int(pttl))), bool(locked)

    async def try_lock(self, ns: str, ident: str, version: str, token: str, lock_ms: int) -> bool:
        """Take the load lock of `ident` at `version` if nobody holds it."""
        return bool(
            await self._redis.set(keys.lock_key(ns, version, ident), token, nx=True, px=lock_ms)
        )

    async def store(
        self, ns: str, ident: str, version: str, data: bytes, ttl_ms: int, token: str
    ) -> None:
        """Write a packed value at `version` with its TTL and release our lock, if held."""
        await self._store(
            keys=[keys.value_key(ns, version, ident), keys.lock_key(ns, version, ident)],
            args=[data, ttl_ms, token],
        )

    async def unlock(self, ns: str, ident: str, version: str, token: str) -> None:
        """Release our lock (after a failed load) so another caller can load at once."""
        await self._unlock(keys=[keys.lock_key(ns, version, ident)], args=[token])
