#!/usr/bin/env node
// CLI driver around the *official* graphql-ws client (createClient, used unchanged), for the
// Python tests to spawn. It prints ONE JSON object per line on stdout:
//
//   {"event":"connected"}                      (connection_ack received)
//   {"event":"next","data":<execution result>}
//   {"event":"error","errors":<GraphQL errors or a message>}
//   {"event":"complete"}
//   {"event":"closed","code":N,"reason":"..."} (the socket closed)
//   {"event":"done","received":N}              (plus "timedOut":true on timeout)
//
// Exit codes: 0 = --count results received (or the operation completed), 3 = timeout,
//             4 = the operation ended with an error, 5 = the socket closed first, 2 = bad args.
//
// usage:
//   node tests/js/graphql-ws-client.mjs --url ws://127.0.0.1:PORT/graphql \
//     --query 'subscription { stockUpdated(productId: "1") { productId stock } }' \
//     [--variables '{"id":"1"}'] [--token T] [--count N] [--timeout-ms 10000] [--debug]
//
// --token goes in connection_init's payload ({"token": T}), as browsers cannot set headers.

import { parseArgs } from "node:util";
import WS from "ws";
import { createClient } from "graphql-ws";

const USAGE =
  "usage: graphql-ws-client.mjs --url ws://HOST:PORT/graphql --query DOC [--variables JSON] " +
  "[--token T] [--count N] [--timeout-ms MS] [--debug]";

function fail(msg) {
  process.stderr.write(`graphql-ws-client: ${msg}\n${USAGE}\n`);
  process.exit(2);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      url: { type: "string" },
      query: { type: "string" },
      variables: { type: "string", default: "{}" },
      token: { type: "string" },
      count: { type: "string" },
      "timeout-ms": { type: "string", default: "10000" },
      debug: { type: "boolean", default: false },
    },
    strict: true,
  }));
} catch (e) {
  fail(e.message);
}
if (!args.url || !/^wss?:\/\//i.test(args.url)) fail("--url must start with ws:// or wss://");
if (!args.query) fail("--query is required");
let variables;
try {
  variables = JSON.parse(args.variables);
} catch (e) {
  fail(`--variables is not JSON: ${e.message}`);
}
const count = args.count === undefined ? null : Number(args.count);
if (count !== null && !(Number.isInteger(count) && count > 0)) fail("--count must be a positive integer");
const timeoutMs = Number(args["timeout-ms"]);
if (!(timeoutMs > 0)) fail("--timeout-ms must be a positive number");

const errlog = (...a) => process.stderr.write(a.map(String).join(" ") + "\n");
let finished = false;
let received = 0;

function emit(obj) {
  if (!finished) process.stdout.write(JSON.stringify(obj) + "\n");
}

const client = createClient({
  url: args.url,
  webSocketImpl: WS,
  lazy: false,
  retryAttempts: 0,
  connectionParams: args.token ? { token: args.token } : undefined,
  on: {
    connected: () => emit({ event: "connected" }),
    closed: (event) => {
      emit({ event: "closed", code: event.code, reason: String(event.reason || "") });
      finish(5);
    },
    message: (message) => {
      if (args.debug) errlog(`graphql-ws-client: <- ${JSON.stringify(message)}`);
    },
  },
});

function finish(code, extra = {}) {
  if (finished) return;
  emit({ event: "done", received, ...extra });
  finished = true;
  clearTimeout(timer);
  unsubscribe();
  client.dispose();
  setTimeout(() => process.stdout.write("", () => process.exit(code)), 50).unref();
}

const timer = setTimeout(() => finish(3, { timedOut: true }), timeoutMs);

const unsubscribe = client.subscribe(
  { query: args.query, variables },
  {
    next: (data) => {
      received += 1;
      emit({ event: "next", data });
      if (count !== null && received >= count) finish(0);
    },
    error: (errors) => {
      emit({ event: "error", errors: Array.isArray(errors) ? errors : String(errors && errors.message || errors) });
      finish(4);
    },
    complete: () => {
      emit({ event: "complete" });
      finish(0);
    },
  },
);
