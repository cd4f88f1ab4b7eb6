// Drives the web console in a real headless chromium: submit a job from the overview, watch its
// progress to completion, check the artifact preview loads, screenshot the job and overview pages.
//
//   node tests/browser/console.mjs <gateway_base_url> <model> <prompt> <out_dir>
//
// Env (scripts/env.sh sets both): KILN_CHROMIUM, the browser binary (default: `chromium` on
// PATH); KILN_NODE_MODULES, the folder holding puppeteer-core (see launch.mjs).
//
// Prints exactly one JSON line on stdout. Success (exit 0):
//   {"job_id", "progress_seen": [..], "final_progress", "status": "completed",
//    "image_natural_width", "previews_seen": [{seq, width}, ..] (the live preview image as it
//    changed while the job ran), "screenshots": [..], "console_errors": [..]}
// Failure (exit 1): {"error", "step", "html" (first 2000 chars of body.outerHTML), "url",
//   "console_errors"}, with <out_dir>/failure.png when a screenshot could still be taken.
import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { describeFailure, launch, q, withTimeout } from './launch.mjs';

const WAIT_MS = 30_000; // page loads, elements, the artifact
const JOB_MS = 60_000; // submission to completed
const WATCHDOG_MS = 150_000; // the whole run, so a hang still ends in a JSON line
const PARAMS = '{"steps": 8, "step_ms": 150}';
const TERMINAL_FAILURES = ['failed', 'cancelled', 'canceled', 'error', 'rejected', 'timed_out'];

let step = 'args';
let printed = false;
const consoleErrors = [];

function emit(obj) {
  if (printed) return;
  printed = true;
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function main() {
  const [baseArg, model, prompt, outArg] = process.argv.slice(2);
  if (!baseArg || !model || prompt === undefined || !outArg) {
    throw new Error('usage: node tests/browser/console.mjs <gateway_base_url> <model> <prompt> <out_dir>');
  }
  const base = baseArg.replace(/\/+$/, '');
  const outDir = path.resolve(outArg);
  mkdirSync(outDir, { recursive: true });

  step = 'launch';
  let page;
  let close;
  try {
    ({ page, close } = await launch({ waitMs: WAIT_MS, consoleErrors }));

    // Every distinct progress value, in the order seen: a MutationObserver plus a 50 ms poll in the
    // page report to node (installed before the submit, since a short job can finish in a second;
    // also on new documents, should the page reload).
    const progressSeen = [];
    let recording = true;
    const record = (v) => {
      if (recording && typeof v === 'number' && Number.isFinite(v) && !progressSeen.includes(v)) {
        progressSeen.push(v);
      }
    };
    await page.exposeFunction('__kilnProgress', record);
    // Each live preview the job page showed: its seq, once its image decoded.
    const previewsSeen = [];
    await page.exposeFunction('__kilnPreview', (seq, width) => {
      if (!previewsSeen.some((p) => p.seq === seq)) previewsSeen.push({ seq, width });
    });
    const watchProgress = () => {
      if (window.__kilnWatching) return;
      window.__kilnWatching = true;
      let last;
      const checkPreview = () => {
        const img = document.querySelector('img#job-preview');
        if (img && img.complete && img.naturalWidth > 0 && img.hasAttribute('data-seq')) {
          window.__kilnPreview(Number(img.getAttribute('data-seq')), img.naturalWidth);
        }
      };
      const check = () => {
        checkPreview();
        const el = document.querySelector('progress#job-progress');
        if (!el || !el.hasAttribute('value')) return;
        const v = Number(el.value);
        if (v !== last) {
          last = v;
          window.__kilnProgress(v);
        }
      };
      const start = () => {
        new MutationObserver(check).observe(document.documentElement,
          { subtree: true, childList: true, attributes: true, characterData: true });
        setInterval(check, 50);
        check();
      };
      if (document.documentElement) start();
      else document.addEventListener('DOMContentLoaded', start);
    };
    await page.evaluateOnNewDocument(watchProgress);

    // a. The overview, with the cluster and the model's submit link.
    step = 'open overview';
    await page.goto(`${base}/#/`, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });
    await page.evaluate(watchProgress);
    step = 'wait for cluster (table#cluster tr.gpu-row)';
    await page.waitForSelector('table#cluster tr.gpu-row', { visible: true });
    const link = `a.submit-link[data-model=${q(model)}]`;
    step = `wait for ${link}`;
    await page.waitForSelector(link, { visible: true });

    // b. The submit form.
    step = 'open submit form';
    await page.click(link);
    const form = `form#submit-form[data-model=${q(model)}]`;
    await page.waitForSelector(form, { visible: true });
    step = 'fill submit form';
    await fill(page, `${form} input[name="input.prompt"]`, prompt);
    await fill(page, 'textarea#params', PARAMS);
    step = 'submit';
    await page.click('button#submit-button');

    // c. The job page, its progress, completion and the artifact.
    step = 'wait for #/jobs/<id>';
    const hash = await page.waitForFunction(
      () => (/^#\/jobs\/[^/?]+$/.test(location.hash) ? location.hash : false),
      { polling: 50, timeout: WAIT_MS },
    ).then((h) => h.jsonValue());
    const jobId = decodeURIComponent(hash.slice('#/jobs/'.length));
    step = `wait for #job[data-job-id=${q(jobId)}]`;
    await page.waitForSelector(`#job[data-job-id=${q(jobId)}]`);
    step = 'wait for #job[data-status="completed"]';
    const status = await page.waitForFunction(
      (failures) => {
        const s = document.querySelector('#job')?.getAttribute('data-status');
        return s === 'completed' || failures.includes(s) ? s : false;
      },
      { polling: 50, timeout: JOB_MS },
      TERMINAL_FAILURES,
    ).then((h) => h.jsonValue()).catch(async (e) => {
      const s = await page.$eval('#job', (el) => el.getAttribute('data-status')).catch(() => null);
      throw new Error(`${e.message}; last data-status=${JSON.stringify(s)}, progress seen ${JSON.stringify(progressSeen)}`);
    });
    if (status !== 'completed') throw new Error(`job ${jobId} ended with data-status="${status}"`);
    const finalProgress = await page.$eval('progress#job-progress', (el) =>
      (el.hasAttribute('value') ? Number(el.value) : null));
    record(finalProgress);
    recording = false;
    step = 'wait for img.artifact-preview to load';
    const imageWidth = await page.waitForFunction(() => {
      const img = document.querySelector('img.artifact-preview');
      return img && img.complete && img.naturalWidth > 0 ? img.naturalWidth : false;
    }, { polling: 100, timeout: WAIT_MS }).then((h) => h.jsonValue()).catch(async (e) => {
      const img = await page.$eval('img.artifact-preview',
        (i) => ({ src: i.currentSrc || i.src, complete: i.complete, naturalWidth: i.naturalWidth })).catch(() => null);
      throw new Error(`${e.message}; img.artifact-preview: ${JSON.stringify(img)}`);
    });

    // d. Screenshots of the job and of the overview listing it.
    step = 'screenshot job';
    const shots = [path.join(outDir, 'console-job.png'), path.join(outDir, 'console-overview.png')];
    await page.screenshot({ path: shots[0], fullPage: true });
    step = 'back to overview';
    await page.goto(`${base}/#/`, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });
    step = `wait for tr.job-row[data-job-id=${q(jobId)}]`;
    await page.waitForSelector(`tr.job-row[data-job-id=${q(jobId)}]`, { visible: true });
    step = 'screenshot overview';
    await page.screenshot({ path: shots[1], fullPage: true });

    // e.
    emit({
      job_id: jobId,
      progress_seen: progressSeen,
      final_progress: finalProgress,
      status,
      image_natural_width: imageWidth,
      previews_seen: previewsSeen,
      screenshots: shots,
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

// Clears a field the way a user would (select all, delete) and types the value; falls back to
// setting it with input/change events should the page reformat what was typed.
async function fill(page, selector, value) {
  const el = await page.waitForSelector(selector, { visible: true });
  await el.focus();
  await el.evaluate((e) => e.select());
  await page.keyboard.press('Backspace');
  await el.type(value);
  const got = await el.evaluate((e) => e.value);
  if (got !== value) {
    await el.evaluate((e, v) => {
      const proto = e instanceof HTMLTextAreaElement ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;
      Object.getOwnPropertyDescriptor(proto, 'value').set.call(e, v);
      e.dispatchEvent(new Event('input', { bubbles: true }));
      e.dispatchEvent(new Event('change', { bubbles: true }));
    }, value);
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
