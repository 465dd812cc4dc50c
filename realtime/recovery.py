"""Recovery decisions, from positions alone: what a (re)subscribing client is sent before live
messages, whether a history run is complete, and how an arriving message stands against what
a node has delivered.

Pure functions of offsets and epochs (no I/O, no clock), so the rules that keep every offset
at most once and in order per stream can be checked on their own (tests/realtime/
test_recovery.py runs them against generated sequences of publishes, losses and reconnects).
`realtime.cable` does the reading and sending they decide on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from realtime.cable_codec import HistoryRequest

# What a subscription's first messages answer to an extended `history` request.
HISTORY_CONFIRMED = "confirmed"
HISTORY_REJECTED = "rejected"


class Recovery(StrEnum):
    """What a channel's stream needs to bring a client that was away up to date."""

    EVERY_MESSAGE = "every_message"
    """Every message it missed, in order (a cart's changes, notifications)."""
    LATEST_VALUE = "latest_value"
    """Only the newest state (Centrifugo's cache mode): after any gap, one message, the
    channel's current state stamped with the stream's newest offset. The channel must have a
    snapshot."""


class Step(Enum):
    """What precedes the live messages of a subscription."""

    NOTHING = "nothing"  # the client is at the stream's newest offset
    REPLAY = "replay"  # history after `Plan.after`; when history cannot give it, SNAPSHOT
    SNAPSHOT = "snapshot"  # the channel's current state (none if it has none)
    SINCE = "since"  # the current state, or for a channel without one the messages since then


@dataclass(frozen=True, slots=True)
class Plan:
    """The first messages of one subscription: a step, the answer to an extended `history`
    request (None: it made none), and for REPLAY the last offset the client has."""

    step: Step
    outcome: str | None = None
    after: int = 0


def plan_first_messages(
    recovery: Recovery,
    stream: str,
    params: dict[str, Any],
    history: HistoryRequest | None,
    offset: int,
    epoch: str,
) -> Plan:
    """What a subscriber of `stream` gets up to the node's position (`offset`, `epoch`).

    With `history` (the extended protocol), for a stream listed in it: the messages after the
    client's offset (confirmed), or when its epoch differs or its offset is ahead of the
    stream, the current state (rejected); with `since` only, SINCE (confirmed); with neither,
    the current state (rejected). Without `history`, the identifier's `since`/`epoch` params
    (the plain protocols' recovery): a replay, else the current state.

    A LATEST_VALUE stream answers every request with nothing when the client is at the
    stream's newest offset in its epoch, else with the current state alone, and confirms an
    extended request either way (the state is all the client needs).
    """
    if history is None:
        since, client_epoch = params.get("since"), params.get("epoch")
        if (
            isinstance(since, int)
            and not isinstance(since, bool)
            and 0 <= since <= offset
            and client_epoch in (None, epoch)
        ):
            if recovery is Recovery.LATEST_VALUE:
                return Plan(Step.NOTHING if since == offset else Step.SNAPSHOT)
            return Plan(Step.REPLAY, after=since)
        return Plan(Step.SNAPSHOT)
    position = history.streams.get(stream)
    if recovery is Recovery.LATEST_VALUE:
        if position is None and history.since is not None:
            return Plan(Step.SINCE, HISTORY_CONFIRMED)
        if position == (epoch, offset):
            return Plan(Step.NOTHING, HISTORY_CONFIRMED)
        return Plan(Step.SNAPSHOT, HISTORY_CONFIRMED)
    if position is not None:
        client_epoch, client_offset = position
        if client_epoch != epoch or client_offset > offset:
            return Plan(Step.SNAPSHOT, HISTORY_REJECTED)
        return Plan(Step.REPLAY, HISTORY_CONFIRMED, client_offset)
    if history.since is None:
        return Plan(Step.SNAPSHOT, HISTORY_REJECTED)
    return Plan(Step.SINCE, HISTORY_CONFIRMED)


def when_history_is_missing(plan: Plan) -> Plan:
    """A REPLAY whose messages history no longer holds: the current state instead, with the
    extended request rejected."""
    return Plan(Step.SNAPSHOT, None if plan.outcome is None else HISTORY_REJECTED)


def complete_run(
    entries: Iterable[tuple[int, Any]], after: int, until: int
) -> list[tuple[int, Any]] | None:
    """The entries with offsets in (after, until], in order, if history holds every one of
    them; None if any is missing (trimmed, expired, never written)."""
    if until <= after:
        return []
    run = [(offset, payload) for offset, payload in entries if after < offset <= until]
    run.sort(key=lambda entry: entry[0])
    if len(run) != until - after or any(
        offset != after + 1 + index for index, (offset, _payload) in enumerate(run)
    ):
        return None
    return run


class Arrival(Enum):
    """How a message reaching a node stands against the last offset it delivered."""

    DELIVERED = "delivered"  # at or before it (already replayed from history): drop
    NEXT = "next"  # exactly the one after it: deliver
    GAP = "gap"  # past the next one, or of another epoch: fill the gap first


def arrival(offset: int, epoch: str, delivered_offset: int, delivered_epoch: str) -> Arrival:
    """Classify a message at (`offset`, `epoch`) on a stream where the node has delivered up
    to (`delivered_offset`, `delivered_epoch`)."""
    if epoch != delivered_epoch:
        return Arrival.GAP
    if offset <= delivered_offset:
        return Arrival.DELIVERED
    if offset == delivered_offset + 1:
        return Arrival.NEXT
    return Arrival.GAP


class Gap(Enum):
    """How a node brings a stream's subscribers from what it delivered to a later position."""

    NONE = "none"  # nothing is missing (Redis is not ahead of what was delivered)
    FROM_HISTORY = "from_history"  # the messages in between, if history still holds them all
    RESYNC = "resync"  # another epoch: the stream's data was lost; a fresh state at the target


def gap_step(delivered_offset: int, delivered_epoch: str, until: int, epoch: str) -> Gap:
    """What fills the way from (`delivered_offset`, `delivered_epoch`) to offset `until` of
    `epoch` (when FROM_HISTORY finds history incomplete, RESYNC too)."""
    if epoch != delivered_epoch:
        return Gap.RESYNC
    if until > delivered_offset:
        return Gap.FROM_HISTORY
    return Gap.NONE
