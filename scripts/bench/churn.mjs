// Connection churn (driven by `scripts/bench/churn`).
// usage: FM_WS_MODULE_DIR=DIR node churn.mjs URL CYCLES CONCURRENCY SERVER_PID
// CYCLES times: open /cable (source addresses 127.0.0.1-50), subscribe to BenchmarkChannel,
// wait for the confirmation, close; CONCURRENCY at a time. The server's RSS (VmRSS) and open
// file descriptors of SERVER_PID are read before, after every 10,000 cycles and 2 s after the
// last one. Prints progress lines on stderr and one JSON line on stdout.
import { readFileSync, readdirSync } from "node:fs";
import { createRequire } from "node:module";

const WebSocket = createRequire(`${process.env.FM_WS_MODULE_DIR}/`)("ws");
const [url, cArg, kArg, pid] = process.argv.slice(2);
const CYCLES = Number(cArg), K = Number(kArg);
const ID = JSON.stringify({ channel: "BenchmarkChannel" });
const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
const fds = () => readdirSync(`/proc/${pid}/fd`).length;

function cycle(i) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, ["actioncable-v1-json"], { perMessageDeflate: false, localAddress: `127.0.0.${1 + (i % 50)}` });
    let ok = false;
    ws.on("message", (raw) => {
      const m = JSON.parse(raw.toString());
      if (m.type === "welcome") ws.send(JSON.stringify({ command: "subscribe", identifier: ID }));
      else if (m.type === "confirm_subscription") { ok = true; ws.close(); }
    });
    ws.on("error", () => {});
    ws.on("close", () => resolve(ok));
  });
}
const marks = [{ cycles: 0, rss_kib: rssKiB(), fds: fds() }];
let next = 0, done = 0, failed = 0;
const t0 = Date.now();
async function worker() {
  while (next < CYCLES) {
    const i = next++;
    if (!(await cycle(i))) failed += 1;
    done += 1;
    if (done % 10000 === 0) {
      marks.push({ cycles: done, rss_kib: rssKiB(), fds: fds() });
      process.stderr.write(`churn: ${done} cycles, ${((Date.now() - t0) / 1000).toFixed(1)} s, RSS ${(rssKiB() / 1024).toFixed(1)} MiB\n`);
    }
  }
}
await Promise.all(Array.from({ length: K }, worker));
const seconds = (Date.now() - t0) / 1000;
await new Promise((r) => setTimeout(r, 2000));
marks.push({ cycles: done, settled: true, rss_kib: rssKiB(), fds: fds() });
console.log(JSON.stringify({ cycles: done, failed, seconds: +seconds.toFixed(1), marks }));
process.exit(0);
