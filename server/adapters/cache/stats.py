"""Per-namespace cache counters: plain ints, cheap to bump, exported by /metrics later.

Every `get_or_load` call counts exactly once in `local_hits`, `hits` or `misses` (callers that
joined another caller's fetch count as that fetch's outcome), so the hit ratio is
`(local_hits + hits) / (local_hits + hits + misses)`. The rest are diagnostics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class CacheStats:
    """Counters of one namespace on one node."""

    local_hits: int = 0  # served from the node's in-memory LRU
    hits: int = 0  # served from Redis
    misses: int = 0  # not in Redis: loaded here, or waited for another node's load
    loads: int = 0  # loader calls (misses, early refreshes, fallbacks)
    load_errors: int = 0  # loader calls that raised
    early_refreshes: int = 0  # XFetch refreshes started before expiry
    lock_waits: int = 0  # misses that waited on another node's load lock
    lock_wait_timeouts: int = 0  # ... and gave up waiting and loaded themselves
    coalesced: int = 0  # calls that joined an in-flight fetch on this node
    redis_errors: int = 0  # Redis unreachable: loaded without the cache

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)
