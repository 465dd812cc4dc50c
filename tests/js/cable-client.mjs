#!/usr/bin/env node
// CLI driver around the *official* @rails/actioncable consumer (used unchanged), for the
// Python tests to spawn. It prints ONE JSON object per line on stdout for every event:
//
//   {"event":"connected","reconnected":false}
//   {"event":"rejected"}
//   {"event":"disconnected","willAttemptReconnect":true}
//   {"event":"received","data":<message>}
//   {"event":"done","received":N}                    (plus "timedOut":true on timeout)
//
// Exit codes: 0 = --count messages received (or, without --count, the timeout ended the run),
//             3 = timeout before --count messages, 4 = subscription rejected,
//             5 = disconnected for good (the client will not reconnect: a server "disconnect" without
//                 reconnect:true, or a subprotocol the client does not support), 2 = bad arguments.
//
// usage:
//   node tests/js/cable-client.mjs --url ws://127.0.0.1:PORT/cable?token=T \
//     --channel InventoryChannel [--params '{"product_id":"42"}'] [--count N] [--timeout-ms 10000] \
//     [--perform ACTION [--data '{"k":1}']] [--origin http://127.0.0.1:PORT] [--header 'Name: value']... \
//     [--stale-threshold SECONDS] [--debug]
//
// --debug turns on ActionCable.logger (routed to stderr) and prints every raw frame to stderr.
// stdout carries only the JSON event lines; diagnostics always go to stderr.

import { parseArgs } from "node:util";
import WS from "ws";

const USAGE =
  "usage: cable-client.mjs --url ws://HOST:PORT/cable --channel NAME [--params JSON] [--count N] " +
  "[--timeout-ms MS] [--perform ACTION [--data JSON]] [--origin URL] [--header 'K: V']... " +
  "[--stale-threshold S] [--debug]";

function fail(msg) {
  process.stderr.write(`cable-client: ${msg}\n${USAGE}\n`);
  process.exit(2);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      url: { type: "string" },
      channel: { type: "string" },
      params: { type: "string", default: "{}" },
      count: { type: "string" },
      "timeout-ms": { type: "string", default: "10000" },
      perform: { type: "string" },
      data: { type: "string", default: "{}" },
      origin: { type: "string" },
      header: { type: "string", multiple: true, default: [] },
      "stale-threshold": { type: "string" },
      debug: { type: "boolean", default: false },
    },
    strict: true,
  }));
} catch (e) {
  fail(e.message);
}

if (!args.url) fail("--url is required");
if (!args.channel) fail("--channel is required");
// createWebSocketURL() only resolves non-ws(s) URLs through document.createElement("a"),
// which does not exist in Node: insist on an absolute ws:// or wss:// URL.
if (!/^wss?:\/\//i.test(args.url)) fail("--url must start with ws:// or wss://");

function parseJsonObject(name, text) {
  let v;
  try {
    v = JSON.parse(text);
  } catch (e) {
    fail(`--${name} is not valid JSON: ${e.message}`);
  }
  if (v === null || typeof v !== "object" || Array.isArray(v)) fail(`--${name} must be a JSON object`);
  return v;
}
const params = parseJsonObject("params", args.params);
const performData = parseJsonObject("data", args.data);

const count = args.count === undefined ? null : Number(args.count);
if (count !== null && !(Number.isInteger(count) && count >= 0)) fail("--count must be a non-negative integer");
const timeoutMs = Number(args["timeout-ms"]);
if (!(timeoutMs > 0)) fail("--timeout-ms must be a positive number");

const headers = {};
for (const h of args.header) {
  const i = h.indexOf(":");
  if (i <= 0) fail(`bad --header ${JSON.stringify(h)} (want 'Name: value')`);
  headers[h.slice(0, i).trim()] = h.slice(i + 1).trim();
}

const debug = args.debug;
const errlog = (...a) => process.stderr.write(a.map(String).join(" ") + "\n");

// --- WebSocket implementation for the client --------------------------------------------------
// The client builds its socket as `new adapters.WebSocket(url, protocols)` (src/connection.js), so
// the subclass keeps that signature and adds ws options (Origin and other headers) itself.
// Static CONNECTING/OPEN/CLOSING/CLOSED are enumerable on ws's class, which the client's
// getState() needs (`for (let state in adapters.WebSocket)`); a subclass inherits them for for..in.
class CableWebSocket extends WS {
  constructor(url, protocols) {
    const opts = { headers: { ...headers } };
    if (args.origin) opts.origin = args.origin;
    super(url, protocols, opts);
    // Always report transport errors (handshake refused, bad subprotocol, ...) on stderr.
    this.on("error", (e) => errlog(`cable-client: websocket error: ${e.message}`));
    if (debug) {
      this.on("open", () => errlog(`cable-client: open, subprotocol=${JSON.stringify(this.protocol)}`));
      this.on("message", (d, isBinary) => errlog(`cable-client: frame ${isBinary ? "(binary) " : ""}<- ${d}`));
      this.on("close", (code, reason) => errlog(`cable-client: close ${code} ${reason}`));
    }
  }
}
// adapters.js captures `WebSocket` when the module is *loaded*, and Node 20 has no global
// WebSocket, so this must be set before the dynamic import below (and is set on adapters again).
globalThis.WebSocket = CableWebSocket;

// --- Shims (minimal; the client is otherwise used unchanged) --------------------------------------
// ConnectionMonitor.start()/stop() (src/connection_monitor.js) call the *global*
// addEventListener/removeEventListener("visibilitychange", ...) unconditionally; Node has no such
// globals, so without these no-op shims consumer.connect() throws a ReferenceError.
// Nothing ever fires "visibilitychange" in Node, so visibilityDidChange() (the only user of
// `document.visibilityState`) never runs and no `document` shim is needed. `document` would also be
// used by createWebSocketURL() for non-ws URLs and by getConfig() when createConsumer() gets no URL;
// both are avoided above (we always pass an absolute ws:// URL).
if (typeof globalThis.addEventListener !== "function") globalThis.addEventListener = () => {};
if (typeof globalThis.removeEventListener !== "function") globalThis.removeEventListener = () => {};

const mod = await import("@rails/actioncable");
const ActionCable = mod.createConsumer ? mod : mod.default; // UMD build loaded as CommonJS
ActionCable.adapters.WebSocket = CableWebSocket;
// The logger writes through adapters.logger.log (console.log = stdout by default): route it to
// stderr so stdout stays one JSON object per line.
ActionCable.adapters.logger = { log: (...a) => errlog(...a) };
if (debug) ActionCable.logger.enabled = true;
if (args["stale-threshold"] !== undefined) {
  const s = Number(args["stale-threshold"]);
  if (!(s > 0)) fail("--stale-threshold must be a positive number of seconds");
  ActionCable.ConnectionMonitor.staleThreshold = s; // default 6 (s); only for reconnect tests
}

// --- Output and exit --------------------------------------------------------------------------------
let finished = false;
let received = 0;

function emit(obj) {
  if (finished) return;
  // On Linux, writes to pipes and files are synchronous in Node, so each line is flushed here.
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function finish(code, extra = {}) {
  if (finished) return;
  emit({ event: "done", received, ...extra });
  finished = true;
  clearTimeout(timer);
  // Close cleanly (no reconnect), then exit once stdout has drained; don't wait long for the close.
  try {
    consumer.disconnect();
  } catch (e) {
    errlog(`cable-client: disconnect failed: ${e.message}`);
  }
  const ws = consumer.connection.webSocket;
  const exit = () => process.stdout.write("", () => process.exit(code));
  if (ws && ws.readyState !== WS.CLOSED) {
    ws.once("close", exit);
    setTimeout(exit, 300).unref();
  } else {
    exit();
  }
}

const timer = setTimeout(() => {
  if (count === null) finish(0, { timedOut: true });
  else finish(3, { timedOut: true });
}, timeoutMs);

// --- The official client -----------------------------------------------------------------------------
const consumer = ActionCable.createConsumer(args.url);
let performed = false;

const subscription = consumer.subscriptions.create(
  { channel: args.channel, ...params },
  {
    connected(info) {
      emit({ event: "connected", reconnected: !!(info && info.reconnected) });
      if (args.perform && !performed) {
        performed = true;
        this.perform(args.perform, { ...performData });
      }
      if (count === 0) finish(0);
    },
    disconnected(info) {
      emit({ event: "disconnected", ...(info || {}) });
      // willAttemptReconnect is false once the ConnectionMonitor is stopped: nothing more can arrive.
      if (info && info.willAttemptReconnect === false) finish(5, { closed: true });
    },
    rejected() {
      emit({ event: "rejected" });
      finish(4);
    },
    received(data) {
      received += 1;
      emit({ event: "received", data: data === undefined ? null : data });
      if (count !== null && received >= count) finish(0);
    },
  },
);
if (debug) errlog(`cable-client: subscribing with identifier ${subscription.identifier}`);
