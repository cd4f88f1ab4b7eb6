// Opens the web console's page of an existing job in a real headless chromium and records what
// its progress bar shows from the first render until the job's event stream has been replayed
// to its end (the page says "finished"), or until the job ends when it is still running.
//
//   node tests/browser/job.mjs <gateway_base_url> <job_id> <out_dir>
//
// Env: as console.mjs (KILN_CHROMIUM, KILN_NODE_MODULES; see launch.mjs).
//
// Prints exactly one JSON line on stdout. Success (exit 0):
//   {"job_id", "status" (#job's data-status), "progress_changes": [..] (every value the bar took,
//    in order, repeats included), "final_progress", "live" (the stream indicator's text),
//    "screenshot", "webhooks": [{outcome, text}] (the webhook log's rows; [] when its panel is
//    hidden), "console_errors": [..]}
// Failure (exit 1): {"error", "step", "html", "url", "console_errors"}, with
// <out_dir>/failure.png when a screenshot could still be taken.
import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { describeFailure, launch, q } from './launch.mjs';

const WAIT_MS = 30_000; // the page load, the job page
const JOB_MS = 60_000; // a running job to its end
const SETTLE_MS = 500; // after the stream's end, for late renders to show
const WATCHDOG_MS = 150_000; // the whole run, so a hang still ends in a JSON line
const TERMINAL = ['completed', 'failed', 'cancelled'];

let step = 'args';
let printed = false;
const consoleErrors = [];

function emit(obj) {
  if (printed) return;
  printed = true;
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function main() {
  const [baseArg, jobId, outArg] = process.argv.slice(2);
  if (!baseArg || !jobId || !outArg) {
    throw new Error('usage: node tests/browser/job.mjs <gateway_base_url> <job_id> <out_dir>');
  }
  const base = baseArg.replace(/\/+$/, '');
  const outDir = path.resolve(outArg);
  mkdirSync(outDir, { recursive: true });

  step = 'launch';
  let page;
  let close;
  try {
    ({ page, close } = await launch({ waitMs: WAIT_MS, consoleErrors }));

    // Every change of the bar, reported by a MutationObserver and a 50 ms poll in the page,
    // installed before the document's own scripts run.
    const changes = [];
    await page.exposeFunction('__kilnProgressChange', (v) => changes.push(v));
    await page.evaluateOnNewDocument(() => {
      let last;
      const check = () => {
        const el = document.querySelector('progress#job-progress');
        if (!el || !el.hasAttribute('value')) return;
        const v = Number(el.value);
        if (v !== last) {
          last = v;
          window.__kilnProgressChange(v);
        }
      };
      document.addEventListener('DOMContentLoaded', () => {
        new MutationObserver(check).observe(document.documentElement,
          { subtree: true, childList: true, attributes: true, characterData: true });
        setInterval(check, 50);
        check();
      });
    });

    step = 'open the job page';
    await page.goto(`${base}/#/jobs/${encodeURIComponent(jobId)}`, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });
    step = `wait for #job[data-job-id=${q(jobId)}]`;
    await page.waitForSelector(`#job[data-job-id=${q(jobId)}]`);
    step = 'wait for a terminal data-status and the end of the event stream';
    const live = await page.waitForFunction((terminal) => {
      const status = document.querySelector('#job')?.getAttribute('data-status');
      const live = document.querySelector('#job .live')?.textContent ?? '';
      return terminal.includes(status) && live === 'finished' ? live : false;
    }, { polling: 50, timeout: JOB_MS }, TERMINAL).then((h) => h.jsonValue()).catch(async (e) => {
      const s = await page.$eval('#job', (el) => ({
        status: el.getAttribute('data-status'),
        live: el.querySelector('.live')?.textContent,
      })).catch(() => null);
      throw new Error(`${e.message}; #job: ${JSON.stringify(s)}, progress changes ${JSON.stringify(changes)}`);
    });
    await new Promise((resolve) => setTimeout(resolve, SETTLE_MS));

    step = 'read the page';
    const status = await page.$eval('#job', (el) => el.getAttribute('data-status'));
    const finalProgress = await page.$eval('progress#job-progress', (el) =>
      (el.hasAttribute('value') ? Number(el.value) : null));
    const webhooks = await page.$$eval('#job-webhooks:not([hidden]) tr.webhook-attempt', (rows) =>
      rows.map((r) => ({ outcome: r.getAttribute('data-outcome'), text: r.textContent })));
    step = 'screenshot';
    const shot = path.join(outDir, 'job.png');
    await page.screenshot({ path: shot, fullPage: true });
    emit({
      job_id: jobId,
      status,
      progress_changes: changes,
      final_progress: finalProgress,
      live,
      screenshot: shot,
      webhooks,
      console_errors: consoleErrors,
    });
  } catch (e) {
    const failure = { error: String(e?.message ?? e), step, html: null, url: null, console_errors: consoleErrors };
    if (page) Object.assign(failure, await describeFailure(page, outDir));
    emit(failure);
    process.exitCode = 1;
  } finally {
    if (close) await close();
  }
}

setTimeout(() => {
  emit({ error: `watchdog: no result after ${WATCHDOG_MS} ms`, step, html: null, url: null, console_errors: consoleErrors });
  process.exit(1);
}, WATCHDOG_MS).unref();

main().catch((e) => {
  emit({ error: String(e?.message ?? e), step, html: null, url: null, console_errors: consoleErrors });
  process.exitCode = 1;
}).finally(() => process.exit(process.exitCode ?? 0));
