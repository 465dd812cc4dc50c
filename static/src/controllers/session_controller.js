// session_controller.js — on <body>: asks GET /api/v1/me who the visitor is (the cached HTML
// never says; asked only when the fm_csrf cookie says someone signed in), shows the signed-in
// or signed-out part of the header, and announces a sign-in with a `session:signed-in` event
// on window. Controllers that need a user (cart, toasts) use onSignedIn(), which also works
// when they connect after the event has fired.
import { Controller } from "@hotwired/stimulus";
import { csrfToken } from "../api.js";

let currentUser = null;

export function onSignedIn(callback) {
  if (currentUser) callback(currentUser);
  const listener = (event) => callback(event.detail.user);
  window.addEventListener("session:signed-in", listener);
  return () => window.removeEventListener("session:signed-in", listener);
}

export default class extends Controller {
  static targets = ["signedIn", "signedOut", "name"];

  async connect() {
    // Signing in sets the script-readable fm_csrf cookie beside the HTTP-only session one
    // (signing out clears both): without it the visitor is signed out, and asking /me would
    // only log a 401 in the console of every anonymous page view.
    if (!csrfToken()) return;
    let res;
    try {
      res = await fetch("/api/v1/me", { headers: { Accept: "application/json" }, credentials: "same-origin" });
    } catch {
      return; // offline: keep the signed-out header the server rendered
    }
    if (!res.ok) return; // 401: signed out
    const user = await res.json(); // the account itself: {id, email, name, is_admin, ...}
    if (!user?.id || currentUser?.id === user.id) return;
    currentUser = user;
    this.nameTargets.forEach((el) => (el.textContent = user.name || user.email));
    this.signedInTargets.forEach((el) => (el.hidden = false));
    this.signedOutTargets.forEach((el) => (el.hidden = true));
    window.dispatchEvent(new CustomEvent("session:signed-in", { detail: { user } }));
  }
}
