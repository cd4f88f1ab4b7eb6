// Watches the web console's overview in a real headless chromium while the cluster changes:
// opens it once, then waits for the cluster table to show each expected set of slots in turn,
// without reloading or re-rendering the page (the overview must update itself).
//
//   node tests/browser/overview.mjs <gateway_base_url> <out_dir> <phase> [<phase> ...]
//
// A phase is a comma-separated list of <node>=<slot count>, e.g. `n1=2` then `n1=2,n2=3`: it is
// reached when table#cluster has a tr.gpu-row for exactly those nodes, with exactly that many
// distinct slots each, and every row's state cell is filled. Each phase has PHASE_MS from the
// previous one; the caller changes the cluster when it reads a phase's line.
//
// Env: as console.mjs (KILN_CHROMIUM, KILN_NODE_MODULES; see launch.mjs).
//
// Prints one JSON line on stdout per phase reached, as soon as it is:
//   {"phase": i, "rows": [{"node", "slot", "state", "badge_class"}], "screenshot", "elapsed_ms"}
// then one last line. Success (exit 0):
//   {"done": true, "phases": n, "rows": [..] (as last shown), "same_document", "same_table",
//    "main_frame_navigations", "url", "screenshots": [..], "console_errors": [..]}
// where same_document says no reload happened (a marker set on `window` after the first phase is
// still there), same_table that the view was not rebuilt either (a marker on the table element),
// and main_frame_navigations counts navigations after the first load (hash changes included).
// Failure (exit 1): {"error", "step", "html", "url", "console_errors"}, with <out_dir>/failure.png
// when a screenshot could still be taken.
import { mkdirSync } from 'node:fs';
import path from 'node:path';

import { describeFailure, launch } from './launch.mjs';

const WAIT_MS = 30_000; // the page load
const PHASE_MS = 60_000; // each phase, from the previous one
const WATCHDOG_MS = 150_000; // the whole run, so a hang still ends in a JSON line

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
    const m = /^([^=]+)=(\d+)$/.exec(part.trim());
    if (!m) throw new Error(`bad phase "${arg}": want <node>=<slot count>[,...]`);
    want[m[1]] = Number(m[2]);
  }
  return want;
}

async function main() {
  const [baseArg, outArg, ...phaseArgs] = process.argv.slice(2);
  if (!baseArg || !outArg || phaseArgs.length === 0) {
    throw new Error('usage: node tests/browser/overview.mjs <gateway_base_url> <out_dir> <node>=<slots>[,...] ...');
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
    let navigations = 0;
    page.on('framenavigated', (frame) => { if (frame === page.mainFrame()) navigations += 1; });

    const screenshots = [];
    let rows = [];
    for (const [i, want] of phases.entries()) {
      step = `phase ${i}: wait for table#cluster to show ${phaseArgs[i]}`;
      rows = await page.waitForFunction((want) => {
        const rows = [...document.querySelectorAll('table#cluster tr.gpu-row')].map((tr) => ({
          node: tr.getAttribute('data-node'),
          slot: tr.getAttribute('data-slot'),
          state: tr.querySelector('td.gpu-state')?.textContent.trim() ?? '',
          badge_class: tr.querySelector('td.gpu-state .badge')?.className ?? '',
        }));
        const slots = {};
        for (const r of rows) (slots[r.node] ??= new Set()).add(r.slot);
        const nodes = Object.keys(slots);
        const match = nodes.length === Object.keys(want).length
          && nodes.every((n) => slots[n].size === want[n])
          && rows.every((r) => r.state !== '');
        return match ? rows : false;
      }, { polling: 100, timeout: PHASE_MS }, want).then((h) => h.jsonValue()).catch(async (e) => {
        const shown = await page.$$eval('table#cluster tr.gpu-row',
          (trs) => trs.map((tr) => `${tr.getAttribute('data-node')}/${tr.getAttribute('data-slot')}`)).catch(() => null);
        throw new Error(`${e.message}; rows shown: ${JSON.stringify(shown)}`);
      });
      if (i === 0) {
        // Markers that a reload (window) or a re-render of the view (the table) would lose.
        await page.evaluate(() => {
          window.__kilnOverviewMark = 'kept';
          document.querySelector('table#cluster').__kilnOverviewMark = 'kept';
        });
      }
      step = `phase ${i}: screenshot`;
      const shot = path.join(outDir, `overview-${i}.png`);
      await page.screenshot({ path: shot, fullPage: true });
      screenshots.push(shot);
      line({ phase: i, rows, screenshot: shot, elapsed_ms: Date.now() - started });
    }

    step = 'check the page was neither reloaded nor re-rendered';
    const marks = await page.evaluate(() => ({
      same_document: window.__kilnOverviewMark === 'kept',
      same_table: document.querySelector('table#cluster')?.__kilnOverviewMark === 'kept',
    }));
    finish({
      done: true,
      phases: phases.length,
      rows,
      ...marks,
      main_frame_navigations: navigations,
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
