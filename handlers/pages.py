"""Rendering the storefront's HTML: templates, asset URLs, product fragments, page headers.

One `Storefront` per application (built by `make_app`): the Tornado template loader for
`handlers/templates/`, the asset bundle read once from `FM_STATIC_DIR`, and the fragment
cache. Templates autoescape every `{{ }}` (Tornado's `xhtml_escape`); `{% raw %}` is used only
for fragments and markup this module rendered itself.

Headers every HTML answer carries (`HTML_SECURITY_HEADERS`): the storefront CSP (spec
section 6: no inline script or style, no other hosts), `nosniff`, a strict referrer policy,
no camera/microphone/geolocation/payment, and no framing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.template

from server.adapters.cache import CachedLoader
from server.adapters.cache.fragments import STOCK_SLOT, FragmentCache, fill_stock
from server.adapters.images import SIZES
from server.adapters.static_assets import AssetBundle, AssetsMissing, load_bundle, resolve_dir
from server.common.logs import get_logger

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; font-src 'self'; manifest-src 'self'; worker-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HTML_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "X-Frame-Options": "DENY",
}
HTML_CONTENT_TYPE = "text/html; charset=utf-8"
PRIVATE_CACHE_CONTROL = "private, no-store"
CARD_SIZES = "(min-width: 60em) 300px, (min-width: 30em) 50vw, 100vw"
PRODUCT_SIZES = "(min-width: 60em) 600px, 100vw"
# Fragment kind -> its template and the `sizes` of its picture.
_FRAGMENTS = {"card": ("_card.html", CARD_SIZES), "product": ("_product.html", PRODUCT_SIZES)}
_CURRENCY_SIGNS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
_ZERO_DECIMAL = frozenset({"JPY", "KRW"})
_log = get_logger("finalmarket.storefront")


def format_price(cents: int, currency: str) -> str:
    """`$12.34`, `€5.00`, `¥500`, or `12.34 CHF` for currencies without a sign here."""
    whole = currency in _ZERO_DECIMAL
    amount = f"{cents:,}" if whole else f"{cents // 100:,}.{cents % 100:02d}"
    sign = _CURRENCY_SIGNS.get(currency)
    return f"{sign}{amount}" if sign else f"{amount} {currency}"


def picture_of(product: Mapping[str, Any], sizes: str) -> dict[str, Any] | None:
    """What the `<picture>` of a product's first image needs, or None when it has none.

    Variant widths are derived from the large variant's size the way the pipeline fits them
    (inside a square box, never upscaled), so each `srcset` entry's `w` is the real width.
    """
    images = product.get("images") or []
    if not images:
        return None
    image = images[0]
    variants: Mapping[str, Mapping[str, str]] = image.get("variants") or {}
    width, height = int(image.get("width") or 0), int(image.get("height") or 0)
    if not variants or width <= 0 or height <= 0:
        return None
    long_edge = max(width, height)
    dims: dict[str, tuple[int, int]] = {}
    for size, box in sorted(SIZES.items(), key=lambda item: item[1]):
        scale = min(1.0, box / long_edge)
        dims[size] = (max(1, round(width * scale)), max(1, round(height * scale)))

    def srcset(fmt: str) -> str:
        seen: set[int] = set()
        entries = []
        for size in sorted(dims, key=lambda name: dims[name][0]):
            url = variants.get(size, {}).get(fmt)
            if url and dims[size][0] not in seen:
                seen.add(dims[size][0])
                entries.append(f"{url} {dims[size][0]}w")
        return ", ".join(entries)

    fallback = "medium" if "medium" in variants else next(iter(variants))
    return {
        "placeholder": image.get("placeholder") or "",
        "sources": [
            (mime, srcset(fmt))
            for mime, fmt in (("image/avif", "avif"), ("image/webp", "webp"))
            if srcset(fmt)
        ],
        "src": variants[fallback].get("jpeg", ""),
        "srcset": srcset("jpeg"),
        "width": dims[fallback][0],
        "height": dims[fallback][1],
        "sizes": sizes,
    }


def paragraphs(text: str) -> list[str]:
    """A description's paragraphs (blank lines separate them)."""
    return [part.strip() for part in text.replace("\r\n", "\n").split("\n\n") if part.strip()]


@dataclass(frozen=True, slots=True)
class PageCaching:
    """How long shared caches may keep a public page (`FM_HTML_*`)."""

    s_maxage_s: int
    stale_while_revalidate_s: int
    stale_if_error_s: int

    def cache_control(self) -> str:
        """The `Cache-Control` of a public page."""
        return (
            f"public, max-age=0, s-maxage={self.s_maxage_s}, "
            f"stale-while-revalidate={self.stale_while_revalidate_s}, "
            f"stale-if-error={self.stale_if_error_s}"
        )


class Storefront:
    """Templates, assets and fragments of one application."""

    def __init__(
        self,
        cache: CachedLoader,
        *,
        static_dir: str,
        fragment_ttl_s: float,
        caching: PageCaching,
    ) -> None:
        self.loader = tornado.template.Loader(str(TEMPLATE_DIR), autoescape="xhtml_escape")
        self.static_dir = resolve_dir(static_dir)
        self.fragments = FragmentCache(cache, fragment_ttl_s)
        self.html_cache_control = caching.cache_control()
        self._bundle: AssetBundle | None = None
        self._missing: AssetsMissing | None = None
        try:
            self._bundle = load_bundle(self.static_dir)
        except AssetsMissing as exc:
            self._missing = exc
            _log.warning("storefront_assets_missing", error=str(exc))

    def assets(self) -> AssetBundle:
        """The asset bundle; `AssetsMissing` (saying to run scripts/build-assets) if the
        build was not there when the node started."""
        if self._bundle is None:
            assert self._missing is not None
            raise self._missing
        return self._bundle

    def link_header(self) -> str:
        """The `Link` preload header of every page: the stylesheet and the app module."""
        bundle = self.assets()
        return (
            f"<{bundle.url('app.css')}>; rel=preload; as=style, "
            f"<{bundle.url('app.js')}>; rel=modulepreload"
        )

    def render(self, template: str, **values: Any) -> bytes:
        """A whole page (`template` extends `layout.html`)."""
        namespace = {"q": "", "assets": self.assets(), "format_price": format_price}
        namespace.update(values)
        page: bytes = self.loader.load(template).generate(**namespace)
        return page

    def _fragment(self, template: str, **values: Any) -> str:
        values.update(format_price=format_price, stock_slot=STOCK_SLOT, paragraphs=paragraphs)
        fragment: bytes = self.loader.load(template).generate(**values)
        return fragment.decode()

    async def _cached_fragment(
        self, kind: str, product: Mapping[str, Any], version: str, stock: int
    ) -> str:
        template, sizes = _FRAGMENTS[kind]
        fragment = await self.fragments.get(
            kind,
            product["id"],
            version,
            lambda: self._fragment(template, product=product, pic=picture_of(product, sizes)),
        )
        return fill_stock(fragment, stock)

    async def card(self, product: Mapping[str, Any], version: str, stock: int) -> str:
        """A product card with the live `stock` (the rest from the fragment cache)."""
        return await self._cached_fragment("card", product, version, stock)

    async def cards(
        self, entries: Sequence[tuple[Mapping[str, Any], str]], stocks: Mapping[int, int]
    ) -> list[str]:
        """The cards of a list page, in order."""
        return [
            await self.card(product, version, stocks.get(int(product["id"]), 0))
            for product, version in entries
        ]

    async def product_body(self, product: Mapping[str, Any], version: str, stock: int) -> str:
        """The product page's main content with the live `stock`."""
        return await self._cached_fragment("product", product, version, stock)
