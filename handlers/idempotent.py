"""`Idempotency-Key` on the cart's change endpoints (see `server.adapters.idempotency`).

A handler runs its change through `await self.run_idempotent(user_id, work)` after validating
the request: without the header `work(None)` just runs; with it the key is claimed in Redis
first, a replay is answered with the stored answer (and `Idempotent-Replayed: true`) without
running `work`, and a fresh claim runs `work(once)`, stores its answer under the key and sends
it. A `work` that fails releases the key, so the client's retry runs again.

Redis answers fast, but it is not what makes a change apply once: `once` carries the key into
the change's own shard transaction (`server.domain.carts.Once`), so when Redis lost the key (a
master died before its replica had it) the shard still knows the change ran and the replay is
answered with the answer it stored there.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from handlers.api import ApiHandler
from handlers.base import ApiError
from handlers.gate import Gate
from server.adapters.idempotency import (
    MAX_KEY_CHARS,
    IdempotencyStore,
    InProgress,
    KeyReused,
    fingerprint,
)
from server.domain.carts import ChangeAlreadyApplied, Once

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


class IdempotentHandler(ApiHandler):
    """Parent of handlers whose changes honour an optional `Idempotency-Key`."""

    idempotency: IdempotencyStore

    def initialize(self, gate: Gate, idempotency: IdempotencyStore) -> None:  # type: ignore[override]
        super().initialize(gate)
        self.idempotency = idempotency

    def idempotency_key(self) -> str | None:
        """The request's `Idempotency-Key`, None without one; a 400 problem if malformed."""
        key = self.request.headers.get(IDEMPOTENCY_HEADER)
        if key is None:
            return None
        if not 1 <= len(key) <= MAX_KEY_CHARS or not key.isprintable():
            raise ApiError(
                400,
                "invalid-idempotency-key",
                f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_CHARS} printable characters",
                field=IDEMPOTENCY_HEADER,
            )
        return key

    async def run_idempotent(
        self, user_id: int, work: Callable[[Once | None], Awaitable[Any]], status: int = 200
    ) -> None:
        """Answer with `await work(once)` as JSON, applying it at most once per key."""
        key = self.idempotency_key()
        if key is None:
            self.write_json(await work(None), status=status)
            return
        store = self.idempotency
        request_fingerprint = fingerprint(
            self.request.method or "", self.request.path, self.request.body or b""
        )
        try:
            stored = await store.claim(user_id, key, request_fingerprint)
        except InProgress:
            raise ApiError(
                409,
                "idempotent-request-in-progress",
                f"a request with this {IDEMPOTENCY_HEADER} is still running; retry",
                headers={"Retry-After": "1"},
            ) from None
        except KeyReused:
            raise ApiError(
                422,
                "idempotency-key-reused",
                f"this {IDEMPOTENCY_HEADER} was used for a different request",
                field=IDEMPOTENCY_HEADER,
            ) from None
        if stored is not None:
            self.set_header(REPLAYED_HEADER, "true")
            self.write_json(stored.body, status=stored.status)
            return
        once = Once("cart:" + hashlib.sha256(key.encode()).hexdigest(), request_fingerprint)
        try:
            body = await work(once)
        except ChangeAlreadyApplied as applied:  # Redis had lost the key; the shard had not
            await store.store(user_id, key, request_fingerprint, status, applied.answer)
            self.set_header(REPLAYED_HEADER, "true")
            self.write_json(applied.answer, status=status)
            return
        except BaseException:
            with contextlib.suppress(Exception):
                await store.release(user_id, key)
            raise
        await store.store(user_id, key, request_fingerprint, status, body)
        self.write_json(body, status=status)
