"""A database nobody answers for makes requests 503 with Retry-After, never a bare 500."""

from __future__ import annotations

import json
import socket
from typing import Any

import psycopg2
import pytest
from tornado.httpclient import HTTPClientError

from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    """Every user shard points at a port where nothing listens; the catalog is fine."""
    down = f"postgresql://postgres@127.0.0.1:{_closed_port()}/fm_shard_x"
    return make_settings(infra_env, shards=[{"primary": down}] * 4, connect_timeout_s=1)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_sign_up_while_the_shard_is_down_is_503_and_frees_the_email(
    http_client: Any, base_url: str, infra_env: dict[str, str]
) -> None:
    body = json.dumps({"email": "ada@example.com", "password": "correct horse"})
    with pytest.raises(HTTPClientError) as caught:
        await http_client.fetch(
            base_url + "/api/v1/users",
            method="POST",
            body=body,
            headers={"Content-Type": "application/json"},
        )
    response = caught.value.response
    assert response is not None and response.code == 503
    assert response.headers["Retry-After"] == "1"
    problem = json.loads(response.body)
    assert problem["type"] == "/problems/temporarily-unavailable"
    with psycopg2.connect(infra_env["FM_CATALOG_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM user_directory")
        assert cur.fetchone() == (0,), "the failed sign-up must not keep the email claimed"
    conn.close()
