"""Property tests of the recovery rules (`realtime/recovery.py`): generated sequences of
publishes, lost deliveries, history trims, data losses, reconnects and resubscribes, run
through a model of one node and its clients built from those rules alone.

Invariant checked after every step: each client has been sent every offset of a stream at most
once and in order (within an epoch, offsets only grow); between a snapshot and the next one, a
client of an every-message stream got every offset (no silent hole); a client of a
latest-value stream that comes back gets at most one message before the live ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.cable_codec import HistoryRequest
from realtime.recovery import (
    HISTORY_CONFIRMED,
    HISTORY_REJECTED,
    Arrival,
    Gap,
    Recovery,
    Step,
    arrival,
    complete_run,
    gap_step,
    plan_first_messages,
    when_history_is_missing,
)

STREAM = "cart:user:1"
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


@dataclass
class Redis:
    """The stream as Redis keeps it: the last offset, the epoch and a bounded history."""

    limit: int
    offset: int = 0
    epoch: str = "e0"
    history: list[tuple[int, Any]] = field(default_factory=list)
    epochs: int = 0

    def publish(self, keep: bool) -> tuple[int, str]:
        self.offset += 1
        if keep and self.limit:
            self.history.append((self.offset, f"m{self.offset}"))
            del self.history[: -self.limit]
        return self.offset, self.epoch

    def lose_data(self) -> None:
        self.epochs += 1
        self.offset, self.epoch, self.history = 0, f"e{self.epochs}", []


@dataclass
class Client:
    """What one client has been sent: (epoch, offset, kind) in order; kind is "message",
    "snapshot" or "replay"."""

    protocol: str  # "ext" (position beside the message, history requests) or "plain" (since)
    connected: bool = True
    received: list[tuple[str, int, str]] = field(default_factory=list)
    since_return: int | None = None  # index in `received` where the last return began

    @property
    def position(self) -> tuple[str, int] | None:
        return self.received[-1][:2] if self.received else None


class Node:
    """One node following the stream for its clients, doing what `realtime.cable` does with
    the rules: deliver in order, fill gaps from history or resync, plan first messages."""

    def __init__(self, redis: Redis, recovery: Recovery) -> None:
        self.redis = redis
        self.recovery = recovery
        self.offset, self.epoch = redis.offset, redis.epoch
        self.clients: list[Client] = []

    def _send(self, epoch: str, offset: int, kind: str) -> None:
        for client in self.clients:
            if client.connected:
                client.received.append((epoch, offset, kind))

    def _fill(self, until: int, epoch: str) -> None:
        step = gap_step(self.offset, self.epoch, until, epoch)
        if step is Gap.NONE:
            return
        if step is Gap.FROM_HISTORY:
            missed = complete_run(self.redis.history, self.offset, until)
            if missed is not None:
                for offset, _payload in missed:
                    self._send(epoch, offset, "message")
                self.offset = until
                return
        self.offset, self.epoch = until, epoch
        self._send(epoch, until, "snapshot")

    def receive(self, offset: int, epoch: str) -> None:
        seen = arrival(offset, epoch, self.offset, self.epoch)
        if seen is Arrival.DELIVERED:
            return
        if seen is Arrival.GAP:
            self._fill(offset - 1, epoch)
        if arrival(offset, epoch, self.offset, self.epoch) is Arrival.NEXT:
            self.offset = offset
            self._send(epoch, offset, "message")

    def reconnected(self) -> None:
        if (self.redis.epoch, self.redis.offset) != (self.epoch, self.offset):
            self._fill(self.redis.offset, self.redis.epoch)

    def resubscribe(self, client: Client, since_only: bool) -> str | None:
        """The client comes back (its last position in its request); returns the history
        answer it got (None on the plain protocol)."""
        position = client.position
        history: HistoryRequest | None = None
        params: dict[str, Any] = {}
        if client.protocol == "ext":
            streams = {} if position is None or since_only else {STREAM: position}
            history = HistoryRequest(1 if since_only else None, streams)
        elif position is not None:
            params = {"since": position[1], "epoch": position[0]}
        plan = plan_first_messages(self.recovery, STREAM, params, history, self.offset, self.epoch)
        client.connected, client.since_return = True, len(client.received)
        if plan.step is Step.REPLAY:
            missed = complete_run(self.redis.history, plan.after, self.offset)
            if missed is None:
                plan = when_history_is_missing(plan)
            else:
                client.received += [(self.epoch, offset, "replay") for offset, _ in missed]
        if plan.step in (Step.SNAPSHOT, Step.SINCE):
            client.received.append((self.epoch, self.offset, "snapshot"))
        return plan.outcome


Action = tuple[str, int]
actions = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "publish",
                "publish",
                "publish",
                "lose_delivery",
                "publish_without_history",
                "drop_client",
                "resubscribe",
                "resubscribe_since_only",
                "reconnect_node",
                "lose_data",
            ]
        ),
        st.integers(0, 2),  # which client
    ),
    max_size=60,
)


def check_in_order_once(client: Client, recovery: Recovery) -> None:
    by_epoch: dict[str, int] = {}
    previous: tuple[str, int, str] | None = None
    for epoch, offset, kind in client.received:
        assert offset > by_epoch.get(epoch, -1), client.received  # at most once, in order
        by_epoch[epoch] = offset
        if (
            recovery is Recovery.EVERY_MESSAGE
            and previous is not None
            and previous[0] == epoch
            and kind != "snapshot"
        ):
            assert offset == previous[1] + 1, client.received  # no silent hole
        previous = (epoch, offset, kind)


@PROPERTY_SETTINGS
@given(
    recovery=st.sampled_from(list(Recovery)),
    limit=st.integers(0, 6),
    protocols=st.lists(st.sampled_from(["ext", "plain"]), min_size=3, max_size=3),
    steps=actions,
)
def test_every_offset_reaches_each_client_at_most_once_and_in_order(
    recovery: Recovery, limit: int, protocols: list[str], steps: list[Action]
) -> None:
    redis = Redis(limit)
    node = Node(redis, recovery)
    node.clients = [Client(protocol) for protocol in protocols]
    for client in node.clients:
        client.received.append((node.epoch, node.offset, "snapshot"))
    for action, which in steps:
        client = node.clients[which]
        if action in ("publish", "lose_delivery", "publish_without_history"):
            offset, epoch = redis.publish(keep=action != "publish_without_history")
            if action != "lose_delivery":
                node.receive(offset, epoch)
        elif action == "drop_client":
            client.connected = False
        elif action.startswith("resubscribe") and not client.connected:
            if action.endswith("since_only"):
                # A client without a position of the stream (a reloaded page: the published
                # client names every stream it has had a message of) starts afresh.
                client.received = []
            mark = len(client.received)
            outcome = node.resubscribe(client, since_only=action.endswith("since_only"))
            back = client.received[mark:]
            if recovery is Recovery.LATEST_VALUE:
                assert len(back) <= 1, back
                assert outcome in (None, HISTORY_CONFIRMED)
                if back:  # the current state at the newest offset
                    assert back[0][1:] == (node.offset, "snapshot")
            if outcome == HISTORY_REJECTED:
                assert [kind for _e, _o, kind in back] in ([], ["snapshot"])
        elif action == "reconnect_node":
            node.reconnected()
        elif action == "lose_data":
            redis.lose_data()
        for each in node.clients:
            check_in_order_once(each, recovery)


@PROPERTY_SETTINGS
@given(
    history=st.lists(st.integers(1, 30), unique=True),
    after=st.integers(0, 30),
    span=st.integers(0, 10),
)
def test_a_run_is_complete_or_none_and_never_a_part(
    history: list[int], after: int, span: int
) -> None:
    until = after + span
    entries = [(offset, f"m{offset}") for offset in history]
    run = complete_run(entries, after, until)
    wanted = set(range(after + 1, until + 1))
    if wanted <= set(history):
        assert run == [(offset, f"m{offset}") for offset in range(after + 1, until + 1)]
    else:
        assert run is None


@PROPERTY_SETTINGS
@given(
    recovery=st.sampled_from(list(Recovery)),
    offset=st.integers(0, 50),
    client_offset=st.integers(0, 60),
    same_epoch=st.booleans(),
    listed=st.booleans(),
    since=st.one_of(st.none(), st.integers(1, 2**31)),
)
def test_a_replay_never_starts_before_or_reaches_past_the_position(
    recovery: Recovery,
    offset: int,
    client_offset: int,
    same_epoch: bool,
    listed: bool,
    since: int | None,
) -> None:
    epoch = "e"
    position = ("e" if same_epoch else "other", client_offset)
    history = HistoryRequest(since, {STREAM: position} if listed else {})
    plan = plan_first_messages(recovery, STREAM, {}, history, offset, epoch)
    if plan.step is Step.REPLAY:
        # Only a position of this epoch, at or behind the stream, is replayed after.
        assert recovery is Recovery.EVERY_MESSAGE and listed and same_epoch
        assert plan.after == client_offset <= offset and plan.outcome == HISTORY_CONFIRMED
    if recovery is Recovery.LATEST_VALUE:
        assert plan.outcome == HISTORY_CONFIRMED and plan.step is not Step.REPLAY
        assert (plan.step is Step.NOTHING) == (listed and position == (epoch, offset))
