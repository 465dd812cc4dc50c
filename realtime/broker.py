"""Redis broker: cross-node delivery, offsets, epochs and bounded history per stream.

Every publish runs one Lua script that takes the stream's next offset (INCR), appends the
message to its history (XADD with the offset as entry id, MAXLEN ~), and PUBLISHes a msgpack
envelope `[stream, offset, epoch, payload, origin]`. Being one script, two nodes publishing
to one stream can never reorder or duplicate offsets. All keys of a stream share one hash tag
(`{inventory:product:42}:offset`, `...:history`, `...:epoch`, channel `...:live`), so the same
script runs unchanged on a Redis Cluster.

The epoch is a random string stored beside the offset; when Redis loses the stream's data
(restart without persistence, eviction) the epoch is made anew, so clients holding the old one
know their offsets mean nothing any more and take a fresh snapshot.

A node subscribes to a stream's channel while it has local subscribers. The reader task
survives Redis restarts: it reconnects with backoff on a fresh pub/sub connection, subscribes
every followed channel again, and the node then asks for each stream's position so the hub
can fill the gap from history or resynchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.logs import get_logger

_log = get_logger("finalmarket.broker")

DEFAULT_HISTORY_MAXLEN = 1000
_RECONNECT_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

_PUBLISH = """
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[3], epoch)
end
local offset = redis.call('INCR', KEYS[1])
local maxlen = tonumber(ARGV[4])
if maxlen > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, offset .. '-1', 'p', ARGV[2])
end
redis.call('PUBLISH', KEYS[4], cmsgpack.pack({ARGV[1], offset, epoch, ARGV[2], ARGV[5]}))
return {offset, epoch}
"""

_POSITION = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
return {tonumber(redis.call('GET', KEYS[1]) or '0'), epoch}
"""


def stream_keys(stream: str) -> tuple[str, str, str, str]:
    """(offset, history, epoch, channel) names of `stream`, sharing one hash tag."""
    tag = "{" + stream + "}"
    return f"{tag}:offset", f"{tag}:history", f"{tag}:epoch", f"{tag}:live"


def _new_epoch() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A stream message as it crosses between nodes."""

    stream: str
    offset: int
    epoch: str
    payload: Any
    origin: str


def decode_envelope(data: bytes) -> Envelope:
    """Parse the script's envelope (Lua strings arrive as msgpack str of raw bytes)."""
    stream, offset, epoch, payload, origin = msgpack.unpackb(data, raw=True)
    return Envelope(
        stream.decode(), int(offset), epoch.decode(), msgpack.unpackb(payload), origin.decode()
    )


OnEnvelope = Callable[[Envelope], None]
OnReconnect = Callable[[], Awaitable[None]]


class RedisBroker:
    """Publishes stream messages through Redis and feeds received ones to a callback."""

    def __init__(
        self,
        redis: Any,
        node_id: str,
        on_envelope: OnEnvelope,
        on_reconnect: OnReconnect | None = None,
        history_maxlen: int = DEFAULT_HISTORY_MAXLEN,
    ) -> None:
        self._redis = redis
        self._node_id = node_id
        self._on_envelope = on_envelope
        self._on_reconnect = on_reconnect
        self._history_maxlen = history_maxlen
        self._publish = redis.register_script(_PUBLISH)
        self._position = redis.register_script(_POSITION)
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._channels: dict[str, str] = {}  # channel -> stream
        self._reader: asyncio.Task[None] | None = None
        self._has_channels = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader task (owned by the broker; `stop` cancels it)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def stop(self) -> None:
        """Stop reading and release the pub/sub connection."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        await self._pubsub.aclose()

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, stream: str) -> None:
        """Receive `stream`'s messages on this node."""
        channel = stream_keys(stream)[3]
        if channel in self._channels:
            return
        self._channels[channel] = stream
        try:
            await self._pubsub.subscribe(channel)
        except Exception as exc:  # a broken pub/sub connection (redis-py may raise anything)
            # The reader notices the same breakage and resubscribes every channel.
            _log.info("broker_subscribe_deferred", channel=channel, error=repr(exc))
        self._has_channels.set()  # only now: reading before the first SUBSCRIBE fails

    async def unsubscribe(self, stream: str) -> None:
        """Stop receiving `stream`'s messages."""
        channel = stream_keys(stream)[3]
        if self._channels.pop(channel, None) is not None:
            with contextlib.suppress(*_REDIS_DOWN):
                await self._pubsub.unsubscribe(channel)

    # --- publishing and history ---------------------------------------------------------------

    async def publish(self, stream: str, message: Any, *, history: bool = True) -> tuple[int, str]:
        """Publish `message` on `stream` to every node; returns its (offset, epoch)."""
        offset_key, history_key, epoch_key, channel = stream_keys(stream)
        offset, epoch = await self._publish(
            keys=[offset_key, history_key, epoch_key, channel],
            args=[
                stream,
                msgpack.packb(message),
                _new_epoch(),
                self._history_maxlen if history else 0,
                self._node_id,
            ],
        )
        return int(offset), epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def position(self, stream: str) -> tuple[int, str]:
        """(last offset, epoch) of `stream`, creating the epoch if the stream is new."""
        offset_key, _history, epoch_key, _channel = stream_keys(stream)
        offset, epoch = await self._position(keys=[offset_key, epoch_key], args=[_new_epoch()])
        return int(offset), epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def history_after(
        self, stream: str, after: int, until: int
    ) -> list[tuple[int, Any]] | None:
        """Messages with offsets in (after, until], in order; None if history no longer
        reaches back that far (the caller then sends a fresh snapshot instead)."""
        if until <= after:
            return []
        history_key = stream_keys(stream)[1]
        entries = await self._redis.xrange(history_key, min=f"{after + 1}-1", max=f"{until}-1")
        found = [
            (int(entry_id.split(b"-")[0]), msgpack.unpackb(fields[b"p"]))
            for entry_id, fields in entries
        ]
        if len(found) != until - after:
            return None
        return found

    # --- reading ------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        failures = 0
        while True:
            if not self._channels:
                self._has_channels.clear()
                await self._has_channels.wait()
            try:
                if failures:
                    await self._resubscribe()
                    failures = 0
                    _log.info("broker_reconnected", channels=len(self._channels))
                    if self._on_reconnect is not None:
                        await self._on_reconnect()
                message = await self._pubsub.get_message(timeout=1.0)
            except (*_REDIS_DOWN, RuntimeError) as exc:  # RuntimeError: pub/sub never connected
                if failures == 0:
                    _log.warning("broker_disconnected", error=str(exc))
                await asyncio.sleep(
                    _RECONNECT_BACKOFF_S[min(failures, len(_RECONNECT_BACKOFF_S) - 1)]
                )
                failures += 1
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                envelope = decode_envelope(message["data"])
            except Exception:
                _log.exception("broker_bad_envelope")
                continue
            self._on_envelope(envelope)

    async def _resubscribe(self) -> None:
        """A fresh pub/sub connection subscribed to every stream this node follows."""
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        if self._channels:
            await self._pubsub.subscribe(*self._channels)
