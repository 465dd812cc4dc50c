"""Revoked sessions end their long-lived connections on every node.

A request carries its token each time, so a revoked token is refused by the next request on
any node. A WebSocket authenticates once; without this it would go on receiving a user's
cart and notifications after that user signed out elsewhere. `SessionStore.revoke` announces
each revocation (`announce`, the token's digest, never the token) on one stream; every node
follows the stream and closes its cable and GraphQL sockets acting for that session: the
cable with `disconnect {reason: "unauthorized", reconnect: false}`, GraphQL with 4403.

Revocations the node may have missed (it lost its Redis subscription, or history could not
fill a gap: a `StreamReset`) are made up for by asking Redis which of the sessions its
sockets act for still exist.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

from realtime.watch import StreamReset
from server.common.logs import get_logger

#: The stream every node follows for revoked sessions.
REVOCATIONS_STREAM = "sessions:revoked"
#: Pause before following the stream again after it failed (Redis down, say).
RETRY_S = 1.0

_log = get_logger("finalmarket.revocations")

Watch = Callable[[str], contextlib.AbstractAsyncContextManager[AsyncIterator[Any]]]
Publish = Callable[[str, dict[str, Any]], Awaitable[Any]]
LiveSessions = Callable[[Iterable[str]], Awaitable[set[str]]]


class SessionSockets(Protocol):
    """A socket server that can end the connections of one session."""

    def close_session(self, digest: str) -> int:
        """Close the open sockets acting for session `digest`; how many there were."""
        ...

    def session_digests(self) -> set[str]:
        """The sessions its open sockets act for."""
        ...


class SessionRevocations:
    """Announces revocations and closes, on this node, the sockets of revoked sessions."""

    def __init__(self, watch: Watch, publish: Publish, live_sessions: LiveSessions) -> None:
        self._watch = watch
        self._publish = publish
        self._live_sessions = live_sessions
        self.servers: list[SessionSockets] = []
        self._task: asyncio.Task[None] | None = None
        self._following = asyncio.Event()
        self.closed_sockets = 0

    async def announce(self, digest: str) -> None:
        """Tell every node that session `digest` was revoked (`SessionStore`'s `on_revoked`)."""
        await self._publish(REVOCATIONS_STREAM, {"event": "session_revoked", "session": digest})

    def start(self) -> None:
        """Follow the stream until `stop`."""
        self._task = asyncio.get_running_loop().create_task(self._follow_forever())

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_following(self, timeout_s: float = 5.0) -> None:
        """Return once the stream is followed (tests, and a node's start)."""
        await asyncio.wait_for(self._following.wait(), timeout_s)

    def close(self, digest: str) -> int:
        """Close this node's sockets acting for session `digest`."""
        closed = sum(server.close_session(digest) for server in self.servers)
        if closed:
            self.closed_sockets += closed
            _log.info("session_revoked_sockets_closed", sockets=closed)
        return closed

    async def recheck(self) -> None:
        """Close the sockets of every session that no longer exists (revocations missed)."""
        held = set().union(*(server.session_digests() for server in self.servers))
        if not held:
            return
        live = await self._live_sessions(held)
        for digest in held - live:
            self.close(digest)

    async def _follow_forever(self) -> None:
        missed_some = False
        while True:
            try:
                async with self._watch(REVOCATIONS_STREAM) as messages:
                    self._following.set()
                    if missed_some:
                        await self.recheck()
                    async for message in messages:
                        if isinstance(message, StreamReset):
                            await self.recheck()
                        elif isinstance(message, dict) and isinstance(message.get("session"), str):
                            self.close(message["session"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis unavailable, the watch overflowed, ...
                _log.warning("revocations_follow_failed", error=repr(exc))
            self._following.clear()
            missed_some = True
            await asyncio.sleep(RETRY_S)
