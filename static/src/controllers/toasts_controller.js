// toasts_controller.js — the toast area (a role=status, aria-live=polite container). Shows
// any toast(title, body) call from the other controllers and, after sign-in, every message of
// the NotificationsChannel. Each toast dismisses itself after 6 s (paused while hovered or
// focused) and has a close button.
import { Controller } from "@hotwired/stimulus";
import { consumer } from "../consumer.js";
import { onSignedIn } from "./session_controller.js";

const SHOW = "toasts:show";
const LIFETIME_MS = 6000;
const MAX_TOASTS = 5;

export function toast(title, body = "") {
  window.dispatchEvent(new CustomEvent(SHOW, { detail: { title, body } }));
}

export default class extends Controller {
  static targets = ["list"];

  connect() {
    this.onShow = (e) => this.show(e.detail);
    window.addEventListener(SHOW, this.onShow);
    this.stopWaiting = onSignedIn(() => {
      if (this.subscription) return;
      this.subscription = consumer.subscriptions.create(
        { channel: "NotificationsChannel" },
        { received: (data) => data.event === "notification" && this.show(data.notification) },
      );
    });
  }

  disconnect() {
    window.removeEventListener(SHOW, this.onShow);
    this.stopWaiting();
    this.subscription?.unsubscribe();
    this.subscription = null;
  }

  show({ title, body }) {
    const list = this.hasListTarget ? this.listTarget : this.element;
    const item = document.createElement("div");
    item.className = "toast";
    const heading = document.createElement("strong");
    heading.textContent = title;
    item.append(heading);
    if (body) item.append(Object.assign(document.createElement("p"), { textContent: body }));
    const close = document.createElement("button");
    close.type = "button";
    close.className = "toast-close";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.addEventListener("click", () => item.remove());
    item.append(close);
    list.append(item);
    while (list.children.length > MAX_TOASTS) list.firstElementChild.remove();

    let timer;
    const arm = () => (timer = setTimeout(() => item.remove(), LIFETIME_MS));
    const pause = () => clearTimeout(timer);
    item.addEventListener("mouseenter", pause);
    item.addEventListener("mouseleave", arm);
    item.addEventListener("focusin", pause);
    item.addEventListener("focusout", arm);
    arm();
  }
}
