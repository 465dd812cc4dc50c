"""A small bounded per-node LRU in front of Redis for the hottest entries.

Two bounds: at most `max_entries` entries (least recently used evicted first), and no entry is
served more than `max_staleness_s` after it was read from Redis (nor past its Redis expiry).
Invalidation messages from other nodes normally clear entries at once; the freshness bound is
what holds when such a message is lost, so a missed message can never make an entry older than
the bound.

Invalidating a namespace is O(1): each namespace has a generation number, entries remember the
generation they were stored under, and entries of an older generation read as absent (and are
dropped when met, or evicted as least recently used).

A fetch that began before an invalidation must not store what it read afterwards: callers take
a `ticket()` before reading Redis and `put` refuses the entry if any invalidation has happened
on this node since (the value is still returned to the caller; it only skips this layer).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]


@dataclass(slots=True)
class _Entry:
    value: Any
    expires_at: float
    generation: int


class LocalLRU:
    """The in-memory layer of one node (not shared between event loops or threads)."""

    def __init__(
        self,
        max_entries: int = 10_000,
        max_staleness_s: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_entries < 0 or max_staleness_s < 0:
            raise ValueError("max_entries and max_staleness_s must not be negative")
        self.max_entries = max_entries
        self.max_staleness_s = max_staleness_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._invalidations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ns: str, ident: str) -> tuple[bool, Any]:
        """(True, value) for a fresh entry of the current generation, else (False, None)."""
        key = (ns, ident)
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry.generation != self._generations.get(ns, 0) or self._clock() >= entry.expires_at:
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, entry.value

    def ticket(self) -> int:
        """A mark to hand back to `put`: the put is refused if anything was invalidated since."""
        return self._invalidations

    def put(
        self, ns: str, ident: str, value: Any, ticket: int, fresh_for_s: float | None = None
    ) -> bool:
        """Keep `value` for at most `min(max_staleness_s, fresh_for_s)`; False if refused."""
        if self.max_entries == 0 or ticket != self._invalidations:
            return False
        fresh = (
            self.max_staleness_s if fresh_for_s is None else min(self.max_staleness_s, fresh_for_s)
        )
        if fresh <= 0:
            return False
        key = (ns, ident)
        self._entries[key] = _Entry(value, self._clock() + fresh, self._generations.get(ns, 0))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def invalidate(self, ns: str, ident: str | None = None) -> None:
        """Forget one entry of `ns`, or (without `ident`) every entry of `ns`."""
        self._invalidations += 1
        if ident is None:
            self._generations[ns] = self._generations.get(ns, 0) + 1
        else:
            self._entries.pop((ns, ident), None)

    def clear(self) -> None:
        """Forget everything (e.g. after invalidation messages may have been missed)."""
        self._invalidations += 1
        self._entries.clear()
