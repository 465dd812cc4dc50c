#!/usr/bin/env node
// Broadcast latency seen by many /cable subscribers, for the Python tests to drive.
//
// usage: node tests/js/broadcast-latency.mjs --url ws://127.0.0.1:PORT/cable --subscribers 1000
//
// Opens SUBSCRIBERS subscribers of BenchmarkChannel (the node must run with benchmark_channel)
// and one sender, then prints {"event":"ready","connect_s":S}. Commands arrive as JSON lines on
// stdin:
//   {"start": {"interval_ms": 50}}  the sender broadcasts {t, k} every interval_ms, where t is
//                                   this process's clock; each subscriber records now - t
//   {"stop": true}                  stop sending, wait for the last deliveries, print
//                                   {"event":"measured","broadcasts":N,"deliveries":D,"missing":M,
//                                    "p50_ms":..,"p90_ms":..,"p99_ms":..,"max_ms":..,
//                                    "slowest_broadcast_ms":[per broadcast, in order]}
//   {"quit": true}                  close every socket and exit 0
// Sender and subscribers share one clock (this process), so no clock skew enters the figures.
// Diagnostics go to stderr; stdout carries only the JSON event lines.

import { parseArgs } from "node:util";
import { createInterface } from "node:readline";
import WebSocket from "ws";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    subscribers: { type: "string", default: "1000" },
  },
});
const N = Number(args.subscribers);
const ID = JSON.stringify({ channel: "BenchmarkChannel" });
const DRAIN_MS = 2000; // after stop: deliveries still in flight may arrive this late

const emit = (event) => process.stdout.write(JSON.stringify(event) + "\n");
let latencies = [];
let worst = []; // per broadcast: its slowest delivery
let sent = 0;

function open(isSender) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(args.url, ["actioncable-v1-json"], { perMessageDeflate: false });
    ws.on("error", reject);
    ws.on("message", (raw) => {
      const text = raw.toString();
      if (text.includes('"type":"ping"')) return;
      const message = JSON.parse(text);
      if (message.type === "welcome") ws.send(JSON.stringify({ command: "subscribe", identifier: ID }));
      else if (message.type === "confirm_subscription") resolve(ws);
      else if (message.type === "reject_subscription" || message.type === "disconnect") reject(new Error(text));
      else if (!isSender && message.message && message.message.action === "broadcast") {
        const now = performance.now();
        latencies.push(now - message.message.payload.t);
        const k = message.message.payload.k;
        worst[k] = Math.max(worst[k] || 0, now - message.message.payload.t);
      }
    });
  });
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

const started = performance.now();
const subscribers = [];
for (let i = 0; i < N; i += 100) {
  const batch = Array.from({ length: Math.min(100, N - i) }, () => open(false));
  subscribers.push(...(await Promise.all(batch)));
}
const sender = await open(true);
emit({ event: "ready", connect_s: +((performance.now() - started) / 1000).toFixed(2) });

let timer = null;
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  if (command.start) {
    latencies = [];
    worst = [];
    sent = 0;
    const send = () => {
      const data = JSON.stringify({ action: "broadcast", payload: { t: performance.now(), k: sent } });
      sender.send(JSON.stringify({ command: "message", identifier: ID, data }));
      sent += 1;
    };
    send();
    timer = setInterval(send, command.start.interval_ms);
  } else if (command.stop) {
    clearInterval(timer);
    const expected = sent * N;
    const deadline = performance.now() + DRAIN_MS;
    while (latencies.length < expected && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
    }
    const sorted = latencies.slice().sort((a, b) => a - b);
    const ms = (v) => (v === null ? null : +v.toFixed(2));
    emit({
      event: "measured",
      broadcasts: sent,
      deliveries: sorted.length,
      missing: expected - sorted.length,
      p50_ms: ms(percentile(sorted, 0.5)),
      p90_ms: ms(percentile(sorted, 0.9)),
      p99_ms: ms(percentile(sorted, 0.99)),
      max_ms: ms(sorted.length ? sorted[sorted.length - 1] : null),
      slowest_broadcast_ms: worst.map((v) => Math.round(v)),
    });
  } else if (command.quit) {
    break;
  }
}
for (const ws of subscribers) ws.terminate();
sender.terminate();
process.exit(0);
