"""Names of the cache's Redis keys and channel.

Every key of a namespace carries the namespace's hash tag (`{cache:<ns>}`), so the version
counters, values and locks of one namespace live on one Redis Cluster slot and a single Lua
script may touch them all. Layout:

- `{cache:<ns>}:version`: the namespace version, INCRed by `bump(ns)`;
- `{cache:<ns>}:ev:<id>`: the entity version of one id, INCRed by `bump(ns, id)` (expires);
- `{cache:<ns>}:v<ns version>.<entity version>:<id>`: the cached value (msgpack);
- `{cache:<ns>}:lock:v<ns version>.<entity version>:<id>`: the cross-node load lock.

Ids containing braces, or longer than `_MAX_PLAIN_ID` characters (list pages keyed by their
query), are replaced by their SHA-256 so they cannot break the hash tag or bloat keys.
"""

from __future__ import annotations

import hashlib
import re

BUMP_CHANNEL = "{cache}:bumps"
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_PLAIN_ID = 120


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


def prefix(ns: str) -> str:
    """`{cache:<ns>}:`, the start of every key of `ns`."""
    return f"{{cache:{ns}}}:"


def version_key(ns: str) -> str:
    """The namespace version counter."""
    return prefix(ns) + "version"


def entity_version_key(ns: str, ident: str) -> str:
    """The version counter of one entity (`ident` as returned by `id_part`)."""
    return f"{prefix(ns)}ev:{ident}"


def value_key(ns: str, version: str, ident: str) -> str:
    """Where the value of `ident` at `version` ("<ns version>.<entity version>") lives."""
    return f"{prefix(ns)}v{version}:{ident}"


def lock_key(ns: str, version: str, ident: str) -> str:
    """The load lock of `ident` at `version`."""
    return f"{prefix(ns)}lock:v{version}:{ident}"
