// Runs seed 003's README JavaScript client (fetch + FormData + EventSource, `status` events) in a
// real headless chromium against a Kiln gateway serving examples/http/seed-003-sharp.toml.
//
//   node tests/browser/seed003.mjs <gateway_base_url> <png_path>
//
// The page is the gateway's own /healthz (same origin, so no CORS is involved). The snippet
// (seed003-readme-client.js, the README's text verbatim) runs in an async function with two
// substitutions: `http://localhost:8000` becomes the gateway, and `window.location.href = <url>`
// (the download) records the URL instead of navigating away; `fileInput` is an object whose
// files[0] is a File of the PNG's bytes. Every `status` event the page's EventSource receives is
// recorded too, raw, before the snippet's own listener sees it, and so is the /predict reply.
//
// Env (scripts/env.sh sets both): KILN_CHROMIUM, the browser binary; KILN_NODE_MODULES, the
// folder holding puppeteer-core.
//
// Prints exactly one JSON line on stdout. Success (exit 0):
//   {"task_info", "event_source_url", "status_events": [data strings], "event_source_errors",
//    "console": [{"type", "text", "url"}], "result_url", "result": {"status", "content_type", "size",
//    "magic": [4 bytes]}, "page_errors": [..]}
// Failure (exit 1): {"error", "step", "console", "page_errors"}.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromiumPath, loadPuppeteer } from './launch.mjs';

const WAIT_MS = 30_000; // page load, the console lines
const JOB_MS = 60_000; // submission to the download
const WATCHDOG_MS = 120_000; // the whole run, so a hang still ends in a JSON line

// The README's "JavaScript 客户端（SSE）", verbatim, beside this file.
const README_SNIPPET = readFileSync(new URL('./seed003-readme-client.js', import.meta.url), 'utf8');

let step = 'args';
let printed = false;
const consoleLines = [];
const pageErrors = [];

function emit(obj) {
  if (printed) return;
  printed = true;
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function main() {
  const [baseArg, pngArg] = process.argv.slice(2);
  if (!baseArg || !pngArg) throw new Error('usage: node tests/browser/seed003.mjs <gateway_base_url> <png_path>');
  const base = baseArg.replace(/\/+$/, '');
  const png = readFileSync(pngArg).toString('base64');

  // The substitutions (each must apply, or the snippet changed under us).
  let snippet = README_SNIPPET;
  const substitute = (from, to) => {
    const next = snippet.replace(from, to);
    if (next === snippet) throw new Error(`the snippet has no ${from}`);
    snippet = next;
  };
  substitute(/http:\/\/localhost:8000/g, base);
  substitute(/window\.location\.href = (.*);/, 'window.__kilnNavigate($1);');
  const prelude = `
    const fileInput = { files: [new File([Uint8Array.from(atob(${JSON.stringify(png)}), (c) => c.charCodeAt(0))],
      'image.png', { type: 'image/png' })] };
    window.__kiln = { events: [], errors: 0, url: null, sourceUrl: null, taskInfo: null };
    window.__kilnNavigate = (url) => { window.__kiln.url = url; };
    const NativeEventSource = window.EventSource;
    window.EventSource = class extends NativeEventSource {
      constructor(url, init) {
        super(url, init);
        window.__kiln.sourceUrl = url;
        this.addEventListener('status', (e) => window.__kiln.events.push(e.data));
        this.addEventListener('error', () => { window.__kiln.errors += 1; });
      }
    };
    const nativeFetch = window.fetch;
    window.fetch = async (...args) => {
      const r = await nativeFetch(...args);
      r.clone().json().then((j) => { window.__kiln.taskInfo = j; }, () => {});
      return r;
    };
  `;
  const program = `(async () => {\n${prelude}\n${snippet}\n})()`;

  step = 'launch';
  const puppeteer = loadPuppeteer();
  const profile = mkdtempSync(path.join(os.tmpdir(), 'kiln-chromium-'));
  let browser;
  try {
    browser = await puppeteer.launch({
      executablePath: chromiumPath(),
      headless: true,
      userDataDir: profile,
      args: ['--no-sandbox', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check', '--disable-gpu'],
    });
    const page = await browser.newPage();
    page.setDefaultTimeout(WAIT_MS);
    page.on('console', (msg) => consoleLines.push({ type: msg.type(), text: msg.text(), url: msg.location()?.url ?? null }));
    page.on('pageerror', (err) => pageErrors.push(`uncaught: ${err?.message ?? err}`));
    page.on('requestfailed', (req) => pageErrors.push(`request failed: ${req.method()} ${req.url()}: ${req.failure()?.errorText ?? '?'}`));

    step = 'open /healthz';
    await page.goto(`${base}/healthz`, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });

    step = 'run the README snippet';
    await page.evaluate(program);

    step = 'wait for the download or a failure';
    await page.waitForFunction(
      () => window.__kiln.url !== null || window.__kiln.events.some((d) => JSON.parse(d).status === 'failed'),
      { polling: 50, timeout: JOB_MS },
    ).catch(async (e) => {
      const state = await page.evaluate(() => window.__kiln).catch(() => null);
      throw new Error(`${e.message}; state ${JSON.stringify(state)}`);
    });
    const state = await page.evaluate(() => window.__kiln);

    // The download the README's client navigates to, fetched by the page itself.
    step = 'fetch the result';
    const result = state.url === null ? null : await page.evaluate(async (url) => {
      const r = await fetch(url);
      const bytes = new Uint8Array(await r.arrayBuffer());
      return { status: r.status, content_type: r.headers.get('content-type'), size: bytes.length, magic: [...bytes.slice(0, 4)] };
    }, state.url);

    // The snippet's console lines reach node asynchronously: wait for its last one.
    step = 'wait for the console';
    const last = state.url === null ? 'Task failed:' : 'Task completed!';
    const deadline = Date.now() + WAIT_MS;
    while (!consoleLines.some((l) => l.text.startsWith(last)) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }

    emit({
      task_info: state.taskInfo,
      event_source_url: state.sourceUrl,
      status_events: state.events,
      event_source_errors: state.errors,
      console: consoleLines,
      result_url: state.url,
      result,
      page_errors: pageErrors,
    });
  } catch (e) {
    emit({ error: String(e?.message ?? e), step, console: consoleLines, page_errors: pageErrors });
    process.exitCode = 1;
  } finally {
    if (browser) await browser.close().catch(() => browser.process()?.kill('SIGKILL'));
    rmSync(profile, { recursive: true, force: true });
  }
}

setTimeout(() => {
  emit({ error: `watchdog: no result after ${WATCHDOG_MS} ms`, step, console: consoleLines, page_errors: pageErrors });
  process.exit(1);
}, WATCHDOG_MS).unref();

main().catch((e) => {
  emit({ error: String(e?.message ?? e), step, console: consoleLines, page_errors: pageErrors });
  process.exitCode = 1;
}).finally(() => process.exit(process.exitCode ?? 0));
