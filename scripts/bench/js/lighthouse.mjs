// lighthouse.mjs — Lighthouse (mobile emulation, its defaults) on each URL given, against the
// Chromium named by CHROME_PATH; prints one JSON line per URL: the category scores and the
// figures scripts/bench/edge reports (LCP, TBT, CLS, total bytes, requests), plus the audits
// that did not pass, so a lost point names its cause.
//
//   CHROME_PATH=/usr/bin/chromium node scripts/bench/js/lighthouse.mjs URL...
import * as chromeLauncher from "chrome-launcher";
import lighthouse from "lighthouse";

const FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"];
const CATEGORIES = ["performance", "accessibility", "best-practices"];
const SKIP_MODES = new Set(["informative", "notApplicable", "manual"]);

async function audit(url) {
  const chrome = await chromeLauncher.launch({ chromeFlags: FLAGS });
  try {
    const result = await lighthouse(url, {
      port: chrome.port,
      output: "json",
      logLevel: "error",
      onlyCategories: CATEGORIES,
    });
    const { categories, audits } = result.lhr;
    const scores = Object.fromEntries(
      Object.entries(categories).map(([id, c]) => [id, Math.round(c.score * 100)]),
    );
    const failing = Object.entries(audits)
      .filter(([, a]) => a.score !== null && a.score < 0.9 && !SKIP_MODES.has(a.scoreDisplayMode))
      .map(([id, a]) => ({ id, score: a.score, title: a.title }));
    return {
      url,
      scores,
      lcp_ms: Math.round(audits["largest-contentful-paint"].numericValue),
      tbt_ms: Math.round(audits["total-blocking-time"].numericValue),
      cls: Number(audits["cumulative-layout-shift"].numericValue.toFixed(3)),
      total_bytes: Math.round(audits["total-byte-weight"].numericValue),
      requests: audits["network-requests"].details?.items?.length ?? null,
      failing,
      console_errors: (audits["errors-in-console"].details?.items ?? []).map(
        (item) => `${item.source}: ${item.description} (${item.sourceLocation?.url ?? ""})`,
      ),
    };
  } finally {
    await chrome.kill();
  }
}

for (const url of process.argv.slice(2)) {
  process.stderr.write(`lighthouse: ${url}\n`);
  console.log(JSON.stringify(await audit(url)));
}
