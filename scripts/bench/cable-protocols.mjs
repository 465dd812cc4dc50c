// Fan-out cost of one cable dialect (driven by `scripts/bench/cable --protocols`).
// usage: FM_WS_MODULE_DIR=DIR node cable-protocols.mjs URL SUBPROTOCOL SUBSCRIBERS BROADCASTS SERVER_PID
// The same measurement as wsbench (the peers' client): SUBSCRIBERS subscribers of
// BenchmarkChannel (source addresses 127.0.0.1-50), one of them sends BROADCASTS `broadcast`
// commands one after the other, each once every subscriber has the previous one; but over
// the subprotocol given (`actioncable-v1-json` or `actioncable-v1-ext-json`: on the extended
// one, every delivered message also carries `stream_id`, `epoch` and `offset`, which this
// client checks are there). Prints one JSON line: round trips, delivered messages per second
// and the server's CPU per delivered message (utime+stime of SERVER_PID).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const WebSocket = createRequire(`${process.env.FM_WS_MODULE_DIR}/`)("ws");
const [url, protocol, nArg, rArg, pid] = process.argv.slice(2);
const N = Number(nArg), R = Number(rArg);
const EXT = protocol.includes("-ext-");
const id = JSON.stringify({ channel: "BenchmarkChannel" });
const cpu = () => { const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(")")[1].trim().split(" "); return (Number(f[11]) + Number(f[12])) / 100; };

const got = new Map();
let waiter = null, unstamped = 0;
function open(i) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, [protocol], { perMessageDeflate: false, localAddress: `127.0.0.${1 + (i % 50)}` });
    ws.on("error", reject);
    ws.on("message", (raw) => {
      const s = raw.toString();
      if (s.includes('"ping"')) return;
      const m = JSON.parse(s);
      if (m.type === "welcome") ws.send(JSON.stringify({ command: "subscribe", identifier: id }));
      else if (m.type === "confirm_subscription") resolve(ws);
      else if (m.message && m.message.action === "broadcast" && m.message.payload) {
        if (EXT && (m.offset === undefined || m.epoch === undefined || m.stream_id === undefined)) unstamped += 1;
        const k = m.message.payload.k, c = (got.get(k) || 0) + 1;
        got.set(k, c);
        if (c === N && waiter) waiter(k);
      }
    });
  });
}
const conns = [];
for (let i = 0; i < N; i += 200) conns.push(...(await Promise.all(Array.from({ length: Math.min(200, N - i) }, (_, j) => open(i + j)))));
await new Promise((r) => setTimeout(r, 1000));
const lat = [];
const c0 = cpu();
const tb = process.hrtime.bigint();
for (let k = 0; k < R; k++) {
  const ts = process.hrtime.bigint();
  const done = new Promise((r) => { waiter = (kk) => kk === k && r(); });
  conns[0].send(JSON.stringify({ command: "message", identifier: id, data: JSON.stringify({ action: "broadcast", payload: { k } }) }));
  await done;
  lat.push(Number(process.hrtime.bigint() - ts) / 1e6);
}
const el = Number(process.hrtime.bigint() - tb) / 1e9;
const cpuPer = ((cpu() - c0) / (N * R)) * 1e6;
lat.sort((a, b) => a - b);
const q = (p) => +lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(1);
console.log(JSON.stringify({ protocol, subscribers: N, broadcasts: R, rtt_ms: { p50: q(0.5), p99: q(0.99) }, delivered_per_s: Math.round((N * R) / el), server_cpu_us_per_msg: +cpuPer.toFixed(2), unstamped }));
for (const c of conns) c.terminate();
process.exit(0);
