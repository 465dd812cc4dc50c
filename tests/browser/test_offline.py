"""The service worker in a real browser: pages offline, cart changes queued offline and
replayed exactly once, old caches gone after a new version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.async_api import expect

from server.wiring.settings import Settings
from tests.browser.conftest import (
    NewContext,
    PortNode,
    Shop,
    build_assets_with_changed_worker,
    forget_http_cache,
    sign_in,
    wait_for_cached_page,
    wait_for_service_worker,
    wait_for_true,
)
from tests.helpers.processes import free_port
from tests.helpers.storefront import insert_products


@pytest.mark.gen_test(timeout=60)
async def test_offline_visited_pages_load_and_others_show_the_offline_page(
    shop: Shop, new_context: NewContext
) -> None:
    lamp, chair = shop.add_product("Desk Lamp", stock=4), shop.add_product("Chair", stock=2)
    context = await new_context()
    page = await context.new_page()
    await page.goto(f"{shop.url}/")  # the first visit: installs the service worker
    await wait_for_service_worker(page)
    await wait_for_cached_page(page, f"{shop.url}/")  # the page that installed it, too
    await page.goto(f"{shop.url}/products/{lamp}")
    await expect(page.locator("h1")).to_have_text("Desk Lamp")
    await wait_for_cached_page(page, f"{shop.url}/products/{lamp}")

    await forget_http_cache(page)
    await context.set_offline(True)
    home = await page.goto(f"{shop.url}/")
    assert home is not None and home.from_service_worker
    await expect(page.locator("h1")).to_have_text("Products")
    await expect(page.locator(".product-card h2")).to_have_text(["Desk Lamp", "Chair"])
    await page.goto(f"{shop.url}/products/{lamp}")
    await expect(page.locator("h1")).to_have_text("Desk Lamp")
    await page.goto(f"{shop.url}/products/{chair}")  # never visited
    await expect(page.locator("h1")).to_have_text("You are offline")
    await page.goto(f"{shop.url}/orders")  # personal: never stored
    await expect(page.locator("h1")).to_have_text("You are offline")


# The cart changes the service worker queued (workbox-background-sync's IndexedDB store).
QUEUED_REQUESTS = """() => new Promise((resolve, reject) => {
  const open = indexedDB.open("workbox-background-sync");
  open.onerror = () => reject(open.error);
  open.onsuccess = () => {
    const db = open.result;
    if (!db.objectStoreNames.contains("requests")) return resolve([]);
    const all = db.transaction("requests").objectStore("requests").getAll();
    all.onsuccess = () => resolve(all.result.map((entry) => ({
      queue: entry.queueName,
      url: entry.requestData.url,
      method: entry.requestData.method,
      headers: entry.requestData.headers,
      body: new TextDecoder().decode(entry.requestData.body),
    })));
    all.onerror = () => reject(all.error);
  };
})"""

# The same request again, as a second replay would send it (its headers, the page's cookies).
SEND_AGAIN = """async (queued) => {
  const res = await fetch(queued.url, {
    method: queued.method, headers: queued.headers, body: queued.body, credentials: "same-origin",
  });
  return { status: res.status, replayed: res.headers.get("Idempotent-Replayed") };
}"""


@pytest.mark.gen_test(timeout=90)
async def test_cart_change_made_offline_is_queued_and_applied_once_when_back_online(
    shop: Shop, new_context: NewContext
) -> None:
    lamp = shop.add_product("Desk Lamp", stock=8)
    _user_id, token = await shop.add_user("ada@example.com")
    context = await new_context()
    page = await context.new_page()
    await sign_in(page, shop, "ada@example.com")
    await wait_for_service_worker(page)
    await page.goto(f"{shop.url}/products/{lamp}")
    await expect(page.locator(".site-header [data-cart-target=count]")).to_have_text("0")

    await context.set_offline(True)
    async with page.expect_response(f"{shop.url}/api/v1/cart/items") as answer:
        await page.click(".product-page button[type=submit]")
    queued_answer = await answer.value
    assert queued_answer.status == 202 and queued_answer.headers.get("x-fm-queued") == "1"
    await expect(page.locator(".toasts")).to_contain_text("Saved, will sync when back online")
    queued = await page.evaluate(QUEUED_REQUESTS)
    assert [(q["queue"], q["method"]) for q in queued] == [("cart-queue", "POST")], queued
    assert queued[0]["headers"].get("idempotency-key"), queued[0]["headers"]
    assert await shop.cart_quantities(token) == {}

    # Back online: the page asks the worker to replay (the 'online' event), and the cart
    # comes back over the CartChannel.
    await context.set_offline(False)
    await expect(page.locator(".site-header [data-cart-target=count]")).to_have_text("1")
    await wait_for_true(
        page, f"async () => !(await ({QUEUED_REQUESTS})()).length", what="an empty queue"
    )
    assert await shop.cart_quantities(token) == {lamp: 1}

    # A second replay of the same request (say the first one's answer was lost) applies
    # nothing: the server answers the first answer again under its Idempotency-Key.
    again = await page.evaluate(SEND_AGAIN, queued[0])
    assert again == {"status": 200, "replayed": "true"}, again
    assert await shop.cart_quantities(token) == {lamp: 1}


CACHE_NAMES = "async () => (await caches.keys()).sort()"


@pytest.mark.gen_test(timeout=120)
async def test_after_a_new_worker_version_only_its_caches_remain(
    settings: Settings, clean_data: None, new_context: NewContext, dist: Path, tmp_path: Path
) -> None:
    old_version = json.loads((dist / "manifest.json").read_text())["sw_version"]
    new_dist = build_assets_with_changed_worker(tmp_path)
    new_version = json.loads((new_dist / "manifest.json").read_text())["sw_version"]
    assert new_version != old_version
    port = free_port()
    node = await PortNode.start(settings, port, dist)
    try:
        lamp = insert_products(settings.catalog_dsn, [("Desk Lamp", "", 1999, 3)])[0]
        context = await new_context()
        page = await context.new_page()
        await page.goto(f"{node.url}/")
        await wait_for_service_worker(page)
        await page.goto(f"{node.url}/products/{lamp}")
        await wait_for_cached_page(page, f"{node.url}/products/{lamp}")
        assert await page.evaluate(CACHE_NAMES) == [
            f"fm-pages-{old_version}",
            f"fm-precache-v2-{old_version}",
        ]

        # The deploy: another node with the new build on the same origin.
        await node.stop()
        node = await PortNode.start(settings, port, new_dist)
        await page.evaluate("async () => (await navigator.serviceWorker.ready).update()")
        await wait_for_true(
            page,
            "async () => !!(await navigator.serviceWorker.getRegistration()).waiting",
            what="the new worker, installed and waiting",
        )
        # The new worker waits until no tab uses the old one; the next visit gets it.
        await page.close()
        page = await context.new_page()
        await page.goto(f"{node.url}/products/{lamp}")
        await wait_for_service_worker(page)
        await wait_for_true(
            page,
            f"async () => (await ({CACHE_NAMES})()).every((n) => n.endsWith('-{new_version}'))",
            what=f"only caches of version {new_version}",
        )
        names = await page.evaluate(CACHE_NAMES)
        assert f"fm-precache-v2-{new_version}" in names, names
        assert not [name for name in names if old_version in name], names
        precached = await page.evaluate(
            f"async () => (await (await caches.open('fm-precache-v2-{new_version}')).keys())"
            ".map((request) => new URL(request.url).pathname)"
        )
        assert "/offline" in precached, precached
    finally:
        await node.stop()
