"""Version counters: invalidation by INCR, never by SCAN, announced to every node.

`bump(ns)` INCRs the namespace version in each of the namespace's buckets (`keys.BUCKETS`, one
hash tag each, spread over a cluster's masters): every key of the namespace changes name, so
the next read misses and old values simply expire (their TTL bounds the garbage). The INCRs go
out in one non-transactional pipeline (one round trip per master); each is atomic for the ids
of its bucket, and when `bump` returns every bucket has its new version, so no read that starts
after it sees a value from before. (A bump that fails half way, a master down, raises: the
caller's write stands and what was not bumped expires by its TTL, as when Redis is away.)

`bump(ns, id)` INCRs one entity's version instead, so a product update reloads that product and
not the 10,000 others (a whole-namespace bump per write would wreck the hit ratio of a
write-heavy catalog); namespace bumps remain for derived data such as list pages, which any
write may change.

Why versions rather than DEL: a loader that read the database before a write may store its
result after the write's invalidation. With versions it stores under the old version's key,
which no reader asks for any more; with DEL it would resurrect the stale value until its TTL.

Entity version keys expire (`ENTITY_VERSION_TTL_S`) so per-user versions do not accumulate;
values are capped at `MAX_VALUE_TTL_S`, far shorter, so when a version key expires and restarts
at 0 no value stored under the old "0" can still exist. The bump also deletes the value at the
current version right away (memory; and a second guard should Redis evict a version key).
Namespace version keys have no TTL: a `volatile-*` eviction policy never evicts them.

Each bump PUBLISHes `[ns, id or nil, origin node]` (msgpack) on `{cache}:bumps` once Redis has
the new versions (an entity bump inside its script), so other nodes drop their in-memory copies
(see `listener.py`). Classic PUBLISH reaches every node of a cluster, wherever it is sent.
"""

from __future__ import annotations

from typing import Any

import msgpack

from server.adapters.cache import keys

ENTITY_VERSION_TTL_S = 2 * 24 * 3600
MAX_VALUE_TTL_S = 24 * 3600

# An entity bump. KEYS: the bucket's namespace version, the entity version. ARGV: channel,
# message, the bucket's prefix, id, entity version TTL.
_BUMP = """
local nv = redis.call('GET', KEYS[1]) or '0'
local ev = redis.call('GET', KEYS[2]) or '0'
redis.call('DEL', ARGV[3] .. 'v' .. nv .. '.' .. ev .. ':' .. ARGV[4])
local v = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return v
"""


def encode_bump(ns: str, ident: str | None, origin: str) -> bytes:
    """The message announcing a bump on `BUMP_CHANNEL`."""
    return msgpack.packb([ns, ident, origin], use_bin_type=True)


def decode_bump(data: bytes) -> tuple[str, str | None, str]:
    """(ns, id or None, origin node) of a bump message."""
    ns, ident, origin = msgpack.unpackb(data, raw=False)
    return str(ns), None if ident is None else str(ident), str(origin)


class Versions:
    """Bumps namespace and entity versions in Redis and announces them."""

    def __init__(self, redis: Any, node_id: str) -> None:
        self._redis = redis
        self._node_id = node_id
        self._bump = redis.register_script(_BUMP)

    async def bump(self, ns: str, key: str | int | None = None) -> int:
        """Invalidate every cached value of `ns`, or only `key`'s; returns the new version
        (of a namespace: the highest of its buckets')."""
        keys.check_namespace(ns)
        ident = None if key is None else keys.id_part(key)
        message = encode_bump(ns, ident, self._node_id)
        if ident is None:
            pipe = self._redis.pipeline(transaction=False)
            for version_key in keys.bucket_version_keys(ns):
                pipe.incr(version_key)
            versions = await pipe.execute()
            await self._redis.publish(keys.BUMP_CHANNEL, message)
            return max(int(version) for version in versions)
        result = await self._bump(
            keys=[keys.version_key(ns, ident), keys.entity_version_key(ns, ident)],
            args=[keys.BUMP_CHANNEL, message, keys.prefix(ns, ident), ident, ENTITY_VERSION_TTL_S],
        )
        return int(result)
