// Opens the gateway's /docs (Swagger UI) and /redoc (ReDoc) in a real headless chromium and
// waits until each has rendered every operation of /openapi.json, recording every request the
// pages make: they must all go to the gateway (the assets are built into it, nothing from a CDN).
//
//   node tests/browser/docs.mjs <gateway_base_url> <out_dir>
//
// Env: as console.mjs (KILN_CHROMIUM, KILN_NODE_MODULES; see launch.mjs).
//
// Success (exit 0), one JSON line:
//   {"done": true, "operations": n, "swagger": {"rendered": [ids], "elapsed_ms"},
//    "redoc": {"rendered": [ids], "elapsed_ms"}, "requests": [urls], "elsewhere": [urls not on
//    the gateway], "screenshots": [..], "console_errors": [..]}
// where an operation counts as rendered by Swagger UI when its block `#operations-<tag>-<id>`
// is in the page, and by ReDoc when `[data-section-id="tag/<tag>/operation/<id>"]` is.
// Failure (exit 1): {"error", "step", "html", "url", "console_errors"}, with <out_dir>/failure.png.
import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { describeFailure, launch, withTimeout } from './launch.mjs';

const WAIT_MS = 60_000; // each page's rendering (ReDoc parses the whole document first)
const WATCHDOG_MS = 150_000;

let step = 'args';
let done = false;
const consoleErrors = [];

function finish(obj) {
  if (done) return;
  process.stdout.write(JSON.stringify(obj) + '\n');
  done = true;
}

// Swagger UI's element id of an operation: `operations-<tag>-<operationId>`, the tag's spaces
// as underscores.
const swaggerId = (tag, id) => `operations-${tag.replace(/\s/g, '_')}-${id}`;

async function main() {
  const [baseArg, outArg] = process.argv.slice(2);
  if (!baseArg || !outArg) throw new Error('usage: node tests/browser/docs.mjs <gateway_base_url> <out_dir>');
  const base = baseArg.replace(/\/+$/, '');
  const outDir = path.resolve(outArg);
  mkdirSync(outDir, { recursive: true });

  step = 'read /openapi.json';
  const doc = await (await fetch(`${base}/openapi.json`)).json();
  const ops = [];
  for (const item of Object.values(doc.paths)) {
    for (const op of Object.values(item)) ops.push({ tag: op.tags[0], id: op.operationId });
  }

  step = 'launch';
  let page;
  let close;
  const requests = [];
  try {
    ({ page, close } = await launch({ waitMs: WAIT_MS, consoleErrors }));
    page.on('request', (req) => requests.push(req.url()));
    const screenshots = [];
    const result = { done: true, operations: ops.length };

    for (const [name, selector] of [
      ['swagger', (op) => `[id="${swaggerId(op.tag, op.id)}"]`],
      ['redoc', (op) => `[data-section-id="tag/${op.tag}/operation/${op.id}"]`],
    ]) {
      const pagePath = name === 'swagger' ? '/docs' : '/redoc';
      step = `open ${pagePath}`;
      const started = Date.now();
      await page.goto(`${base}${pagePath}`, { waitUntil: 'load', timeout: WAIT_MS });
      step = `${pagePath}: wait for every operation`;
      const want = ops.map(selector);
      await page.waitForFunction((want) => want.every((s) => document.querySelector(s)), { polling: 200, timeout: WAIT_MS }, want)
        .catch(async (e) => {
          const missing = await page.evaluate((want) => want.filter((s) => !document.querySelector(s)), want);
          throw new Error(`${e.message}; not rendered: ${JSON.stringify(missing.slice(0, 10))} (${missing.length} of ${want.length})`);
        });
      const rendered = await page.evaluate((want) => want.filter((s) => document.querySelector(s)), want);
      const shot = path.join(outDir, `${name}.png`);
      await page.screenshot({ path: shot });
      screenshots.push(shot);
      result[name] = { rendered, elapsed_ms: Date.now() - started };
    }
    const elsewhere = requests.filter((u) => !u.startsWith(`${base}/`) && !u.startsWith('data:') && !u.startsWith('blob:'));
    finish({ ...result, requests, elsewhere, screenshots, console_errors: consoleErrors });
  } catch (e) {
    const failure = { error: String(e?.message ?? e), step, html: null, url: null, console_errors: consoleErrors, requests };
    if (page) Object.assign(failure, await describeFailure(page, outDir));
    finish(failure);
    process.exitCode = 1;
  } finally {
    if (close) await withTimeout(close(), 15_000).catch(() => {});
  }
}

const watchdog = setTimeout(() => {
  finish({ error: `watchdog: no result after ${WATCHDOG_MS} ms`, step, console_errors: consoleErrors });
  process.exit(1);
}, WATCHDOG_MS);
main().finally(() => clearTimeout(watchdog));
