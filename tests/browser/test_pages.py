"""Storefront pages in a real browser: the CSP holds (nothing refused, nothing logged), the
add-to-cart form works with JavaScript off, and screenshots of the home and product pages
are kept as test artefacts."""

from __future__ import annotations

import pytest
from playwright.async_api import ConsoleMessage, Page, expect

from tests.browser.conftest import (
    NewContext,
    Shop,
    save_artifact,
    sign_in,
    wait_for_service_worker,
    wait_until_live,
)
from tests.helpers.photos import photo_jpeg
from tests.images.uploads import upload


async def shop_with_a_photo(shop: Shop) -> tuple[int, int]:
    """Two products, the first with an uploaded photo (all its variants and placeholder)."""
    lamp = shop.add_product("Desk Lamp", stock=6, price_cents=4900, text="Brass.\n\nDimmable.")
    chair = shop.add_product("Oak Chair", stock=2, price_cents=12900)
    _admin_id, admin = await shop.add_user("admin@example.com", admin=True)
    response = await upload(
        shop.client,
        shop.url,
        lamp,
        photo_jpeg("product", 640, 480),
        {"Authorization": f"Bearer {admin}"},
    )
    assert response.code == 201, response.body
    return lamp, chair


def record_console(page: Page) -> list[str]:
    """Every console message and uncaught error of `page` from now on, as text."""
    lines: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        lines.append(f"{message.type}: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: lines.append(f"pageerror: {error}"))
    return lines


async def page_observations(page: Page) -> dict[str, list[str]]:
    """What the page's observer script saw: CSP violations and uncaught errors."""
    seen: dict[str, list[str]] = await page.evaluate("() => window.__fm")
    return seen


@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("signed_in", [False, True], ids=["signed-out", "signed-in"])
async def test_home_and_product_pages_violate_no_csp_and_log_no_errors(
    shop: Shop, new_context: NewContext, signed_in: bool
) -> None:
    lamp, _chair = await shop_with_a_photo(shop)
    page = await (await new_context()).new_page()
    if signed_in:
        await shop.add_user("ada@example.com")
        await sign_in(page, shop, "ada@example.com")
    console = record_console(page)
    await page.goto(f"{shop.url}/")
    await wait_for_service_worker(page)
    await expect(page.locator(".product-card h2")).to_have_text(["Desk Lamp", "Oak Chair"])
    # The placeholder painted through the CSSOM (no inline style), the image loaded.
    await expect(page.locator(".product-image.is-loaded")).to_have_count(1)
    home = await page_observations(page)
    await page.goto(f"{shop.url}/products/{lamp}")
    await wait_until_live(page)
    await expect(page.locator(".product-image.is-loaded")).to_have_count(1)
    product = await page_observations(page)
    assert home == {"csp": [], "errors": []}, home
    assert product == {"csp": [], "errors": []}, product
    assert console == [], console


@pytest.mark.gen_test(timeout=60)
async def test_add_to_cart_form_works_without_javascript(
    shop: Shop, new_context: NewContext
) -> None:
    lamp = shop.add_product("Desk Lamp", stock=6, price_cents=4900)
    _user_id, token = await shop.add_user("ada@example.com")
    page = await (await new_context(java_script_enabled=False)).new_page()
    await sign_in(page, shop, "ada@example.com")  # a form post too
    await page.goto(f"{shop.url}/products/{lamp}")
    await expect(page.locator("[data-stock-target=count]")).to_have_text("6")
    await page.fill(f"#qty-{lamp}", "2")
    async with page.expect_response(f"{shop.url}/cart/items") as posted:
        await page.click(".product-page button[type=submit]")
    answer = await posted.value
    assert answer.status == 303 and answer.headers["location"] == "/cart"
    await page.wait_for_url(f"{shop.url}/cart")
    line = page.locator("table.cart-lines tbody tr")
    await expect(line).to_have_count(1)
    await expect(line.locator("th")).to_have_text("Desk Lamp")
    await expect(line.locator("td").first).to_have_text("2")
    assert await shop.cart_quantities(token) == {lamp: 2}


@pytest.mark.gen_test(timeout=90)
async def test_screenshots_of_the_home_and_product_pages(
    shop: Shop, new_context: NewContext
) -> None:
    lamp, _chair = await shop_with_a_photo(shop)
    for name, viewport in (("desktop", {"width": 1280, "height": 900}), ("phone", None)):
        options = (
            {"viewport": viewport}
            if viewport
            else {
                "viewport": {"width": 390, "height": 844},
                "device_scale_factor": 2,
                "is_mobile": True,
                "has_touch": True,
            }
        )
        page = await (await new_context(**options)).new_page()
        await page.goto(f"{shop.url}/")
        await expect(page.locator(".product-image.is-loaded")).to_have_count(1)
        home = save_artifact(f"home-{name}.png")
        await page.screenshot(path=home, full_page=True)
        await page.goto(f"{shop.url}/products/{lamp}")
        await wait_until_live(page)
        await expect(page.locator(".product-image.is-loaded")).to_have_count(1)
        product = save_artifact(f"product-{name}.png")
        await page.screenshot(path=product, full_page=True)
        for path in (home, product):
            assert path.stat().st_size > 10_000, f"{path} looks empty"
