"""Liveness, readiness and metrics over real HTTP against real Redis and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from server.wiring.services import Services
from tests.helpers.http import get_json


@pytest.mark.gen_test
async def test_healthz_answers_ok(http_client: Any, base_url: str) -> None:
    code, body = await get_json(http_client, base_url + "/healthz")
    assert code == 200
    assert body["status"] == "ok"


@pytest.mark.gen_test
async def test_readyz_is_ready_when_redis_and_primaries_answer(
    http_client: Any, base_url: str
) -> None:
    code, body = await get_json(http_client, base_url + "/readyz")
    assert (code, body["status"]) == (200, "ready")


@pytest.mark.gen_test
async def test_readyz_is_unavailable_while_draining(
    http_client: Any, base_url: str, services: Services
) -> None:
    services.state.draining = True
    code, body = await get_json(http_client, base_url + "/readyz")
    assert code == 503
    assert body["reasons"] == ["draining: node is shutting down"]


@pytest.mark.gen_test
async def test_unknown_path_is_a_problem_document(http_client: Any, base_url: str) -> None:
    with pytest.raises(HTTPClientError) as caught:
        await http_client.fetch(base_url + "/no/such/thing")
    response = caught.value.response
    assert response.code == 404
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(response.body)
    assert problem["type"] == "/problems/not-found"
    assert problem["status"] == 404
    assert problem["request_id"] == response.headers["X-Request-Id"]


@pytest.mark.gen_test
async def test_request_id_is_adopted_from_the_caller(http_client: Any, base_url: str) -> None:
    response = await http_client.fetch(
        base_url + "/healthz", headers={"X-Request-Id": "lb-1234.abc"}
    )
    assert response.headers["X-Request-Id"] == "lb-1234.abc"
    junk = await http_client.fetch(base_url + "/healthz", headers={"X-Request-Id": "a b<c>"})
    assert junk.headers["X-Request-Id"] != "a b<c>"


@pytest.mark.gen_test
async def test_metrics_expose_request_counts(http_client: Any, base_url: str) -> None:
    await http_client.fetch(base_url + "/healthz")
    response = await http_client.fetch(base_url + "/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    assert 'fm_http_requests_total{method="GET",route="Healthz",status="200"} 1.0' in text
    assert "fm_http_requests_in_flight" in text
    assert "fm_cable_connections 0.0" in text
    assert "fm_cable_delivered_messages_total" in text
    assert 'fm_db_router_total{db="catalog",what="primary_reads"}' in text
    assert 'fm_catalog_db_loads_total{what="product_loads"}' in text
