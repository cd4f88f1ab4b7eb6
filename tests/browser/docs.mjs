// Opens the gateway's /docs (Swagger UI) and /redoc (ReDoc) in a real headless chromium and
// waits until each has rendered every operation of /openapi.json, recording every request the
// pages make: they must all go to the gateway (the assets are built into it, nothing from a CDN).
//
//   node tests/browser/docs.mjs <gateway_base_url> <out_dir> [<api_key> <submit_body_json>]
//
// With an API key and a body it then uses Swagger UI as a person would: "Authorize" with the
// key (the bearer scheme), open POST /v1/jobs, "Try it out", put the body in, "Execute", and
// reads the status and body the page shows ("try_it_out": {"status", "body"}).
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
  const [baseArg, outArg, apiKey, submitBody] = process.argv.slice(2);
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
    if (apiKey && submitBody) result.try_it_out = await tryItOut(page, base, apiKey, submitBody, outDir, screenshots);
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

// Swagger UI's "Authorize", then "Try it out" and "Execute" on POST /v1/jobs (operation
// `submitJob`, tag `jobs`) with `body`; returns what the page shows of the response.
async function tryItOut(page, base, apiKey, body, outDir, screenshots) {
  step = 'try it out: open /docs';
  await page.goto(`${base}/docs`, { waitUntil: 'load', timeout: WAIT_MS });
  const op = `[id="${swaggerId('jobs', 'submitJob')}"]`;
  await page.waitForSelector(op, { timeout: WAIT_MS });

  step = 'try it out: authorize with the bearer key';
  await page.click('.auth-wrapper .authorize');
  await page.waitForSelector('input[aria-label="auth-bearer-value"]', { timeout: WAIT_MS });
  await page.type('input[aria-label="auth-bearer-value"]', apiKey);
  // The bearer scheme's own form: its submit button is the "Authorize" inside that form.
  await page.evaluate(() => {
    const input = document.querySelector('input[aria-label="auth-bearer-value"]');
    input.closest('form').querySelector('button.modal-btn.auth.authorize').click();
  });
  await page.waitForFunction(() => [...document.querySelectorAll('.auth-container h6')].some((h) => h.textContent === 'Authorized'),
    { polling: 100, timeout: WAIT_MS });
  await page.click('.modal-ux .btn-done');

  step = 'try it out: open POST /v1/jobs';
  await page.click(`${op} .opblock-summary`);
  await page.waitForSelector(`${op} .try-out__btn`, { timeout: WAIT_MS });
  await page.click(`${op} .try-out__btn`);
  step = 'try it out: the JSON body';
  const textarea = `${op} textarea.body-param__text`;
  await page.waitForSelector(textarea, { timeout: WAIT_MS });
  // Replaced by typing, as a person would (the textarea is React's: its value follows input).
  await page.click(textarea, { clickCount: 1 });
  await page.keyboard.down('Control');
  await page.keyboard.press('KeyA');
  await page.keyboard.up('Control');
  await page.keyboard.press('Backspace');
  await page.type(textarea, body);

  step = 'try it out: execute';
  await page.click(`${op} .execute`);
  const statusCell = `${op} .live-responses-table tr.response .response-col_status`;
  await page.waitForSelector(statusCell, { timeout: WAIT_MS });
  const shown = await page.evaluate((op) => {
    const block = document.querySelector(op);
    const status = block.querySelector('.live-responses-table tr.response .response-col_status')?.textContent?.trim() ?? '';
    const body = block.querySelector('.live-responses-table tr.response .response-col_description pre')?.textContent ?? '';
    return { status, body };
  }, op);
  const shot = path.join(outDir, 'try-it-out.png');
  await page.screenshot({ path: shot, fullPage: true });
  screenshots.push(shot);
  return shown;
}

const watchdog = setTimeout(() => {
  finish({ error: `watchdog: no result after ${WATCHDOG_MS} ms`, step, console_errors: consoleErrors });
  process.exit(1);
}, WATCHDOG_MS);
main().finally(() => clearTimeout(watchdog));
