"""Readiness follows its dependencies: Redis going away and coming back, a shard unreachable."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.wiring.infra import ValkeyServer
from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings
from tests.helpers.http import get_json


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Valkey server of this test's own, so stopping it disturbs no other test."""
    server = ValkeyServer(tmp_path / "valkey", port=_free_port(), log=lambda line: None)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(infra_env: dict[str, str], own_valkey: ValkeyServer) -> Settings:
    """The test deployment, but with this module's own Redis."""
    return make_settings(infra_env, redis_url=own_valkey.url, redis_timeout_s=0.5)


@pytest.mark.gen_test(timeout=30)
async def test_readyz_goes_503_while_redis_is_down_and_recovers(
    http_client: Any, base_url: str, own_valkey: ValkeyServer
) -> None:
    assert (await get_json(http_client, base_url + "/readyz"))[0] == 200
    own_valkey.stop()
    code, body = await get_json(http_client, base_url + "/readyz")
    assert code == 503
    assert any(reason.startswith("redis:") for reason in body["reasons"]), body
    own_valkey.start()
    code, body = await get_json(http_client, base_url + "/readyz")
    assert (code, body["status"]) == (200, "ready")


class TestUnreachableShard:
    """A shard primary nobody answers for makes the node unready, naming that shard."""

    @pytest.fixture
    def settings(self, infra_env: dict[str, str], own_valkey: ValkeyServer) -> Settings:
        shards = json.loads(infra_env["FM_SHARDS"])
        shards[2] = {"primary": f"postgresql://postgres@127.0.0.1:{_free_port()}/x"}
        return make_settings(infra_env, redis_url=own_valkey.url, shards=shards)

    @pytest.mark.gen_test(timeout=30)
    async def test_readyz_names_the_unreachable_shard(
        self, http_client: Any, base_url: str
    ) -> None:
        code, body = await get_json(http_client, base_url + "/readyz")
        assert code == 503
        assert len(body["reasons"]) == 1, body
        assert body["reasons"][0].startswith("postgres shard_2 primary:"), body
