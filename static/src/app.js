// app.js — the storefront's one script (a module, deferred). Starts Stimulus with the five
// controllers, paints the blur placeholders of product images from data-placeholder (CSSOM,
// allowed by the CSP, unlike style="" attributes), registers the service worker at /sw.js
// (secure contexts only; localhost counts), asks it to store the page that installed it, and
// asks it to replay queued cart changes when the browser comes back online (for browsers
// without the Background Sync API).
import { Application } from "@hotwired/stimulus";
import AddToCartController from "./controllers/add_to_cart_controller.js";
import CartController from "./controllers/cart_controller.js";
import SessionController from "./controllers/session_controller.js";
import StockController from "./controllers/stock_controller.js";
import ToastsController from "./controllers/toasts_controller.js";

const application = Application.start();
application.register("session", SessionController);
application.register("stock", StockController);
application.register("cart", CartController);
application.register("add-to-cart", AddToCartController);
application.register("toasts", ToastsController);

function paintPlaceholders() {
  document.querySelectorAll(".product-image[data-placeholder]").forEach((box) => {
    const url = box.dataset.placeholder;
    if (!/^data:image\/[a-z0-9.+-]+;base64,[a-z0-9+/=]+$/i.test(url)) return;
    box.style.backgroundImage = `url("${url}")`;
    const img = box.querySelector("img");
    const clear = () => box.classList.add("is-loaded");
    if (img?.complete && img.naturalWidth) clear();
    else img?.addEventListener("load", clear, { once: true });
  });
}
paintPlaceholders();

if ("serviceWorker" in navigator && window.isSecureContext) {
  const firstVisit = !navigator.serviceWorker.controller;
  navigator.serviceWorker.register("/sw.js", { scope: "/" }).catch((err) => console.warn("service worker:", err));
  // This page came from the network before any worker ran: once one is active, ask it to
  // store this page too (it was not there to see it), so it opens offline like later ones.
  if (firstVisit) {
    navigator.serviceWorker.ready.then((reg) => reg.active?.postMessage({ type: "CACHE_PAGE", url: location.href }));
  }
  window.addEventListener("online", () => {
    navigator.serviceWorker.controller?.postMessage({ type: "REPLAY_QUEUE" });
  });
}
