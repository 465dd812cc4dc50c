"""Where the databases live, as the pools and the router need it: a structural view of the
node's settings (any object with these attributes will do), so the adapters do not depend on
the wiring's settings class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, Field


class ShardDsn(BaseModel):
    """Where one user shard lives: its primary and, optionally, a streaming replica."""

    model_config = {"extra": "forbid", "frozen": True}

    primary: str = Field(min_length=1, description="libpq DSN of the shard's primary")
    replica: str | None = Field(default=None, description="libpq DSN of the shard's replica")


class DatabaseSettings(Protocol):
    """What opening the pools reads (`server.wiring.settings.Settings` has all of it)."""

    @property
    def catalog_dsn(self) -> str: ...
    @property
    def catalog_replica_dsn(self) -> str | None: ...
    @property
    def shards(self) -> Sequence[ShardDsn]: ...
    @property
    def pool_min_size(self) -> int: ...
    @property
    def pool_max_size(self) -> int: ...
    @property
    def pool_acquire_timeout_s(self) -> float: ...
    @property
    def connect_timeout_s(self) -> int: ...
    @property
    def statement_timeout_ms(self) -> int: ...
