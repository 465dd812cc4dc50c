// api.js — small helpers shared by the controllers: same-origin JSON calls to /api/v1 with
// the double-submit CSRF header (the JS-readable `fm_csrf` cookie echoed in X-CSRF-Token)
// and a fresh Idempotency-Key per cart action (a service-worker replay re-sends the same one).

export function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)fm_csrf=([^;]*)/);
  return match ? decodeURIComponent(match[1]) : "";
}

export function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // randomUUID exists only on secure contexts; same v4 layout from getRandomValues.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// GET (no body) or an unsafe method with a JSON body. Rejects only on network failure.
export function api(method, url, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    headers["X-CSRF-Token"] = csrfToken();
    headers["Idempotency-Key"] = uuid();
    if (body !== undefined) headers["Content-Type"] = "application/json";
  }
  return fetch(url, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

// The service worker answers a cart change it queued for later with 202 + this header.
export const isQueued = (res) => res.status === 202 && res.headers.get("X-FM-Queued") === "1";

const money = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
export const formatCents = (cents) => money.format(cents / 100);
