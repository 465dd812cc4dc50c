// Readers' latency beside clients that never read (driven by `scripts/bench/slow-consumers`).
// usage: FM_WS_MODULE_DIR=DIR node slow-consumers.mjs URL READERS STALLED BROADCASTS SERVER_PID
// READERS subscribers of BenchmarkChannel (source addresses 127.0.0.1-50); STALLED more, which
// also subscribe to BenchmarkHistoryChannel and then stop reading their sockets (paused: the
// kernel buffers fill, then the server's). A filler connection broadcasts 48 KiB on
// BenchmarkHistoryChannel every 25 ms all along (in a run without stalled clients too, so both
// runs carry the same load), which is what clogs the stalled ones fast. One reader sends
// BROADCASTS small `broadcast`s on BenchmarkChannel, each once every reader has the previous
// one. The stalled sockets stay paused 15 s more, then are resumed and watched for 12 s: the
// server should have cut them off. Prints one JSON line: the readers' round trips, how many stalled clients were cut
// off (closed by the server) and with which disconnect reasons, and the server's RSS (VmRSS of
// SERVER_PID) at the start, at most, and at the end.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const WebSocket = createRequire(`${process.env.FM_WS_MODULE_DIR}/`)("ws");
const [url, nArg, sArg, rArg, pid] = process.argv.slice(2);
const N = Number(nArg), S = Number(sArg), R = Number(rArg);
const FAST = JSON.stringify({ channel: "BenchmarkChannel" });
const HEAVY = JSON.stringify({ channel: "BenchmarkHistoryChannel" });
const HOLD_MS = 15000;
const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]);

const got = new Map();
let waiter = null;
function open(i, identifiers, count) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, ["actioncable-v1-json"], { perMessageDeflate: false, localAddress: `127.0.0.${1 + (i % 50)}` });
    ws.reasons = [];
    let confirmed = 0;
    ws.on("error", (e) => (confirmed < identifiers.length ? reject(e) : null));
    ws.on("message", (raw) => {
      const s = raw.toString();
      if (s.includes('"ping"')) return;
      const m = JSON.parse(s);
      if (m.type === "welcome") for (const id of identifiers) ws.send(JSON.stringify({ command: "subscribe", identifier: id }));
      else if (m.type === "confirm_subscription") { confirmed += 1; if (confirmed === identifiers.length) resolve(ws); }
      else if (m.type === "disconnect") ws.reasons.push(m.reason);
      else if (count && m.identifier === FAST && m.message && m.message.payload) {
        const k = m.message.payload.k, c = (got.get(k) || 0) + 1;
        got.set(k, c);
        if (c === N && waiter) waiter(k);
      }
    });
  });
}
async function openMany(count, from, identifiers, counting) {
  const out = [];
  for (let i = 0; i < count; i += 200) out.push(...(await Promise.all(Array.from({ length: Math.min(200, count - i) }, (_, j) => open(from + i + j, identifiers, counting)))));
  return out;
}
const rss = { start: rssKiB(), max: 0 };
const sampler = setInterval(() => { rss.max = Math.max(rss.max, rssKiB()); }, 100);
const readers = await openMany(N, 0, [FAST], true);
const stalled = await openMany(S, N, [FAST, HEAVY], false);
for (const ws of stalled) ws._socket.pause();
const filler = await open(N + S, [HEAVY], false);
const big = "x".repeat(48 * 1024); // under FM_CABLE_MAX_FRAME_BYTES (64 KiB) with the command around it
const fill = setInterval(() => filler.send(JSON.stringify({ command: "message", identifier: HEAVY, data: JSON.stringify({ action: "broadcast", payload: { big } }) })), 25); // 40/s: under FM_CABLE_COMMANDS_PER_SECOND (50)
await new Promise((r) => setTimeout(r, 1000));
const lat = [];
for (let k = 0; k < R; k++) {
  const ts = process.hrtime.bigint();
  const done = new Promise((r) => { waiter = (kk) => kk === k && r(); });
  readers[0].send(JSON.stringify({ command: "message", identifier: FAST, data: JSON.stringify({ action: "broadcast", payload: { k } }) }));
  await done;
  lat.push(Number(process.hrtime.bigint() - ts) / 1e6);
  await new Promise((r) => setTimeout(r, 20));
}
// The stalled ones go on not reading while the filler runs (the server cuts a connection off
// after FM_CABLE_SLOW_CONSUMER_GRACE_S, 5 s, over its bound), then read again: what the server
// did to them arrives, or it has dropped them already.
await new Promise((r) => setTimeout(r, HOLD_MS));
const closed = await Promise.all(stalled.map((ws) => new Promise((resolve) => {
  if (ws.readyState === WebSocket.CLOSED) return resolve(true);
  const timer = setTimeout(() => resolve(false), 12000);
  ws.on("close", () => { clearTimeout(timer); resolve(true); });
  ws._socket.resume();
})));
clearInterval(fill);
await new Promise((r) => setTimeout(r, 500));
clearInterval(sampler);
const reasons = {};
for (const ws of stalled) for (const reason of ws.reasons) reasons[reason] = (reasons[reason] || 0) + 1;
lat.sort((a, b) => a - b);
const q = (p) => +lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(1);
const stillOpen = readers.filter((ws) => ws.readyState === WebSocket.OPEN).length;
console.log(JSON.stringify({ readers: N, stalled: S, broadcasts: R, rtt_ms: { p50: q(0.5), p99: q(0.99), max: q(1) }, readers_open: stillOpen, stalled_cut_off: closed.filter(Boolean).length, disconnect_reasons: reasons, server_rss_kib: { start: rss.start, max: rss.max, end: rssKiB() } }));
for (const ws of [...readers, ...stalled, filler]) ws.terminate();
process.exit(0);
