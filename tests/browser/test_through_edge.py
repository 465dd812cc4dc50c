"""The storefront in Chromium through the edge: `finalmarket cluster` (two nodes behind real
nginx). A product page sees a stock change made on the other node within a second; when one
node gets SIGTERM, the page's cable comes back through nginx and the count it ends with is
the last one written (nothing missed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.browser.conftest import NewContext, wait_until_live
from tests.helpers.cluster import Cluster, admin_token, get, running_cluster, send

STOCK_DEADLINE_S = 1.0


@pytest.fixture
def edge(infra_env: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    """Its own cluster: the test stops one of its nodes."""
    with running_cluster(infra_env, tmp_path / "cluster") as running:
        yield running


def _ok(answer: tuple[int, bytes], status: int = 200) -> dict[str, object]:
    code, body = answer
    assert code == status, body
    return dict(json.loads(body))


@pytest.mark.gen_test(timeout=180)
async def test_a_page_through_nginx_follows_stock_across_a_node_drain(
    edge: Cluster, infra_env: dict[str, str], tmp_path: Path, new_context: NewContext
) -> None:
    token = admin_token(edge, infra_env, tmp_path)
    product = _ok(
        send(edge, "POST", "/api/v1/products", {"name": "Edge Lamp", "price_cents": 4200}, token),
        201,
    )
    product_id = str(product["id"])
    stock_path = f"/api/v1/products/{product_id}/stock"
    _ok(send(edge, "POST", stock_path, {"set": 7}, token))

    page = await (await new_context()).new_page()
    await page.goto(edge.url(f"/products/{product_id}"))
    count = page.locator(".product-page [data-stock-target=count]")
    await expect(count).to_have_text("7")
    await wait_until_live(page)

    # The node nginx gave the page's cable (the one counting a connection), and the other.
    holding = [name for name, node in edge.nodes.items() if _cable_connections(node.address) > 0]
    assert len(holding) == 1, holding
    cable_node = holding[0]
    other = next(node for node in edge.nodes if node != cable_node)
    # Written on the other node directly: it reaches the page through Redis.
    await count.evaluate(
        """(el) => new MutationObserver(() => {
             if (el.textContent === "12") window.__stockShownAt = Date.now();
           }).observe(el, { childList: true, characterData: true, subtree: true })"""
    )
    other_node = f"http://{edge.nodes[other].address}"
    code, body = _direct(other_node, stock_path, {"delta": 5}, token)
    answered_at_ms = time.time() * 1000
    assert code == 200, body
    await page.wait_for_function("() => window.__stockShownAt !== undefined", timeout=15_000)
    delay_s = (await page.evaluate("window.__stockShownAt") - answered_at_ms) / 1000
    assert delay_s <= STOCK_DEADLINE_S, f"the page showed the new stock {delay_s:.3f} s late"

    # The page's node drains and stops; stock keeps changing on the other meanwhile.
    os.kill(edge.nodes[cable_node].pid, signal.SIGTERM)
    last = 12
    for _ in range(5):
        last += 1
        code, body = _direct(other_node, stock_path, {"delta": 1}, token)
        assert code == 200, body
        await asyncio.sleep(0.5)
    edge.wait_for_event("node_unready", node=cable_node, timeout=60)
    await expect(count).to_have_text(str(last), timeout=30_000)
    deadline = time.monotonic() + 30
    while _cable_connections(edge.nodes[other].address) == 0:  # the page came back there
        assert time.monotonic() < deadline, "the page's cable did not reconnect through nginx"
        await asyncio.sleep(0.2)
    last += 1
    code, body = _direct(other_node, stock_path, {"delta": 1}, token)
    assert code == 200, body
    await expect(count).to_have_text(str(last), timeout=10_000)  # live again, through nginx


def _cable_connections(address: str) -> int:
    """`fm_cable_connections` of one node, from its /metrics."""
    _status, _headers, body = get(f"http://{address}/metrics")
    for line in body.decode().splitlines():
        if line.startswith("fm_cable_connections "):
            return int(float(line.split()[1]))
    raise AssertionError(f"no fm_cable_connections on {address}")


def _direct(base: str, path: str, body: object, token: str) -> tuple[int, bytes]:
    """A JSON POST straight to one node (not through the balancer)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
