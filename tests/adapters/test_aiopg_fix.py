"""Reconnecting to a PostgreSQL that refuses connections, on uvloop.

(server/adapters/db/aiopg_fix.py)
"""

from __future__ import annotations

import asyncio
import socket

import aiopg
import psycopg2
import pytest
import uvloop

import server.adapters.db.pools  # noqa: F401  (installs the fix, as the node does)


def test_every_refused_connect_is_an_operational_error() -> None:
    """Without the fix every second attempt raised uvloop's RuntimeError instead."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe is closed

    async def attempts() -> list[type[BaseException]]:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        seen = []
        for _ in range(6):
            with pytest.raises(Exception) as caught:
                await aiopg.connect(f"postgresql://postgres@127.0.0.1:{port}/x", timeout=5)
            seen.append(caught.type)
        return seen

    assert uvloop.run(attempts()) == [psycopg2.OperationalError] * 6
