// Reads what the web console shows of a job's attempts, of the jobs list and of the submit form,
// in a real headless chromium (issue 23 items 7 and 16):
//   a. the page of a job that was retried: its attempts table, its whole time, its timeline
//      (a `retrying` row with its reason; progress ticks collapsed), its inputs and labels;
//   b. the overview: the jobs list's progress cells, labels, paging ("Show more") and page
//      height, and the queued count beside each model;
//   c. the submit form of a model that declares params: one typed field per param, filled with
//      its default; submits with a changed field, labels and a file for its `image` input, and
//      reads the new job's labels and the uploaded input's link and preview.
//
//   node tests/browser/history.mjs <gateway_base_url> <retried_job_id> <form_model> <out_dir>
//
// Env: as console.mjs (KILN_CHROMIUM, KILN_NODE_MODULES; see launch.mjs).
//
// Prints exactly one JSON line on stdout. Success (exit 0):
//   {"attempts": [{attempt, outcome, reason, time}], "total_ms", "timeline": [{type, attempt,
//    stage, reason, ticks}], "inputs": [{name, object, value, preview}], "job_labels": [..],
//    "list": {"rows", "more_visible", "rows_after_more", "page_height", "progress": [{job_id,
//    stage, progress}], "labels": [..], "queued": {model: n}},
//    "form": {"fields": [{name, type, kind, value}], "submitted_job_id", "submitted_labels": [..],
//             "submitted_image": {object, link, width}},
//    "screenshots": [..], "console_errors": [..]}
// Failure (exit 1): {"error", "step", "html", "url", "console_errors"}, with
// <out_dir>/failure.png when a screenshot could still be taken.
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

import { describeFailure, launch, q } from './launch.mjs';

const WAIT_MS = 30_000;
// A 1x1 PNG, for the file input.
const TINY_PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='; // the page load, one view's data
const WATCHDOG_MS = 150_000; // the whole run, so a hang still ends in a JSON line

let step = 'args';
let printed = false;
const consoleErrors = [];

function emit(obj) {
  if (printed) return;
  printed = true;
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function main() {
  const [baseArg, jobId, model, outArg] = process.argv.slice(2);
  if (!baseArg || !jobId || !model || !outArg) {
    throw new Error('usage: node tests/browser/history.mjs <gateway_base_url> <retried_job_id> <model> <out_dir>');
  }
  const base = baseArg.replace(/\/+$/, '');
  const outDir = path.resolve(outArg);
  mkdirSync(outDir, { recursive: true });
  const shots = [];

  step = 'launch';
  let page;
  let close;
  try {
    ({ page, close } = await launch({ waitMs: WAIT_MS, consoleErrors }));

    // a. The retried job's page, once its history has been replayed to the end.
    step = 'open the retried job';
    await page.goto(`${base}/#/jobs/${encodeURIComponent(jobId)}`, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });
    step = 'wait for the end of its history';
    await page.waitForFunction(() => document.querySelector('#job .live')?.textContent === 'finished',
      { polling: 50, timeout: WAIT_MS });
    step = 'read the job page';
    const job = await page.evaluate(() => ({
      attempts: [...document.querySelectorAll('#job-attempts tr.attempt-row')].map((r) => ({
        attempt: Number(r.getAttribute('data-attempt')),
        outcome: r.getAttribute('data-outcome'),
        reason: r.getAttribute('data-reason'),
        time: r.querySelector('.attempt-time')?.textContent ?? '',
      })),
      total_ms: Number(document.querySelector('#job-total')?.getAttribute('data-ms')),
      timeline: [...document.querySelectorAll('#job-timeline li.event')].map((li) => ({
        type: li.getAttribute('data-type'),
        attempt: li.getAttribute('data-attempt'),
        stage: li.getAttribute('data-stage'),
        reason: li.getAttribute('data-reason'),
        ticks: Number(li.getAttribute('data-ticks') || 1),
      })),
      inputs: [...document.querySelectorAll('#job-inputs .input')].map((el) => ({
        name: el.getAttribute('data-name'),
        object: el.getAttribute('data-object'),
        value: el.querySelector('.input-value')?.textContent ?? null,
        link: el.querySelector('a.input-link')?.getAttribute('href') ?? null,
      })),
      job_labels: [...document.querySelectorAll('#job-labels .label-chip')].map((c) => c.textContent),
    }));
    step = 'screenshot the job';
    shots.push(path.join(outDir, 'history-job.png'));
    await page.screenshot({ path: shots.at(-1), fullPage: true });

    // b. The overview's jobs list.
    step = 'open the overview';
    await page.goto(`${base}/#/`, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });
    step = 'wait for a running job with progress and a queued count';
    await page.waitForFunction(() => document.querySelector('table#jobs td.job-progress[data-progress]')
      && [...document.querySelectorAll('.queued-count')].some((el) => Number(el.getAttribute('data-count')) > 0),
    { polling: 100, timeout: WAIT_MS });
    step = 'read the jobs list';
    const readList = () => page.evaluate(() => ({
      rows: document.querySelectorAll('table#jobs tr.job-row').length,
      more_visible: !!document.querySelector('#jobs-more') && !document.querySelector('#jobs-more').hidden,
      page_height: document.documentElement.scrollHeight,
      progress: [...document.querySelectorAll('table#jobs td.job-progress[data-progress]')].map((td) => ({
        job_id: td.closest('tr').getAttribute('data-job-id'),
        stage: td.getAttribute('data-stage'),
        progress: Number(td.getAttribute('data-progress')),
      })),
      labels: [...document.querySelectorAll('table#jobs .label-chip')].map((c) => c.textContent),
      queued: Object.fromEntries([...document.querySelectorAll('.queued-count')]
        .map((el) => [el.getAttribute('data-model'), Number(el.getAttribute('data-count'))])),
    }));
    const list = await readList();
    step = 'screenshot the overview';
    shots.push(path.join(outDir, 'history-overview.png'));
    await page.screenshot({ path: shots.at(-1), fullPage: true });
    step = 'show more';
    if (list.more_visible) {
      await page.click('#jobs-more');
      await page.waitForFunction((n) => document.querySelectorAll('table#jobs tr.job-row').length > n,
        { polling: 100, timeout: WAIT_MS }, list.rows);
    }
    list.rows_after_more = (await readList()).rows;

    // c. The submit form of the model that declares params.
    step = 'open the submit form';
    await page.goto(`${base}/#/submit/${encodeURIComponent(model)}`, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });
    await page.waitForSelector(`form#submit-form[data-model=${q(model)}]`, { visible: true });
    const fields = await page.evaluate(() => [...document.querySelectorAll('#param-fields [name^="param."]')].map((el) => ({
      name: el.getAttribute('name').slice('param.'.length),
      type: el.tagName === 'SELECT' ? 'select' : el.getAttribute('type'),
      kind: el.getAttribute('data-kind'),
      value: el.type === 'checkbox' ? el.checked : el.value,
    })));
    step = 'screenshot the form';
    shots.push(path.join(outDir, 'history-submit.png'));
    await page.screenshot({ path: shots.at(-1), fullPage: true });
    step = 'fill and submit the form';
    await fill(page, 'input[name="input.prompt"]', 'a lighthouse at dusk');
    // The image input as a file: uploaded to /v1/files by the page, then named in the job.
    const png = path.join(outDir, 'tiny.png');
    writeFileSync(png, Buffer.from(TINY_PNG, 'base64'));
    await (await page.$('input[name="file.image"]')).uploadFile(png);
    await fill(page, 'input[name="param.steps"]', '3');
    await fill(page, 'input#labels', 'user=ada, session=s-7');
    await page.click('button#submit-button');
    const hash = await page.waitForFunction(
      () => (/^#\/jobs\/[^/?]+$/.test(location.hash) ? location.hash : false),
      { polling: 50, timeout: WAIT_MS },
    ).then((h) => h.jsonValue());
    const submitted = decodeURIComponent(hash.slice('#/jobs/'.length));
    step = 'wait for the new job\'s labels';
    await page.waitForSelector('#job-labels .label-chip');
    const submittedLabels = await page.$$eval('#job-labels .label-chip', (cs) => cs.map((c) => c.textContent));
    step = 'wait for the uploaded input\'s preview';
    const submittedImage = await page.waitForFunction(() => {
      const row = document.querySelector('#job-inputs .input[data-name="image"]');
      const img = row?.querySelector('img.input-preview');
      return img && img.complete && img.naturalWidth > 0
        ? { object: row.getAttribute('data-object'), link: row.querySelector('a.input-link')?.getAttribute('href'), width: img.naturalWidth }
        : false;
    }, { polling: 100, timeout: WAIT_MS }).then((h) => h.jsonValue());

    emit({
      ...job,
      list,
      form: { fields, submitted_job_id: submitted, submitted_labels: submittedLabels, submitted_image: submittedImage },
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

// As console.mjs: clears a field like a user would and types the value.
async function fill(page, selector, value) {
  const el = await page.waitForSelector(selector, { visible: true });
  await el.focus();
  await el.evaluate((e) => { try { e.select(); } catch { /* not every input type selects */ } });
  await page.keyboard.press('Backspace');
  await el.type(value);
  const got = await el.evaluate((e) => e.value);
  if (got !== value) {
    await el.evaluate((e, v) => {
      Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(e, v);
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
