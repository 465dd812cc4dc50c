"""The storefront's pages over real HTTP on real PostgreSQL and Valkey: content, caching
headers and 304s, security headers, no personal data in cacheable HTML, fragments rendered
once per product version, edge purges on writes, and the form posts with their CSRF checks."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from server.adapters.cache.fragments import STOCK_SLOT
from server.adapters.purge import PurgeQueue
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.commerce import buyer_with_cart
from tests.helpers.storefront import (
    Browser,
    build_dist,
    fetch,
    hidden_field,
    insert_image,
    insert_products,
    storefront_settings,
)

pytestmark = pytest.mark.usefixtures("clean_data")

CACHEABLE = "public, max-age=0, s-maxage=30, stale-while-revalidate=60, stale-if-error=86400"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; font-src 'self'; manifest-src 'self'; worker-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@pytest.fixture
def dist(tmp_path: Path) -> dict[str, str]:
    return build_dist(tmp_path / "dist")


@pytest.fixture
def settings(infra_env: dict[str, str], tmp_path: Path, dist: dict[str, str]) -> Settings:
    return storefront_settings(infra_env, tmp_path / "dist")


@pytest.fixture
def products(infra_env: dict[str, str]) -> list[int]:
    return insert_products(
        infra_env["FM_CATALOG_DSN"],
        [
            ("Desk Lamp", "Brass & <glass>.\n\nSecond paragraph.", 1234, 7),
            ("Oak Chair", "Solid oak", 5000, 3),
        ],
    )


@pytest.fixture
def browser(http_client: Any, base_url: str) -> Browser:
    return Browser(http_client, base_url)


class RecordingPurger:
    """A purger that remembers what it was asked to purge (a real Purger, not a mock)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, ...]] = []

    async def purge(self, keys: Any) -> None:
        self.batches.append(tuple(keys))


def assert_security_headers(response: Any) -> None:
    assert response.headers["Content-Security-Policy"] == CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert (
        response.headers["Permissions-Policy"]
        == "camera=(), microphone=(), geolocation=(), payment=()"
    )
    assert response.headers["X-Frame-Options"] == "DENY"


async def signed_up(browser: Browser, email: str = "ada@example.com") -> None:
    response = await browser.post(
        "/sign-up", {"email": email, "password": "correct horse", "name": "Ada Lovelace"}
    )
    assert response.code == 303, response.body
    assert "fm_session" in browser.cookies and "fm_csrf" in browser.cookies


# --- cacheable pages ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_home_lists_products_with_stock_and_caching_headers(
    browser: Browser, products: list[int], dist: dict[str, str]
) -> None:
    response = await browser.get("/")
    assert response.code == 200
    html = response.body.decode()
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert html.startswith("<!doctype html>") and '<html lang="en">' in html
    assert '<a class="skip-link" href="#main">Skip to content</a>' in html
    assert '<main id="main">' in html and "<h1>Products</h1>" in html
    lamp, chair = products
    assert f'data-stock-product-id-value="{lamp}"' in html
    assert f'<a href="/products/{lamp}">' in html and "<h2>Desk Lamp</h2>" in html
    assert '<p class="price">$12.34</p>' in html and '<p class="price">$50.00</p>' in html
    assert '<span data-stock-target="count">7</span> in stock' in html
    assert '<span data-stock-target="count">3</span> in stock' in html
    assert STOCK_SLOT not in html
    assert f'href="/static/{dist["app.css"]}"' in html
    assert f'<script type="module" src="/static/{dist["app.js"]}" defer></script>' in html
    assert f'<link rel="icon" href="/static/{dist["icon-192.png"]}">' in html
    assert "<picture>" not in html and "product-image--none" in html  # no images yet
    assert "style=" not in html and "<script>" not in html  # the CSP allows neither
    assert response.headers["Cache-Control"] == CACHEABLE
    assert re.fullmatch(r'"[0-9a-f]{32}"', response.headers["ETag"])
    assert response.headers["Surrogate-Key"] == f"products product-{lamp} product-{chair}"
    assert response.headers["Cache-Tag"] == f"products,product-{lamp},product-{chair}"
    assert response.headers["Link"] == (
        f"</static/{dist['app.css']}>; rel=preload; as=style, "
        f"</static/{dist['app.js']}>; rel=modulepreload"
    )
    assert "Accept-Encoding" in response.headers["Vary"]
    assert_security_headers(response)

    again = await browser.get("/", **{"If-None-Match": response.headers["ETag"]})
    assert again.code == 304 and again.body == b""
    assert again.headers["ETag"] == response.headers["ETag"]
    assert again.headers["Cache-Control"] == CACHEABLE


@pytest.mark.gen_test(timeout=60)
async def test_cacheable_pages_show_nothing_personal_to_a_signed_in_user(
    browser: Browser, products: list[int]
) -> None:
    anonymous = {
        path: (await browser.get(path)).body
        for path in ("/", f"/products/{products[0]}", "/offline")
    }
    await signed_up(browser)
    cart = await browser.post("/cart/items", {"product_id": products[0], "quantity": 2})
    assert cart.code == 303
    for path, body in anonymous.items():
        response = await browser.get(path)
        assert response.code == 200
        assert response.headers["Cache-Control"] == CACHEABLE
        assert response.body == body, f"{path} differs for a signed-in user"
        text = response.body.decode()
        for personal in ("Ada", "ada@example.com", browser.cookies["fm_csrf"], "csrf_token"):
            assert personal not in text, (path, personal)
        assert "Set-Cookie" not in response.headers


@pytest.mark.gen_test(timeout=30)
async def test_search_and_cursor_paging(browser: Browser, infra_env: dict[str, str]) -> None:
    rows = [(f"Widget {n:02d}", "a widget", 100 + n, n) for n in range(30)]
    rows.append(("Teapot", "porcelain <b>tea</b> pot", 900, 1))
    ids = insert_products(infra_env["FM_CATALOG_DSN"], rows)
    first = await browser.get("/")
    html = first.body.decode()
    assert html.count('class="product-card"') == 24
    next_url = re.search(r'<a href="(/\?after=[^"]+)" rel="next">', html)
    assert next_url, html
    second = await browser.get(next_url.group(1).replace("&amp;", "&"))
    assert second.body.decode().count('class="product-card"') == 7
    assert 'rel="next"' not in second.body.decode()
    assert f"product-{ids[24]}" in second.headers["Surrogate-Key"]

    found = await browser.get("/?q=teapot")
    text = found.body.decode()
    assert text.count('class="product-card"') == 1 and "<h2>Teapot</h2>" in text
    assert 'value="teapot"' in text  # the search box keeps the query
    assert found.headers["Surrogate-Key"] == f"products product-{ids[-1]}"

    escaped = await browser.get("/?q=%3Cscript%3E")
    assert "<script>" not in escaped.body.decode() and "&lt;script&gt;" in escaped.body.decode()

    bad = await browser.get("/?after=not-a-cursor!")
    assert bad.code == 422 and bad.headers["Content-Type"].startswith("text/html")
    assert "after is not a cursor" in bad.body.decode()
    assert bad.headers["Cache-Control"] == "private, no-store"
    too_long = await browser.get("/?q=" + "x" * 201)
    assert too_long.code == 422


@pytest.mark.gen_test(timeout=30)
async def test_product_page_with_picture_and_add_to_cart_form(
    browser: Browser, products: list[int], infra_env: dict[str, str]
) -> None:
    lamp = products[0]
    insert_image(infra_env["FM_CATALOG_DSN"], lamp, width=1200, height=900)
    response = await browser.get(f"/products/{lamp}")
    assert response.code == 200
    html = response.body.decode()
    assert "<title>Desk Lamp — Final Market</title>" in html
    assert "<h1>Desk Lamp</h1>" in html
    assert "<p>Brass &amp; &lt;glass&gt;.</p><p>Second paragraph.</p>" in html
    assert '<span data-stock-target="count">7</span> in stock' in html
    assert '<span data-stock-target="viewers">0</span> viewing now' in html
    assert '<form action="/cart/items" method="post" data-controller="add-to-cart"' in html
    assert f'<input type="hidden" name="product_id" value="{lamp}">' in html
    assert f'<label for="qty-{lamp}">Quantity</label><input id="qty-{lamp}"' in html
    assert 'data-placeholder="data:image/webp;base64,UklGRg=="' in html
    avif = re.search(r'<source type="image/avif" srcset="([^"]+)"', html)
    assert avif, html
    widths = [entry.rsplit(" ", 1)[1] for entry in avif.group(1).split(", ")]
    assert widths == ["150w", "300w", "600w", "1200w"]
    assert '<source type="image/webp"' in html
    assert re.search(r'<img src="/images/[^"]+\.jpg" srcset="[^"]+1200w"', html)
    assert 'width="600" height="450" alt="Desk Lamp"' in html
    assert response.headers["Surrogate-Key"] == f"product-{lamp}"
    assert response.headers["Cache-Control"] == CACHEABLE
    assert_security_headers(response)
    # the list's card shows the same picture, lazily loaded
    home = (await browser.get("/")).body.decode()
    assert 'loading="lazy"' in home and "<picture>" in home


@pytest.mark.gen_test(timeout=30)
async def test_not_found_pages(browser: Browser, products: list[int]) -> None:
    for path in ("/products/999999", "/products/abc", "/products/0"):
        response = await browser.get(path, Accept="text/html")
        assert response.code == 404, path
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert (
            "<h1>Page not found</h1>" in response.body.decode()
            or "no product" in response.body.decode()
        )
        assert response.headers["Cache-Control"] == "private, no-store"
        assert_security_headers(response)
    unknown = await browser.get("/no/such/page", Accept="text/html,application/xhtml+xml")
    assert unknown.code == 404 and "<h1>Page not found</h1>" in unknown.body.decode()
    assert_security_headers(unknown)
    api = await browser.get("/api/v1/nothing", Accept="text/html")
    assert api.code == 404 and api.headers["Content-Type"] == "application/problem+json"
    plain = await browser.get("/no/such/page", Accept="application/json")
    assert plain.headers["Content-Type"] == "application/problem+json"


@pytest.mark.gen_test(timeout=30)
async def test_offline_page_is_cacheable(browser: Browser) -> None:
    response = await browser.get("/offline")
    assert response.code == 200 and "<h1>You are offline</h1>" in response.body.decode()
    assert response.headers["Cache-Control"] == CACHEABLE
    assert response.headers["Surrogate-Key"] == "offline"
    again = await browser.get("/offline", **{"If-None-Match": response.headers["ETag"]})
    assert again.code == 304


# --- fragments and purges ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_cards_render_once_per_product_version(
    browser: Browser, products: list[int], app: Any, services: Services, infra_env: dict[str, str]
) -> None:
    fragments = app.settings["storefront"].fragments
    first = await browser.get("/")
    assert fragments.renders["card"] == 2
    again = await browser.get("/")
    assert fragments.renders["card"] == 2, "unchanged cards must come from the fragment cache"
    assert again.body == first.body
    # a stock change re-renders nothing: the count is filled in at page assembly
    await services.catalog.change_stock(products[1], set=11)
    after_stock = (await browser.get("/")).body.decode()
    assert '<span data-stock-target="count">11</span>' in after_stock
    assert fragments.renders["card"] == 2
    # a price change re-renders exactly that product's card
    await services.catalog.update_product(products[0], {"price_cents": 999})
    after_price = (await browser.get("/")).body.decode()
    assert '<p class="price">$9.99</p>' in after_price
    assert fragments.renders["card"] == 3
    # a second node shares the fragments through Redis: its first render renders nothing
    services.cache.invalidate_all_local()
    await browser.get("/")
    assert fragments.renders["card"] == 3
    # the product body fragment behaves the same way
    await browser.get(f"/products/{products[0]}")
    await browser.get(f"/products/{products[0]}")
    assert fragments.renders["product"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_writes_purge_the_pages_that_show_them(
    products: list[int], services: Services, http_client: Any, base_url: str
) -> None:
    recording = RecordingPurger()
    queue: PurgeQueue = services.purges
    queue.purger = recording
    lamp, chair = products
    await services.catalog.update_product(lamp, {"price_cents": 1500})
    await queue.wait_idle()
    await services.catalog.change_stock(chair, delta=-1)
    await queue.wait_idle()
    created = await services.catalog.create_product(name="Rug", price_cents=100)
    await queue.wait_idle()
    assert recording.batches == [
        (f"product-{lamp}", "products"),
        (f"product-{chair}", "products"),
        ("products",),
    ]
    assert queue.stats.purged == 3 and queue.stats.failed == 0
    metrics = (await fetch(http_client, base_url + "/metrics")).body.decode()
    assert 'fm_edge_purges_total{outcome="purged"} 3.0' in metrics
    assert created["id"]


@pytest.mark.gen_test(timeout=30)
async def test_a_checkout_purges_the_pages_of_what_it_sold(
    products: list[int], services: Services
) -> None:
    """The count on a product's page moves with every sale, not only with an admin's change."""
    recording = RecordingPurger()
    services.purges.purger = recording
    _, chair = products
    user_id, _ = await buyer_with_cart(services, "buyer@example.com", chair, quantity=2)
    result = await services.checkout.checkout(user_id, "purge-key-0001")
    assert result.status == 201
    await services.purges.wait_idle()
    assert recording.batches == [(f"product-{chair}", "products")]


@pytest.mark.gen_test(timeout=30)
async def test_a_page_changing_fast_is_purged_once_per_interval(
    products: list[int], services: Services
) -> None:
    """A burst of stock changes is one purge at once and one per interval after, the last one
    after the last change: the edge keeps the page between."""
    assert services.settings.edge_purge_interval_s == 0.5  # the shipped default
    services.purges.min_interval_s = interval = 1.0
    recording = RecordingPurger()
    services.purges.purger = recording
    lamp, _ = products
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(40):
        await services.catalog.change_stock(lamp, delta=1)
    took = loop.time() - started
    await services.purges.wait_idle()
    assert set(recording.batches) == {(f"product-{lamp}", "products")}
    assert 2 <= len(recording.batches) <= 2 + int(took / interval), (took, recording.batches)
    assert services.purges.stats.submitted == 40


@pytest.mark.gen_test(timeout=30)
async def test_log_purger_writes_structured_keys(
    products: list[int], services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    await services.catalog.update_product(products[0], {"name": "Brass Lamp"})
    await services.purges.wait_idle()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "edge_purge" in text and f"product-{products[0]}" in text, text


@pytest.mark.gen_test(timeout=30)
async def test_failed_purges_are_counted_not_raised(
    products: list[int], services: Services
) -> None:
    class DownEdge:
        async def purge(self, keys: Any) -> None:
            raise ConnectionRefusedError("edge down")

    services.purges.purger = DownEdge()
    product = await services.catalog.update_product(products[0], {"price_cents": 1})
    assert product["price_cents"] == 1  # the write stands
    await services.purges.wait_idle()
    assert services.purges.stats.failed == 1


# --- forms -------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_sign_up_sign_in_cart_checkout_orders_sign_out(
    browser: Browser, products: list[int], services: Services
) -> None:
    form = await browser.get("/sign-up")
    assert form.code == 200 and form.headers["Cache-Control"] == "private, no-store"
    assert '<label for="email">Email</label>' in form.body.decode()
    await signed_up(browser)
    me = await browser.api("/api/v1/me")
    assert me.code == 200  # the form set the same cookies as the REST API

    taken = await browser.post("/sign-up", {"email": "ada@example.com", "password": "another pass"})
    assert taken.code == 409 and "<h1>Create an account</h1>" in taken.body.decode()

    added = await browser.post("/cart/items", {"product_id": products[0], "quantity": 2})
    assert added.code == 303 and added.headers["Location"] == "/cart"
    cart = await browser.get("/cart")
    assert cart.code == 200 and cart.headers["Cache-Control"] == "private, no-store"
    assert "Desk Lamp" in cart.body.decode() and "$24.68" in cart.body.decode()

    page = await browser.get("/checkout")
    assert page.headers["Cache-Control"] == "private, no-store"
    key = hidden_field(page.body, "idempotency_key")
    token = hidden_field(page.body, "csrf_token")
    assert token == browser.cookies["fm_csrf"]
    fields = {"idempotency_key": key, "csrf_token": token}
    placed = await browser.post("/checkout", fields)
    assert placed.code == 303 and placed.headers["Location"] == "/orders"
    replay = await browser.post("/checkout", fields)  # a double click, a resubmit
    assert replay.code == 303
    orders = await browser.api("/api/v1/orders")
    assert len(json.loads(orders.body)["items"]) == 1
    services.catalog.stock.forget(products[0])  # checkout moved it in the database
    assert await services.catalog.stock.get(products[0]) == 5

    listing = await browser.get("/orders")
    assert listing.code == 200 and "Desk Lamp" in listing.body.decode()
    assert listing.headers["Cache-Control"] == "private, no-store"

    out_token = hidden_field(listing.body, "csrf_token")
    signed_out = await browser.post("/sign-out", {"csrf_token": out_token})
    assert signed_out.code == 303 and signed_out.headers["Location"] == "/"
    assert "fm_session" not in browser.cookies

    again = Browser(browser.client, browser.base_url)
    wrong = await again.post("/sign-in", {"email": "ada@example.com", "password": "nope"})
    assert wrong.code == 401 and "email or password is wrong" in wrong.body.decode()
    empty = await again.post("/sign-in", {"email": "", "password": ""})
    assert empty.code == 422
    right = await again.post(
        "/sign-in",
        {"email": "ada@example.com", "password": "correct horse", "next": "/orders"},
    )
    assert right.code == 303 and right.headers["Location"] == "/orders"
    evil = await again.post(
        "/sign-in",
        {"email": "ada@example.com", "password": "correct horse", "next": "//evil.example/"},
    )
    assert evil.headers["Location"] == "/"


@pytest.mark.gen_test(timeout=60)
async def test_form_posts_refuse_cross_site_requests(
    browser: Browser, products: list[int], services: Services
) -> None:
    await signed_up(browser)
    item = {"product_id": products[0], "quantity": 1}
    for origin in (None, "https://evil.example", "null"):
        refused = await browser.post("/cart/items", item, origin=origin)
        assert refused.code == 403, origin
        assert refused.headers["Content-Type"] == "text/html; charset=utf-8"
    by_referer = await browser.post(
        "/cart/items", item, origin=None, Referer=browser.base_url + "/"
    )
    assert by_referer.code == 303
    cross_referer = await browser.post(
        "/cart/items", item, origin=None, Referer="https://evil.example/page"
    )
    assert cross_referer.code == 403

    page = await browser.get("/checkout")
    key = hidden_field(page.body, "idempotency_key")
    no_token = await browser.post("/checkout", {"idempotency_key": key})
    assert no_token.code == 403
    wrong_token = await browser.post("/checkout", {"idempotency_key": key, "csrf_token": "x"})
    assert wrong_token.code == 403
    no_origin = await browser.post(
        "/checkout",
        {"idempotency_key": key, "csrf_token": browser.cookies["fm_csrf"]},
        origin="https://evil.example",
    )
    assert no_origin.code == 403
    assert (await browser.api("/api/v1/orders")).body.count(b'"id"') == 0
    sign_out = await browser.post("/sign-out", {})
    assert sign_out.code == 403 and "fm_session" in browser.cookies
    login_csrf = await Browser(browser.client, browser.base_url).post(
        "/sign-in",
        {"email": "ada@example.com", "password": "correct horse"},
        origin="https://evil.example",
    )
    assert login_csrf.code == 403


@pytest.mark.gen_test(timeout=30)
async def test_form_input_errors_are_precise(browser: Browser, products: list[int]) -> None:
    anonymous = await browser.post("/cart/items", {"product_id": products[0], "quantity": 1})
    assert anonymous.code == 303
    assert anonymous.headers["Location"] == f"/sign-in?next=%2Fproducts%2F{products[0]}"
    await signed_up(browser)
    for fields in (
        {"product_id": "abc", "quantity": 1},
        {"product_id": products[0], "quantity": 0},
        {"product_id": products[0], "quantity": 100},
        {"product_id": products[0], "quantity": "1.5"},
    ):
        response = await browser.post("/cart/items", fields)
        assert response.code == 422, fields
    unknown = await browser.post("/cart/items", {"product_id": 999999, "quantity": 1})
    assert unknown.code == 404
    checkout_page = await browser.get("/checkout")
    assert "Your cart is empty" in checkout_page.body.decode()
    empty = await browser.post(
        "/checkout", {"idempotency_key": "k-1", "csrf_token": browser.cookies["fm_csrf"]}
    )
    assert empty.code == 422 and "cart" in empty.body.decode().lower()


@pytest.mark.gen_test(timeout=30)
async def test_personal_pages_redirect_when_signed_out(browser: Browser) -> None:
    for path in ("/checkout", "/orders"):
        response = await browser.get(path)
        assert response.code == 303 and response.headers["Location"] == f"/sign-in?next={path}"
    cart = await browser.get("/cart", Cookie="fm_session=expired-or-forged")
    assert cart.code == 200 and "Sign in</a> to see your cart" in cart.body.decode()


def test_nginx_purger_names_every_cached_variant_of_the_pages() -> None:
    """`FM_EDGE_PURGE=nginx`: a surrogate key becomes the exact nginx cache keys of its pages,
    one per content coding the edge keeps (config/nginx.conf: `$request_uri|$edge_coding`);
    keys no page uses purge nothing. (Against a real nginx: tests/edge.)"""
    from server.adapters.purge import NginxPurger

    purger = NginxPurger("http://127.0.0.1:8080/_edge/purge")
    assert purger.cache_keys(["product-42", "products", "product-42", "nothing", "product-x"]) == [
        "/products/42|br",
        "/products/42|gzip",
        "/products/42|",
        "/|br",
        "/|gzip",
        "/|",
    ]
    assert purger.cache_keys(["offline"]) == ["/offline|br", "/offline|gzip", "/offline|"]


@pytest.mark.gen_test(timeout=30)
async def test_cart_and_checkout_pages_say_when_a_line_wants_more_than_is_in_stock(
    browser: Browser, products: list[int]
) -> None:
    """docs/decisions.md, "Carts over stock": the form adds 5 Oak Chairs with 3 in stock
    (303 to /cart, as any add), and both pages say how many are in stock."""
    await signed_up(browser)
    added = await browser.post("/cart/items", {"product_id": products[1], "quantity": 5})
    assert added.code == 303 and added.headers["Location"] == "/cart"
    cart = (await browser.get("/cart")).body.decode()
    assert '<strong class="stock-warning">only 3 in stock</strong>' in cart
    checkout = (await browser.get("/checkout")).body.decode()
    assert "only 3 in stock: lower the quantity" in checkout
    await browser.post("/cart/items", {"product_id": products[0], "quantity": 1})
    cart = (await browser.get("/cart")).body.decode()
    assert cart.count("stock-warning") == 1  # the lamp (7 in stock) is not short
