// build.mjs — builds the storefront's client assets into static/dist/ (or --out DIR).
//
//   node static/build.mjs [--out DIR] [--force]
//
// Output (see storefront-spec.md, section 1):
//   app.<hash8>.js, app.<hash8>.css     esbuild bundles, minified (hash8 = sha256 of content)
//   icon-<size>.<hash8>.png            copies of static/icons/*.png
//   manifest.webmanifest               not fingerprinted (served at /manifest.webmanifest)
//   sw.js                              not fingerprinted (served at /sw.js): static/sw/sw.js
//                                      bundled by esbuild into one classic script, then the
//                                      precache list injected by workbox-build injectManifest
//   <text file>.br, <text file>.gz     Brotli q11 / gzip -9 beside every .js .css .webmanifest .svg
//   manifest.json                      {files: {logical: dist name}, sw_version, source_hash,
//                                      offline_revision}; written last, so a build that failed
//                                      half-way is never taken as up to date
//
// The build is skipped ("assets up to date") when DIR/manifest.json has the source_hash of
// the current inputs: static/src, static/sw, static/icons, this file, package-lock.json and
// the two templates that make up the precached /offline page (missing ones count as empty).
// Files of earlier builds are removed from DIR once the new manifest.json is in place.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, extname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { brotliCompressSync, constants as zlib, gzipSync } from "node:zlib";

const STATIC = dirname(fileURLToPath(import.meta.url));
const REPO = dirname(STATIC);
const TEMPLATES = ["handlers/templates/offline.html", "handlers/templates/layout.html"];
const INPUT_DIRS = ["src", "sw", "icons"];
const INPUT_FILES = ["build.mjs", "package-lock.json"];
const TEXT = new Set([".js", ".css", ".webmanifest", ".svg"]);
const JS_TARGET = ["es2020"];
const CSS_TARGET = ["chrome90", "firefox90", "safari14"];
const HASHED = /\.[0-9a-f]{8}\./;
const LIBS = { app: "@hotwired/stimulus and @rails/actioncable (MIT)", sw: "Workbox (MIT)" };

const sha256 = (data) => createHash("sha256").update(data).digest("hex");
const hash8 = (data) => sha256(data).slice(0, 8);
const log = (line) => console.log(`build-assets: ${line}`);

function parseArgs(argv) {
  const args = { out: join(STATIC, "dist"), force: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--force") args.force = true;
    else if (argv[i] === "--out" && argv[i + 1]) args.out = resolve(argv[++i]);
    else throw new Error(`unknown argument ${argv[i]} (usage: build.mjs [--out DIR] [--force])`);
  }
  return args;
}

function walk(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? walk(join(dir, e.name)) : e.isFile() ? [join(dir, e.name)] : [],
  );
}

const readOrEmpty = (file) => (existsSync(file) ? readFileSync(file) : Buffer.alloc(0));

// sha256 over "path NUL sha256(content)" lines of every input, sorted by path.
export function sourceHash() {
  const files = [
    ...INPUT_DIRS.flatMap((d) => walk(join(STATIC, d))),
    ...INPUT_FILES.map((f) => join(STATIC, f)),
  ].map((f) => [relative(REPO, f), readFileSync(f)]);
  for (const t of TEMPLATES) files.push([t, readOrEmpty(join(REPO, t))]);
  files.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return sha256(files.map(([name, data]) => `${name}\0${sha256(data)}\n`).join(""));
}

function upToDate(out, hash) {
  try {
    const manifest = JSON.parse(readFileSync(join(out, "manifest.json"), "utf8"));
    const needed = [...Object.values(manifest.files), "sw.js", "manifest.webmanifest"];
    return manifest.source_hash === hash && needed.every((f) => existsSync(join(out, f)));
  } catch {
    return false;
  }
}

function writeAtomic(file, data) {
  const tmp = `${file}.tmp-${process.pid}`;
  writeFileSync(tmp, data);
  renameSync(tmp, file);
}

function fingerprint(name, data) {
  const ext = extname(name);
  return `${basename(name, ext)}.${hash8(data)}${ext}`;
}

async function bundle(esbuild, entry, options) {
  const result = await esbuild.build({
    entryPoints: [join(STATIC, entry)],
    bundle: true,
    minify: true,
    write: false,
    target: entry.endsWith(".css") ? CSS_TARGET : JS_TARGET,
    logLevel: "warning",
    ...options,
  });
  return Buffer.from(result.outputFiles[0].contents);
}

function compress(file) {
  const data = readFileSync(file);
  const br = brotliCompressSync(data, {
    params: {
      [zlib.BROTLI_PARAM_QUALITY]: 11,
      [zlib.BROTLI_PARAM_MODE]: zlib.BROTLI_MODE_TEXT,
      [zlib.BROTLI_PARAM_SIZE_HINT]: data.length,
    },
  });
  const gz = gzipSync(data, { level: 9 });
  writeAtomic(`${file}.br`, br);
  writeAtomic(`${file}.gz`, gz);
  return { raw: data.length, br: br.length, gz: gz.length };
}

export async function build(argv = process.argv.slice(2)) {
  const { out, force } = parseArgs(argv);
  const source_hash = sourceHash();
  if (!force && upToDate(out, source_hash)) {
    log(`assets up to date in ${out} (source_hash ${source_hash.slice(0, 12)})`);
    return { upToDate: true, out };
  }
  log(`building into ${out} (source_hash ${source_hash.slice(0, 12)})`);
  mkdirSync(out, { recursive: true });
  const esbuild = await import("esbuild");
  const files = {}; // logical name -> dist name
  const written = new Set(); // every dist file of this build

  const emit = (logical, data, hashed = true) => {
    const name = hashed ? fingerprint(logical, data) : logical;
    writeAtomic(join(out, name), data);
    written.add(name);
    if (hashed) files[logical] = name;
    log(`  ${logical} -> ${name}`);
    return name;
  };

  log("esbuild src/app.js, src/app.css");
  emit("app.js", await bundle(esbuild, "src/app.js", { format: "esm", banner: { js: `/*! Final Market storefront; includes ${LIBS.app} */` } }));
  emit("app.css", await bundle(esbuild, "src/app.css", { loader: { ".css": "css" } }));

  log("icons");
  for (const icon of walk(join(STATIC, "icons")).sort()) emit(basename(icon), readFileSync(icon));

  log("manifest.webmanifest");
  const icon = (size, purpose) => ({
    src: `/static/${files[`icon-${size}.png`]}`,
    sizes: `${size}x${size}`,
    type: "image/png",
    purpose,
  });
  const webmanifest = {
    name: "Final Market",
    short_name: "Final Market",
    description: "Live stock, carts and orders.",
    id: "/",
    start_url: "/",
    scope: "/",
    display: "standalone",
    theme_color: "#0b5d1e",
    background_color: "#ffffff",
    icons: [icon(192, "any"), icon(512, "any"), icon(192, "maskable"), icon(512, "maskable")],
  };
  emit("manifest.webmanifest", `${JSON.stringify(webmanifest, null, 2)}\n`, false);

  // The /offline page is the layout + offline template rendered with these asset URLs.
  const offline_revision = hash8(
    [...TEMPLATES.map((t) => sha256(readOrEmpty(join(REPO, t)))), ...Object.values(files).sort()].join("\n"),
  );
  log(`/offline revision ${offline_revision}`);

  log("service worker: esbuild sw/sw.js, then workbox injectManifest");
  const swBundle = (
    await bundle(esbuild, "sw/sw.js", {
      format: "iife",
      define: { "process.env.NODE_ENV": '"production"' },
      banner: { js: `/*! Final Market service worker; includes ${LIBS.sw} */` },
    })
  ).toString("utf8");
  const precached = [...Object.values(files), "manifest.webmanifest"].sort();
  const sw_version = hash8(
    [swBundle, offline_revision, sha256(readFileSync(join(out, "manifest.webmanifest"))), ...precached].join("\n"),
  );
  if (!swBundle.includes("__FM_SW_VERSION__") || !swBundle.includes("self.__WB_MANIFEST")) {
    throw new Error("sw/sw.js must use __FM_SW_VERSION__ and self.__WB_MANIFEST");
  }
  const work = mkdtempSync(join(tmpdir(), "fm-sw-"));
  try {
    const swSrc = join(work, "sw.js");
    writeFileSync(swSrc, swBundle.replaceAll("__FM_SW_VERSION__", sw_version));
    const { injectManifest } = await import("workbox-build");
    const { count, size, warnings } = await injectManifest({
      swSrc,
      swDest: join(work, "sw.out.js"),
      globDirectory: out,
      globPatterns: precached,
      additionalManifestEntries: [{ url: "/offline", revision: offline_revision }],
      dontCacheBustURLsMatching: HASHED,
      manifestTransforms: [
        async (entries) => ({
          manifest: entries.map((e) => ({
            ...e,
            url: e.url.startsWith("/") ? e.url : e.url === "manifest.webmanifest" ? `/${e.url}` : `/static/${e.url}`,
          })),
          warnings: [],
        }),
      ],
    });
    warnings.forEach((w) => log(`  workbox warning: ${w}`));
    log(`  precache: ${count} entries, ${size} bytes`);
    emit("sw.js", readFileSync(join(work, "sw.out.js")), false);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }

  log("compress (brotli q11, gzip -9)");
  const sizes = {};
  for (const name of [...written].sort()) {
    if (TEXT.has(extname(name))) {
      sizes[name] = compress(join(out, name));
      written.add(`${name}.br`).add(`${name}.gz`);
    } else sizes[name] = { raw: statSync(join(out, name)).size };
  }

  const manifest = { files, sw_version, source_hash, offline_revision };
  writeAtomic(join(out, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`);
  written.add("manifest.json");
  log(`manifest.json (sw_version ${sw_version})`);

  const stale = readdirSync(out).filter((name) => !written.has(name));
  for (const name of stale) rmSync(join(out, name), { recursive: true, force: true });
  if (stale.length) log(`removed ${stale.length} file(s) of earlier builds`);

  log("sizes (bytes)          raw        br        gz");
  for (const [name, s] of Object.entries(sizes)) {
    log(`  ${name.padEnd(24)} ${String(s.raw).padStart(7)}   ${String(s.br ?? "-").padStart(7)}   ${String(s.gz ?? "-").padStart(7)}`);
  }
  const first = [files["app.js"], files["app.css"]].map((n) => sizes[n]);
  log(`first load (app.js + app.css): ${first[0].raw + first[1].raw} raw, ${first[0].br + first[1].br} br, ${first[0].gz + first[1].gz} gz`);
  return { upToDate: false, out, manifest, sizes };
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  build().catch((err) => {
    console.error(`build-assets: FAILED: ${err.stack || err}`);
    process.exit(1);
  });
}
