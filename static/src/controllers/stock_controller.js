// stock_controller.js — on each product card / product page: subscribes InventoryChannel for
// its product (through the page's one shared consumer), replaces the server-rendered (possibly
// cached, a little old) stock count with the live one, shows "N viewing now", and at 0 shows
// "Sold out" and disables the card's add-to-cart button. Unsubscribes when the card leaves.
import { Controller } from "@hotwired/stimulus";
import { consumer } from "../consumer.js";

export default class extends Controller {
  static targets = ["count", "viewers"];
  static values = { productId: Number };

  connect() {
    this.subscription = consumer.subscriptions.create(
      { channel: "InventoryChannel", product_id: this.productIdValue },
      { received: (data) => this.received(data) },
    );
  }

  disconnect() {
    this.subscription?.unsubscribe();
    this.subscription = null;
  }

  received(data) {
    if (Number(data.product_id) !== this.productIdValue) return;
    if (data.event === "stock") this.showStock(data.stock);
    else if (data.event === "presence") this.viewersTargets.forEach((el) => (el.textContent = String(data.viewers)));
  }

  showStock(stock) {
    const soldOut = stock <= 0;
    this.countTargets.forEach((el) => {
      el.textContent = String(stock);
      const line = el.closest(".stock") || el;
      line.hidden = soldOut;
      this.soldOutLabel(line).hidden = !soldOut;
    });
    this.element.querySelectorAll('[data-controller~="add-to-cart"]').forEach((form) => {
      form.querySelectorAll('button, input[type="submit"]').forEach((b) => (b.disabled = soldOut));
      const qty = form.querySelector('input[name="quantity"]');
      if (qty && !soldOut) qty.max = String(Math.min(99, stock));
    });
  }

  // A "Sold out" line beside the stock line, made once and toggled with `hidden`.
  soldOutLabel(line) {
    let label = line.nextElementSibling;
    if (!label?.classList.contains("sold-out")) {
      label = document.createElement("p");
      label.className = "sold-out";
      label.textContent = "Sold out";
      line.after(label);
    }
    return label;
  }
}
