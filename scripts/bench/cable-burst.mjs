// Burst fan-out for an Action Cable server speaking BenchmarkChannel (driven by scripts/bench/cable).
// usage: FM_WS_MODULE_DIR=DIR node cable-burst.mjs URL SUBSCRIBERS BURST ROUNDS SERVER_PID
// Opens SUBSCRIBERS subscribers (source addresses 127.0.0.1-50, like wsbench) and one sender.
// Each round the sender writes BURST `broadcast` commands back to back, all masked frames
// concatenated into one buffer and handed to the socket in one write (one TCP send), then waits
// until every subscriber has all BURST messages (after one uncounted warm-up burst). Server CPU (utime+stime of SERVER_PID) is read
// right before the write and right after the last delivery; the result is one JSON line.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { randomBytes } from "node:crypto";

const WebSocket = createRequire(`${process.env.FM_WS_MODULE_DIR}/`)("ws");
const [url, nArg, bArg, rArg, pid] = process.argv.slice(2);
const N = Number(nArg), BURST = Number(bArg), ROUNDS = Number(rArg);
const ROUND_TIMEOUT_MS = 120_000;
const id = JSON.stringify({ channel: "BenchmarkChannel" });
const ticks = () => { const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(")")[1].trim().split(" "); return Number(f[11]) + Number(f[12]); };
const clk = 100; // USER_HZ on Linux

let got = 0, results = 0, expected = 0, waiter = null, closed = 0;
function open(i, sender) {
  return new Promise((resolve, reject) => {
    const opts = { perMessageDeflate: false };
    if (!sender) opts.localAddress = `127.0.0.${1 + (i % 50)}`;
    const ws = new WebSocket(url, ["actioncable-v1-json", "actioncable-unsupported"], opts);
    ws.on("error", reject);
    ws.on("close", () => { closed += 1; });
    ws.on("message", (raw) => {
      const s = raw.toString();
      if (s.includes('"ping"')) return;
      const m = JSON.parse(s);
      if (m.type === "welcome") ws.send(JSON.stringify({ command: "subscribe", identifier: id }));
      else if (m.type === "confirm_subscription") resolve(ws);
      else if (m.type === "disconnect" || m.type === "reject_subscription") reject(new Error(s));
      else if (m.message && m.message.action === "broadcastResult") results += 1;
      else if (!sender && m.message && m.message.action === "broadcast" && m.message.payload) {
        got += 1;
        if (got === expected && waiter) waiter();
      }
    });
  });
}

// One masked client TEXT frame (RFC 6455 5.2), as every client frame must be.
function frame(text) {
  const payload = Buffer.from(text);
  const len = payload.length;
  const head = len < 126 ? Buffer.from([0x81, 0x80 | len]) : Buffer.from([0x81, 0x80 | 126, len >> 8, len & 0xff]);
  const mask = randomBytes(4);
  for (let i = 0; i < len; i++) payload[i] ^= mask[i & 3];
  return Buffer.concat([head, mask, payload]);
}

const t0 = Date.now();
const conns = [];
for (let i = 0; i < N; i += 200) conns.push(...(await Promise.all(Array.from({ length: Math.min(200, N - i) }, (_, j) => open(i + j, false)))));
const sender = await open(N, true);
const connectS = (Date.now() - t0) / 1000;
await new Promise((r) => setTimeout(r, 1000));

const rounds = [];
let totalTicks = 0, burstBytes = 0;
let warmup = null;
for (let r = -1; r < ROUNDS; r++) { // round -1 warms the path up and is not counted
  const buf = Buffer.concat(Array.from({ length: BURST }, (_, i) => frame(JSON.stringify({ command: "message", identifier: id, data: JSON.stringify({ action: "broadcast", payload: { r, i } }) }))));
  burstBytes = buf.length;
  got = 0; expected = N * BURST;
  const done = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`round ${r}: ${got} of ${expected} delivered after ${ROUND_TIMEOUT_MS} ms`)), ROUND_TIMEOUT_MS);
    waiter = () => { clearTimeout(timer); resolve(); };
  });
  const c0 = ticks();
  const ts = process.hrtime.bigint();
  sender._socket.write(buf); // all BURST frames in one write
  await done;
  const ms = Number(process.hrtime.bigint() - ts) / 1e6;
  const used = ticks() - c0;
  const entry = { ms: +ms.toFixed(1), cpu_us_per_msg: +(((used / clk) * 1e6) / expected).toFixed(2) };
  if (r < 0) warmup = entry;
  else { totalTicks += used; rounds.push(entry); }
  await new Promise((res) => setTimeout(res, 1100)); // let the command rate bucket refill
}
const delivered = N * BURST * ROUNDS;
const out = {
  url, subscribers: N, burst: BURST, rounds: ROUNDS, connect_s: connectS, burst_write_bytes: burstBytes,
  burst_ms: { min: Math.min(...rounds.map((x) => x.ms)), max: Math.max(...rounds.map((x) => x.ms)) },
  delivered, server_cpu_us_per_msg: +(((totalTicks / clk) * 1e6) / delivered).toFixed(2),
  per_round: rounds, warmup, broadcast_results: results, closed_during_run: closed,
};
console.log(JSON.stringify(out));
for (const c of conns) c.terminate();
sender.terminate();
process.exit(0);
