// sw.js — the storefront's service worker source (Workbox injectManifest). build.mjs bundles
// it with esbuild into one classic script and then injects the precache list at
// self.__WB_MANIFEST; __FM_SW_VERSION__ is replaced by the build's sw_version.
//
//   app shell (app.*.js/css, icons, manifest.webmanifest, /offline)  precached
//   /images/...                                        CacheFirst, 300 entries, 30 days
//   GET /api/v1/me, /cart*, /orders*, /notifications*, /sessions*, /users*  NetworkOnly
//   GET /api/v1/... and GET /graphql                   StaleWhileRevalidate, 200s only
//   POST/PATCH/DELETE /api/v1/cart/items*              NetworkOnly; failed -> "cart-queue"
//   navigations                                        NetworkFirst (3 s), cached page, /offline
//                                                      (and the installing page, on CACHE_PAGE)
//   /cable, /sw.js and everything else                 not intercepted
import { cacheNames, clientsClaim, setCacheNameDetails } from "workbox-core";
import { cleanupOutdatedCaches, matchPrecache, precacheAndRoute } from "workbox-precaching";
import { NavigationRoute, registerRoute, setCatchHandler } from "workbox-routing";
import { CacheFirst, NetworkFirst, NetworkOnly, StaleWhileRevalidate } from "workbox-strategies";
import { ExpirationPlugin } from "workbox-expiration";
import { CacheableResponsePlugin } from "workbox-cacheable-response";
import { Queue } from "workbox-background-sync";

const VERSION = "__FM_SW_VERSION__";
setCacheNameDetails({ prefix: "fm", suffix: VERSION });
const CACHES = {
  images: `fm-images-${VERSION}`,
  api: `fm-api-${VERSION}`,
  pages: `fm-pages-${VERSION}`,
};

// --- lifecycle -----------------------------------------------------------------------
clientsClaim();
cleanupOutdatedCaches();
precacheAndRoute(self.__WB_MANIFEST);

self.addEventListener("activate", (event) => {
  const keep = new Set([cacheNames.precache, cacheNames.runtime, ...Object.values(CACHES)]);
  event.waitUntil(
    caches.keys().then((names) => Promise.all(names.filter((n) => !keep.has(n)).map((n) => caches.delete(n)))),
  );
});

// --- offline cart: queue failed changes, replay them later ------------------------------
// The queue keeps each request whole, headers included, so a replay carries the
// Idempotency-Key the page set on its first try and the server applies it exactly once.
// (This is what BackgroundSyncPlugin does; the Queue is made here so it can be replayed
// on demand. Without the Background Sync API, Workbox's Queue already replays on SW start.)
const cartQueue = new Queue("cart-queue", { maxRetentionTime: 24 * 60 });
const queueCartChanges = {
  fetchDidFail: async ({ request }) => {
    await cartQueue.pushRequest({ request });
  },
  // The network failed and the request is queued: tell the page so (202 + X-FM-Queued).
  handlerDidError: async () =>
    new Response(JSON.stringify({ queued: true }), {
      status: 202,
      headers: { "Content-Type": "application/json", "X-FM-Queued": "1" },
    }),
};


// --- routes (the first match wins) --------------------------------------------------------
const CART_ITEMS = /^\/api\/v1\/cart\/items(\/|$)/;
const PERSONAL_API = /^\/api\/v1\/(me|cart|orders|notifications|sessions|users|checkout)(\/|$)/;
const sameOrigin = (url) => url.origin === self.location.origin;

// A response the server marked as personal is never stored, whatever route it came by.
const notPrivate = {
  cacheWillUpdate: async ({ response }) =>
    /(^|,)\s*(no-store|private)\b/i.test(response.headers.get("Cache-Control") || "") ? null : response,
};

for (const method of ["POST", "PATCH", "DELETE"]) {
  registerRoute(
    ({ url }) => sameOrigin(url) && CART_ITEMS.test(url.pathname),
    new NetworkOnly({ plugins: [queueCartChanges] }),
    method,
  );
}

registerRoute(({ url }) => sameOrigin(url) && PERSONAL_API.test(url.pathname), new NetworkOnly());

registerRoute(
  ({ url }) => sameOrigin(url) && url.pathname.startsWith("/images/"),
  new CacheFirst({
    cacheName: CACHES.images,
    plugins: [
      new CacheableResponsePlugin({ statuses: [200] }),
      new ExpirationPlugin({ maxEntries: 300, maxAgeSeconds: 30 * 24 * 60 * 60, purgeOnQuotaError: true }),
    ],
  }),
);

registerRoute(
  ({ url }) => sameOrigin(url) && (url.pathname.startsWith("/api/v1/") || url.pathname === "/graphql"),
  new StaleWhileRevalidate({
    cacheName: CACHES.api,
    plugins: [new CacheableResponsePlugin({ statuses: [200] }), notPrivate],
  }),
);

// Pages: the network first (3 s), then the copy cached on an earlier visit. Personal
// pages (cart, checkout, orders, sign-in/up) are never stored: the server sends them
// "private, no-store", and the path list is a second guard.
const PERSONAL_PAGES = /^\/(cart|checkout|orders|sign-in|sign-up|sign-out)(\/|$)/;
const pages = new NetworkFirst({
  cacheName: CACHES.pages,
  networkTimeoutSeconds: 3,
  plugins: [
    new CacheableResponsePlugin({ statuses: [200] }),
    notPrivate,
    { cacheWillUpdate: async ({ request, response }) => (PERSONAL_PAGES.test(new URL(request.url).pathname) ? null : response) },
  ],
});
const NOT_PAGES = [/^\/cable/, /^\/sw\.js$/, /^\/api\//, /^\/graphql/, /^\/static\//, /^\/images\//];
registerRoute(new NavigationRoute(pages, { denylist: NOT_PAGES }));

// The page that installed this worker was loaded before the worker existed, so it is not in
// the pages cache: that page asks (CACHE_PAGE) for it to be fetched again through the pages
// strategy, so a shopper's first page opens offline too (personal pages still never stored).
function cachePage(event, href) {
  let url;
  try {
    url = new URL(href, self.location.href);
  } catch {
    return;
  }
  if (!sameOrigin(url) || NOT_PAGES.some((pattern) => pattern.test(url.pathname))) return;
  const request = new Request(url.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
  event.waitUntil(pages.handle({ event, request }).catch(() => {}));
}

self.addEventListener("message", (event) => {
  const type = event.data?.type;
  if (type === "SKIP_WAITING") self.skipWaiting();
  else if (type === "REPLAY_QUEUE") event.waitUntil(cartQueue.replayRequests().catch(() => {}));
  else if (type === "CACHE_PAGE") cachePage(event, event.data.url);
});

// Nothing from the network or a cache: a page gets the precached /offline page, anything
// else a network error (as without a service worker).
setCatchHandler(async ({ request }) => {
  if (request.mode === "navigate") return (await matchPrecache("/offline")) || Response.error();
  return Response.error();
});
