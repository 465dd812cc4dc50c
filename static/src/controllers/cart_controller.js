// cart_controller.js — the header cart link and the cart drawer (two instances, one store).
// After sign-in: GET /api/v1/cart, then one CartChannel subscription for the page; every cart
// (from the API, the channel, or an add-to-cart answer) is applied only if it is not older
// than the one shown (its `version`), and rendered into every instance: count, items, total;
// a line that wants more than is in stock (`available`) says how many are.
// Clicking the header link opens the drawer; without JS (or signed out) it goes to /cart.
import { Controller } from "@hotwired/stimulus";
import { consumer } from "../consumer.js";
import { api, formatCents, isQueued } from "../api.js";
import { onSignedIn } from "./session_controller.js";
import { toast } from "./toasts_controller.js";

const instances = new Set();
const names = new Map(); // product_id -> Promise<name>
let cart = null;
let subscription = null;
let started = false;

export function applyCart(next) {
  if (!next || !Array.isArray(next.items)) return;
  if (cart && typeof next.version === "number" && next.version < cart.version) return;
  cart = next;
  instances.forEach((c) => c.render());
}

export function openCart() {
  instances.forEach((c) => c.open());
}

function closeCart() {
  instances.forEach((c) => c.close());
}

function start() {
  if (started) return;
  started = true;
  onSignedIn(async () => {
    if (subscription) return;
    try {
      const res = await api("GET", "/api/v1/cart");
      if (res.ok) applyCart(await res.json());
    } catch {
      // offline: the channel sends the cart on (re)connect anyway
    }
    subscription = consumer.subscriptions.create(
      { channel: "CartChannel" },
      { received: (data) => data.event === "cart" && applyCart(data.cart) },
    );
  });
}

function productName(id) {
  if (!names.has(id)) {
    names.set(
      id,
      api("GET", `/api/v1/products/${id}`)
        .then((r) => (r.ok ? r.json() : {}))
        .then((p) => p.name || `Product ${id}`, () => `Product ${id}`),
    );
  }
  return names.get(id);
}

export default class extends Controller {
  static targets = ["link", "count", "drawer", "items", "total"];

  connect() {
    instances.add(this);
    this.onKey = (e) => e.key === "Escape" && closeCart();
    if (this.hasLinkTarget) {
      this.onClick = (e) => {
        if (!cart) return; // not signed in (yet): let the link go to /cart
        e.preventDefault();
        this.toggle();
      };
      this.linkTarget.addEventListener("click", this.onClick);
      this.linkTarget.setAttribute("aria-controls", "cart-drawer");
      this.linkTarget.setAttribute("aria-expanded", "false");
    }
    if (this.hasDrawerTarget && !this.drawerTarget.querySelector(".cart-close")) {
      const close = document.createElement("button");
      close.type = "button";
      close.className = "cart-close";
      close.textContent = "Close";
      close.addEventListener("click", closeCart);
      this.drawerTarget.prepend(close);
      this.drawerTarget.tabIndex = -1;
    }
    if (cart) this.render();
    start();
  }

  disconnect() {
    instances.delete(this);
    if (this.hasLinkTarget) this.linkTarget.removeEventListener("click", this.onClick);
    document.removeEventListener("keydown", this.onKey);
    if (instances.size === 0 && subscription) {
      subscription.unsubscribe();
      subscription = null;
    }
  }

  render() {
    const count = cart.items.reduce((n, item) => n + item.quantity, 0);
    this.countTargets.forEach((el) => (el.textContent = String(count)));
    this.totalTargets.forEach((el) => (el.textContent = formatCents(cart.total_cents)));
    this.itemsTargets.forEach((list) => {
      list.replaceChildren(...cart.items.map((item) => this.line(item)));
      if (!cart.items.length) list.append(Object.assign(document.createElement("li"), { textContent: "Your cart is empty." }));
    });
  }

  line(item) {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/products/${item.product_id}`;
    link.textContent = `Product ${item.product_id}`;
    productName(item.product_id).then((name) => (link.textContent = name));
    const detail = document.createElement("span");
    detail.textContent = ` × ${item.quantity} — ${formatCents(item.unit_price_cents * item.quantity)} `;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "cart-remove";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove product ${item.product_id} from cart`);
    remove.addEventListener("click", () => this.remove(item.product_id));
    li.append(link, detail);
    if (typeof item.available === "number" && item.quantity > item.available) {
      // More than is in stock now: kept in the cart (stock moves), but checkout would refuse it.
      const short = document.createElement("strong");
      short.className = "stock-warning";
      short.textContent = `only ${item.available} in stock `;
      li.append(short);
    }
    li.append(remove);
    return li;
  }

  async remove(productId) {
    try {
      const res = await api("DELETE", `/api/v1/cart/items/${productId}`);
      if (isQueued(res)) toast("Saved, will sync when back online");
      else if (res.ok) applyCart(await res.json());
      else toast("Could not remove the item", `The server answered ${res.status}.`);
    } catch {
      toast("You are offline", "The item was not removed; try again when back online.");
    }
  }

  toggle() {
    const drawer = document.getElementById("cart-drawer");
    if (drawer?.hidden) openCart();
    else closeCart();
  }

  open() {
    if (this.hasLinkTarget) this.linkTarget.setAttribute("aria-expanded", "true");
    if (!this.hasDrawerTarget) return;
    this.drawerTarget.hidden = false;
    this.drawerTarget.focus();
    document.addEventListener("keydown", this.onKey);
  }

  close() {
    if (this.hasLinkTarget) {
      const wasOpen = this.linkTarget.getAttribute("aria-expanded") === "true";
      this.linkTarget.setAttribute("aria-expanded", "false");
      if (wasOpen) this.linkTarget.focus(); // focus goes back where the drawer was opened
    }
    if (!this.hasDrawerTarget) return;
    this.drawerTarget.hidden = true;
    document.removeEventListener("keydown", this.onKey);
  }
}
