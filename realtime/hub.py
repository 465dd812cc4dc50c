"""Per-node fan-out: stream -> local subscribers, each broadcast framed once per wire format.

Subscribers of a stream are grouped by (identifier, codec): every member of a group receives
byte-identical frames, so a broadcast costs one encode per codec and one frame per group, then
one write per subscriber. Broadcasts are queued per stream and flushed once per loop iteration:
a burst of messages for a stream within one iteration leaves as one write per subscriber
(coalescing), in offset order. Writes go straight to the socket when the connection has nothing
queued (the transport's own fast path) and to its buffer otherwise; connections that do not
keep up are cut off by their own slow-consumer policy (`CableConnection.send`) and recover on
reconnect with `since`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from realtime.cable_codec import CableCodec, StreamMessage
from realtime.wsframe import encode_frame


def stream_frame(codec: CableCodec, identifier: str, message: StreamMessage) -> bytes:
    """The complete frame of one stream message for one identifier in `codec`'s dialect."""
    return encode_frame(
        codec.opcode, codec.broadcast_prefix(identifier) + codec.stream_body(message)
    )


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    def send(self, data: bytes) -> None:
        """Write bytes (complete frames) to the connection, in order."""


class _Group:
    """Subscribers of one stream that share identifier and codec, hence frames."""

    __slots__ = ("codec", "members", "prefix")

    def __init__(self, codec: CableCodec, identifier: str) -> None:
        self.codec = codec
        self.prefix = codec.broadcast_prefix(identifier)
        self.members: dict[Subscriber, None] = {}


Listener = Callable[[Any], None]


class _Stream:
    """Local state of one stream: its groups, in-process listeners, and the bodies waiting
    for the next flush."""

    __slots__ = ("groups", "listeners", "pending", "queued_at")

    def __init__(self) -> None:
        self.groups: dict[tuple[str, CableCodec], _Group] = {}
        self.listeners: dict[Listener, None] = {}
        self.pending: list[Any] = []
        self.queued_at: list[float] = []  # when each pending message was queued

    def empty(self) -> bool:
        return not self.groups and not self.listeners

    def codecs(self) -> set[CableCodec]:
        return {group.codec for group in self.groups.values()}


class Hub:
    """Streams to local subscribers on one node; knows nothing of Redis or HTTP."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._streams: dict[str, _Stream] = {}
        self._dirty: list[_Stream] = []
        self._flush_scheduled = False
        self.delivered = 0  # messages written to subscribers (for metrics)
        # Called with each message's fan-out latency in seconds (queued -> written to every
        # local subscriber), e.g. a histogram's `observe`.
        self.observe_fanout: Callable[[float], None] | None = None

    # --- membership -------------------------------------------------------------------------

    def add(self, stream: str, identifier: str, codec: CableCodec, subscriber: Subscriber) -> bool:
        """Add a subscriber; True if it is the stream's first on this node."""
        state = self._streams.get(stream)
        first = state is None
        if state is None:
            state = self._streams[stream] = _Stream()
        key = (identifier, codec)
        group = state.groups.get(key)
        if group is None:
            group = state.groups[key] = _Group(codec, identifier)
        group.members[subscriber] = None
        return first

    def remove(
        self, stream: str, identifier: str, codec: CableCodec, subscriber: Subscriber
    ) -> bool:
        """Remove a subscriber; True if the stream has no local subscribers left."""
        state = self._streams.get(stream)
        if state is None:
            return False
        key = (identifier, codec)
        group = state.groups.get(key)
        if group is not None:
            group.members.pop(subscriber, None)
            if not group.members:
                del state.groups[key]
        if not state.empty():
            return False
        del self._streams[stream]
        return True

    def listen(self, stream: str, listener: Listener) -> bool:
        """Call `listener` with every message broadcast to `stream`, in order, as it is
        queued (in-process consumers such as GraphQL subscriptions, which frame their own
        messages); True if `stream` had no local subscribers before."""
        state = self._streams.get(stream)
        first = state is None
        if state is None:
            state = self._streams[stream] = _Stream()
        state.listeners[listener] = None
        return first

    def unlisten(self, stream: str, listener: Listener) -> bool:
        """Stop calling `listener`; True if the stream has no local subscribers left."""
        state = self._streams.get(stream)
        if state is None:
            return False
        state.listeners.pop(listener, None)
        if not state.empty():
            return False
        del self._streams[stream]
        return True

    def tell_listeners(self, stream: str, item: Any) -> None:
        """Call the stream's in-process listeners with `item` (not a stream message: a
        marker such as `realtime.watch.StreamReset`), after the messages already queued."""
        state = self._streams.get(stream)
        if state is None:
            return
        for listener in list(state.listeners):
            listener(item)

    def streams(self) -> list[str]:
        """Streams with local subscribers."""
        return list(self._streams)

    def subscriber_count(self, stream: str) -> int:
        """Local subscribers of `stream`."""
        state = self._streams.get(stream)
        if state is None:
            return 0
        return sum(len(g.members) for g in state.groups.values()) + len(state.listeners)

    # --- fan-out ----------------------------------------------------------------------------

    def broadcast(self, stream: str, message: StreamMessage) -> None:
        """Queue `message` for every local subscriber of `stream`; sent at the end of this
        loop iteration together with any other message queued for the stream meanwhile.
        Listeners get the stamped payload (with `offset` and `epoch`)."""
        state = self._streams.get(stream)
        if state is None:
            return
        if state.listeners:
            stamped = message.stamped()
            for listener in list(state.listeners):
                listener(stamped)
        if not state.groups:
            return
        bodies = {codec: codec.stream_body(message) for codec in state.codecs()}
        if not state.pending:
            self._dirty.append(state)
        state.pending.append(bodies)
        state.queued_at.append(time.perf_counter())
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued message: one frame run per group, one write per subscriber.

        With one stream to flush (the common case) each member's frames go straight out. With
        several, a member of more than one gets all of its frames in one write.
        """
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        outbox: dict[Subscriber, list[bytes]] | None = {} if len(dirty) > 1 else None
        all_queued_at: list[float] = []
        for state in dirty:
            pending, state.pending = state.pending, []
            queued_at, state.queued_at = state.queued_at, []
            all_queued_at += queued_at
            for group in list(state.groups.values()):
                opcode, prefix, codec = group.codec.opcode, group.prefix, group.codec
                frames = b"".join(
                    encode_frame(opcode, prefix + bodies[codec])
                    for bodies in pending
                    if codec in bodies
                )
                if outbox is None:
                    for member in list(group.members):
                        member.send(frames)
                else:
                    for member in group.members:
                        queued = outbox.get(member)
                        if queued is None:
                            outbox[member] = [frames]
                        else:
                            queued.append(frames)
                self.delivered += len(group.members) * len(pending)
        if outbox:
            for member, chunks in outbox.items():
                member.send(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        observe = self.observe_fanout
        if observe is not None:
            written = time.perf_counter()
            for since in all_queued_at:
                observe(written - since)

    def send_to(
        self, subscriber: Subscriber, identifier: str, codec: CableCodec, message: Any
    ) -> None:
        """Write one message that belongs to no stream position (an action's answer) to one
        subscriber: `{identifier, message}`."""
        subscriber.send(codec.frame({"identifier": identifier, "message": message}))

    def send_stream_message(
        self, subscriber: Subscriber, identifier: str, codec: CableCodec, message: StreamMessage
    ) -> None:
        """Write one stream message to one subscriber (snapshots and replays)."""
        subscriber.send(stream_frame(codec, identifier, message))

    def each_group(self, stream: str) -> Iterable[tuple[str, CableCodec, list[Subscriber]]]:
        """(identifier, codec, members) of each group of `stream` (for resynchronisation)."""
        state = self._streams.get(stream)
        if state is None:
            return []
        return [
            (identifier, codec, list(group.members))
            for (identifier, codec), group in state.groups.items()
        ]
