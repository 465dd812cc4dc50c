"""In-process stream consumers: a bounded queue of a stream's messages, read by `async for`.

GraphQL subscriptions (and anything else on the node that is not a cable connection) follow
streams through the same hub and broker as `/cable`, so a change published on any node
reaches them. A consumer that falls `max_pending` messages behind is ended with
`WatchOverflow` instead of letting its queue grow without bound.

When the node loses messages of a stream that history cannot give back (see
`realtime.delivery`), a watch yields a `StreamReset` where they would have been: what the
consumer showed may be stale, so it reads the current state again, as cable subscribers are
sent a fresh snapshot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_PENDING = 256


@dataclass(frozen=True, slots=True)
class StreamReset:
    """Messages of `stream` before `offset` (of `epoch`) were lost and cannot be replayed:
    read the current state again; the messages after it follow as usual."""

    stream: str
    epoch: str
    offset: int


class WatchOverflow(Exception):
    """The consumer fell too far behind its stream; its watch has ended."""


class StreamWatch:
    """Messages of one stream as they are delivered on this node, oldest first."""

    __slots__ = ("_closed", "_max_pending", "_overflowed", "_queue", "_ready", "stream")

    def __init__(self, stream: str, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.stream = stream
        self._max_pending = max_pending
        self._queue: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._overflowed = False
        self._closed = False

    def push(self, message: Any) -> None:
        """Called by the hub for every message of the stream (on the loop, in order)."""
        if self._overflowed or self._closed:
            return
        if len(self._queue) >= self._max_pending:
            self._overflowed = True
            self._queue.clear()
        else:
            self._queue.append(message)
        self._ready.set()

    def close(self) -> None:
        """End iteration once the queued messages are read."""
        self._closed = True
        self._ready.set()

    def __aiter__(self) -> StreamWatch:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._overflowed:
                raise WatchOverflow(f"fell more than {self._max_pending} messages behind")
            if self._queue:
                return self._queue.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
