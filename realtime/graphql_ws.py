"""GraphQL over WebSocket: the two subprotocols as sans-I/O state machines.

- `graphql-transport-ws` (`TransportWsProtocol`), the protocol of the `graphql-ws` npm client
  (https://github.com/enisdenjo/graphql-ws/blob/master/PROTOCOL.md): `connection_init` ->
  `connection_ack`, `ping`/`pong`, `subscribe` -> `next`* then `complete` (or `error`),
  `complete` from the client to stop. Violations close the socket with the protocol's codes:
  4400 invalid message, 4401 `subscribe` before the ack, 4403 credentials refused, 4408 no
  `connection_init` in time, 4409 an operation id already in use, 4429 a second
  `connection_init` (and, here, a message flood), 4500 internal error.
- `graphql-ws` (`LegacyWsProtocol`), the older subscriptions-transport-ws protocol:
  `connection_init` -> `connection_ack` (+ `ka` keep-alives), `start` -> `data`* then
  `complete` (or `error`), `stop`, `connection_terminate`; bad messages get `error` frames.

A machine turns each inbound text message into actions (`Send`, `Close`, `Authenticate`,
`Start`, `Stop`) that the connection (`realtime.graphql_socket`) carries out; it holds the
protocol state (initialised, acknowledged, operation ids) and nothing else, so both protocols
are tested without sockets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.common import jsontext

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"
SUBPROTOCOLS = (TRANSPORT_WS, LEGACY_WS)  # preference order

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_MESSAGE = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_INIT_TIMEOUT = 4408
CLOSE_DUPLICATE_ID = 4409
CLOSE_TOO_MANY = 4429
CLOSE_INTERNAL = 4500

MAX_ID_CHARS = 128
TOO_MANY_OPERATIONS = "TOO_MANY_OPERATIONS"


class OperationRefused(Exception):
    """An operation was refused before it ran (invalid, too costly, throttled, ...);
    `errors` are GraphQL error objects for the client."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["message"] if errors else "refused")
        self.errors = errors


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write this message."""

    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the socket with this code and reason."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Resolve the credentials of `connection_init` (the payload, possibly None), then call
    `accepted()` or `rejected()`."""

    payload: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Start:
    """Run the operation `payload` under `id`."""

    id: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the operation `id` (send nothing more for it)."""

    id: str


Action = Send | Close | Authenticate | Start | Stop


def encode(message: dict[str, Any]) -> bytes:
    """A message as the UTF-8 JSON text of a frame."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def _parse(text: str | bytes) -> dict[str, Any] | None:
    try:
        message = jsontext.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    return message


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


class _Machine:
    """What both protocols share: init state and the ids of running operations."""

    subprotocol = ""

    def __init__(self, max_operations: int) -> None:
        self.max_operations = max_operations
        self.init_received = False
        self.acknowledged = False
        self.operations: set[str] = set()

    def finished(self, op_id: str) -> None:
        """An operation ended (completed, failed or stopped): its id is free again."""
        self.operations.discard(op_id)

    def init_timed_out(self) -> list[Action]:
        """The init timer fired: close unless `connection_init` arrived."""
        if self.init_received:
            return []
        return [Close(CLOSE_INIT_TIMEOUT, "Connection initialisation timeout")]

    def too_many_messages(self) -> list[Action]:
        """The client sends faster than its message bucket allows."""
        return [Close(CLOSE_TOO_MANY, "Too many messages")]

    def _too_many_operations(self, op_id: str) -> list[Action]:
        return [
            self.error(
                op_id,
                [
                    {
                        "message": f"at most {self.max_operations} operations may run on one "
                        "connection; complete some first",
                        "extensions": {"code": TOO_MANY_OPERATIONS},
                    }
                ],
            )
        ]

    def _init_payload(self, message: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        payload = message.get("payload")
        if payload is None or isinstance(payload, dict):
            return True, payload
        return False, None

    # Overridden by each protocol.
    def receive(self, text: str | bytes) -> list[Action]:
        raise NotImplementedError

    def accepted(self) -> list[Action]:
        raise NotImplementedError

    def rejected(self, reason: str) -> list[Action]:
        raise NotImplementedError

    def next(self, op_id: str, result: dict[str, Any]) -> Action:
        raise NotImplementedError

    def error(self, op_id: str, errors: list[dict[str, Any]]) -> Action:
        raise NotImplementedError

    def complete(self, op_id: str) -> Action:
        return Send({"id": op_id, "type": "complete"})


class TransportWsProtocol(_Machine):
    """`graphql-transport-ws`: see the module docstring for its messages and close codes."""

    subprotocol = TRANSPORT_WS

    def receive(self, text: str | bytes) -> list[Action]:
        """The actions for one inbound message."""
        message = _parse(text)
        if message is None:
            return [Close(CLOSE_INVALID_MESSAGE, "Invalid message received")]
        kind = message["type"]
        if kind == "connection_init":
            if self.init_received:
                return [Close(CLOSE_TOO_MANY, "Too many initialisation requests")]
            well_formed, payload = self._init_payload(message)
            if not well_formed:
                return [Close(CLOSE_INVALID_MESSAGE, "connection_init payload must be an object")]
            self.init_received = True
            return [Authenticate(payload)]
        if kind == "ping":
            pong: dict[str, Any] = {"type": "pong"}
            if isinstance(message.get("payload"), dict):
                pong["payload"] = message["payload"]
            return [Send(pong)]
        if kind == "pong":
            return []
        if kind == "subscribe":
            op_id, payload = message.get("id"), message.get("payload")
            if not _valid_id(op_id) or not isinstance(payload, dict):
                return [Close(CLOSE_INVALID_MESSAGE, "subscribe needs an id and a payload object")]
            assert isinstance(op_id, str)
            if not self.acknowledged:
                return [Close(CLOSE_UNAUTHORIZED, "Unauthorized")]
            if op_id in self.operations:
                return [Close(CLOSE_DUPLICATE_ID, f"Subscriber for {op_id[:64]} already exists")]
            if len(self.operations) >= self.max_operations:
                return self._too_many_operations(op_id)
            self.operations.add(op_id)
            return [Start(op_id, payload)]
        if kind == "complete":
            op_id = message.get("id")
            if not _valid_id(op_id):
                return [Close(CLOSE_INVALID_MESSAGE, "complete needs an id")]
            assert isinstance(op_id, str)
            if op_id in self.operations:
                self.operations.discard(op_id)
                return [Stop(op_id)]
            return []  # already finished: nothing to stop
        return [Close(CLOSE_INVALID_MESSAGE, f"Invalid message type {kind[:40]!r}")]

    def accepted(self) -> list[Action]:
        """Credentials accepted (or none needed): acknowledge."""
        self.acknowledged = True
        return [Send({"type": "connection_ack"})]

    def rejected(self, reason: str) -> list[Action]:
        """Credentials refused."""
        return [Close(CLOSE_FORBIDDEN, "Forbidden")]

    def next(self, op_id: str, result: dict[str, Any]) -> Action:
        return Send({"id": op_id, "type": "next", "payload": result})

    def error(self, op_id: str, errors: list[dict[str, Any]]) -> Action:
        return Send({"id": op_id, "type": "error", "payload": errors})


class LegacyWsProtocol(_Machine):
    """`graphql-ws` (subscriptions-transport-ws): see the module docstring."""

    subprotocol = LEGACY_WS

    def __init__(self, max_operations: int) -> None:
        super().__init__(max_operations)

    def receive(self, text: str | bytes) -> list[Action]:
        """The actions for one inbound message."""
        message = _parse(text)
        if message is None:
            return [self._complaint(None, "Message must be JSON with a type")]
        kind = message["type"]
        if kind == "connection_init":
            if self.init_received:
                return [self._complaint(None, "connection_init was sent already")]
            well_formed, payload = self._init_payload(message)
            if not well_formed:
                return [
                    Send(
                        {
                            "type": "connection_error",
                            "payload": {"message": "payload must be an object"},
                        }
                    ),
                    Close(CLOSE_INVALID_MESSAGE, "connection_init payload must be an object"),
                ]
            self.init_received = True
            return [Authenticate(payload)]
        if kind == "start":
            op_id, payload = message.get("id"), message.get("payload")
            if not _valid_id(op_id) or not isinstance(payload, dict):
                shown = op_id if _valid_id(op_id) else None
                return [self._complaint(shown, "start needs an id and a payload object")]
            assert isinstance(op_id, str)
            if not self.acknowledged:
                return [self._complaint(op_id, "send connection_init first")]
            actions: list[Action] = []
            if op_id in self.operations:  # as subscriptions-transport-ws: replace it
                actions.append(Stop(op_id))
                self.operations.discard(op_id)
            if len(self.operations) >= self.max_operations:
                return actions + self._too_many_operations(op_id)
            self.operations.add(op_id)
            return [*actions, Start(op_id, payload)]
        if kind == "stop":
            op_id = message.get("id")
            if isinstance(op_id, str) and op_id in self.operations:
                self.operations.discard(op_id)
                return [Stop(op_id)]
            return []
        if kind == "connection_terminate":
            return [Close(CLOSE_NORMAL, "terminated")]
        return [self._complaint(message.get("id"), f"Invalid message type {kind[:40]!r}")]

    def accepted(self) -> list[Action]:
        """Credentials accepted: acknowledge and send the first keep-alive."""
        self.acknowledged = True
        return [Send({"type": "connection_ack"}), Send({"type": "ka"})]

    def rejected(self, reason: str) -> list[Action]:
        """Credentials refused: `connection_error`, then close."""
        return [
            Send({"type": "connection_error", "payload": {"message": reason}}),
            Close(CLOSE_FORBIDDEN, "Forbidden"),
        ]

    def next(self, op_id: str, result: dict[str, Any]) -> Action:
        return Send({"id": op_id, "type": "data", "payload": result})

    def error(self, op_id: str, errors: list[dict[str, Any]]) -> Action:
        return Send({"id": op_id, "type": "error", "payload": errors})

    def _complaint(self, op_id: Any, message: str) -> Action:
        error: dict[str, Any] = {"type": "error", "payload": {"message": message}}
        if _valid_id(op_id):
            error["id"] = op_id
        return Send(error)


def machine_for(subprotocol: str, max_operations: int) -> _Machine:
    """The state machine of `subprotocol` (one of `SUBPROTOCOLS`)."""
    if subprotocol == TRANSPORT_WS:
        return TransportWsProtocol(max_operations)
    return LegacyWsProtocol(max_operations)


def choose_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol to answer with: `graphql-transport-ws` before the legacy one."""
    for subprotocol in SUBPROTOCOLS:
        if subprotocol in offered:
            return subprotocol
    return None
