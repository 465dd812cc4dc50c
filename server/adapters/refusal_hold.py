"""Which client addresses were refused 429 lately, and how many of their connections wait.

The HTTP/1 layer (`server.adapters.http1`) holds a refused client's connection for the refusal
hold (`FM_HTTP_REFUSAL_HOLD_S`) and makes a new connection from a refused address wait out
the same hold before it is read, so a flood costs the node about one refusal per connection
per hold, whether it reuses its connections or opens a new one per request. An address with
`max_held` connections waiting already has any further one closed at once (an open-loop flood
cannot pile up sockets). The hold only delays: what a held request then gets is the rate
limiter's answer, as for anyone else.
"""

from __future__ import annotations

from collections import Counter


class RefusedAddresses:
    """Refusal deadlines and held connections per client address (one per HTTP server)."""

    def __init__(self, max_held: int = 256) -> None:
        self.max_held = max_held
        self._until: dict[str, float] = {}  # address -> when its connections may be read again
        self._held: Counter[str] = Counter()
        self.holds = 0  # connections held (after their own refusal, or new while refused)
        self.turned_away = 0  # new connections closed: their address had `max_held` waiting

    def refused(self, address: str, hold_s: float, now: float) -> None:
        """`address` was just refused: hold its connections until `now + hold_s`."""
        self._until[address] = max(self._until.get(address, 0.0), now + hold_s)

    def wait_s(self, address: str, now: float) -> float:
        """How long a connection of `address` must still wait (0: it may be read)."""
        until = self._until.get(address)
        if until is None:
            return 0.0
        if until <= now:
            del self._until[address]
            return 0.0
        return until - now

    def may_hold(self, address: str) -> bool:
        """Whether one more connection of `address` may wait (else it is closed)."""
        return self._held[address] < self.max_held

    def hold(self, address: str) -> None:
        """A connection of `address` starts waiting."""
        self._held[address] += 1
        self.holds += 1

    def release(self, address: str) -> None:
        """A connection of `address` stops waiting (read again, or closed)."""
        self._held[address] -= 1
        if self._held[address] <= 0:
            del self._held[address]

    def sweep(self, now: float) -> None:
        """Forget deadlines that have passed."""
        for address in [a for a, until in self._until.items() if until <= now]:
            del self._until[address]
