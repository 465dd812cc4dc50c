"""Live parts of the storefront in a real browser: stock pushed from another node, viewers,
the cart following the CartChannel across tabs, checkout through the form."""

from __future__ import annotations

import asyncio
import time

import pytest
from playwright.async_api import expect

from server.domain.events import notification_stream
from tests.browser.conftest import NewContext, Shop, sign_in, wait_until_live
from tests.helpers.cable import ExtraNode

STOCK_DEADLINE_S = 1.0
TIMES = "\N{MULTIPLICATION SIGN}"  # as the pages write quantities


@pytest.mark.gen_test(timeout=60)
async def test_stock_change_on_the_other_node_shows_within_a_second(
    shop: Shop, node_b: ExtraNode, new_context: NewContext
) -> None:
    lamp = shop.add_product("Desk Lamp", stock=7)
    _admin_id, admin = await shop.add_user("admin@example.com", admin=True)
    page = await (await new_context()).new_page()
    await page.goto(f"{shop.url}/products/{lamp}")
    count = page.locator(".product-page [data-stock-target=count]")
    await expect(count).to_have_text("7")
    await wait_until_live(page)
    # The moment the count shows the new number, by the page's clock (the machine's).
    await count.evaluate(
        """(el) => new MutationObserver(() => {
             if (el.textContent === "12") window.__stockShownAt = Date.now();
           }).observe(el, { childList: true, characterData: true, subtree: true })"""
    )
    answer = await shop.api(
        admin,
        f"/api/v1/products/{lamp}/stock",
        "POST",
        {"delta": 5},
        base=f"http://127.0.0.1:{node_b.port}",
    )
    answered_at_ms = time.time() * 1000
    assert answer["stock"] == 12
    await page.wait_for_function("() => window.__stockShownAt !== undefined", timeout=15_000)
    shown_at_ms = await page.evaluate("window.__stockShownAt")
    delay_s = (shown_at_ms - answered_at_ms) / 1000
    assert delay_s <= STOCK_DEADLINE_S, f"the page showed the new stock {delay_s:.3f} s late"


@pytest.mark.gen_test(timeout=60)
async def test_viewer_count_goes_up_when_a_second_page_opens(
    shop: Shop, new_context: NewContext
) -> None:
    lamp = shop.add_product("Desk Lamp", stock=3)
    url = f"{shop.url}/products/{lamp}"
    first = await (await new_context()).new_page()
    await first.goto(url)
    viewers = first.locator("[data-stock-target=viewers]")
    await expect(viewers).to_have_text("1")
    second = await (await new_context()).new_page()
    await second.goto(url)
    await expect(viewers).to_have_text("2")
    await expect(second.locator("[data-stock-target=viewers]")).to_have_text("2")
    await second.close()
    await expect(viewers).to_have_text("1")


@pytest.mark.gen_test(timeout=60)
async def test_cart_added_in_one_tab_shows_in_the_other(
    shop: Shop, new_context: NewContext
) -> None:
    lamp = shop.add_product("Desk Lamp", stock=9, price_cents=1250)
    await shop.add_user("ada@example.com")
    context = await new_context()
    other_tab = await context.new_page()
    await sign_in(other_tab, shop, "ada@example.com")
    # The header says who is signed in (from GET /api/v1/me: the cached HTML never does).
    await expect(other_tab.locator("[data-session-target=name]")).to_have_text("ada")
    count = other_tab.locator(".site-header [data-cart-target=count]")
    await expect(count).to_have_text("0")
    tab = await context.new_page()
    await tab.goto(f"{shop.url}/products/{lamp}")
    await tab.fill(f"#qty-{lamp}", "3")
    await tab.click(".product-page button[type=submit]")
    # This tab opens its drawer with the answered cart...
    await expect(tab.locator("#cart-drawer")).to_be_visible()
    await expect(tab.locator(".site-header [data-cart-target=count]")).to_have_text("3")
    # ... and the other one follows the CartChannel.
    await expect(count).to_have_text("3")
    await other_tab.click(".site-header [data-cart-target=link]")
    drawer = other_tab.locator("#cart-drawer")
    await expect(drawer).to_be_visible()
    await expect(drawer.locator("[data-cart-target=items] li")).to_contain_text(
        [f"Desk Lamp {TIMES} 3 — $37.50"]
    )
    await expect(drawer.locator("[data-cart-target=total]")).to_have_text("$37.50")


@pytest.mark.gen_test(timeout=60)
async def test_checkout_through_the_form_lists_the_order(
    shop: Shop, new_context: NewContext
) -> None:
    lamp = shop.add_product("Desk Lamp", stock=5, price_cents=1250)
    _user_id, token = await shop.add_user("ada@example.com")
    page = await (await new_context()).new_page()
    await sign_in(page, shop, "ada@example.com")
    await page.goto(f"{shop.url}/products/{lamp}")
    await page.fill(f"#qty-{lamp}", "2")
    await page.click(".product-page button[type=submit]")
    await expect(page.locator(".site-header [data-cart-target=count]")).to_have_text("2")
    await page.goto(f"{shop.url}/checkout")
    await expect(page.locator(".checkout-lines")).to_contain_text(f"2 {TIMES} Desk Lamp: $25.00")
    async with page.expect_navigation():
        await page.click("form[action='/checkout'] button[type=submit]")
    assert page.url == f"{shop.url}/orders"
    order = page.locator("li.order")
    await expect(order).to_have_count(1)
    await expect(order).to_contain_text("total $25.00")
    await expect(order).to_contain_text(f"2 {TIMES} Desk Lamp")
    orders = await shop.api(token, "/api/v1/orders")
    assert [o["total_cents"] for o in orders["items"]] == [2500]
    await expect(page.locator(".site-header [data-cart-target=count]")).to_have_text("0")


@pytest.mark.gen_test(timeout=60)
async def test_an_order_placed_on_another_device_shows_as_a_toast(
    shop: Shop, node_b: ExtraNode, new_context: NewContext
) -> None:
    """The NotificationsChannel's messages become toasts: an order placed through the API on
    node B shows on the page a signed-in shopper has open on node A, and can be dismissed."""
    lamp = shop.add_product("Desk Lamp", stock=5, price_cents=1250)
    user_id, token = await shop.add_user("ada@example.com")
    page = await (await new_context()).new_page()
    await sign_in(page, shop, "ada@example.com")
    stream = notification_stream(user_id)
    deadline = time.monotonic() + 15
    while shop.services.cable.hub.subscriber_count(stream) == 0:  # the page subscribed
        assert time.monotonic() < deadline, "the page never subscribed to its notifications"
        await asyncio.sleep(0.05)
    other_device = f"http://127.0.0.1:{node_b.port}"
    await shop.api(token, "/api/v1/cart/items", "POST", {"product_id": str(lamp), "quantity": 2})
    placed = await shop.api(
        token, "/api/v1/checkout", "POST", {}, base=other_device, key="toast-order-0001"
    )
    toast = page.locator(".toasts .toast")
    await expect(toast).to_have_count(1)
    await expect(toast.locator("strong")).to_have_text(f"Order {placed['order']['id']} confirmed")
    await expect(toast.locator("p")).to_have_text("2 items, total 25.00 USD")
    await toast.locator("button.toast-close").click()
    await expect(toast).to_have_count(0)


@pytest.mark.gen_test(timeout=60)
async def test_a_cart_line_short_of_stock_says_how_many_are_left(
    shop: Shop, new_context: NewContext
) -> None:
    """docs/decisions.md, "Carts over stock": the product page lets a shopper add at most
    the stock (its quantity's `max` follows the live count); when the stock then falls below
    what the cart holds, the cart keeps the line, and the drawer and the cart page say how
    many are left."""
    chair = shop.add_product("Oak Chair", stock=3, price_cents=5000)
    _user_id, admin = await shop.add_user("root@example.com", admin=True)
    await shop.add_user("ada@example.com")
    page = await (await new_context()).new_page()
    await sign_in(page, shop, "ada@example.com")
    await page.goto(f"{shop.url}/products/{chair}")
    await page.fill(f"#qty-{chair}", "3")
    await page.click(".product-page button[type=submit]")
    await expect(page.locator(".site-header [data-cart-target=count]")).to_have_text("3")
    await shop.api(admin, f"/api/v1/products/{chair}/stock", "POST", {"set": 1})
    await page.reload()
    await page.click(".site-header [data-cart-target=link]")
    line = page.locator("#cart-drawer [data-cart-target=items] li")
    await expect(line.locator(".stock-warning")).to_have_text("only 1 in stock")
    await page.goto(f"{shop.url}/cart")
    await expect(page.locator(".cart-lines .stock-warning")).to_have_text("only 1 in stock")
