"""Redis broker: cross-node delivery, offsets, epochs and bounded history per stream.

Every publish runs one Lua script that takes the stream's next offset (INCR), appends the
message to its history (XADD with the offset as entry id and Redis' clock in milliseconds as
field `t`, for `since` requests; MAXLEN keeps exactly the history limit, and the whole history
expires when the stream has been quiet for the history TTL, as in AnyCable), and PUBLISHes a
msgpack envelope `[stream, offset, epoch, payload, origin]`. Being one script, two nodes publishing
to one stream can never reorder or duplicate offsets. All keys of a stream share one hash tag
(`{inventory:product:42}:offset`, `...:history`, `...:epoch`, channel `...:live`), so the same
script runs unchanged on a Redis Cluster, where it SPUBLISHes instead: sharded pub/sub keeps
each message on the shard that owns its stream.

The epoch is a random string stored beside the offset; when Redis loses the stream's data
(restart without persistence, eviction) the epoch is made anew, so clients holding the old one
know their offsets mean nothing any more and take a fresh snapshot. When Redis loses only the
last writes (a master dies before its replica got them: the promoted replica has the epoch but
an older offset, and would hand the lost offsets out again for other messages), the node that
notices rotates the epoch (`rotate_epoch`): see `realtime.cable`, "lost writes".

A node subscribes to a stream's channel while it has local subscribers. The subscription
(`server.adapters.pubsub.ResilientSubscription`, or
`server.adapters.sharded_pubsub.ShardedSubscription` on a cluster) survives Redis restarts and
failovers; after each reconnect the node
asks for every followed stream's position so the hub can fill the gap from history or
resynchronise.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import msgpack

from realtime.recovery import complete_run
from server.adapters.pubsub import ResilientSubscription
from server.adapters.redis_client import keys_in_slots
from server.adapters.sharded_pubsub import ShardedSubscription
from server.common.logs import get_logger

_log = get_logger("finalmarket.broker")

DEFAULT_HISTORY_MAXLEN = 100
DEFAULT_HISTORY_TTL_S = 300

# The publish, atomically. KEYS: offset, history, epoch, channel (`stream_keys`). ARGV: stream,
# msgpack payload, epoch to create if the stream has none, history limit (0: no history entry),
# origin node, PUBLISH or SPUBLISH, history TTL in seconds (0: none). Returns {offset, epoch}.
PUBLISH_SCRIPT = """
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[3], epoch)
end
local offset = redis.call('INCR', KEYS[1])
local maxlen = tonumber(ARGV[4])
if maxlen > 0 then
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('XADD', KEYS[2], 'MAXLEN', maxlen, offset .. '-1', 'p', ARGV[2], 't', ms)
  local ttl = tonumber(ARGV[7])
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[2], ttl)
  end
end
redis.call(ARGV[6], KEYS[4], cmsgpack.pack({ARGV[1], offset, epoch, ARGV[2], ARGV[5]}))
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


# A new epoch for a stream whose writes were lost (an unplanned failover of its master): set
# only if the epoch is still the one the caller knew (or none), so nodes noticing the same
# loss agree on one new epoch. KEYS: epoch. ARGV: the epoch known, the new one. Returns the
# stream's epoch now.
_ROTATE_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if (not epoch) or epoch == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return epoch
"""


# A new epoch for a stream whose slot's master failed over unplanned, once per failover however
# many nodes ask (the failover is remembered on the stream for a day). KEYS: epoch, failover
# marker. ARGV: the failover's name, a new epoch. Returns the stream's epoch now.
_ROTATE_AFTER_FAILOVER = """
local epoch = redis.call('GET', KEYS[1])
if epoch and redis.call('GET', KEYS[2]) == ARGV[1] then
  return epoch
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'EX', 86400)
return ARGV[2]
"""
_EPOCH_SUFFIX = "}:epoch"


def failover_key(stream: str) -> str:
    """The key remembering the last failover that gave `stream` a new epoch."""
    return "{" + stream + "}:failover"


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
        *,
        sharded: bool = False,
        history_ttl_s: int = DEFAULT_HISTORY_TTL_S,
    ) -> None:
        """`sharded`: `redis` is a Redis Cluster client; use sharded pub/sub (SPUBLISH and
        SSUBSCRIBE), so each message crosses only the shard that owns its stream.
        `history_maxlen` messages are kept per stream; a stream's history expires
        `history_ttl_s` after its last publish (0: never)."""
        self._redis = redis
        self._sharded = sharded
        self._publish_command = "SPUBLISH" if sharded else "PUBLISH"
        self._node_id = node_id
        self._on_envelope = on_envelope
        self._on_reconnect = on_reconnect
        self._history_maxlen = history_maxlen
        self._history_ttl_s = history_ttl_s
        self._publish = redis.register_script(PUBLISH_SCRIPT)
        self._outbox: list[tuple[tuple[list[str], list[Any]], asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._position = redis.register_script(_POSITION)
        self._rotate_epoch = redis.register_script(_ROTATE_EPOCH)
        self._rotate_after_failover = redis.register_script(_ROTATE_AFTER_FAILOVER)
        subscription = ShardedSubscription if sharded else ResilientSubscription
        self._subscription = subscription(redis, self._on_message, self._reconnected, "broker")

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading (the subscription task is owned here; `stop` cancels it)."""
        self._subscription.start()

    async def stop(self) -> None:
        """Stop reading and release the pub/sub connection (queued publishes finish first)."""
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)
        await self._subscription.stop()

    @property
    def reconnects(self) -> int:
        """How often the pub/sub subscription had to be re-established (messages lost meanwhile
        were then recovered from history)."""
        return self._subscription.reconnects

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, stream: str) -> None:
        """Receive `stream`'s messages on this node."""
        await self._subscription.subscribe(stream_keys(stream)[3])

    async def unsubscribe(self, stream: str) -> None:
        """Stop receiving `stream`'s messages."""
        await self._subscription.unsubscribe(stream_keys(stream)[3])

    # --- publishing and history ---------------------------------------------------------------

    async def publish(self, stream: str, message: Any, *, history: bool = True) -> tuple[int, str]:
        """Publish `message` on `stream` to every node; returns its (offset, epoch).

        Publishes leave this node in call order: they are queued and sent by one drainer,
        everything queued meanwhile in one pipeline on one connection. Order is kept (one
        connection is FIFO), and a burst costs one round trip and reaches subscribers as one
        batch, which the hub then coalesces.
        """
        offset_key, history_key, epoch_key, channel = stream_keys(stream)
        request = (
            [offset_key, history_key, epoch_key, channel],
            [
                stream,
                msgpack.packb(message),
                _new_epoch(),
                self._history_maxlen if history else 0,
                self._node_id,
                self._publish_command,
                self._history_ttl_s,
            ],
        )
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._outbox.append((request, done))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain_outbox())
        offset, epoch = await done
        return int(offset), epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def _drain_outbox(self) -> None:
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                if len(batch) == 1:
                    (keys, args), _ = batch[0]
                    results = [await self._publish(keys=keys, args=args)]
                elif self._sharded:
                    results = await self._publish_per_stream(batch)
                else:
                    pipe = self._redis.pipeline(transaction=False)
                    for (keys, args), _ in batch:
                        await self._publish(keys=keys, args=args, client=pipe)
                    results = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                results = [exc] * len(batch)
            for (_, done), result in zip(batch, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def _publish_per_stream(
        self, batch: list[tuple[tuple[list[str], list[Any]], asyncio.Future[Any]]]
    ) -> list[Any]:
        """A batch on a cluster, where redis-py pipelines no scripts: the messages of one
        stream one after another (their order), the streams side by side."""
        results: list[Any] = [None] * len(batch)
        by_stream: dict[str, list[int]] = {}
        for index, ((keys, _args), _done) in enumerate(batch):
            by_stream.setdefault(keys[0], []).append(index)

        async def in_order(indexes: list[int]) -> None:
            for index in indexes:
                (keys, args), _done = batch[index]
                try:
                    results[index] = await self._publish(keys=keys, args=args)
                except Exception as exc:
                    results[index] = exc

        await asyncio.gather(*(in_order(indexes) for indexes in by_stream.values()))
        return results

    async def position(self, stream: str) -> tuple[int, str]:
        """(last offset, epoch) of `stream`, creating the epoch if the stream is new."""
        offset_key, _history, epoch_key, _channel = stream_keys(stream)
        offset, epoch = await self._position(keys=[offset_key, epoch_key], args=[_new_epoch()])
        return int(offset), epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def rotate_epoch(self, stream: str, known: str) -> str:
        """Start a new epoch for `stream` if its epoch is still `known` (Redis lost writes of
        it: offsets clients hold may be reused for other messages); returns the epoch now."""
        epoch = await self._rotate_epoch(keys=[stream_keys(stream)[2]], args=[known, _new_epoch()])
        return epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def rotate_epoch_after_failover(self, stream: str, failover: str) -> str:
        """Start a new epoch for `stream` unless `failover` (an unplanned failover of its
        slot's master, named as `server.adapters.cluster_health` names it) gave it one
        already; returns the epoch now."""
        epoch = await self._rotate_after_failover(
            keys=[stream_keys(stream)[2], failover_key(stream)],
            args=[failover, _new_epoch()],
        )
        return epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def streams_in(self, slots: Collection[int]) -> list[str]:
        """Every stream with an epoch in `slots` of a Redis Cluster (SCAN of the masters now
        serving them, one pass each); none on a single Redis."""
        if not self._sharded:
            return []
        keys = await keys_in_slots(self._redis, slots, "{*" + _EPOCH_SUFFIX, "string")
        return [key.decode()[1 : -len(_EPOCH_SUFFIX)] for key in keys]

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
        return complete_run(found, after, until)

    async def history_since(self, stream: str, since_s: int, until: int) -> list[tuple[int, Any]]:
        """Messages with offsets up to `until` published at or after `since_s` (Unix seconds,
        by Redis' clock), in order: what history still holds of them."""
        history_key = stream_keys(stream)[1]
        entries = await self._redis.xrange(history_key, min="-", max=f"{until}-1")
        since_ms = since_s * 1000
        return [
            (int(entry_id.split(b"-")[0]), msgpack.unpackb(fields[b"p"]))
            for entry_id, fields in entries
            if int(fields.get(b"t", 0)) >= since_ms
        ]

    # --- reading ------------------------------------------------------------------------------

    def _on_message(self, _channel: str, data: bytes) -> None:
        try:
            envelope = decode_envelope(data)
        except Exception:
            _log.exception("broker_bad_envelope")
            return
        self._on_envelope(envelope)

    async def _reconnected(self) -> None:
        if self._on_reconnect is not None:
            await self._on_reconnect()
