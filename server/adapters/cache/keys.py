"""Names of the cache's Redis keys and channel.

A namespace is spread over `BUCKETS` hash tags, `{cache:<ns>:<bucket>}`, the bucket being a
CRC32 of the id: on a Redis Cluster the entries of one namespace (every product) land on
many slots and so on every master, instead of one master holding the whole namespace. Each
bucket is a complete, self-contained copy of the versioning scheme: its own namespace version
counter, and beside it the entity versions, values and locks of the ids in it, all under the
bucket's tag. So every script touches one slot (one master) and a read stays one round trip,
and a value and the versions that name it are replicated together (a promoted replica that
lost a bump also lost every value stored after it). Layout, with `B` = `<ns>:<bucket>`:

- `{cache:B}:version`: the namespace version as this bucket knows it, INCRed in every bucket
  by `bump(ns)`;
- `{cache:B}:ev:<id>`: the entity version of one id, INCRed by `bump(ns, id)` (expires);
- `{cache:B}:v<ns version>.<entity version>:<id>`: the cached value (msgpack);
- `{cache:B}:lock:v<ns version>.<entity version>:<id>`: the cross-node load lock.

Why buckets and not one tag per id: a namespace bump must reach every version counter of the
namespace; with `BUCKETS` of them it is one pipelined INCR per bucket (a round trip per
master), where a tag per id would leave no counter to bump but one per id. See
docs/decisions.md ("The cache on a Redis Cluster").

Ids containing braces, or longer than `_MAX_PLAIN_ID` characters (list pages keyed by their
query), are replaced by their SHA-256 so they cannot break the hash tag or bloat keys.
"""

from __future__ import annotations

import hashlib
import re
import zlib

from redis.crc import key_slot

BUMP_CHANNEL = "{cache}:bumps"
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_PLAIN_ID = 120
#: Hash tags per namespace. Changing it renames every key (the cache starts empty).
BUCKETS = 64


def check_namespace(ns: str) -> str:
    """`ns` if it is a valid namespace name (letters, digits, `_.:-`), else ValueError."""
    if not _NAMESPACE.match(ns):
        raise ValueError(f"cache namespace {ns!r}: use 1-64 of [A-Za-z0-9_.:-]")
    return ns


def id_part(key: str | int) -> str:
    """The id as it appears in key names."""
    text = str(key)
    if "{" in text or "}" in text or len(text) > _MAX_PLAIN_ID:
        return "h:" + hashlib.sha256(text.encode()).hexdigest()
    return text


def bucket(ident: str) -> int:
    """The bucket of `ident` (as returned by `id_part`): CRC32, stable across nodes."""
    return zlib.crc32(ident.encode()) % BUCKETS


def bucket_prefix(ns: str, number: int) -> str:
    """`{cache:<ns>:<number>}:`, the start of every key of bucket `number` of `ns`."""
    return f"{{cache:{ns}:{number}}}:"


def bucket_slot(ns: str, number: int) -> int:
    """The Redis Cluster slot of bucket `number` of `ns`."""
    return int(key_slot(bucket_prefix(ns, number).encode()))


def prefix(ns: str, ident: str) -> str:
    """The start of every key of `ident` in `ns`: its bucket's."""
    return bucket_prefix(ns, bucket(ident))


def version_key(ns: str, ident: str) -> str:
    """The namespace version counter of `ident`'s bucket."""
    return prefix(ns, ident) + "version"


def bucket_version_keys(ns: str) -> list[str]:
    """The namespace version counter of every bucket (what `bump(ns)` INCRs)."""
    return [bucket_prefix(ns, number) + "version" for number in range(BUCKETS)]


def entity_version_key(ns: str, ident: str) -> str:
    """The version counter of one entity (`ident` as returned by `id_part`)."""
    return f"{prefix(ns, ident)}ev:{ident}"


def value_key(ns: str, version: str, ident: str) -> str:
    """Where the value of `ident` at `version` ("<ns version>.<entity version>") lives."""
    return f"{prefix(ns, ident)}v{version}:{ident}"


def lock_key(ns: str, version: str, ident: str) -> str:
    """The load lock of `ident` at `version`."""
    return f"{prefix(ns, ident)}lock:v{version}:{ident}"
