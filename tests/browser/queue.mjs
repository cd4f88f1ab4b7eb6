// Watches the web console's queue in a real headless chromium while the cluster's queue fills
// and drains: opens the overview and waits for the model's "N queued" (from /v1/queue), follows
// the nav link to the queue page (#/queue), then waits for the model's row to show each expected
// set of figures in turn, without reloading or re-rendering the page (it must update itself).
//
//   node tests/browser/queue.mjs <gateway_base_url> <model> <out_dir> <phase> [<phase> ...]
//
// A phase is a comma-separated list of <figure>=<n>, figures among high, normal (the lanes'
// queued), queued, running, slots, busy, desired; e.g. `high=2,normal=3,running=1`. It is reached
// when table#queue's tr.queue-row for the model shows exactly those numbers. The overview's count
// must first equal the first phase's queued (its `queued`, else high + normal). Each phase has
// PHASE_MS from the previous one; the caller changes the cluster when it reads a phase's line.
//
// Env: as console.mjs (KILN_CHROMIUM, KILN_NODE_MODULES; see launch.mjs).
//
// Prints one JSON line on stdout per phase reached, as soon as it is:
//   {"phase": i, "row": {model, queued, high, normal, high_running, normal_running, oldest_ms,
//    oldest_text, running, slots, busy, mean_text, desired, keys: {lane: {keys: [{key, queued,
//    running, text}], more}}}, "measured_ms", "measured_text", "screenshot", "elapsed_ms"}
// (oldest_ms null when the page shows none) then one last line. Success (exit 0):
//   {"done": true, "overview_queued", "row" (as last shown), "same_document", "same_table",
//    "rendered_keys", "url", "screenshots": [..], "console_errors": [..]}
// where same_document says no reload happened after the queue page was opened (a marker set on
// `window`), same_table that its table was not rebuilt (a marker on the table element), and
// rendered_keys is what the page's own lane-keys renderer (app.js `laneKeys`) makes of a lane
// with 12 keys, read from the DOM it builds: the key lists of today's replies may be absent, so
// the list's cut at 10 is checked on a made-up lane.
// Failure (exit 1): {"error", "step", "html", "url", "console_errors"}, with <out_dir>/failure.png
// when a screenshot could still be taken.
import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { describeFailure, launch, q } from './launch.mjs';

const WAIT_MS = 30_000; // the page load
const PHASE_MS = 60_000; // each phase, from the previous one
const WATCHDOG_MS = 150_000; // the whole run, so a hang still ends in a JSON line
const FIGURES = ['high', 'normal', 'queued', 'running', 'slots', 'busy', 'desired'];

let step = 'args';
let done = false;
const consoleErrors = [];

function line(obj) {
  if (done) return;
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function finish(obj) {
  line(obj);
  done = true;
}

function parsePhase(arg) {
  const want = {};
  for (const part of arg.split(',')) {
    const m = /^([a-z]+)=(\d+)$/.exec(part.trim());
    if (!m || !FIGURES.includes(m[1])) throw new Error(`bad phase "${arg}": want <figure>=<n>[,...] with figures ${FIGURES.join(', ')}`);
    want[m[1]] = Number(m[2]);
  }
  return want;
}

// The model's row of table#queue as numbers and texts; null while it has none. `quotedModel`: the
// model's name as a CSS string (q(model)). Runs in the page.
function readRow(quotedModel) {
  const tr = document.querySelector(`table#queue tr.queue-row[data-model=${quotedModel}]`);
  if (!tr) return null;
  const text = (sel) => tr.querySelector(sel)?.textContent.trim() ?? null;
  const num = (sel) => {
    const t = text(sel);
    return t == null || t === '' || isNaN(Number(t)) ? null : Number(t);
  };
  const oldest = tr.querySelector('td.q-oldest');
  const keys = {};
  const keysRow = document.querySelector(`table#queue tr.queue-keys[data-model=${quotedModel}]`);
  for (const div of keysRow ? keysRow.querySelectorAll('.lane-keys') : []) {
    keys[div.getAttribute('data-lane')] = {
      keys: [...div.querySelectorAll('li.key')].map((li) => ({
        key: li.getAttribute('data-key'),
        queued: Number(li.getAttribute('data-queued')),
        running: Number(li.getAttribute('data-running')),
        text: li.textContent.trim(),
      })),
      more: Number(div.querySelector('li.more')?.getAttribute('data-more') ?? 0),
    };
  }
  return {
    model: tr.getAttribute('data-model'),
    queued: num('td.q-queued'),
    high: num('td.q-lane[data-lane=high] .n'),
    normal: num('td.q-lane[data-lane=normal] .n'),
    high_running: text('td.q-lane[data-lane=high] .lane-running'),
    normal_running: text('td.q-lane[data-lane=normal] .lane-running'),
    oldest_ms: oldest?.hasAttribute('data-ms') ? Number(oldest.getAttribute('data-ms')) : null,
    oldest_text: oldest?.textContent.trim() ?? null,
    running: num('td.q-running'),
    slots: num('td.q-slots'),
    busy: num('td.q-busy'),
    mean_text: text('td.q-mean'),
    desired: num('td.q-desired'),
    keys,
  };
}

async function main() {
  const [baseArg, model, outArg, ...phaseArgs] = process.argv.slice(2);
  if (!baseArg || !model || !outArg || phaseArgs.length === 0) {
    throw new Error('usage: node tests/browser/queue.mjs <gateway_base_url> <model> <out_dir> <figure>=<n>[,...] ...');
  }
  const phases = phaseArgs.map(parsePhase);
  const base = baseArg.replace(/\/+$/, '');
  const outDir = path.resolve(outArg);
  mkdirSync(outDir, { recursive: true });

  step = 'launch';
  let page;
  let close;
  try {
    ({ page, close } = await launch({ waitMs: WAIT_MS, consoleErrors }));
    const started = Date.now();

    step = 'open overview';
    await page.goto(`${base}/#/`, { waitUntil: 'domcontentloaded', timeout: WAIT_MS });
    const first = phases[0];
    const overviewWant = first.queued ?? ((first.high ?? 0) + (first.normal ?? 0));
    step = `wait for the overview's count of ${model} to say ${overviewWant} queued`;
    const overviewQueued = await page.waitForFunction((sel, want) => {
      const el = document.querySelector(sel);
      return el && Number(el.getAttribute('data-count')) === want && el.textContent === `${want} queued` ? want : false;
    }, { polling: 100, timeout: WAIT_MS }, `#models .queued-count[data-model=${q(model)}]`, overviewWant)
      .then((h) => h.jsonValue());

    step = 'follow the nav link to the queue page';
    await page.click('#nav-queue');
    await page.waitForSelector('table#queue', { timeout: WAIT_MS });
    await page.evaluate(() => { window.__kilnQueueMark = 'kept'; });
    let navigations = 0;
    page.on('framenavigated', (frame) => { if (frame === page.mainFrame()) navigations += 1; });

    const screenshots = [];
    let row = null;
    for (const [i, want] of phases.entries()) {
      step = `phase ${i}: wait for ${model}'s row of table#queue to show ${phaseArgs[i]}`;
      // readRow goes to the page as source text: an expression puppeteer evaluates as it is.
      const rowNow = `(${readRow})(${JSON.stringify(q(model))})`;
      row = await page.waitForFunction(
        `(() => { const row = ${rowNow}; const want = ${JSON.stringify(want)};
          return row && Object.entries(want).every(([k, v]) => row[k] === v) ? row : false; })()`,
        { polling: 100, timeout: PHASE_MS }).then((h) => h.jsonValue()).catch(async (e) => {
        const shown = await page.evaluate(rowNow).catch(() => null);
        throw new Error(`${e.message}; row shown: ${JSON.stringify(shown)}`);
      });
      if (i === 0) {
        await page.evaluate(() => { document.querySelector('table#queue').__kilnQueueMark = 'kept'; });
      }
      const measured = await page.evaluate(() => {
        const el = document.querySelector('#queue-measured');
        return { ms: Number(el?.getAttribute('data-measured-ms')), text: el?.textContent ?? '' };
      });
      step = `phase ${i}: screenshot`;
      const shot = path.join(outDir, `queue-${i}.png`);
      await page.screenshot({ path: shot, fullPage: true });
      screenshots.push(shot);
      line({ phase: i, row, measured_ms: measured.ms, measured_text: measured.text, screenshot: shot, elapsed_ms: Date.now() - started });
    }

    step = 'check the page was neither reloaded nor re-rendered';
    const marks = await page.evaluate(() => ({
      same_document: window.__kilnQueueMark === 'kept',
      same_table: document.querySelector('table#queue')?.__kilnQueueMark === 'kept',
    }));

    step = 'render a lane of 12 keys with the page\'s own renderer';
    const renderedKeys = await page.evaluate(() => {
      const keys = Array.from({ length: 12 }, (_, i) => ({ key: i === 11 ? null : `user-${i}`, queued: i, running: i % 3 }));
      const div = laneKeys({ lane: 'normal', queued: 66, running: 0, keys });
      return {
        keys: [...div.querySelectorAll('li.key')].map((li) => ({ key: li.getAttribute('data-key'), text: li.textContent.trim() })),
        more: div.querySelector('li.more')?.textContent.trim() ?? null,
        without_keys: laneKeys({ lane: 'high', queued: 0, running: 0 }).querySelectorAll('li').length,
      };
    });

    finish({
      done: true,
      overview_queued: overviewQueued,
      row,
      ...marks,
      main_frame_navigations: navigations,
      rendered_keys: renderedKeys,
      url: page.url(),
      screenshots,
      console_errors: consoleErrors,
    });
  } catch (e) {
    const failure = { error: String(e?.message ?? e), step, html: null, url: null, console_errors: consoleErrors };
    if (page) Object.assign(failure, await describeFailure(page, outDir));
    finish(failure);
    process.exitCode = 1;
  } finally {
    if (close) await close();
  }
}

setTimeout(() => {
  finish({ error: `watchdog: no result after ${WATCHDOG_MS} ms`, step, html: null, url: null, console_errors: consoleErrors });
  process.exit(1);
}, WATCHDOG_MS).unref();

main().catch((e) => {
  finish({ error: String(e?.message ?? e), step, html: null, url: null, console_errors: consoleErrors });
  process.exitCode = 1;
}).finally(() => process.exit(process.exitCode ?? 0));
