"""The built storefront assets over HTTP: `/static/<name>`, `/sw.js`, `/manifest.webmanifest`.

Everything is served from memory (`server.adapters.static_assets.AssetBundle`, read at start-up): a
request is a dict lookup of the name, so only files the build's `manifest.json` lists exist
here and no URL is ever turned into a path (no traversal, `..%2F` included).

- `/static/<name>`: fingerprinted, so `Cache-Control: public, max-age=31536000, immutable`;
- `/sw.js`: `Cache-Control: no-cache` (browsers must see a new worker at once) and
  `Service-Worker-Allowed: /`;
- `/manifest.webmanifest`: `application/manifest+json`, cached for five minutes.

Each answer picks the build's precompressed `.br` or `.gz` by `Accept-Encoding` q-values
(`server.adapters.compression.choose_coding`: br, then gzip, then identity on ties), with
`Vary: Accept-Encoding`, a strong ETag per representation (`"<sha256>"`, `"<sha256>-br"`,
`"<sha256>-gz"`), and 304 for `If-None-Match` with any of them.
"""

from __future__ import annotations

from typing import Any

from handlers.base import ApiError, BaseHandler
from handlers.gate import Gate
from handlers.pages import Storefront
from server.adapters.compression import IDENTITY, choose_coding, coded_etag, etag_matches
from server.adapters.static_assets import Asset, AssetsMissing

IMMUTABLE = "public, max-age=31536000, immutable"
SW_CACHE_CONTROL = "no-cache"
WEBMANIFEST_CACHE_CONTROL = "public, max-age=300"


class _AssetHandler(BaseHandler):
    """Sends one in-memory asset with content-coding negotiation."""

    storefront: Storefront
    cache_control = IMMUTABLE

    def initialize(  # type: ignore[override]
        self, gate: Gate, storefront: Storefront
    ) -> None:
        super().initialize(gate)
        self.storefront = storefront

    def compute_etag(self) -> str | None:
        return None  # set per representation below

    def lookup(self, name: str) -> Asset | None:
        """The asset this route serves under `name`."""
        raise NotImplementedError

    def _asset(self, name: str) -> Asset:
        try:
            asset = self.lookup(name)
        except AssetsMissing as exc:
            raise ApiError(500, "assets-missing", str(exc)) from None
        if asset is None:
            raise ApiError(404, "not-found", f"no asset {name!r} in this build")
        return asset

    def send_asset(self, name: str) -> None:
        """200 with the best representation, or 304; HEAD sends the headers only."""
        asset = self._asset(name)
        coding = choose_coding(self.request.headers.get("Accept-Encoding"), asset.codings)
        if coding is None:
            coding = IDENTITY  # nothing acceptable: identity anyway (RFC 9110 12.5.3)
        etag = coded_etag(asset.etag, coding)
        self.set_header("Content-Type", asset.content_type)
        self.set_header("Cache-Control", self.cache_control)
        self.set_header("ETag", etag)
        self.set_header("X-Content-Type-Options", "nosniff")
        if len(asset.codings) > 1:
            self.set_header("Vary", "Accept-Encoding")
        if coding != IDENTITY:
            self.set_header("Content-Encoding", coding)
        if etag_matches(self.request.headers.get("If-None-Match", ""), asset.etag):
            self.clear_header("Content-Type")
            self.set_status(304)
            self.finish()
            return
        body = asset.bodies[coding]
        if self.request.method == "HEAD":
            self.set_header("Content-Length", str(len(body)))
            self.finish()
            return
        self.finish(body)


class StaticFileHandler(_AssetHandler):
    """`GET /static/<name>`: a fingerprinted file the build's manifest lists."""

    def lookup(self, name: str) -> Asset | None:
        return self.storefront.assets().static(name)

    def get(self, name: str) -> None:
        self.send_asset(name)

    def head(self, name: str) -> None:
        self.send_asset(name)


class RootAssetHandler(_AssetHandler):
    """`GET /sw.js` and `GET /manifest.webmanifest` (unfingerprinted, short-lived)."""

    name = ""

    def lookup(self, name: str) -> Asset | None:
        return self.storefront.assets().root(name)

    def get(self) -> None:
        self.send_asset(self.name)

    def head(self) -> None:
        self.send_asset(self.name)


class ServiceWorkerHandler(RootAssetHandler):
    """`/sw.js`: revalidated on every load, allowed to control the whole site."""

    name = "sw.js"
    cache_control = SW_CACHE_CONTROL

    def set_default_headers(self) -> None:
        self.set_header("Service-Worker-Allowed", "/")


class WebManifestHandler(RootAssetHandler):
    """`/manifest.webmanifest`: the installable app's manifest."""

    name = "manifest.webmanifest"
    cache_control = WEBMANIFEST_CACHE_CONTROL


def routes(gate: Gate, storefront: Storefront) -> list[Any]:
    """The asset routes, for `server.wiring.app.make_app`."""
    args = {"gate": gate, "storefront": storefront}
    return [
        (r"/static/([^/]+)", StaticFileHandler, args),
        (r"/sw\.js", ServiceWorkerHandler, args),
        (r"/manifest\.webmanifest", WebManifestHandler, args),
    ]
