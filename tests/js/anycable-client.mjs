#!/usr/bin/env node
// CLI driver around AnyCable's *published* client, @anycable/core (used unchanged), speaking
// the extended protocol, for the Python tests to spawn. It prints ONE JSON object per line on
// stdout for every event:
//
//   {"event":"frame","data":<server message>}              (every frame received, with --frames)
//   {"event":"cable","type":"connect","reconnect":false,"restored":false}
//   {"event":"cable","type":"disconnect","reason":"..."}
//   {"event":"connect","channel":I,"reconnect":false,"restored":false}   (subscription I)
//   {"event":"disconnect","channel":I,"reason":"..."}
//   {"event":"info","channel":I,"type":"history_received"}   (or "history_not_found", "restored")
//   {"event":"message","channel":I,"data":<message>,"meta":{"stream","epoch","offset"}}
//   {"event":"done"}
//
// It runs until --timeout-ms passes or stdin closes (exit code 0), then disconnects.
// Exit code 2: bad arguments.
//
// usage:
//   node tests/js/anycable-client.mjs --url ws://127.0.0.1:PORT/cable?token=T \
//     --subscribe '{"channel":"CartChannel"}' [--subscribe '{"channel":"InventoryChannel","product_id":1}']... \
//     [--protocol actioncable-v1-ext-json] [--reconnect-ms 200] [--pongs] [--frames] [--timeout-ms 60000]
//
// --reconnect-ms: the first reconnect waits about this long (the client's backoff with jitter,
// capped at 4 times it), instead of the default pingInterval-based 3-9 s.

import { parseArgs } from "node:util";
import WS from "ws";
import { createCable, backoffWithJitter } from "@anycable/core";

const USAGE =
  "usage: anycable-client.mjs --url ws://HOST:PORT/cable --subscribe JSON [--subscribe JSON]... " +
  "[--protocol P] [--reconnect-ms MS] [--pongs] [--frames] [--timeout-ms MS]";

function fail(msg) {
  process.stderr.write(`anycable-client: ${msg}\n${USAGE}\n`);
  process.exit(2);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      url: { type: "string" },
      subscribe: { type: "string", multiple: true, default: [] },
      protocol: { type: "string", default: "actioncable-v1-ext-json" },
      "reconnect-ms": { type: "string", default: "200" },
      pongs: { type: "boolean", default: false },
      frames: { type: "boolean", default: false },
      "timeout-ms": { type: "string", default: "60000" },
    },
    strict: true,
  }));
} catch (e) {
  fail(e.message);
}
if (!args.url || !/^wss?:\/\//i.test(args.url)) fail("--url ws://... is required");
if (args.subscribe.length === 0) fail("at least one --subscribe is required");
const subscriptions = args.subscribe.map((text) => {
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    fail(`--subscribe is not JSON: ${e.message}`);
  }
  if (!value || typeof value.channel !== "string") fail("--subscribe needs a channel");
  return value;
});
const reconnectMs = Number(args["reconnect-ms"]);
const timeoutMs = Number(args["timeout-ms"]);
if (!(reconnectMs > 0) || !(timeoutMs > 0)) fail("--reconnect-ms and --timeout-ms must be > 0");

let finished = false;
function emit(obj) {
  if (!finished) process.stdout.write(JSON.stringify(obj) + "\n");
}
const reasonOf = (err) => (err ? err.reason || err.message || String(err) : null);

// The client opens `new websocketImplementation(url, protocols)`; this subclass of ws's
// WebSocket only reports what arrives (it changes nothing).
class ReportingWebSocket extends WS {
  constructor(url, protocols, options) {
    super(url, protocols, options);
    this.on("error", (e) => process.stderr.write(`anycable-client: websocket error: ${e.message}\n`));
    if (args.frames) {
      this.on("message", (data, isBinary) => {
        if (!isBinary) emit({ event: "frame", data: JSON.parse(data.toString()) });
      });
    }
  }
}

const cable = createCable(args.url, {
  protocol: args.protocol,
  websocketImplementation: ReportingWebSocket,
  protocolOptions: { pongs: args.pongs },
  reconnectStrategy: backoffWithJitter(reconnectMs, { maxInterval: reconnectMs * 4 }),
  logLevel: "error",
  logger: {
    log: () => {},
    debug: () => {},
    info: () => {},
    warn: (...a) => process.stderr.write(`anycable-client: ${a.map(String).join(" ")}\n`),
    error: (...a) => process.stderr.write(`anycable-client: ${a.map(String).join(" ")}\n`),
  },
});

cable.on("connect", (ev) => emit({ event: "cable", type: "connect", reconnect: ev.reconnect, restored: ev.restored }));
cable.on("disconnect", (err) => emit({ event: "cable", type: "disconnect", reason: reasonOf(err) }));

subscriptions.forEach(({ channel: name, ...params }, index) => {
  const channel = cable.subscribeTo(name, params);
  channel.on("connect", (ev) =>
    emit({ event: "connect", channel: index, reconnect: ev.reconnect, restored: ev.restored }),
  );
  channel.on("disconnect", (err) => emit({ event: "disconnect", channel: index, reason: reasonOf(err) }));
  channel.on("info", (ev) => emit({ event: "info", channel: index, type: ev.type }));
  channel.on("message", (data, meta) => emit({ event: "message", channel: index, data, meta: meta || null }));
});

function finish() {
  if (finished) return;
  emit({ event: "done" });
  finished = true;
  try {
    cable.disconnect();
  } catch (e) {
    process.stderr.write(`anycable-client: disconnect failed: ${e.message}\n`);
  }
  process.stdout.write("", () => process.exit(0));
}
setTimeout(finish, timeoutMs);
process.stdin.on("end", finish);
process.stdin.resume();
