// build.test.mjs — tests static/build.mjs with node's built-in runner (node --test static/test/).
// Each test builds a copy of the asset sources (static/src, sw, icons, build.mjs, the
// lockfile, node_modules linked) in a temp dir, with its own templates, into --out dirs
// there, so the real sources and static/dist are never touched.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { appendFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { brotliDecompressSync, gunzipSync } from "node:zlib";

const STATIC = fileURLToPath(new URL("..", import.meta.url));
let work, copy;

function build(out, ...args) {
  return execFileSync(process.execPath, [join(copy, "build.mjs"), "--out", out, ...args], { encoding: "utf8" });
}
const readManifest = (out) => JSON.parse(readFileSync(join(out, "manifest.json"), "utf8"));
const hash8 = (data) => createHash("sha256").update(data).digest("hex").slice(0, 8);

before(() => {
  if (!existsSync(join(STATIC, "node_modules"))) throw new Error("static/node_modules missing: run scripts/build-assets (npm ci) first");
  work = mkdtempSync(join(tmpdir(), "fm-assets-test-"));
  copy = join(work, "static");
  mkdirSync(copy);
  for (const name of ["src", "sw", "icons", "build.mjs", "package.json", "package-lock.json"]) {
    cpSync(join(STATIC, name), join(copy, name), { recursive: true });
  }
  symlinkSync(join(STATIC, "node_modules"), join(copy, "node_modules"), "dir");
  mkdirSync(join(work, "handlers", "templates"), { recursive: true });
  writeFileSync(join(work, "handlers", "templates", "layout.html"), "<!doctype html><title>layout</title>\n");
  // offline.html left missing on purpose: it counts as empty.
});

after(() => rmSync(work, { recursive: true, force: true }));

describe("build.mjs", () => {
  let out, manifest, log;

  before(() => {
    out = join(work, "out");
    log = build(out);
    manifest = readManifest(out);
  });

  it("maps every logical name to an existing file named by its content hash", () => {
    assert.deepEqual(Object.keys(manifest.files).sort(), ["app.css", "app.js", "icon-192.png", "icon-512.png"]);
    for (const [logical, file] of Object.entries(manifest.files)) {
      const [stem, ext] = [logical.slice(0, logical.lastIndexOf(".")), logical.slice(logical.lastIndexOf("."))];
      const data = readFileSync(join(out, file));
      assert.equal(file, `${stem}.${hash8(data)}${ext}`);
    }
    assert.match(manifest.sw_version, /^[0-9a-f]{8}$/);
    assert.match(manifest.source_hash, /^[0-9a-f]{64}$/);
  });

  it("writes .br and .gz beside every text file, with the same bytes inside", () => {
    const text = [manifest.files["app.js"], manifest.files["app.css"], "sw.js", "manifest.webmanifest"];
    for (const file of text) {
      const raw = readFileSync(join(out, file));
      assert.deepEqual(brotliDecompressSync(readFileSync(join(out, `${file}.br`))), raw, `${file}.br`);
      assert.deepEqual(gunzipSync(readFileSync(join(out, `${file}.gz`))), raw, `${file}.gz`);
    }
    assert.ok(!existsSync(join(out, `${manifest.files["icon-192.png"]}.br`)), "PNGs are not compressed");
  });

  it("writes a web manifest with fingerprinted icons", () => {
    const web = JSON.parse(readFileSync(join(out, "manifest.webmanifest"), "utf8"));
    assert.equal(web.name, "Final Market");
    assert.equal(web.start_url, "/");
    assert.equal(web.scope, "/");
    assert.equal(web.display, "standalone");
    const srcs = new Set(web.icons.map((i) => i.src));
    assert.deepEqual([...srcs].sort(), [`/static/${manifest.files["icon-192.png"]}`, `/static/${manifest.files["icon-512.png"]}`]);
    assert.ok(web.icons.some((i) => i.purpose === "maskable"));
  });

  it("puts every fingerprinted file and /offline in the service worker's precache list", () => {
    const sw = readFileSync(join(out, "sw.js"), "utf8");
    assert.ok(!sw.includes("self.__WB_MANIFEST"), "manifest injected");
    assert.ok(!/importScripts|\bimport\s*[({"']/.test(sw), "one self-contained classic script");
    assert.ok(sw.includes(manifest.sw_version), "cache names carry sw_version");
    const list = JSON.parse(sw.match(/\[\{"revision".*?\}\]/)[0]);
    const urls = list.map((e) => e.url);
    for (const file of Object.values(manifest.files)) assert.ok(urls.includes(`/static/${file}`), file);
    assert.ok(urls.includes("/manifest.webmanifest"));
    const offline = list.find((e) => e.url === "/offline");
    assert.equal(offline.revision, manifest.offline_revision);
    execFileSync(process.execPath, ["--check", join(out, "sw.js")]);
  });

  it("says up to date when nothing changed, and rebuilds with --force", () => {
    assert.match(build(out), /assets up to date/);
    assert.match(build(out, "--force"), /manifest\.json/);
    assert.deepEqual(readManifest(out), manifest, "same inputs, same output");
  });

  it("changes the hashes when a source changes, and removes the old files", () => {
    const other = join(work, "out-changed");
    cpSync(out, other, { recursive: true });
    appendFileSync(join(copy, "src", "app.css"), "\n.test-change { color: #000; }\n");
    try {
      const log2 = build(other);
      assert.doesNotMatch(log2, /up to date/);
      const changed = readManifest(other);
      assert.notEqual(changed.source_hash, manifest.source_hash);
      assert.notEqual(changed.files["app.css"], manifest.files["app.css"]);
      assert.equal(changed.files["app.js"], manifest.files["app.js"]);
      assert.notEqual(changed.sw_version, manifest.sw_version);
      assert.notEqual(changed.offline_revision, manifest.offline_revision, "the /offline page links the new CSS");
      assert.ok(!existsSync(join(other, manifest.files["app.css"])), "old CSS removed");
      assert.ok(!existsSync(join(other, `${manifest.files["app.css"]}.br`)), "old CSS .br removed");
    } finally {
      writeFileSync(join(copy, "src", "app.css"), readFileSync(join(STATIC, "src", "app.css")));
    }
  });

  it("changes the /offline revision when a template changes", () => {
    const other = join(work, "out-template");
    build(other);
    const before = readManifest(other);
    writeFileSync(join(work, "handlers", "templates", "offline.html"), "{% extends 'layout.html' %} offline\n");
    try {
      build(other);
      const changed = readManifest(other);
      assert.notEqual(changed.source_hash, before.source_hash);
      assert.notEqual(changed.offline_revision, before.offline_revision);
      assert.deepEqual(changed.files, before.files);
    } finally {
      rmSync(join(work, "handlers", "templates", "offline.html"));
    }
  });

  it("prints the sizes of every file", () => {
    assert.match(log, /sizes \(bytes\)/);
    assert.match(log, new RegExp(`${manifest.files["app.js"].replace(/\./g, "\\.")}\\s+\\d+\\s+\\d+\\s+\\d+`));
  });
});
