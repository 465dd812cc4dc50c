"""The storefront: server-rendered HTML pages and their form posts (storefront spec, 2-3).

Cacheable pages (`/`, `/products/{id}`, `/offline`) never look at the caller: no session is
resolved, nothing personal is rendered, and they go out with `Cache-Control: public,
max-age=0, s-maxage=...` (`FM_HTML_*`), a strong ETag (a hash of the body; 304 on
`If-None-Match`), and `Surrogate-Key` / `Cache-Tag` naming the products shown (`product-42`,
plus `products` on list pages) for the edge purges (`server.adapters.purge`). Pages are
assembled from product fragments cached in Redis (`server.adapters.cache.fragments`) with the
live stock filled in.

Personal pages (`/cart`, `/checkout`, `/orders`, the sign-in/sign-up forms) are `private,
no-store`; they resolve the session cookie like the REST API does (an unknown or expired
cookie means signed out here, not an error page).

CSRF, for form posts (which cannot send the API's `X-CSRF-Token` header):

1. every form POST must come from this origin: `Origin` equal to the request's own
   scheme://host, or, when a browser sends no `Origin`, a `Referer` on this origin; neither
   means 403. This covers the forms on cacheable pages (add to cart), which cannot carry a
   token, together with the session cookie's `SameSite=Lax` (no cross-site POST carries it);
2. posts from private pages (checkout, sign-out) also carry a `csrf_token` field equal to the
   `fm_csrf` cookie (double submit, rendered only into `no-store` pages).

Sign-up and sign-in set the same cookies as the REST API and redirect (303) to `next` (a
local path) or `/`; form posts redirect with 303 (`/cart`, `/orders`). Bad input re-renders
the form with the problem and its precise status (422, 401, 409).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode, urlsplit

from handlers.api import CSRF_COOKIE, SESSION_COOKIE, SessionHandler
from handlers.auth import set_session_cookies
from handlers.base import ApiError, NotFoundHandler, problem_from
from handlers.gate import Gate
from handlers.pages import (
    HTML_CONTENT_TYPE,
    HTML_SECURITY_HEADERS,
    PRIVATE_CACHE_CONTROL,
    Storefront,
)
from handlers.products import product_id_of
from server.adapters.compression import etag_matches
from server.adapters.purge import LIST_KEY, product_key
from server.adapters.static_assets import AssetsMissing
from server.common.errors import DomainError
from server.common.logs import get_logger
from server.domain.carts import MAX_QUANTITY, MIN_QUANTITY, CartService
from server.domain.catalog import CatalogService
from server.domain.checkout import MAX_KEY_CHARS, CheckoutService
from server.domain.orders import OrderService
from server.domain.users import User, UserService

PAGE_SIZE = 24
CSRF_FIELD = "csrf_token"
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_log = get_logger("finalmarket.storefront")


def local_path(raw: str | None, default: str = "/") -> str:
    """`raw` if it is a path on this site (`/orders`), else `default`: never `//host` or a
    URL, so `next` cannot send anyone elsewhere (open redirect)."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return default
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc or any(ord(ch) < 0x20 for ch in raw):
        return default
    return raw


@dataclass(frozen=True, slots=True)
class Shop:
    """The domain services the storefront pages use."""

    catalog: CatalogService
    carts: CartService
    checkout: CheckoutService
    orders: OrderService
    users: UserService


class PageHandler(SessionHandler):
    """Parent of storefront pages: HTML answers, errors as HTML, the headers of section 5."""

    storefront: Storefront
    shop: Shop
    catalog: CatalogService
    personal = True  # False: a cacheable page, which must not look at the caller
    needs_token = False  # POSTs must also carry the csrf_token field

    def initialize(  # type: ignore[override]
        self, gate: Gate, storefront: Storefront, shop: Shop
    ) -> None:
        super().initialize(gate)
        self.storefront = storefront
        self.shop = shop
        self.catalog = shop.catalog

    def set_default_headers(self) -> None:
        for name, value in HTML_SECURITY_HEADERS.items():
            self.set_header(name, value)

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method == "POST":
            self.check_same_origin()
            if self.needs_token:
                self.check_csrf_field()

    # --- authentication and CSRF --------------------------------------------------------------

    async def _authenticate(self) -> None:
        """The session cookie, leniently: unknown or expired means signed out."""
        if not self.personal:
            return
        token = self.get_cookie(SESSION_COOKIE)
        if not token:
            return
        session = await self.gate.sessions.resolve(token)
        if session is not None:
            self.session, self.token = session, token
            self._authenticated_by_cookie = True

    def _check_csrf(self) -> None:
        """Form posts are checked in `prepare` (origin, then the field); not by header."""

    def own_origin(self) -> str:
        """scheme://host of this request (the forwarded ones when the node trusts them)."""
        return f"{self.request.protocol}://{self.request.host}"

    def check_same_origin(self) -> None:
        """403 unless `Origin` (or, without it, `Referer`) is this site."""
        own = self.own_origin().lower()
        origin = self.request.headers.get("Origin")
        if origin is not None:
            if origin.strip().lower() != own:
                raise ApiError(403, "csrf", f"form posts must come from {own}, not from {origin!r}")
            return
        referer = self.request.headers.get("Referer", "")
        parts = urlsplit(referer)
        if not referer or f"{parts.scheme}://{parts.netloc}".lower() != own:
            raise ApiError(403, "csrf", f"form posts need an Origin or Referer header naming {own}")

    def check_csrf_field(self) -> None:
        """403 unless the form's `csrf_token` equals the `fm_csrf` cookie."""
        expected = self.get_cookie(CSRF_COOKIE) or ""
        offered = self.get_body_argument(CSRF_FIELD, "") or ""
        if not expected or not hmac.compare_digest(expected, offered):
            raise ApiError(403, "csrf", f"this form needs its {CSRF_FIELD} field (reload the page)")

    def csrf_token(self) -> str:
        """The double-submit token for a private page's forms (made if the cookie is gone)."""
        token = self.get_cookie(CSRF_COOKIE)
        if not token:
            token = uuid.uuid4().hex
            self.set_cookie(CSRF_COOKIE, token, secure=self.gate.cookie_secure, samesite="Lax")
        return token

    # --- answers ------------------------------------------------------------------------------

    def _page_headers(self) -> None:
        self.set_header("Content-Type", HTML_CONTENT_TYPE)
        self.set_header("Link", self.storefront.link_header())

    def send_cacheable(self, body: bytes, keys: list[str]) -> None:
        """A public page: shared-cache headers, surrogate keys, strong ETag, 304."""
        etag = f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'
        self._page_headers()
        self.set_header("Cache-Control", self.storefront.html_cache_control)
        self.set_header("Surrogate-Key", " ".join(keys))
        self.set_header("Cache-Tag", ",".join(keys))
        self.set_header("ETag", etag)
        if etag_matches(self.request.headers.get("If-None-Match", ""), etag):
            self.clear_header("Content-Type")
            self.set_status(304)
            self.finish()
            return
        self.finish(body)

    def send_private(self, body: bytes, status: int = 200) -> None:
        """A personal page: never stored by any cache."""
        self._page_headers()
        self.set_header("Cache-Control", PRIVATE_CACHE_CONTROL)
        self.set_status(status)
        self.finish(body)

    def see_other(self, location: str) -> None:
        """303 to `location` (after a form post)."""
        self.set_header("Cache-Control", PRIVATE_CACHE_CONTROL)
        self.redirect(location, status=303)

    def compute_etag(self) -> str | None:
        return None  # pages set their own (cacheable) or none (personal)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors as an HTML page (plain text if the assets are missing), never cached."""
        exc, status_code = self.answer_of(status_code, kwargs)
        if isinstance(exc, ApiError):
            for name, value in exc.headers.items():
                self.set_header(name, value)
            message = exc.detail
        elif isinstance(exc, AssetsMissing):
            message = str(exc)
        elif status_code == 404:
            message = f"There is nothing at {self.request.path}."
        else:
            message = "Something went wrong on our side. Please try again."
        title = "Page not found" if status_code == 404 else HTTPStatus(status_code).phrase
        if getattr(self, "request_id", None):
            self.set_header("X-Request-Id", self.request_id)
        self.set_header("Cache-Control", PRIVATE_CACHE_CONTROL)
        try:
            body = self.storefront.render("error.html", title=title, message=message)
            self._page_headers()
        except AssetsMissing as missing:
            _log.error("storefront_assets_missing", error=str(missing))
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            body = f"{status_code} {title}: {missing}\n".encode()
        self.finish(body)

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        """A missing asset build is a deployment fault named in one line, not a crash."""
        if isinstance(value, AssetsMissing):
            _log.error("storefront_assets_missing", error=str(value))
            return
        super().log_exception(typ, value, tb)

    def render_page(self, template: str, **values: Any) -> bytes:
        """`template` rendered with the page's current search query."""
        return self.storefront.render(template, **values)

    async def cart_summary(self, user_id: int) -> dict[str, Any]:
        """The template values of a cart: its lines named, the total and its currency."""
        cart = await self.carts.get(user_id)
        lines = await self._named_lines(cart)
        return {
            "lines": lines,
            "total_cents": int(cart.get("total_cents", 0)),
            "currency": lines[0]["currency"] if lines else "USD",
        }

    async def _named_lines(self, cart: dict[str, Any]) -> list[dict[str, Any]]:
        ids = [int(item["product_id"]) for item in cart.get("items", [])]
        products = await self.catalog.products_by_ids(ids)
        lines = []
        for item in cart.get("items", []):
            product = products.get(int(item["product_id"]), {})
            name = product.get("name", f"Product {item['product_id']}")
            lines.append({**item, "name": name, "currency": product.get("currency", "USD")})
        return lines

    @property
    def carts(self) -> CartService:
        """Carts, announcing changes on the cable like the REST API."""
        return self.shop.carts


# --- cacheable pages ------------------------------------------------------------------------


class HomeHandler(PageHandler):
    """`GET /?q=&after=`: the product list, 24 per page."""

    personal = False

    async def get(self) -> None:
        q = (self.get_query_argument("q", "") or "").strip()
        after = self.get_query_argument("after", None) or None
        entries, next_cursor = await self.catalog.list_entries(PAGE_SIZE, after, q or None)
        ids = [int(product["id"]) for product, _version in entries]
        stocks = await self.catalog.stock.get_many(ids)
        cards = await self.storefront.cards(entries, stocks)
        next_url = None
        if next_cursor:
            query = {"q": q, "after": next_cursor} if q else {"after": next_cursor}
            next_url = "/?" + urlencode(query)
        body = self.render_page("home.html", q=q, cards=cards, next_url=next_url)
        self.send_cacheable(body, [LIST_KEY, *(product_key(pid) for pid in ids)])


class ProductPageHandler(PageHandler):
    """`GET /products/{id}`: one product with its live stock and the add-to-cart form."""

    personal = False

    async def get(self, raw_id: str) -> None:
        product_id = product_id_of(raw_id)
        product, version = await self.catalog.product_entry(product_id)
        stock = await self.catalog.stock.get(product_id)
        body = await self.storefront.product_body(product, version, stock)
        page = self.render_page("product.html", product=product, body=body)
        self.send_cacheable(page, [product_key(product_id)])


class OfflinePageHandler(PageHandler):
    """`GET /offline`: what the service worker shows for a page it cannot reach."""

    personal = False

    async def get(self) -> None:
        self.send_cacheable(self.render_page("offline.html"), ["offline"])


# --- personal pages -------------------------------------------------------------------------


class CartPageHandler(PageHandler):
    """`GET /cart`: the signed-in caller's cart, server-rendered (JS refreshes it live)."""

    async def get(self) -> None:
        if self.session is None:
            self.send_private(self.render_page("cart.html", signed_in=False, lines=[]))
            return
        summary = await self.cart_summary(self.session.user_id)
        self.send_private(self.render_page("cart.html", signed_in=True, **summary))


class CartItemsFormHandler(PageHandler):
    """`POST /cart/items` (form: `product_id`, `quantity`): add to the cart, 303 to /cart."""

    async def post(self) -> None:
        product_raw = self.get_body_argument("product_id", "") or ""
        quantity_raw = (self.get_body_argument("quantity", "1") or "1").strip()
        if not _DIGITS.match(product_raw) or int(product_raw) < 1:
            raise ApiError(422, "invalid-body", "product_id must be a product's id (digits)")
        if not _DIGITS.match(quantity_raw) or not (
            MIN_QUANTITY <= int(quantity_raw) <= MAX_QUANTITY
        ):
            raise ApiError(
                422,
                "invalid-body",
                f"quantity must be a whole number from {MIN_QUANTITY} to {MAX_QUANTITY}",
            )
        if self.session is None:
            self.see_other("/sign-in?" + urlencode({"next": f"/products/{int(product_raw)}"}))
            return
        await self.carts.add_item(self.session.user_id, int(product_raw), int(quantity_raw))
        self.see_other("/cart")


class CheckoutPageHandler(PageHandler):
    """`GET /checkout`: the order summary and its form (a fresh idempotency key);
    `POST /checkout`: place the order once per key, 303 to /orders."""

    needs_token = True

    async def get(self) -> None:
        if self.session is None:
            self.see_other("/sign-in?next=/checkout")
            return
        summary = await self.cart_summary(self.session.user_id)
        self.send_private(
            self.render_page(
                "checkout.html",
                **summary,
                idempotency_key=str(uuid.uuid4()),
                csrf_token=self.csrf_token(),
            )
        )

    async def post(self) -> None:
        session = self.require_user()
        key = (self.get_body_argument("idempotency_key", "") or "").strip()
        if not 1 <= len(key) <= MAX_KEY_CHARS:
            raise ApiError(
                422,
                "invalid-idempotency-key",
                f"idempotency_key must be 1 to {MAX_KEY_CHARS} characters (reload the page)",
            )
        await self.shop.checkout.checkout(session.user_id, key, "storefront-form")
        self.see_other("/orders")


class OrdersPageHandler(PageHandler):
    """`GET /orders?after=`: the caller's orders, newest first."""

    async def get(self) -> None:
        if self.session is None:
            self.see_other("/sign-in?next=/orders")
            return
        after = self.get_query_argument("after", None) or None
        page = await self.shop.orders.page(self.session.user_id, 20, after)
        ids = [int(item["product_id"]) for order in page["items"] for item in order["items"]]
        products = await self.catalog.products_by_ids(ids)
        for order in page["items"]:
            for item in order["items"]:
                item["name"] = products.get(int(item["product_id"]), {}).get("name")
        next_url = "/orders?" + urlencode({"after": page["next_cursor"]})
        self.send_private(
            self.render_page(
                "orders.html",
                orders=page["items"],
                next_url=next_url if page["next_cursor"] else None,
                csrf_token=self.csrf_token(),
            )
        )


class _AccountForm(PageHandler):
    """Shared by sign-in and sign-up: render the form, sign in, redirect."""

    template = ""

    def form(self, status: int = 200, error: str = "", **values: str) -> None:
        fields = {"email": "", "name": "", **values}
        if self.request.method == "POST":
            next_path = local_path(self.get_body_argument("next", None))
        else:
            next_path = local_path(self.get_query_argument("next", None))
        self.send_private(
            self.render_page(self.template, error=error, next_path=next_path, **fields),
            status=status,
        )

    async def get(self) -> None:
        self.form()

    async def sign_in_as(self, user: User) -> None:
        token = await self.gate.sessions.create(user.id, user.is_admin)
        set_session_cookies(self, token, self.gate.cookie_secure)
        self.see_other(local_path(self.get_body_argument("next", None)))

    def refuse(self, error: DomainError, **values: str) -> None:
        problem = problem_from(error)
        self.form(problem.status_code, error.detail, **values)

    @property
    def users(self) -> UserService:
        """Accounts, as the REST API reaches them."""
        return self.shop.users


class SignInHandler(_AccountForm):
    """`GET /sign-in` (the form), `POST /sign-in` (email, password, next)."""

    template = "sign_in.html"

    async def post(self) -> None:
        email = (self.get_body_argument("email", "") or "")[:254]
        password = self.get_body_argument("password", "") or ""
        if not email or not password:
            self.form(422, "Enter your email and password.", email=email)
            return
        try:
            user = await self.users.authenticate(email, password[:1024])
        except DomainError as exc:
            self.refuse(exc, email=email)
            return
        await self.sign_in_as(user)


class SignUpHandler(_AccountForm):
    """`GET /sign-up` (the form), `POST /sign-up` (email, password, name, next)."""

    template = "sign_up.html"

    async def post(self) -> None:
        email = self.get_body_argument("email", "") or ""
        password = self.get_body_argument("password", "") or ""
        name = (self.get_body_argument("name", "") or "").strip()
        if not email or not password:
            self.form(422, "Enter an email and a password.", email=email[:254], name=name)
            return
        try:
            user = await self.users.create_user(email, password, name)
        except DomainError as exc:
            self.refuse(exc, email=email[:254], name=name[:200])
            return
        await self.sign_in_as(user)


class SignOutHandler(PageHandler):
    """`POST /sign-out` (form with csrf_token): revoke the session, clear cookies, 303 /."""

    needs_token = True

    async def post(self) -> None:
        if self.token is not None:
            await self.gate.sessions.revoke(self.token)
        self.clear_cookie(SESSION_COOKIE)
        self.clear_cookie(CSRF_COOKIE)
        self.see_other("/")


class StorefrontNotFoundHandler(NotFoundHandler):
    """Unknown paths: an HTML 404 page for browsers outside `/api/`, a problem otherwise."""

    storefront: Storefront

    def initialize(self, gate: Gate, storefront: Storefront | None = None) -> None:
        super().initialize(gate)
        if storefront is not None:
            self.storefront = storefront

    def _wants_html(self) -> bool:
        if self.request.path.startswith("/api/") or not hasattr(self, "storefront"):
            return False
        return "text/html" in self.request.headers.get("Accept", "")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if not self._wants_html():
            super().write_error(status_code, **kwargs)
            return
        for name, value in HTML_SECURITY_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Cache-Control", PRIVATE_CACHE_CONTROL)
        self.set_header("X-Request-Id", getattr(self, "request_id", "") or "")
        try:
            body = self.storefront.render(
                "error.html",
                title="Page not found",
                message=f"There is nothing at {self.request.path}.",
            )
            self.set_header("Content-Type", HTML_CONTENT_TYPE)
        except AssetsMissing as missing:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            body = f"404 Page not found ({missing})\n".encode()
        self.finish(body)


def routes(gate: Gate, storefront: Storefront, shop: Shop) -> list[Any]:
    """The storefront page routes, for `server.wiring.app.make_app`."""
    args = {"gate": gate, "storefront": storefront, "shop": shop}
    return [
        (r"/", HomeHandler, args),
        (r"/products/([^/]+)", ProductPageHandler, args),
        (r"/offline", OfflinePageHandler, args),
        (r"/cart", CartPageHandler, args),
        (r"/cart/items", CartItemsFormHandler, args),
        (r"/checkout", CheckoutPageHandler, args),
        (r"/orders", OrdersPageHandler, args),
        (r"/sign-in", SignInHandler, args),
        (r"/sign-up", SignUpHandler, args),
        (r"/sign-out", SignOutHandler, args),
    ]
