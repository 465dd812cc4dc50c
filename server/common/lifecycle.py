"""The node's lifecycle as the serving code sees it: whether it drains, and how many requests
are in flight (shutdown waits for them). Written by the node, read by handlers and /readyz."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class NodeState:
    """Lifecycle flags the handlers read (readiness goes 503 once draining starts), and the
    count of requests in flight that shutdown waits for."""

    draining: bool = False
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def request_started(self) -> None:
        """A request entered a handler."""
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        """A request left its handler."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if `timeout_s` passed first."""
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
