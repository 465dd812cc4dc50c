// add_to_cart_controller.js — on the add-to-cart <form>: instead of the full-page POST to
// /cart/items, sends POST /api/v1/cart/items (CSRF header + a fresh Idempotency-Key) and opens
// the cart drawer with the answered cart. Offline, the service worker queues the request for
// background sync and answers 202 (X-FM-Queued): the toast says it will sync. Signed out (401)
// the form is submitted the plain way, so the server can send the visitor to sign in. More
// than is in stock is added (the cart keeps it): a toast says how many are available.
import { Controller } from "@hotwired/stimulus";
import { api, isQueued } from "../api.js";
import { applyCart, openCart } from "./cart_controller.js";
import { toast } from "./toasts_controller.js";

export default class extends Controller {
  async submit(event) {
    event.preventDefault();
    const form = this.element;
    const data = new FormData(form);
    const body = { product_id: Number(data.get("product_id")), quantity: Number(data.get("quantity") || 1) };
    const button = form.querySelector('button[type="submit"], button:not([type])');
    if (button) button.disabled = true;
    try {
      const res = await api("POST", "/api/v1/cart/items", body);
      if (isQueued(res)) toast("Saved, will sync when back online");
      else if (res.ok) {
        const cart = await res.json();
        applyCart(cart);
        openCart();
        const short = (cart.warnings || []).find((w) => w.product_id === String(body.product_id));
        if (short) toast(`Only ${short.available} in stock`, "Added to your cart; lower the quantity before checkout.");
      } else if (res.status === 401 || res.status === 403) form.submit();
      else toast("Could not add to cart", await problemText(res));
    } catch {
      toast("You are offline", "Nothing was added; try again when back online.");
    } finally {
      if (button) button.disabled = false;
    }
  }
}

async function problemText(res) {
  try {
    const problem = await res.json(); // RFC 9457 problem
    return problem.detail || problem.title || `Error ${res.status}`;
  } catch {
    return `Error ${res.status}`;
  }
}
