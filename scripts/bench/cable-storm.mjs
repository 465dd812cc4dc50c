// Reconnect storm with AnyCable's published client (driven by scripts/bench/cable-storm).
// usage: node cable-storm.mjs NODE_A NODE_B CLIENTS MISSED   (NODE_* as HOST:PORT)
//
// Opens CLIENTS @anycable/core clients (protocol actioncable-v1-ext-json, ws, source addresses
// 127.0.0.1-50) through a TCP proxy of its own to node A, each subscribed to
// BenchmarkHistoryChannel, and one plain sender connected to node B. Then, driven by lines on
// stdin from the Python side:
//   -> {"event":"ready"}              all subscribed, and all hold broadcast k=0 (their position)
//   <- "hold"                          the proxy holds new connections (accepts, does not forward)
//   -> {"event":"holding"}
//   (the Python side SIGTERMs node A: it drains, every client is told to reconnect)
//   -> {"event":"disconnected"}       every client saw its disconnect
//   the sender broadcasts k=1..MISSED through node B (nobody but the sender hears them)
//   -> {"event":"published"}          and the proxy waits until every client's reconnect is held
//   <- "release"                       every held connection is forwarded to node B at once
//   -> {"event":"done", ...}           when every client holds k=1..MISSED (or after 60 s)
// The result: time from the release until every client had all missed messages, per-client
// p50/p99, messages lost and duplicated, sessions restored.
import net from "node:net";
import readline from "node:readline";
import { createRequire } from "node:module";
import { fileURLToPath, pathToFileURL } from "node:url";
import path from "node:path";

// The published clients the tests use (tests/js's lockfile; the Python side runs `npm ci`).
const here = path.dirname(fileURLToPath(import.meta.url));
const modules = path.join(here, "..", "..", "tests", "js", "node_modules");
const WS = createRequire(path.join(modules, "..", "package.json"))("ws");
const { createCable, backoffWithJitter } = await import(
  pathToFileURL(path.join(modules, "@anycable", "core", "index.js")).href
);

const [nodeA, nodeB, nArg, mArg] = process.argv.slice(2);
const N = Number(nArg), MISSED = Number(mArg);
const CHANNEL = "BenchmarkHistoryChannel";
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const log = (line) => process.stderr.write(`cable-storm: ${line}\n`);
const hostPort = (s) => { const [h, p] = s.split(":"); return { host: h, port: Number(p) }; };

// --- the proxy ---------------------------------------------------------------------------------
let target = hostPort(nodeA);
let holding = false;
const held = [];
function forward(client) {
  const upstream = net.connect({ ...target, localAddress: client.remoteAddress });
  upstream.on("error", () => client.destroy());
  client.on("error", () => upstream.destroy());
  client.pipe(upstream);
  upstream.pipe(client);
  client.resume();
}
const proxy = net.createServer({ pauseOnConnect: true }, (client) => {
  if (holding) held.push(client);
  else forward(client);
});
await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
const proxyUrl = `ws://127.0.0.1:${proxy.address().port}/cable`;

// --- the clients -------------------------------------------------------------------------------
const clients = [];
function openClient(i) {
  const localAddress = `127.0.0.${1 + (i % 50)}`;
  class SourcedWebSocket extends WS {
    constructor(url, protocols) {
      super(url, protocols, { perMessageDeflate: false, localAddress });
    }
  }
  const state = { got: new Map(), connected: false, disconnects: 0, restored: 0, doneAt: null };
  const cable = createCable(proxyUrl, {
    protocol: "actioncable-v1-ext-json",
    websocketImplementation: SourcedWebSocket,
    reconnectStrategy: backoffWithJitter(100, { maxInterval: 400 }),
    logLevel: "error",
    logger: { log() {}, debug() {}, info() {}, warn() {}, error() {} },
  });
  cable.on("connect", (ev) => { if (ev.restored) state.restored += 1; });
  cable.on("disconnect", () => { state.disconnects += 1; });
  const channel = cable.subscribeTo(CHANNEL);
  channel.on("message", (data) => {
    const k = data && data.action === "broadcast" && data.payload ? data.payload.k : undefined;
    if (k === undefined) return;
    state.got.set(k, (state.got.get(k) || 0) + 1);
    if (state.doneAt === null && k >= 1 && hasAllMissed(state)) state.doneAt = performance.now();
  });
  state.cable = cable;
  state.channel = channel;
  return state;
}
function hasAllMissed(state) {
  for (let k = 1; k <= MISSED; k++) if (!state.got.has(k)) return false;
  return true;
}
const until = async (check, timeoutMs, what) => {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
};

// The sender: a plain Action Cable socket straight to node B.
function openSender() {
  return new Promise((resolve, reject) => {
    const ws = new WS(`ws://${nodeB}/cable`, ["actioncable-v1-json"], { perMessageDeflate: false });
    const id = JSON.stringify({ channel: CHANNEL });
    const results = new Set();
    ws.on("error", reject);
    ws.on("message", (raw) => {
      const m = JSON.parse(raw.toString());
      if (m.type === "welcome") ws.send(JSON.stringify({ command: "subscribe", identifier: id }));
      else if (m.type === "confirm_subscription") resolve({ ws, id, results });
      else if (m.message && m.message.action === "broadcastResult") results.add(m.message.payload.k);
    });
  });
}
async function broadcast(sender, k) {
  const data = JSON.stringify({ action: "broadcast", payload: { k } });
  sender.ws.send(JSON.stringify({ command: "message", identifier: sender.id, data }));
  await until(() => sender.results.has(k), 10_000, `broadcastResult ${k}`);
}

const t0 = performance.now();
for (let i = 0; i < N; i++) clients.push(openClient(i));
await until(() => clients.every((c) => c.channel.state === "connected"), 120_000, "subscriptions");
const connectS = (performance.now() - t0) / 1000;
log(`${N} clients subscribed in ${connectS.toFixed(1)} s`);
const sender = await openSender();
await broadcast(sender, 0);
await until(() => clients.every((c) => c.got.has(0)), 30_000, "k=0 everywhere");
emit({ event: "ready", connect_s: +connectS.toFixed(2) });

const lines = readline.createInterface({ input: process.stdin });
const commands = lines[Symbol.asyncIterator]();
const expect = async (word) => {
  const { value } = await commands.next();
  if (value !== word) throw new Error(`expected ${word}, got ${value}`);
};
await expect("hold");
holding = true;
emit({ event: "holding" });
await until(() => clients.every((c) => c.disconnects >= 1), 60_000, "every disconnect");
emit({ event: "disconnected" });
for (let k = 1; k <= MISSED; k++) await broadcast(sender, k);
await until(() => held.length >= N, 30_000, `${N} held reconnects (held ${held.length})`);
emit({ event: "published", held: held.length });
await expect("release");
target = hostPort(nodeB);
holding = false;
const released = performance.now();
for (const client of held.splice(0)) forward(client);
let timedOut = false;
try {
  await until(() => clients.every((c) => c.doneAt !== null), 60_000, "every client recovered");
} catch (e) {
  timedOut = true;
  log(e.message);
}
const times = clients.filter((c) => c.doneAt !== null).map((c) => (c.doneAt - released) / 1000).sort((a, b) => a - b);
const q = (p) => (times.length ? +times[Math.min(times.length - 1, Math.floor(p * times.length))].toFixed(3) : null);
let lost = 0, duplicated = 0;
for (const c of clients) {
  for (let k = 0; k <= MISSED; k++) {
    const n = c.got.get(k) || 0;
    if (n === 0) lost += 1;
    if (n > 1) duplicated += n - 1;
  }
}
emit({
  event: "done",
  clients: N,
  missed_per_client: MISSED,
  recovered: times.length,
  timed_out: timedOut,
  all_recovered_s: times.length === N ? q(1) : null,
  per_client_s: { p50: q(0.5), p99: q(0.99), max: times.length ? +times.at(-1).toFixed(3) : null },
  lost,
  duplicated,
  restored: clients.filter((c) => c.restored > 0).length,
});
for (const c of clients) c.cable.disconnect();
sender.ws.terminate();
proxy.close();
setTimeout(() => process.exit(0), 200);
