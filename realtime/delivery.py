"""Stream delivery on one node: positions, first messages, live gap filling and resync.

The node remembers, per stream it follows, the last offset it handed to the hub. A new
subscriber is sent its snapshot or replay up to that offset and joins the hub in the same
loop step, so it neither misses nor repeats a message. An envelope that skips offsets (lost
while Redis was away, or dropped by pub/sub) is preceded by the missing ones from history;
when history cannot supply them, or the epoch changed, every subscriber of the stream is sent
a fresh snapshot (on the extended protocol the frame's epoch tells the client its old position
means nothing any more), and in-process watches a `StreamReset`.

This module decides what to send and in which order; the hub frames and writes, the broker
carries envelopes and history, and the channel's `snapshot` (reached through `SnapshotOf`)
gives current state. It knows no connection type.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from redis.crc import key_slot

from realtime.broker import Envelope, stream_keys
from realtime.cable_codec import CableCodec, HistoryRequest, StreamMessage
from realtime.hub import Hub, Subscriber, stream_frame
from realtime.recovery import (
    Arrival,
    Gap,
    Recovery,
    Step,
    arrival,
    gap_step,
    plan_first_messages,
    when_history_is_missing,
)
from realtime.watch import StreamReset
from server.adapters.faults import as_domain_error
from server.common.errors import Unavailable
from server.common.logs import get_logger

_log = get_logger("finalmarket.cable")


class StreamSource(Protocol):
    """What delivery needs of the broker: following streams, positions and history."""

    async def subscribe(self, stream: str) -> None: ...

    async def unsubscribe(self, stream: str) -> None: ...

    async def position(self, stream: str) -> tuple[int, str]: ...

    async def history_after(
        self, stream: str, after: int, until: int
    ) -> list[tuple[int, Any]] | None: ...

    async def history_since(
        self, stream: str, since_s: int, until: int
    ) -> list[tuple[int, Any]]: ...

    async def rotate_epoch(self, stream: str, epoch: str) -> str: ...

    async def rotate_epoch_after_failover(self, stream: str, failover: str) -> str: ...

    async def streams_in(self, slots: Collection[int]) -> list[str]: ...


# A subscriber's current state for a stream: `snapshot(identifier, members)` -> the payload
# for that group of subscribers (same identifier, so same channel and params), or None.
SnapshotOf = Callable[[str, list[Subscriber]], Awaitable[Any | None]]
Snapshot = Callable[[], Awaitable[Any | None]]
Spawn = Callable[[Coroutine[Any, Any, Any]], Any]
Run = list[tuple[int, Any]]
# Replays kept: a run of offsets of one epoch never changes once written, so a reconnect
# storm (thousands of clients that missed the same messages) costs one XRANGE, not thousands.
HISTORY_RUNS_KEPT = 256
# The longest pause between tries of a catch-up step Redis could not serve.
CATCH_UP_RETRY_MAX_S = 2.0
# Tries of the new epochs for the streams nobody here follows after a failover (a minute).
UNFOLLOWED_ROTATION_TRIES = 30


@dataclass(slots=True)
class Position:
    """The last offset of `epoch` this node handed to its hub for one stream."""

    offset: int
    epoch: str


class StreamDelivery:
    """Delivery state of every stream this node follows (one per node)."""

    def __init__(self, hub: Hub, spawn: Spawn, snapshot_of: SnapshotOf) -> None:
        self.hub = hub
        self.spawn = spawn
        self.snapshot_of = snapshot_of
        self.source: StreamSource | None = None  # the broker, attached once it exists
        self._positions: dict[str, Position] = {}
        # streams whose catch-up task runs -> what waits for it (None: compare with Redis)
        self._catching_up: dict[str, list[Envelope | None]] = {}
        self._following: dict[str, asyncio.Future[None]] = {}
        self._runs: OrderedDict[tuple[str, str, int, int], Run] = OrderedDict()
        self._reading: dict[tuple[str, str, int, int], asyncio.Future[Run | None]] = {}
        self.gaps_filled = 0  # live gaps filled from history (a lost message, a reconnect)
        self.resyncs = 0  # live gaps history could not fill: fresh snapshots sent
        self.epochs_rotated = 0  # streams given a new epoch after Redis lost writes of them
        # streams to rotate at their next catch-up -> (the epoch whose writes were lost, the
        # failover that lost them)
        self._lost_writes: dict[str, tuple[str, str]] = {}
        self.received = 0  # stream messages that arrived from Redis (for metrics)

    def attach(self, source: StreamSource) -> None:
        """Use `source` (the broker, which calls `on_envelope` and `on_reconnect`)."""
        self.source = source

    def _source(self) -> StreamSource:
        if self.source is None:
            raise RuntimeError("StreamDelivery used before its broker was attached")
        return self.source

    # --- following ----------------------------------------------------------------------------

    def follows(self, stream: str) -> bool:
        """Whether this node follows `stream` now."""
        return stream in self._positions

    async def follow(self, stream: str) -> None:
        """Make this node receive `stream` and know its position; concurrent first
        subscribers of one stream share one Redis round trip."""
        if stream in self._positions:
            return
        pending = self._following.get(stream)
        if pending is None:
            pending = self._following[stream] = asyncio.ensure_future(self._start_following(stream))
            pending.add_done_callback(lambda _f: self._following.pop(stream, None))
        await asyncio.shield(pending)

    async def _start_following(self, stream: str) -> None:
        source = self._source()
        await source.subscribe(stream)
        offset, epoch = await source.position(stream)
        self._positions.setdefault(stream, Position(offset, epoch))

    def release_if_unused(self, stream: str) -> None:
        """Stop following `stream` once nothing on this node subscribes to it."""
        if self.hub.subscriber_count(stream) == 0 and stream in self._positions:
            del self._positions[stream]
            self._catching_up.pop(stream, None)
            self.spawn(self._source().unsubscribe(stream))

    async def first_messages(
        self,
        recovery: Recovery,
        stream: str,
        params: dict[str, Any],
        snapshot: Snapshot,
        history: HistoryRequest | None = None,
    ) -> tuple[list[StreamMessage], str | None]:
        """What a subscriber gets before live messages, up to the node's position, and the
        answer to its extended `history` request (None when it made none), as
        `realtime.recovery.plan_first_messages` decides from the positions: a replay from
        history, the snapshot (also when history no longer reaches back), or nothing."""
        source = self._source()
        while True:
            position = self._positions.get(stream)
            if position is None:  # the stream was released meanwhile; start over
                offset, epoch = await source.position(stream)
                position = Position(offset, epoch)
            target, epoch = position.offset, position.epoch
            plan = plan_first_messages(recovery, stream, params, history, target, epoch)
            replay: list[tuple[int, Any]] | None = None
            if plan.step is Step.NOTHING:
                replay = []
            elif plan.step is Step.REPLAY:
                replay = await self._history_run(stream, epoch, plan.after, target)
                if replay is None:
                    plan = when_history_is_missing(plan)
            if plan.step in (Step.SNAPSHOT, Step.SINCE):
                state = await snapshot()
                if state is not None:
                    replay = [(target, state)]
                elif plan.step is Step.SINCE and history and history.since is not None:
                    replay = await source.history_since(stream, history.since, target)
            messages = [
                StreamMessage(stream, payload, offset, epoch) for offset, payload in replay or ()
            ]
            now = self._positions.get(stream)
            if now is None or (now.offset == target and now.epoch == epoch):
                return messages, plan.outcome
            # The stream moved while we read: recompute so nothing between is lost.

    async def _history_run(self, stream: str, epoch: str, after: int, until: int) -> Run | None:
        """History's messages with offsets in (after, until] of `epoch` (None: no longer all
        there), read once however many subscribers ask at the same time, and kept (a run of
        one epoch never changes). The caller checks the epoch against the client's."""
        key = (stream, epoch, after, until)
        run = self._runs.get(key)
        if run is not None:
            self._runs.move_to_end(key)
            return run
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(
                self._source().history_after(stream, after, until)
            )
            reading.add_done_callback(lambda _f: self._reading.pop(key, None))
        found = await asyncio.shield(reading)
        position = self._positions.get(stream)
        if found is not None and position is not None and position.epoch == epoch:
            self._runs[key] = found
            while len(self._runs) > HISTORY_RUNS_KEPT:
                self._runs.popitem(last=False)
        return found

    # --- live ---------------------------------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """A message arrived from the broker: hand it to the hub if it is the next one,
        drop it if it was delivered already, or queue it behind a catch-up."""
        self.received += 1
        stream = envelope.stream
        position = self._positions.get(stream)
        if position is None:
            return  # no local subscribers any more
        waiting = self._catching_up.get(stream)
        if waiting is not None:
            waiting.append(envelope)
            return
        seen = arrival(envelope.offset, envelope.epoch, position.offset, position.epoch)
        if seen is Arrival.DELIVERED:
            return  # already delivered (replayed from history)
        if seen is Arrival.NEXT:
            position.offset = envelope.offset
            self.hub.broadcast(
                stream, StreamMessage(stream, envelope.payload, envelope.offset, envelope.epoch)
            )
            return
        self._queue_catch_up(stream, envelope)

    async def redis_lost_writes(self, lost: Mapping[int, str]) -> None:
        """Redis lost the last writes of the slots in `lost` (their master failed over
        unplanned; each slot -> the failover's name): every stream hashed there gets a new
        epoch, since the promoted master would hand the lost offsets out again for other
        messages. Followed streams first, their subscribers a fresh state; then, in the
        background, the streams nobody here follows, so a client coming back later with an
        old position is not replayed reused offsets. Once per failover per stream however
        many nodes notice it."""
        for stream in list(self._positions):
            position = self._positions.get(stream)
            slot = key_slot(stream_keys(stream)[0].encode())
            if position is not None and slot in lost:
                self._lost_writes[stream] = (position.epoch, lost[slot])
                self._queue_catch_up(stream, None)
        self.spawn(self._rotate_unfollowed(dict(lost)))

    async def _rotate_unfollowed(self, lost: dict[int, str]) -> None:
        """New epochs for the streams in `lost`'s slots that this node does not follow,
        tried again while Redis is still settling."""
        source = self._source()
        for tries in range(1, UNFOLLOWED_ROTATION_TRIES + 1):
            try:
                rotated = 0
                for stream in await source.streams_in(lost.keys()):
                    if stream not in self._positions:
                        slot = key_slot(stream_keys(stream)[0].encode())
                        await source.rotate_epoch_after_failover(stream, lost[slot])
                        rotated += 1
                self.epochs_rotated += rotated
                _log.warning("stream_epochs_rotated_after_failover", unfollowed=rotated)
                return
            except Exception as exc:
                if not isinstance(as_domain_error(exc), Unavailable):
                    raise
                _log.warning("stream_epoch_rotation_retry", error=repr(exc), tries=tries)
                await asyncio.sleep(CATCH_UP_RETRY_MAX_S)
        _log.error("stream_epoch_rotation_gave_up", slots=len(lost))

    async def on_reconnect(self) -> None:
        """Redis came back (messages published meanwhile were lost): every followed stream's
        catch-up compares its position with what this node delivered, in its queue's order."""
        for stream in list(self._positions):
            self._queue_catch_up(stream, None)

    def _queue_catch_up(self, stream: str, item: Envelope | None) -> None:
        """Hand `item` (an envelope past a gap, or None: compare with Redis' own position) to
        the stream's catch-up task, starting one if none runs. One task per stream works
        through its queue in order, so the fills of a lost message and of a reconnect can
        never both send the same offsets; envelopes arriving meanwhile wait behind them."""
        waiting = self._catching_up.get(stream)
        if waiting is not None:
            waiting.append(item)
            return
        self._catching_up[stream] = [item]
        self.spawn(self._catch_up(stream))

    async def _catch_up(self, stream: str) -> None:
        """Work through the stream's queue: before an envelope past a gap, the missed messages
        from history, or when history cannot supply them (or the epoch changed), a fresh
        snapshot for every subscriber; then the envelope. A None item (after a Redis
        reconnect) brings subscribers up to Redis' position the same way. An item Redis
        cannot serve now (its master failing over) stays first in the queue and is tried
        again after a pause: dropping it would leave the stream behind until its next
        message, and the queue behind it would be lost."""
        failures = 0
        try:
            while (waiting := self._catching_up.get(stream)) and stream in self._positions:
                item = waiting.pop(0)
                try:
                    await self._catch_up_one(stream, item)
                    failures = 0
                except Exception as exc:
                    if not isinstance(as_domain_error(exc), Unavailable):
                        raise
                    failures += 1
                    _log.warning(
                        "stream_catch_up_retry", stream=stream, error=repr(exc), tries=failures
                    )
                    if self._catching_up.get(stream) is waiting:
                        waiting.insert(0, item)
                    await asyncio.sleep(min(CATCH_UP_RETRY_MAX_S, 0.05 * 2**failures))
        finally:
            self._catching_up.pop(stream, None)

    async def _catch_up_one(self, stream: str, item: Envelope | None) -> None:
        """One item of the stream's catch-up queue (see `_catch_up`)."""
        position = self._positions.get(stream)
        if position is None:
            return
        if item is None:
            offset, epoch = await self._source().position(stream)
            lost = self._lost_writes.get(stream)
            position = self._positions.get(stream)
            if position is not None and epoch == position.epoch:
                # Redis is behind what this node delivered in the same epoch, or its master
                # failed over unplanned: writes were lost, and their offsets would be handed
                # out again. A new epoch, and a fresh state for all.
                rotated = True
                if lost is not None and lost[0] == epoch:
                    epoch = await self._source().rotate_epoch_after_failover(stream, lost[1])
                elif offset < position.offset:
                    epoch = await self._source().rotate_epoch(stream, epoch)
                else:
                    rotated = False
                if rotated:
                    self.epochs_rotated += 1
                    _log.warning("stream_epoch_rotated", stream=stream, offset=offset)
                    position = self._positions.get(stream)
            self._lost_writes.pop(stream, None)  # kept until Redis answered
            if position is not None and (epoch, offset) != (position.epoch, position.offset):
                await self._fill(stream, position, offset, epoch)
            return
        seen = arrival(item.offset, item.epoch, position.offset, position.epoch)
        if seen is Arrival.DELIVERED:
            return
        if seen is Arrival.GAP:
            await self._fill(stream, position, item.offset - 1, item.epoch)
        current = self._positions.get(stream)
        if current is not None and (
            arrival(item.offset, item.epoch, current.offset, current.epoch) is Arrival.NEXT
        ):
            current.offset = item.offset
            self.hub.broadcast(stream, StreamMessage(stream, item.payload, item.offset, item.epoch))

    async def _fill(self, stream: str, position: Position, until: int, epoch: str) -> None:
        """Bring the stream's subscribers from `position` to offset `until` of `epoch`: the
        messages in between from history, in order, or if history no longer holds them all
        (or the epoch is another: Redis lost the stream's data) a fresh snapshot at `until`."""
        step = gap_step(position.offset, position.epoch, until, epoch)
        if step is Gap.NONE:
            return
        if step is Gap.FROM_HISTORY:
            missed = await self._source().history_after(stream, position.offset, until)
            if self._positions.get(stream) is not position:
                return  # released meanwhile
            if missed is not None:
                self.gaps_filled += 1
                for offset, payload in missed:
                    self.hub.broadcast(stream, StreamMessage(stream, payload, offset, epoch))
                position.offset = until
                return
        await self._resync(stream, until + 1, epoch)

    async def _resync(self, stream: str, offset: int, epoch: str) -> None:
        """History cannot fill the gap: send every subscriber a fresh snapshot at `offset - 1`
        (of `epoch`)."""
        position = self._positions.get(stream)
        if position is None:
            return
        self.resyncs += 1
        position.offset, position.epoch = offset - 1, epoch
        _log.info("stream_resync", stream=stream, epoch=epoch, offset=offset - 1)
        # Messages queued in the hub for this stream go out before the snapshots.
        self.hub.flush()
        self.hub.tell_listeners(stream, StreamReset(stream, epoch, offset - 1))
        for identifier, codec, members in self.hub.each_group(stream):
            # Snapshots depend only on the identifier's channel and params (and for user
            # streams the stream is the user's), so one per group serves all its members.
            snapshot = await self.snapshot_of(identifier, members)
            if snapshot is not None:
                self._send_group(codec, identifier, members, stream, snapshot, offset - 1, epoch)

    @staticmethod
    def _send_group(
        codec: CableCodec,
        identifier: str,
        members: list[Subscriber],
        stream: str,
        payload: Any,
        offset: int,
        epoch: str,
    ) -> None:
        frame = stream_frame(codec, identifier, StreamMessage(stream, payload, offset, epoch))
        for member in members:
            if not getattr(member, "closing", False):
                member.send(frame)
