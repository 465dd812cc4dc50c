"""Browser tests: headless Chromium (Debian's `chromium` package) driven by Playwright for
Python, against real nodes (the test's node A and a node B in the same process), real
PostgreSQL and Valkey, and the real asset build in `static/dist` (`scripts/build-assets`).

- Chromium is the system's (`FM_CHROMIUM`, else `chromium` on `PATH`, else
  `/usr/bin/chromium`), never a `playwright install` download. When it or the `playwright`
  package is missing the tests FAIL naming what is missing: they are never skipped.
- One event loop and one browser for the whole package (`io_loop` and `browser` are
  package-scoped: the Playwright connection lives on the loop that started it, and pytest-
  tornado's loop is per test otherwise); every test gets fresh browser contexts (their own
  cookies, storage and service workers) and a fresh node on a port of its own, so nothing is
  shared between tests but the Chromium process.
- Artefacts (screenshots) go to `FM_BROWSER_ARTIFACTS` (default
  `$TMPDIR/finalmarket-browser-artifacts`); the path is printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

from server.adapters.http1 import HttpServerLike, make_http_server
from server.adapters.static_assets import resolve_dir
from server.wiring.app import make_app
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import ExtraNode
from tests.helpers.storefront import fetch, insert_products, storefront_settings

try:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
except ImportError:  # pragma: no cover - reported by the `browser` fixture
    async_playwright = None  # type: ignore[assignment]
    Browser = BrowserContext = Page = Any  # type: ignore[misc,assignment]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
# A loaded 2-core machine: conditions are waited for this long before a test fails.
WAIT_MS = 15_000
PASSWORD = "correct horse battery"
ARTIFACTS_ENV = "FM_BROWSER_ARTIFACTS"

# Records what a page's Content-Security-Policy refused (the console says it too, but the
# event carries the directive) and uncaught errors, from the first script on.
OBSERVER_SCRIPT = """
window.__fm = { csp: [], errors: [] };
document.addEventListener("securitypolicyviolation", (e) => {
  window.__fm.csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`);
});
window.addEventListener("error", (e) => window.__fm.errors.push(String(e.message)));
"""


def find_chromium() -> str | None:
    """The Chromium to drive: `FM_CHROMIUM`, else Debian's `chromium` on PATH."""
    configured = os.environ.get("FM_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for candidate in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


def artifacts_dir() -> Path:
    """Where screenshots are saved (made on first use)."""
    default = Path(tempfile.gettempdir()) / "finalmarket-browser-artifacts"
    path = Path(os.environ.get(ARTIFACTS_ENV) or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


_saved: list[Path] = []


def save_artifact(name: str) -> Path:
    """A path for the artefact `name`, listed at the end of the run."""
    path = artifacts_dir() / name
    _saved.append(path)
    return path


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Remember whether the test itself failed (contexts then leave screenshots)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _saved:
        terminalreporter.write_line(f"browser test artefacts in {artifacts_dir()}:")
        for path in _saved:
            terminalreporter.write_line(f"  {path}")


# --- one loop and one browser for the package ---------------------------------------------------


@pytest.fixture(scope="package")
def io_loop() -> Iterator[IOLoop]:
    """One IOLoop for every browser test (replaces pytest-tornado's per-test loop), so the
    package's one Playwright connection and Chromium serve them all."""
    loop = IOLoop()
    loop.make_current()
    yield loop
    loop.clear_current()
    loop.close(all_fds=True)


@pytest.fixture(scope="package")
def browser(io_loop: IOLoop) -> Iterator[Browser]:
    """Headless Chromium, launched once; fails (never skips) when it cannot be."""
    if async_playwright is None:
        pytest.fail(
            "the browser tests need the `playwright` Python package "
            "(./scripts/ensure-venv test installs the project's `test` extra)"
        )
    executable = find_chromium()
    if executable is None and os.environ.get("FM_CHROMIUM"):
        pytest.fail(
            f"the browser tests need Chromium: FM_CHROMIUM={os.environ['FM_CHROMIUM']!r} "
            "is not an executable"
        )
    if executable is None:
        pytest.fail(
            "the browser tests need Chromium: Debian's `chromium` package is not installed "
            "(apt-get install -y chromium; scripts/test does it as root), or set FM_CHROMIUM"
        )

    async def launch() -> tuple[Any, Browser]:
        playwright = await async_playwright().start()
        try:
            launched = await playwright.chromium.launch(
                executable_path=executable, args=CHROMIUM_ARGS, headless=True
            )
        except Exception:
            await playwright.stop()
            raise
        return playwright, launched

    try:
        playwright, launched = io_loop.run_sync(launch, timeout=60)
    except Exception as exc:
        pytest.fail(f"could not start Chromium at {executable} through Playwright: {exc}")
    expect.set_options(timeout=WAIT_MS)
    yield launched

    async def close() -> None:
        await launched.close()
        await playwright.stop()

    io_loop.run_sync(close, timeout=30)


# --- the shop under test ------------------------------------------------------------------------


@pytest.fixture(scope="package")
def dist() -> Path:
    """The real asset build (`FM_STATIC_DIR`'s default, `static/dist`)."""
    directory = resolve_dir(Settings.model_fields["static_dir"].default)
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        pytest.fail(f"no asset build in {directory}: run scripts/build-assets first")
    if "offline_revision" not in json.loads(manifest.read_text()):
        pytest.fail(f"{directory} holds no build of static/build.mjs (no offline_revision)")
    return directory


@pytest.fixture
def settings(infra_env: dict[str, str], dist: Path, tmp_path: Path) -> Settings:
    """Node settings: the real build, secure cookies as in production (Chromium keeps
    `Secure` cookies from http://127.0.0.1), no rate limits in the way, images stored in the
    test's directory."""
    return storefront_settings(
        infra_env, dist, cookie_secure=True, image_storage_dir=str(tmp_path / "images")
    )


def build_assets_with_changed_worker(work: Path) -> Path:
    """A second real build (static/build.mjs) of the sources with one change to the service
    worker, into `work/dist`: a new worker version, as a deploy would bring. The sources
    are copied (build.mjs builds the tree it sits in), node_modules linked."""
    root = Path(__file__).resolve().parents[2]
    static = work / "static"
    static.mkdir(parents=True)
    for name in ("src", "sw", "icons"):
        shutil.copytree(root / "static" / name, static / name)
    for name in ("build.mjs", "package.json", "package-lock.json"):
        shutil.copy2(root / "static" / name, static / name)
    (static / "node_modules").symlink_to(root / "static" / "node_modules", target_is_directory=True)
    templates = work / "handlers" / "templates"
    templates.mkdir(parents=True)
    for name in ("layout.html", "offline.html"):
        shutil.copy2(root / "handlers" / "templates" / name, templates / name)
    with (static / "sw" / "sw.js").open("a") as source:
        source.write('\nself.__FM_BUILD_NOTE = "a later deploy";\n')
    node = shutil.which("node")
    if node is None:
        pytest.fail("the browser tests need Node.js (`node`) to build the assets")
    out = work / "dist"
    result = subprocess.run(
        [node, str(static / "build.mjs"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@dataclass
class Shop:
    """The shop one test runs against: node A (the pages) and helpers for its data."""

    url: str
    services: Services
    catalog_dsn: str
    client: AsyncHTTPClient = field(default_factory=AsyncHTTPClient)

    def add_product(self, name: str, stock: int, price_cents: int = 1999, text: str = "") -> int:
        """A product written straight to the catalog; its id."""
        return insert_products(self.catalog_dsn, [(name, text, price_cents, stock)])[0]

    async def add_user(self, email: str, *, admin: bool = False) -> tuple[int, str]:
        """An account (password `PASSWORD`) and a bearer token for it."""
        user = await self.services.users.create_user(email, PASSWORD, email.split("@")[0], admin)
        return user.id, await self.services.sessions.create(user.id, admin)

    async def api(
        self,
        token: str,
        path: str,
        method: str = "GET",
        body: Any = None,
        base: str = "",
        key: str | None = None,
    ) -> Any:
        """One REST call as `token` (on node A, or on `base`; with `Idempotency-Key: key`);
        the decoded answer."""
        headers = {"Authorization": f"Bearer {token}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if body is not None:
            headers["Content-Type"] = "application/json"
        data = None if body is None else json.dumps(body).encode()
        response = await fetch(self.client, (base or self.url) + path, method, data, **headers)
        assert response.code < 300, (response.code, response.body)
        return json.loads(response.body)

    async def cart_quantities(self, token: str) -> dict[int, int]:
        """product id -> quantity of the cart, as the server has it."""
        cart = await self.api(token, "/api/v1/cart")
        return {int(item["product_id"]): int(item["quantity"]) for item in cart["items"]}


@pytest.fixture
def shop(
    clean_data: None, http_server: Any, http_port: int, services: Services, infra_env: Any
) -> Shop:
    """Node A serving the storefront at http://127.0.0.1:<port>, on emptied databases."""
    return Shop(f"http://127.0.0.1:{http_port}", services, infra_env["FM_CATALOG_DSN"])


class PortNode:
    """A node serving `static_dir` on a chosen port, so that a node with another asset build
    can take over the same origin (service workers, caches and cookies are per origin)."""

    def __init__(self, services: Services, server: HttpServerLike, port: int) -> None:
        self.services = services
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    async def start(cls, settings: Settings, port: int, static_dir: Path) -> PortNode:
        node_settings = settings.model_copy(
            update={"static_dir": str(static_dir), "node_id": f"node-{port}-{static_dir.name}"}
        )
        services = await Services.open(node_settings)
        services.start()
        server = make_http_server(make_app(services), services.settings)
        await server.listen_on(bind_sockets(port, "127.0.0.1"))
        return cls(services, server, port)

    async def stop(self) -> None:
        """Stop listening, close every connection (keep-alive ones too), then the services."""
        self.server.stop()
        await self.server.close_all_connections()
        await self.services.close()


@pytest.fixture
def node_b(io_loop: IOLoop, settings: Settings) -> Iterator[ExtraNode]:
    """A second node sharing Redis and the databases with node A."""
    node: ExtraNode = io_loop.run_sync(lambda: ExtraNode.start(settings))
    yield node
    io_loop.run_sync(node.stop)


# --- browser contexts ---------------------------------------------------------------------------

NewContext = Callable[..., Awaitable[BrowserContext]]


@pytest.fixture
def new_context(
    io_loop: IOLoop, browser: Browser, request: pytest.FixtureRequest
) -> Iterator[NewContext]:
    """Makes browser contexts (a fresh profile each: cookies, storage, service workers),
    all closed after the test. Each page records CSP violations and uncaught errors; when
    the test failed, a screenshot of every page still open is saved first."""
    made: list[BrowserContext] = []

    async def make(**options: Any) -> BrowserContext:
        context = await browser.new_context(**options)
        context.set_default_timeout(WAIT_MS)
        if options.get("java_script_enabled", True):
            await context.add_init_script(OBSERVER_SCRIPT)
        made.append(context)
        return context

    yield make

    failed = request.node.stash.get(_CALL_FAILED, False)

    async def close_all() -> None:
        for number, context in enumerate(made):
            for tab, page in enumerate(context.pages if failed else []):
                try:
                    path = save_artifact(f"failed-{request.node.name}-{number}-{tab}.png")
                    await page.screenshot(path=path, full_page=True, timeout=5_000)
                except Exception as exc:  # a crashed or closing page: the failure still shows
                    print(f"no screenshot of {page.url}: {exc}")
            await context.close()

    io_loop.run_sync(close_all, timeout=30)


async def sign_in(page: Page, shop: Shop, email: str) -> None:
    """Sign in through the storefront's form (the cookies land in the page's context)."""
    await page.goto(f"{shop.url}/sign-in")
    await page.fill("#email", email)
    await page.fill("#password", PASSWORD)
    async with page.expect_navigation():
        await page.click("form.account-form button[type=submit]")
    assert page.url == f"{shop.url}/", page.url


async def wait_for_service_worker(page: Page) -> None:
    """Until the page is controlled by an activated service worker."""
    await page.wait_for_function(
        "() => navigator.serviceWorker.controller?.state === 'activated'",
        timeout=WAIT_MS,
    )


async def wait_for_true(page: Page, script: str, arg: Any = None, what: str = "") -> None:
    """Until `script` (a function, async ones too) evaluates truthy in `page`. (Playwright's
    `wait_for_function` takes the promise of an async function for a truthy answer.)"""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not await page.evaluate(script, arg):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {WAIT_MS / 1000:.0f} s for {what or script}")
        await asyncio.sleep(0.05)


async def wait_for_cached_page(page: Page, url: str) -> None:
    """Until the service worker's pages cache holds `url`."""
    await wait_for_true(
        page,
        """async (url) => {
             for (const name of await caches.keys()) {
               if (name.startsWith("fm-pages-") && (await (await caches.open(name)).match(url)))
                 return true;
             }
             return false;
           }""",
        url,
        f"{url} in the service worker's pages cache",
    )


async def forget_http_cache(page: Page) -> None:
    """Empty the browser's HTTP cache (not the service worker's Cache Storage). DevTools'
    offline emulation serves stale HTTP-cache entries, which real offline browsers do not, so
    a page that loads offline after this came from the service worker."""
    session = await page.context.new_cdp_session(page)
    await session.send("Network.clearBrowserCache")
    await session.detach()


async def wait_until_live(page: Page) -> None:
    """Until the product page's InventoryChannel subscription is confirmed: the viewer count
    (sent after the subscription) shows at least 1."""
    await expect(page.locator("[data-stock-target=viewers]")).not_to_have_text("0")
