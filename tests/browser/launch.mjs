// What the console drivers (console.mjs, overview.mjs) share: finding puppeteer-core and the
// chromium binary, launching it headless on a throwaway profile with a page that records the
// console's errors, closing it, and describing a page for a failure report.
//
// Env (scripts/env.sh sets both): KILN_CHROMIUM, the browser binary (default: `chromium` on
// PATH); KILN_NODE_MODULES, the folder holding puppeteer-core (NODE_PATH is also searched; ES
// modules ignore it on their own, hence createRequire below).
import { createRequire } from 'node:module';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export function loadPuppeteer() {
  const dirs = [process.env.KILN_NODE_MODULES, ...(process.env.NODE_PATH || '').split(path.delimiter)]
    .filter(Boolean);
  for (const dir of dirs) {
    const pkg = path.join(dir, 'puppeteer-core');
    if (existsSync(path.join(pkg, 'package.json'))) return createRequire(path.join(dir, '_'))(pkg);
  }
  try {
    return createRequire(import.meta.url)('puppeteer-core');
  } catch {
    throw new Error(`puppeteer-core not found (KILN_NODE_MODULES=${process.env.KILN_NODE_MODULES ?? ''}, ` +
      `NODE_PATH=${process.env.NODE_PATH ?? ''}); run scripts/setup.sh and source scripts/env.sh`);
  }
}

// puppeteer wants an existing file, so a bare name is looked up on PATH.
export function chromiumPath() {
  const want = process.env.KILN_CHROMIUM || 'chromium';
  if (want.includes('/')) return want;
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    const p = path.join(dir || '.', want);
    try {
      if (statSync(p).isFile()) return p;
    } catch {}
  }
  throw new Error(`${want} not found on PATH (set KILN_CHROMIUM)`);
}

// Launches chromium and opens one page (1280x900, `waitMs` as its default timeout). Every console
// error, uncaught exception, crash and failed request of the page is appended to `consoleErrors`.
// Returns { browser, page, close }; close() ends the browser (killing it if it does not end within
// 10 s) and removes the profile.
export async function launch({ waitMs, consoleErrors }) {
  const puppeteer = loadPuppeteer();
  const executablePath = chromiumPath();
  const profile = mkdtempSync(path.join(os.tmpdir(), 'kiln-chromium-'));
  let browser;
  const close = async () => {
    if (browser) await withTimeout(browser.close(), 10_000).catch(() => browser.process()?.kill('SIGKILL'));
    rmSync(profile, { recursive: true, force: true });
  };
  try {
    browser = await puppeteer.launch({
      executablePath,
      headless: true,
      userDataDir: profile,
      defaultViewport: { width: 1280, height: 900 },
      args: ['--no-sandbox', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check',
        '--disable-gpu', '--hide-scrollbars'],
    });
    const page = await browser.newPage();
    page.setDefaultTimeout(waitMs);
    page.on('console', (msg) => {
      if (msg.type() !== 'error') return;
      const url = msg.location()?.url;
      consoleErrors.push(url ? `${msg.text()} (${url})` : msg.text());
    });
    page.on('pageerror', (err) => consoleErrors.push(`uncaught: ${err?.message ?? err}`));
    page.on('error', (err) => consoleErrors.push(`page crashed: ${err?.message ?? err}`));
    page.on('requestfailed', (req) =>
      consoleErrors.push(`request failed: ${req.method()} ${req.url()}: ${req.failure()?.errorText ?? '?'}`));
    return { browser, page, close };
  } catch (e) {
    await close();
    throw e;
  }
}

// For a failure report: the page's URL and the first 2000 characters of its body, and a
// screenshot at <outDir>/failure.png when one can still be taken.
export async function describeFailure(page, outDir) {
  const url = page.url();
  const html = await withTimeout(page.evaluate(() => document.body?.outerHTML.slice(0, 2000) ?? null), 5000)
    .catch(() => null);
  await withTimeout(page.screenshot({ path: path.join(outDir, 'failure.png'), fullPage: true }), 10_000)
    .catch(() => {});
  return { url, html };
}

// A CSS string literal for attribute selectors.
export const q = (s) => '"' + String(s).replace(/["\\]/g, '\\$&').replace(/\n/g, '\\a ') + '"';

export function withTimeout(promise, ms) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms); }),
  ]).finally(() => clearTimeout(timer));
}
