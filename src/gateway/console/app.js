// Kiln web console: a dependency-free single page app served by the gateway.
//
// Rules this file keeps:
// - Server data only ever reaches the DOM through textContent/attributes (see `h`),
//   never innerHTML, so job params, messages and artifact names cannot inject markup.
// - Every view gets a context that owns its timers and EventSources; navigating
//   disposes it, so old polls and streams never write into the new page.
'use strict';

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);
const JOB_STATUSES = ['queued', 'running', 'retrying', 'completed', 'failed', 'cancelled'];
const KEY_STORAGE = 'kiln.api_key';
const JSON_PREVIEW_LIMIT = 2 * 1024 * 1024; // larger JSON artifacts are download-only

// ---------------------------------------------------------------- DOM helpers

// h('a', {href, class, text, onclick, 'data-x': 1}, ...children) builds an element.
// Attributes go through setAttribute and text through textContent: XSS-safe by design.
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = String(value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const $ = (sel, root = document) => root.querySelector(sel);

function badge(state, extraClass = '') {
  return h('span', { class: `badge state-${state} ${extraClass}`.trim(), text: state });
}

function jobLink(id) {
  return h('a', { href: `#/jobs/${encodeURIComponent(id)}`, class: 'mono', text: id });
}

function batchLink(id, text = id) {
  return h('a', { href: `#/batches/${encodeURIComponent(id)}`, class: 'mono', text });
}

function fmtBytes(n) {
  if (typeof n !== 'number' || !isFinite(n)) return '?';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

function fmtDateTime(ms) {
  return ms ? new Date(ms).toLocaleString() : '';
}

// A time of today as HH:MM:SS, of another day with its date.
function fmtShortTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

// HH:MM:SS.mmm: the timeline needs sub-second resolution to show ordering.
function fmtClock(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const pad = (v, n = 2) => String(v).padStart(n, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function fmtDuration(ms) {
  if (ms == null || ms < 0) return '';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

// Heartbeats are wall-clock epoch milliseconds; show them as an age.
function fmtAge(ms) {
  if (!ms) return '';
  return `${fmtDuration(Math.max(0, Date.now() - ms))} ago`;
}

// name=value chips for a job's labels (sorted, as the server keeps them).
function labelChips(labels) {
  const entries = Object.entries(labels || {});
  if (!entries.length) return null;
  return h('span', { class: 'labels' }, entries.map(([k, v]) => h('span', { class: 'label-chip', 'data-label': k, title: `${k}=${v}`, text: `${k}=${v}` })));
}

// Media kinds the browser can show inline, by content type or, for inputs (which carry
// none), by the file name's extension.
function mediaKind(contentType, name) {
  const type = (contentType || '').toLowerCase();
  if (/^image\/(png|jpeg|gif|webp)\b/.test(type)) return 'image';
  if (/^video\//.test(type)) return 'video';
  if (/^audio\//.test(type)) return 'audio';
  if (type) return null;
  const ext = (String(name || '').match(/\.([a-z0-9]+)$/i) || [])[1]?.toLowerCase();
  if (['png', 'jpg', 'jpeg', 'gif', 'webp'].includes(ext)) return 'image';
  if (['mp4', 'webm', 'mov', 'm4v'].includes(ext)) return 'video';
  if (['mp3', 'wav', 'ogg', 'flac', 'm4a'].includes(ext)) return 'audio';
  return null;
}

function mediaPreview(kind, url, name, cls = 'artifact-preview') {
  if (kind === 'image') return h('img', { class: cls, src: withToken(url), alt: name, loading: 'lazy' });
  if (kind === 'video') return h('video', { class: cls, src: withToken(url), controls: true, preload: 'metadata' });
  if (kind === 'audio') return h('audio', { class: `${cls} audio`, src: withToken(url), controls: true, preload: 'metadata' });
  return null;
}

function fmtError(err) {
  if (!err) return '';
  if (typeof err === 'string') return err;
  return [err.code, err.message].filter(Boolean).join(': ');
}

// ---------------------------------------------------------------- API key + banner

function apiKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ''; } catch { return ''; }
}

function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key just does not persist */ }
}

// EventSource, <img> and download links cannot send headers, so they carry the
// key as a query parameter instead.
function withToken(url) {
  const key = apiKey();
  if (!key) return url;
  return `${url}${url.includes('?') ? '&' : '?'}access_token=${encodeURIComponent(key)}`;
}

// One banner, tagged with the kind of problem so that a success only clears
// the problem it disproves (a 200 clears "unreachable" and "unauthorised").
let bannerKind = null;
function setBanner(kind, text) {
  const el = $('#banner');
  bannerKind = kind;
  el.textContent = text;
  el.hidden = !text;
}
function clearBanner(...kinds) {
  if (bannerKind && (kinds.length === 0 || kinds.includes(bannerKind))) setBanner(null, '');
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code);
    this.status = status;
    this.code = code;
  }
  toString() { return `${this.code}: ${this.message}`; }
}

// fetch wrapper: adds the bearer key, parses JSON, turns {code,message} bodies
// into ApiError and keeps the banner in sync with auth/connectivity.
async function api(path, { method = 'GET', json, body } = {}) {
  const headers = { Accept: 'application/json' };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body });
  } catch (err) {
    setBanner('network', `Cannot reach the Kiln gateway (${err.message}). Retrying…`);
    throw new ApiError(0, 'network', err.message);
  }
  if (res.status === 401 || res.status === 403) {
    setBanner('auth', key
      ? 'The gateway rejected the API key. Enter a valid key in the "API key" field at the top.'
      : 'This gateway requires an API key. Enter it in the "API key" field at the top.');
  } else {
    clearBanner('network', 'auth');
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (!res.ok) {
    const obj = data && typeof data === 'object' ? data : {};
    throw new ApiError(res.status, obj.code || `http_${res.status}`,
      obj.message || (typeof data === 'string' ? data : res.statusText));
  }
  return data;
}

// Runs `fn` with at most one call in flight; calls made meanwhile collapse into
// one rerun afterwards. Keeps poll results in request order (no stale overwrite).
function serial(fn) {
  let running = null;
  let again = false;
  return () => {
    if (running) { again = true; return running; }
    running = (async () => {
      try {
        do {
          again = false;
          try { await fn(); } catch (err) { console.warn(err); }
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
}

// ---------------------------------------------------------------- view context + router

class ViewContext {
  constructor() {
    this.alive = true;
    this.timers = new Set();
    this.sources = new Set();
  }
  // Poll fn every `ms`, waiting for each call to finish before scheduling the next.
  every(ms, fn) {
    const tick = async () => {
      if (!this.alive) return;
      try { await fn(); } catch (err) { console.warn(err); }
      if (this.alive) {
        const t = setTimeout(() => { this.timers.delete(t); tick(); }, ms);
        this.timers.add(t);
      }
    };
    tick();
  }
  stream(url) {
    const es = new EventSource(withToken(url));
    this.sources.add(es);
    return es;
  }
  dispose() {
    this.alive = false;
    this.timers.forEach(clearTimeout);
    this.sources.forEach((es) => es.close());
  }
}

let currentView = null;

function route() {
  if (currentView) currentView.dispose();
  const ctx = new ViewContext();
  currentView = ctx;
  clearBanner('action');

  const hash = location.hash.replace(/^#\/?/, '');
  const [section, ...rest] = hash.split('/');
  const arg = rest.length ? decodeURIComponent(rest.join('/')) : '';
  const view = $('#view');
  view.replaceChildren();

  if (section === '') renderOverview(ctx, view);
  else if (section === 'jobs' && arg) renderJob(ctx, view, arg);
  else if (section === 'batches' && arg) renderBatch(ctx, view, arg);
  else if (section === 'queue' && !arg) renderQueue(ctx, view);
  else if (section === 'submit' && arg) renderSubmit(ctx, view, arg);
  else view.append(h('p', { class: 'notice', text: `Unknown page "${location.hash}".` }), h('a', { href: '#/', text: 'Back to overview' }));
}

function notFound(view, what) {
  view.append(
    h('div', { class: 'notice', id: 'not-found' },
      h('h2', { text: `${what} not found` }),
      h('p', { text: 'The gateway does not know this id. It may be mistyped, or belong to another cluster.' }),
      h('a', { href: '#/', text: 'Back to overview' })));
}

// ---------------------------------------------------------------- overview

// Filters survive navigating to a job and back.
// The list shows `limit` jobs, newest first; "Show more" raises it by a page.
const JOBS_PAGE = 20;
const jobFilters = { status: '', model: '', limit: JOBS_PAGE };

function renderOverview(ctx, view) {
  const nodeSummary = h('ul', { class: 'node-summary' });
  const clusterBody = h('tbody');
  const clusterErr = h('span', { class: 'hint' });
  const modelsList = h('ul', { id: 'models' });
  const jobsBody = h('tbody');
  const jobsErr = h('span', { class: 'hint' });
  const jobsCount = h('span', { id: 'jobs-count', class: 'muted' });
  const jobsMore = h('button', { id: 'jobs-more', type: 'button', class: 'secondary', text: `Show ${JOBS_PAGE} more`, hidden: true });

  const statusSelect = h('select', { id: 'filter-status', 'aria-label': 'Filter by status' },
    h('option', { value: '', text: 'all statuses' }),
    JOB_STATUSES.map((s) => h('option', { value: s, text: s })));
  const modelSelect = h('select', { id: 'filter-model', 'aria-label': 'Filter by model' },
    h('option', { value: '', text: 'all models' }));
  statusSelect.value = jobFilters.status;

  const batchInput = h('input', { type: 'text', id: 'batch-open-id', placeholder: 'batch id', spellcheck: 'false' });
  const batchForm = h('form', { class: 'inline-form', id: 'batch-open' }, batchInput,
    h('button', { type: 'submit', text: 'Open batch' }));
  batchForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const id = batchInput.value.trim();
    if (id) location.hash = `#/batches/${encodeURIComponent(id)}`;
  });

  view.append(
    h('section', { class: 'panel' },
      h('div', { class: 'panel-head' }, h('h3', { text: 'Cluster' }), h('span', { class: 'spacer' }), clusterErr),
      nodeSummary,
      h('table', { id: 'cluster' },
        h('thead', {}, h('tr', {}, ['Node', 'Slot', 'State', 'Warm models', 'Memory', 'Current job', 'Restarts', 'Heartbeat', 'Last error']
          .map((t) => h('th', { text: t })))),
        clusterBody)),
    h('div', { class: 'columns' },
      h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h3', { text: 'Models' })),
        modelsList,
        h('h3', { text: 'Batch', style: 'margin-top:16px' }),
        batchForm),
      h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h3', { text: 'Jobs' }), statusSelect, modelSelect,
          h('span', { class: 'spacer' }), jobsErr),
        h('table', { id: 'jobs' },
          h('thead', {}, h('tr', {}, JOB_COLUMNS.map((t) => h('th', { text: t })))),
          jobsBody),
        h('div', { class: 'list-foot' }, jobsCount, jobsMore))));

  const refreshCluster = serial(async () => {
    try {
      const data = await api('/v1/cluster');
      if (!ctx.alive) return;
      renderCluster(data, nodeSummary, clusterBody);
      clusterErr.textContent = '';
    } catch (err) {
      clusterErr.textContent = `update failed: ${err}`;
    }
  });

  const refreshJobs = serial(async () => {
    // One more than shown tells whether there are more.
    const query = new URLSearchParams({ limit: String(jobFilters.limit + 1) });
    if (jobFilters.status) query.set('status', jobFilters.status);
    if (jobFilters.model) query.set('model', jobFilters.model);
    try {
      const data = await api(`/v1/jobs?${query}`);
      if (!ctx.alive) return;
      const jobs = data.jobs || [];
      const more = jobs.length > jobFilters.limit;
      const shown = jobs.slice(0, jobFilters.limit);
      renderJobRows(shown, jobsBody);
      jobsCount.textContent = shown.length ? `newest ${shown.length}${more ? '' : ' (all)'}` : '';
      jobsMore.hidden = !more;
      jobsErr.textContent = '';
    } catch (err) {
      jobsErr.textContent = `update failed: ${err}`;
    }
  });

  // How many jobs wait in the queue, per model (shown beside each model, a link to the queue
  // page): one `/v1/queue` for every model, its lanes in the count's title.
  const refreshQueued = serial(async () => {
    try {
      const data = await api('/v1/queue');
      if (!ctx.alive) return;
      const byModel = new Map((data.models || []).map((m) => [m.model, m]));
      for (const el of modelsList.querySelectorAll('.queued-count')) {
        const m = byModel.get(el.getAttribute('data-model'));
        const n = m?.queued ?? 0;
        el.setAttribute('data-count', n);
        el.textContent = `${n} queued`;
        el.title = m ? [...QUEUE_LANES.map((lane) => `${lane} ${laneOf(m, lane)?.queued ?? 0}`), `${m.running ?? 0} running`].join(' · ') : '';
        el.classList.toggle('zero', n === 0);
      }
    } catch (err) {
      console.warn(err);
    }
  });

  const resetPage = () => { jobFilters.limit = JOBS_PAGE; };
  statusSelect.addEventListener('change', () => { jobFilters.status = statusSelect.value; resetPage(); refreshJobs(); });
  modelSelect.addEventListener('change', () => { jobFilters.model = modelSelect.value; resetPage(); refreshJobs(); });
  jobsMore.addEventListener('click', () => { jobFilters.limit += JOBS_PAGE; refreshJobs(); });

  // Models change only with the config, so one fetch (retried until it works) is enough.
  ctx.every(5000, async () => {
    if (modelsList.dataset.loaded) return;
    try {
      const data = await api('/v1/models');
      if (!ctx.alive) return;
      renderModels(data.models || [], modelsList, modelSelect);
      modelsList.dataset.loaded = '1';
      refreshQueued();
    } catch (err) {
      modelsList.replaceChildren(h('li', { class: 'muted', text: `Could not load models: ${err}` }));
    }
  });
  ctx.every(1000, refreshCluster);
  ctx.every(2000, refreshJobs);
  ctx.every(3000, refreshQueued);
}

function renderCluster(data, summary, body) {
  summary.replaceChildren(...(data.nodes || []).map((n) => h('li', {},
    h('strong', { text: n.node }),
    ` · v${n.version || '?'} · slots ${(n.slots || []).join(', ') || 'none'} · ${n.running_jobs ?? 0} running`,
    ` · heartbeat ${fmtAge(n.heartbeat_ms)} · up ${fmtDuration(Date.now() - n.started_ms)}`,
    (n.peers || []).length ? ` · peers: ${n.peers.join(', ')}` : '')));

  const gpus = [...(data.gpus || [])].sort((a, b) =>
    String(a.node).localeCompare(String(b.node)) || Number(a.slot) - Number(b.slot));
  const rows = gpus.map((g) => h('tr', { class: 'gpu-row', 'data-node': g.node, 'data-slot': g.slot },
    h('td', { text: g.node }),
    h('td', { text: g.slot }),
    // The cell's text must be exactly the state: the badge is its only content.
    h('td', { class: 'gpu-state' }, badge(g.state)),
    h('td', { title: `serves: ${(g.models || []).join(', ')}`, text: (g.warm_models || []).join(', ') || '—' }),
    memoryCell(g),
    // A multi-GPU model's group (primary first) shows as the job cell's tooltip.
    h('td', { title: (g.group || []).length ? `group: ${g.group.join(', ')}` : '' }, g.current_job ? jobLink(g.current_job) : ''),
    h('td', { text: g.restarts ?? 0 }),
    h('td', { class: 'muted', text: fmtAge(g.heartbeat_ms) }),
    h('td', { class: 'error-cell', title: g.last_error || '', text: g.last_error || '' })));
  body.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 9, class: 'empty', text: 'No GPU slots reported.' }))]));
}

// A slot's memory: what its resident models hold of its budget, and each model's bytes with
// where the figure comes from (measured, declared, estimated); `min_warm` models are pinned.
function memoryCell(g) {
  const resident = g.resident || [];
  const used = resident.reduce((sum, r) => sum + (r.bytes || 0), 0);
  const total = g.memory_budget_bytes ? `${fmtBytes(used)} of ${fmtBytes(g.memory_budget_bytes)}` : fmtBytes(used);
  return h('td', { class: 'gpu-memory', 'data-used': used },
    h('div', { text: total }),
    ...resident.map((r) => h('div', { class: 'muted', 'data-model': r.model, 'data-bytes': r.bytes,
      text: `${r.model} ${fmtBytes(r.bytes)} ${r.source}${r.pinned ? ' · pinned' : ''}` })));
}

function renderModels(models, list, select) {
  list.replaceChildren(...models.map((m) => h('li', {},
    h('div', { class: 'model-head' },
      h('strong', { text: m.name }),
      h('a', { class: 'queued-count zero', 'data-model': m.name, href: '#/queue', text: '' }),
      h('a', { class: 'submit-link', 'data-model': m.name, href: `#/submit/${encodeURIComponent(m.name)}`, text: 'submit' })),
    h('div', { class: 'model-meta', text: [
      m.engine && `engine ${m.engine}`,
      `inputs: ${(m.required_inputs || []).join(', ') || 'none'}`,
      `slots: ${(m.slots || []).join(', ') || 'any'}`,
      (m.warm_on || []).length && `warm on: ${m.warm_on.join(', ')}`,
      m.max_attempts && `max attempts ${m.max_attempts}`,
      m.timeout_ms && `timeout ${fmtDuration(m.timeout_ms)}`,
    ].filter(Boolean).join(' · ') }))));
  if (!models.length) list.append(h('li', { class: 'muted', text: 'No models configured.' }));

  select.replaceChildren(h('option', { value: '', text: 'all models' }),
    ...models.map((m) => h('option', { value: m.name, text: m.name })));
  select.value = jobFilters.model;
}

const JOB_COLUMNS = ['Job', 'Model', 'Status', 'Progress', 'Attempt', 'Labels', 'Created', 'Duration', 'Placement', 'Batch'];

// Where a running job is: its stage and a small bar (the list's view carries both).
function progressCell(j) {
  const td = h('td', { class: 'job-progress' });
  if (j.status !== 'running') return td;
  if (j.stage) td.setAttribute('data-stage', j.stage);
  if (j.progress != null) {
    const p = Math.max(0, Math.min(100, Number(j.progress)));
    td.setAttribute('data-progress', p);
    td.append(h('progress', { max: 100, value: p }), h('span', { class: 'pct', text: `${Math.round(p)}%` }));
  }
  td.append(h('span', { class: 'stage muted', text: j.stage || (j.progress == null ? 'starting' : '') }));
  return td;
}

function renderJobRows(jobs, body) {
  const rows = jobs.map((j) => {
    // The whole job's time: from its submission to its end (or now).
    const end = j.finished_ms || Date.now();
    const row = h('tr', { class: 'job-row', 'data-job-id': j.job_id, 'data-status': j.status },
      // The id's first 8 characters keep a row on one line; the whole id is its title.
      h('td', { class: 'job-id' }, h('a', { href: `#/jobs/${encodeURIComponent(j.job_id)}`, class: 'mono', title: j.job_id, text: String(j.job_id).slice(0, 8) })),
      h('td', { text: j.model }),
      h('td', {}, badge(j.status)),
      progressCell(j),
      h('td', { text: `${j.attempt ?? 0}/${j.max_attempts ?? '?'}` }),
      h('td', { class: 'job-labels' }, labelChips(j.labels)),
      h('td', { class: 'muted nowrap', title: fmtDateTime(j.created_ms), text: fmtShortTime(j.created_ms) }),
      h('td', { class: 'muted nowrap', title: 'since it was submitted', text: j.created_ms ? fmtDuration(end - j.created_ms) : '' }),
      h('td', { text: j.node ? `${j.node}/${j.slot ?? '?'}` : '' }),
      h('td', {}, j.batch ? batchLink(j.batch.batch_id, `${j.batch.batch_id}#${j.batch.index}`) : ''));
    // The whole row is clickable; clicks on the inner links keep their own target.
    row.addEventListener('click', (e) => {
      if (!e.target.closest('a')) location.hash = `#/jobs/${encodeURIComponent(j.job_id)}`;
    });
    return row;
  });
  body.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: JOB_COLUMNS.length, class: 'empty', text: 'No jobs match.' }))]));
}

// ---------------------------------------------------------------- queue page

// The queue as `GET /v1/queue` measures it (docs/PROTOCOL.md, `kiln.api.queue`): per model its
// depth by lane, oldest wait, running jobs, the slots serving it and the slots that would start
// every queued job within the target wait; per lane, when the reply has them, its fair-share keys.
const QUEUE_REFRESH_MS = 2000;
const QUEUE_LANES = ['high', 'normal'];
// Per lane, at most this many keys are listed (those with the most queued); the rest are counted.
const QUEUE_TOP_KEYS = 10;
const QUEUE_COLUMNS = ['Model', 'Queued', 'High', 'Normal', 'Oldest wait', 'Running', 'Slots', 'Busy', 'Mean run', 'Desired slots'];

const laneOf = (m, lane) => (m.lanes || []).find((l) => l.lane === lane);

// The keys of a lane to list: most queued first (then most running, then by key), at most
// `limit`, and what the others add up to. `keys` may be absent (a gateway before fair share).
function topKeys(keys, limit = QUEUE_TOP_KEYS) {
  const sorted = [...(keys || [])].sort((a, b) => (b.queued ?? 0) - (a.queued ?? 0)
    || (b.running ?? 0) - (a.running ?? 0) || String(a.key ?? '').localeCompare(String(b.key ?? '')));
  const rest = sorted.slice(limit);
  return { shown: sorted.slice(0, limit), more: rest.length, moreQueued: rest.reduce((n, k) => n + (k.queued ?? 0), 0) };
}

function renderQueue(ctx, view) {
  const measured = h('span', { id: 'queue-measured', class: 'muted' });
  const err = h('span', { class: 'hint' });
  const body = h('tbody');
  view.append(h('section', { class: 'panel' },
    h('div', { class: 'panel-head' }, h('h3', { text: 'Queue' }), measured, h('span', { class: 'spacer' }), err),
    h('table', { id: 'queue' },
      h('thead', {}, h('tr', {}, QUEUE_COLUMNS.map((t) => h('th', { text: t })))),
      body),
    h('p', { class: 'hint', text: 'Queued: jobs never yet delivered to a slot. Running: delivered and not yet settled (running, '
      + 'waiting out a retry\'s backoff, or held by a lost node until handed back). Slots: live slots serving the model; busy: '
      + 'of those, the ones running a job (possibly another model\'s). Desired slots: running plus the slots that would start '
      + 'every queued job within the target wait, from the mean run time of its recent jobs.' })));

  ctx.every(QUEUE_REFRESH_MS, async () => {
    try {
      const data = await api('/v1/queue');
      if (!ctx.alive) return;
      renderQueueRows(data, body, measured);
      err.textContent = '';
    } catch (e) {
      err.textContent = `update failed: ${e}`;
    }
  });
}

function renderQueueRows(data, body, measured) {
  measured.textContent = `measured ${fmtClock(data.measured_ms)} · target wait ${data.target_wait_s ?? '?'} s`;
  measured.setAttribute('data-measured-ms', data.measured_ms ?? '');
  const rows = [];
  for (const m of data.models || []) {
    const laneCell = (lane) => {
      const l = laneOf(m, lane);
      return h('td', { class: 'q-lane', 'data-lane': lane },
        h('span', { class: 'n', text: l?.queued ?? 0 }),
        l?.running ? h('span', { class: 'lane-running muted', text: ` · ${l.running} running` }) : null);
    };
    const num = (cls, n, title) => h('td', { class: `num ${cls}`, title, text: n ?? 0 });
    rows.push(h('tr', { class: 'queue-row', 'data-model': m.model },
      h('td', {}, h('strong', { text: m.model })),
      num('q-queued', m.queued),
      laneCell('high'),
      laneCell('normal'),
      h('td', { class: 'num q-oldest', 'data-ms': m.oldest_wait_ms, text: m.oldest_wait_ms == null ? '—' : fmtDuration(m.oldest_wait_ms) }),
      num('q-running', m.running),
      num('q-slots', m.slots),
      num('q-busy', m.busy_slots),
      h('td', { class: 'num q-mean', title: m.service_samples ? `over its last ${m.service_samples} finished jobs` : 'no finished job yet',
        text: m.mean_service_ms == null ? '—' : fmtDuration(m.mean_service_ms) }),
      num('q-desired', m.desired_slots, `slots that would start every queued job within ${data.target_wait_s ?? '?'} s, the running ones included`)));
    const lanesWithKeys = (m.lanes || []).filter((l) => (l.keys || []).length);
    if (lanesWithKeys.length) {
      rows.push(h('tr', { class: 'queue-keys', 'data-model': m.model },
        h('td', {}), h('td', { colspan: QUEUE_COLUMNS.length - 1 }, lanesWithKeys.map(laneKeys))));
    }
  }
  body.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: QUEUE_COLUMNS.length, class: 'empty', text: 'No models.' }))]));
}

// One lane's fair-share keys: the top ones with their queued and running jobs, then the rest
// counted. A key's value is the job's fair-share label (`[fair_share] key`); null (or "") is
// the shared queue of the jobs without it.
function laneKeys(lane) {
  const { shown, more, moreQueued } = topKeys(lane.keys);
  return h('div', { class: 'lane-keys', 'data-lane': lane.lane },
    h('span', { class: 'lane-name', text: `${lane.lane} by key` }),
    h('ol', { class: 'keys' },
      shown.map((k) => h('li', { class: 'key', 'data-key': k.key ?? '', 'data-queued': k.queued ?? 0, 'data-running': k.running ?? 0 },
        h('span', { class: 'key-name mono', title: k.key ?? '', text: (k.key ?? '') === '' ? '(no key)' : k.key }),
        ` ${k.queued ?? 0} queued · ${k.running ?? 0} running`)),
      more ? h('li', { class: 'more muted', 'data-more': more, text: `and ${more} more (${moreQueued} queued)` }) : null));
}

// ---------------------------------------------------------------- job page

function artifactUrl(jobId, name) {
  return `/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(name)}`;
}

async function renderJob(ctx, view, jobId) {
  let job;
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  } catch (err) {
    if (!ctx.alive) return;
    if (err.status === 404) return notFound(view, `Job ${jobId}`);
    view.append(h('div', { class: 'error-box', text: `Could not load job ${jobId}: ${err}` }));
    return;
  }
  if (!ctx.alive) return;

  const statusEl = h('span', { id: 'job-status' });
  const attemptEl = h('dd', { id: 'job-attempt' });
  const placementEl = h('dd', { id: 'job-placement' });
  const timesEl = h('dd', { id: 'job-times' });
  const flagsEl = h('dd', { id: 'job-flags' });
  const labelsEl = h('dd', { id: 'job-labels' });
  const inputsEl = h('div', { id: 'job-inputs' });
  const attemptsBody = h('tbody');
  const progress = h('progress', { id: 'job-progress', max: 100, value: 0 });
  const progressLabel = h('span', { class: 'muted', text: '0%' });
  const liveEl = h('span', { class: 'live muted' });
  const errorEl = h('div', { id: 'job-error', class: 'error-box', hidden: true });
  const actions = h('div', { class: 'actions' });
  const artifactsEl = h('div', { id: 'artifacts' });
  const artifactsEmpty = h('p', { class: 'muted', text: 'No artifacts yet.' });
  const timeline = h('ol', { id: 'job-timeline' });
  const detailsPre = h('pre', { class: 'json' });
  // The job's live preview (`event: preview`, never stored): hidden until one comes.
  const previewImg = h('img', { id: 'job-preview', class: 'live-preview', alt: 'live preview' });
  const previewCaption = h('p', { id: 'job-preview-caption', class: 'muted' });
  const previewPanel = h('section', { class: 'panel', id: 'job-preview-panel', hidden: true },
    h('h3', { text: 'Live preview' }), previewImg, previewCaption);
  // The job's webhook delivery log (`GET /v1/jobs/{id}/webhooks`): hidden while it is empty.
  const webhooksBody = h('tbody');
  const webhooksPanel = h('section', { class: 'panel', id: 'job-webhooks', hidden: true },
    h('div', { class: 'panel-head' }, h('h3', { text: 'Webhooks' }), h('span', { class: 'spacer' }),
      h('button', { id: 'job-webhooks-redeliver', type: 'button', text: 'Redeliver' })),
    h('table', {},
      h('thead', {}, h('tr', {}, ['Message', 'Type', 'URL', '#', 'Sent', 'Answer', 'Latency', 'Outcome'].map((t) => h('th', { text: t })))),
      webhooksBody));
  const root = h('div', { id: 'job', 'data-job-id': job.job_id || jobId, 'data-status': job.status });

  root.append(
    h('section', { class: 'panel' },
      h('div', { class: 'panel-head' },
        h('h2', {}, 'Job ', h('span', { class: 'mono', text: job.job_id || jobId })), statusEl,
        h('span', { class: 'spacer' }), liveEl, actions),
      h('dl', { class: 'meta' },
        h('dt', { text: 'Model' }), h('dd', {}, h('a', { href: `#/submit/${encodeURIComponent(job.model)}`, text: job.model })),
        h('dt', { text: 'Attempt' }), attemptEl,
        h('dt', { text: 'Node / slot' }), placementEl,
        h('dt', { text: 'Priority' }), h('dd', { text: job.priority ?? '' }),
        h('dt', { text: 'Times' }), timesEl,
        h('dt', { text: 'Labels' }), labelsEl,
        job.batch && h('dt', { text: 'Batch' }),
        job.batch && h('dd', {}, batchLink(job.batch.batch_id), ` item ${job.batch.index}`),
        h('dt', { text: 'Flags' }), flagsEl),
      h('div', { class: 'progress-line' }, progress, progressLabel),
      errorEl),
    previewPanel,
    h('section', { class: 'panel' }, h('h3', { text: 'Attempts' }),
      h('table', { id: 'job-attempts' },
        h('thead', {}, h('tr', {}, ['#', 'Node / slot', 'Started', 'Ended', 'Time', 'Outcome'].map((t) => h('th', { text: t })))),
        attemptsBody)),
    h('section', { class: 'panel' }, h('h3', { text: 'Inputs' }), inputsEl),
    h('section', { class: 'panel' }, h('h3', { text: 'Artifacts' }), artifactsEmpty, artifactsEl),
    webhooksPanel,
    h('section', { class: 'panel' }, h('h3', { text: 'Timeline' }), timeline),
    h('section', { class: 'panel' }, h('details', {}, h('summary', { text: 'Params and inputs' }), detailsPre)));
  view.append(root);

  // Errors keyed by attempt: a retried job shows why each earlier attempt failed.
  const errors = new Map();
  let status = null;
  let terminalSeen = false;
  // Every event seen, in stream order: the attempts table is derived from them.
  const events = [];
  let lastView = job;

  function showAttempts() {
    const rows = attemptsOf(events, lastView);
    attemptsBody.replaceChildren(...(rows.length ? rows.map((a) => h('tr', {
      class: 'attempt-row', 'data-attempt': a.attempt, 'data-outcome': a.outcome, 'data-reason': a.reason || '',
    },
    h('td', { text: a.attempt }),
    h('td', { text: a.placement || '' }),
    h('td', { class: 'muted', text: fmtClock(a.started) }),
    h('td', { class: 'muted', text: fmtClock(a.ended) }),
    h('td', { class: 'attempt-time', text: a.started ? fmtDuration((a.ended || Date.now()) - a.started) : '' }),
    h('td', { class: 'attempt-outcome', title: a.detail || '' }, badge(a.outcome),
      a.reason ? h('span', { class: 'reason mono', text: ` ${a.reason}` }) : '',
      a.detail ? h('span', { class: 'muted', text: ` ${String(a.detail).split('\n')[0]}` }) : ''),
    )) : [h('tr', {}, h('td', { colspan: 6, class: 'empty', text: 'No attempt has started yet.' }))]));
  }

  function showErrors() {
    const lines = [...errors.entries()].sort((a, b) => a[0] - b[0])
      .map(([attempt, err]) => `Attempt ${attempt} failed: ${fmtError(err)}`);
    errorEl.textContent = lines.join('\n');
    errorEl.hidden = lines.length === 0;
  }

  function setProgress(p) {
    const v = Math.max(0, Math.min(100, Number(p) || 0));
    progress.value = v;
    progressLabel.textContent = `${v.toFixed(v % 1 ? 1 : 0)}%`;
  }

  function setStatus(next) {
    if (!next) return;
    // The stream and refetches can interleave; a terminal status is final.
    if (terminalSeen && !TERMINAL.has(next)) return;
    status = next;
    terminalSeen = TERMINAL.has(next);
    root.setAttribute('data-status', next);
    statusEl.replaceChildren(badge(next));
    if (next === 'completed') setProgress(100);
    if (terminalSeen) $('#job-cancel', actions)?.remove();
  }

  function renderCancel(v) {
    if (terminalSeen) return;
    let btn = $('#job-cancel', actions);
    if (!btn) {
      btn = h('button', { id: 'job-cancel', type: 'button', class: 'danger', text: 'Cancel job' });
      btn.addEventListener('click', async () => {
        btn.disabled = true;
        btn.textContent = 'Cancelling…';
        try {
          applyJob(await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: 'POST' }));
        } catch (err) {
          btn.disabled = false;
          btn.textContent = 'Cancel job';
          setBanner('action', `Cancel failed: ${err}`);
        }
      });
      actions.append(btn);
    }
    if (v.cancel_requested) {
      btn.disabled = true;
      btn.textContent = 'Cancel requested';
    }
  }

  function applyJob(v) {
    if (!ctx.alive || !v) return;
    setStatus(v.status);
    attemptEl.textContent = `${v.attempt ?? 0} / ${v.max_attempts ?? '?'}`;
    placementEl.textContent = v.node ? `${v.node} / ${v.slot ?? '?'}` : '—';
    lastView = v;
    // The whole job's time (submission to end), not only its last attempt's.
    const total = v.created_ms ? (v.finished_ms || Date.now()) - v.created_ms : null;
    timesEl.replaceChildren(
      h('span', { id: 'job-total', 'data-ms': total ?? '', text: total != null ? `${fmtDuration(total)} in all` : '' }),
      h('span', { class: 'muted', text: ' · ' + [
        `created ${fmtDateTime(v.created_ms)}`,
        v.started_ms && `attempt ${v.attempt} started ${fmtDateTime(v.started_ms)}`,
        v.finished_ms && `finished ${fmtDateTime(v.finished_ms)}`,
      ].filter(Boolean).join(' · ') }));
    labelsEl.replaceChildren(labelChips(v.labels) || '—');
    renderInputs(v.inputs || {}, inputsEl);
    showAttempts();
    flagsEl.textContent = [v.cancel_requested && 'cancel requested', v.dead_letter && 'dead letter']
      .filter(Boolean).join(', ') || '—';
    if (v.error) { errors.set(Number(v.attempt) || 0, v.error); showErrors(); }
    renderCancel(v);
    renderArtifacts(ctx, jobId, v.artifacts || [], artifactsEl);
    artifactsEmpty.hidden = (v.artifacts || []).length > 0;
    detailsPre.textContent = JSON.stringify({ params: v.params || {}, inputs: v.inputs || {} }, null, 2);
  }

  const refetch = serial(async () => {
    if (!ctx.alive) return;
    applyJob(await api(`/v1/jobs/${encodeURIComponent(jobId)}`));
    loadWebhooks();
  });

  const loadWebhooks = serial(async () => {
    let log;
    try { log = await api(`/v1/jobs/${encodeURIComponent(jobId)}/webhooks`); } catch { return; }
    if (!ctx.alive) return;
    const attempts = log.attempts || [];
    webhooksPanel.hidden = attempts.length === 0;
    webhooksBody.replaceChildren(...attempts.map((a) => h('tr', { class: 'webhook-attempt', 'data-outcome': a.outcome },
      h('td', { class: 'mono', text: a.webhook_id }),
      h('td', { text: a.type }),
      h('td', { class: 'mono', text: a.url }),
      h('td', { text: a.manual ? `${a.attempt} (manual)` : a.attempt }),
      h('td', { class: 'muted', text: fmtDateTime(a.ts_ms) }),
      h('td', { text: a.status_code != null ? String(a.status_code) : '', title: a.error || '' },
        a.error ? h('span', { class: 'muted', text: ` ${a.error}` }) : ''),
      h('td', { text: `${a.latency_ms} ms` }),
      h('td', {}, badge(a.outcome)))));
  });
  $('#job-webhooks-redeliver', webhooksPanel).addEventListener('click', async () => {
    try {
      await api(`/v1/jobs/${encodeURIComponent(jobId)}/webhooks/redeliver`, { method: 'POST' });
      setTimeout(loadWebhooks, 1500);
    } catch (err) {
      setBanner('action', `Redeliver failed: ${err}`);
    }
  });
  loadWebhooks();

  applyJob(job);

  // The stream replays the full history, so the timeline starts empty and is fed
  // only by events; ids dedupe replays after an EventSource reconnect.
  const seen = new Set();
  const es = ctx.stream(`/v1/jobs/${encodeURIComponent(jobId)}/events`);
  let polling = false;
  liveEl.textContent = 'connecting…';

  const onEvent = (e) => {
    if (e.lastEventId) {
      if (seen.has(e.lastEventId)) return;
      seen.add(e.lastEventId);
    }
    let ev;
    try { ev = JSON.parse(e.data); } catch { return; }
    const type = ev.type || e.type;
    events.push(ev);
    addToTimeline(timeline, type, ev);
    showAttempts();
    // A `retrying` event carries the previous attempt's error, already shown under that attempt.
    if (ev.error && type !== 'retrying') { errors.set(Number(ev.attempt) || 0, ev.error); showErrors(); }
    // A job already ended shows its ending: the replayed history must not move the bar back.
    if (type === 'progress' && ev.progress != null && !terminalSeen) setProgress(ev.progress);
    if (ev.attempt != null && !terminalSeen) attemptEl.textContent = `${ev.attempt} / ${job.max_attempts ?? '?'}`;
    if (type === 'status') {
      setStatus(ev.status);
      if (TERMINAL.has(ev.status)) {
        previewPanel.hidden = true;
        closeWhenEnded(ctx, es);
        liveEl.textContent = 'finished';
      }
      refetch(); // picks up node/slot, error and final artifacts
    } else if (type === 'artifact') {
      refetch();
    }
  };
  for (const type of ['status', 'retrying', 'progress', 'message', 'artifact']) es.addEventListener(type, onEvent);
  // Previews come live only, without an id (the stream opens with the newest kept one): each
  // replaces the image; once the job has ended its artifacts show instead.
  let previewSeq = 0;
  es.addEventListener('preview', (e) => {
    if (terminalSeen) return;
    let p;
    try { p = JSON.parse(e.data); } catch { return; }
    previewSeq += 1;
    previewImg.setAttribute('data-seq', p.seq);
    previewImg.setAttribute('data-count', previewSeq);
    previewImg.src = `data:${p.content_type};base64,${p.data_base64}`;
    previewCaption.textContent = `attempt ${p.attempt}, preview ${p.seq} at ${fmtClock(p.ts_ms)}`;
    previewPanel.hidden = false;
  });
  es.onmessage = onEvent; // events without an `event:` line
  es.onopen = () => { liveEl.textContent = 'live'; };
  es.onerror = () => {
    if (!ctx.alive || terminalSeen) return;
    if (es.readyState === EventSource.CONNECTING) {
      liveEl.textContent = 'reconnecting…';
    } else if (!polling) {
      // The stream was refused (auth, proxy): fall back to polling the job view.
      polling = true;
      liveEl.textContent = 'live stream unavailable; polling';
      ctx.every(2000, async () => { if (!terminalSeen) await refetch(); });
    }
  };
}

// After the terminal event the server ends the stream, which EventSource treats as
// an error and would answer by reconnecting: close it right then. Closing before the
// server has ended the response would abort it (a failed request in the browser log),
// so an immediate close is only the fallback should the server keep it open.
function closeWhenEnded(ctx, es) {
  es.addEventListener('error', () => es.close());
  const timer = setTimeout(() => es.close(), 2000);
  ctx.timers.add(timer);
}

// Each attempt of a job from its events (and its view, for the current one): when it ran,
// where, and how it ended: its terminal status, `failed` (then retried) with its error, or
// `lost` (its node died or went silent); the next attempt's `retrying` event gives the reason.
const LOST_REASONS = new Set(['node_lost', 'ack_wait_expired']);

function attemptsOf(events, view) {
  const byAttempt = new Map();
  const get = (n) => {
    if (!byAttempt.has(n)) byAttempt.set(n, { attempt: n, outcome: 'running' });
    return byAttempt.get(n);
  };
  for (const ev of events) {
    const n = Number(ev.attempt) || 0;
    if (n < 1) continue;
    if (ev.type === 'retrying') {
      // Attempt n runs because attempt n-1 did not finish: that is n-1's ending.
      const prev = get(n - 1);
      prev.reason = ev.reason;
      if (!TERMINAL.has(prev.outcome)) prev.outcome = LOST_REASONS.has(ev.reason) ? 'lost' : 'failed';
      prev.detail = ev.message || '';
      if (!prev.ended) prev.ended = ev.ts_ms;
      get(n).queuedAt = ev.ts_ms;
      continue;
    }
    const a = get(n);
    if (ev.type === 'status' && ev.status === 'running' && !a.started) a.started = ev.ts_ms;
    if (ev.type === 'status' && ev.status === 'retrying') {
      a.outcome = 'failed';
      a.ended = ev.ts_ms;
      if (!a.detail && ev.error) a.detail = fmtError(ev.error);
    }
    if (ev.type === 'status' && TERMINAL.has(ev.status)) {
      a.outcome = ev.status;
      a.ended = ev.ts_ms;
      if (ev.error) a.detail = fmtError(ev.error);
    }
  }
  const current = Number(view?.attempt) || 0;
  if (current >= 1) {
    const a = get(current);
    if (view.node) a.placement = `${view.node} / ${view.slot ?? '?'}`;
    if (!a.started && view.started_ms) a.started = view.started_ms;
    if (TERMINAL.has(view.status)) {
      a.outcome = view.status;
      a.ended = a.ended || view.finished_ms;
    }
  }
  // The attempt 0 placeholder a `retrying` event of attempt 1 could make is no attempt.
  byAttempt.delete(0);
  return [...byAttempt.values()].sort((x, y) => x.attempt - y.attempt);
}

// Consecutive progress events of one attempt and stage collapse into one row that shows the
// newest values and how many ticks it stands for; any other event starts a new row.
function addToTimeline(timeline, type, ev) {
  const last = timeline.lastElementChild;
  if (type === 'progress' && last && last.getAttribute('data-type') === 'progress'
      && last.getAttribute('data-attempt') === String(ev.attempt ?? '')
      && last.getAttribute('data-stage') === String(ev.stage ?? '')) {
    const ticks = Number(last.getAttribute('data-ticks')) + 1;
    const first = last.getAttribute('data-first-progress');
    const item = timelineItem(type, ev);
    item.setAttribute('data-ticks', ticks);
    if (first !== '') item.setAttribute('data-first-progress', first);
    const detail = $('.detail', item);
    if (first !== '' && ev.progress != null) {
      detail.textContent = [`stage ${ev.stage ?? ''}`.trim(), `${Number(first).toFixed(1)}% → ${Number(ev.progress).toFixed(1)}%`, ev.message]
        .filter(Boolean).join(' · ');
    }
    detail.append(h('span', { class: 'ticks muted', text: ` (${ticks} updates)` }));
    last.replaceWith(item);
    return;
  }
  const item = timelineItem(type, ev);
  if (type === 'progress') {
    item.setAttribute('data-ticks', 1);
    item.setAttribute('data-first-progress', ev.progress ?? '');
  }
  timeline.append(item);
}

function timelineItem(type, ev) {
  const parts = [];
  if (ev.reason) parts.push(`reason ${ev.reason}`);
  if (ev.status) parts.push(`status ${ev.status}`);
  if (ev.stage) parts.push(`stage ${ev.stage}`);
  if (ev.progress != null) parts.push(`${Number(ev.progress).toFixed(1)}%`);
  if (ev.message) parts.push(ev.message);
  if (ev.artifact) parts.push(`artifact ${ev.artifact.name || ''} (${fmtBytes(ev.artifact.size)})`);
  // The error is left out where the message already says it (a failure's `retrying`).
  if (ev.error && !(ev.message || '').includes(ev.error.message || '\u0000')) parts.push(`error ${fmtError(ev.error)}`);
  return h('li', {
    class: `event event-${type}${ev.error ? ' has-error' : ''}`, 'data-type': type,
    'data-attempt': ev.attempt ?? '', 'data-stage': ev.stage ?? '', 'data-reason': ev.reason || null,
  },
    h('span', { class: 'time', text: fmtClock(ev.ts_ms) }),
    h('span', { class: 'type', text: type }),
    h('span', { class: 'attempt muted', title: 'attempt', text: ev.attempt != null ? `#${ev.attempt}` : '' }),
    h('span', { class: 'detail', text: parts.join(' · ') }));
}

function isJsonArtifact(a) {
  return /^application\/json\b/i.test(a.content_type || '') || /\.json$/i.test(a.name || '');
}

// Re-rendering keeps existing artifact cards (same name and digest) so image
// previews and fetched JSON are not reloaded on every refetch.
function renderArtifacts(ctx, jobId, artifacts, container) {
  const existing = new Map([...container.querySelectorAll('.artifact')].map((n) => [n.getAttribute('data-name'), n]));
  const cards = artifacts.map((a) => {
    const old = existing.get(a.name);
    if (old && old.getAttribute('data-sha256') === String(a.sha256 || '')) return old;
    return artifactCard(ctx, jobId, a);
  });
  container.replaceChildren(...cards);
}

function artifactCard(ctx, jobId, a) {
  const url = artifactUrl(jobId, a.name);
  const type = (a.content_type || '').toLowerCase();
  const card = h('div', { class: 'artifact', 'data-name': a.name, 'data-sha256': a.sha256 || '' },
    h('div', { class: 'name', text: a.name }),
    h('div', { class: 'muted', text: `${a.content_type || 'unknown type'} · ${fmtBytes(a.size)}` }));

  const media = mediaKind(type, a.name);
  if (media) {
    card.append(mediaPreview(media, url, a.name));
  } else if (isJsonArtifact(a)) {
    const pre = h('pre', { class: 'artifact-json', text: 'loading…' });
    card.append(pre);
    loadJsonArtifact(ctx, url, a, pre);
  }
  card.append(
    h('div', { class: 'sha', title: 'sha256', text: a.sha256 ? `sha256 ${a.sha256}` : '' }),
    h('a', { class: 'artifact-download', href: withToken(url), download: a.name, text: `Download (${fmtBytes(a.size)})` }));
  return card;
}

async function loadJsonArtifact(ctx, url, a, pre) {
  if (a.size > JSON_PREVIEW_LIMIT) {
    pre.textContent = `Too large to preview (${fmtBytes(a.size)}); use the download link.`;
    return;
  }
  try {
    const headers = {};
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    const res = await fetch(url, { headers });
    const text = await res.text();
    if (!ctx.alive) return;
    if (!res.ok) { pre.textContent = `Could not load (${res.status}): ${text}`; return; }
    try { pre.textContent = JSON.stringify(JSON.parse(text), null, 2); } catch { pre.textContent = text; }
  } catch (err) {
    pre.textContent = `Could not load: ${err.message}`;
  }
}

// A job's inputs: an uploaded file as a link to it (and a preview when the browser can show
// it), an inline value as its text. Rebuilt only when they change (they never do).
function renderInputs(inputs, container) {
  const key = JSON.stringify(inputs);
  if (container.getAttribute('data-key') === key) return;
  container.setAttribute('data-key', key);
  const entries = Object.entries(inputs);
  container.replaceChildren(...(entries.length ? entries.map(([name, value]) => {
    const object = value && typeof value === 'object' && Object.keys(value).length === 1 && typeof value.object === 'string'
      ? value.object : null;
    const row = h('div', { class: 'input', 'data-name': name }, h('div', { class: 'name', text: name }));
    if (object) {
      const url = `/v1/files/${object.split('/').map(encodeURIComponent).join('/')}`;
      const base = object.split('/').pop();
      row.setAttribute('data-object', object);
      row.append(h('a', { class: 'input-link', href: withToken(url), download: base, text: base, title: object }));
      const preview = mediaPreview(mediaKind('', base), url, name, 'input-preview');
      if (preview) row.append(preview);
    } else {
      row.append(h('div', { class: 'input-value', text: typeof value === 'string' ? value : JSON.stringify(value) }));
    }
    return row;
  }) : [h('p', { class: 'muted', text: 'No inputs.' })]));
}

// ---------------------------------------------------------------- submit page

async function renderSubmit(ctx, view, model) {
  let models;
  try {
    models = (await api('/v1/models')).models || [];
  } catch (err) {
    if (ctx.alive) view.append(h('div', { class: 'error-box', text: `Could not load models: ${err}` }));
    return;
  }
  if (!ctx.alive) return;
  const spec = models.find((m) => m.name === model);
  if (!spec) return notFound(view, `Model ${model}`);

  const inputs = spec.required_inputs || [];
  const declared = spec.params || [];
  const params = h('textarea', { id: 'params', name: 'params', spellcheck: 'false', rows: declared.length ? 3 : 6,
    class: declared.length ? 'short' : null });
  params.value = '{}';
  const labelsInput = h('input', { type: 'text', id: 'labels', name: 'labels', spellcheck: 'false',
    placeholder: 'user_id=u-1, session_id=s-7' });
  const errorEl = h('div', { id: 'submit-error', class: 'error-box', hidden: true });
  const button = h('button', { id: 'submit-button', type: 'submit', text: 'Submit job' });

  const form = h('form', { id: 'submit-form', 'data-model': spec.name, class: 'panel', novalidate: true },
    h('h2', {}, 'Submit to ', h('span', { class: 'mono', text: spec.name })),
    h('p', { class: 'muted', text: [spec.engine && `engine ${spec.engine}`,
      `slots ${(spec.slots || []).join(', ') || 'any'}`, spec.max_attempts && `max attempts ${spec.max_attempts}`]
      .filter(Boolean).join(' · ') }),
    inputs.map((name) => h('div', { class: 'field' },
      h('label', { for: `input-${name}`, text: name }),
      h('div', { class: 'field-row' },
        h('input', { type: 'text', id: `input-${name}`, name: `input.${name}`, placeholder: `${name} (text)` }),
        h('input', { type: 'file', name: `file.${name}`, 'aria-label': `${name} file` })),
      h('div', { class: 'hint', text: 'Type a value or pick a file; a chosen file wins.' }))),
    inputs.length ? null : h('p', { class: 'muted', text: 'This model needs no inputs.' }),
    declared.length ? h('div', { class: 'param-grid', id: 'param-fields' }, declared.map(paramField)) : null,
    h('div', { class: 'field' },
      h('label', { for: 'params', text: declared.length ? 'More params (JSON object; wins over the fields)' : 'Params (JSON object)' }), params),
    h('div', { class: 'field' },
      h('label', { for: 'labels', text: 'Labels' }), labelsInput,
      h('div', { class: 'hint', text: 'name=value pairs, separated by commas: shown with the job, on its events, and filterable.' })),
    errorEl,
    button);
  view.append(form);

  const showError = (text) => { errorEl.textContent = text; errorEl.hidden = !text; };

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    showError('');
    let parsed;
    try { parsed = JSON.parse(params.value.trim() || '{}'); } catch (err) {
      showError(`Params are not valid JSON: ${err.message}`);
      return;
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
      showError('Params must be a JSON object, e.g. {"steps": 30}.');
      return;
    }
    let fields;
    try { fields = paramValues(form, declared); } catch (err) { showError(err.message); return; }
    let labels;
    try { labels = parseLabels(labelsInput.value); } catch (err) { showError(err.message); return; }

    button.disabled = true;
    button.textContent = 'Submitting…';
    try {
      // Files are uploaded first (POST /v1/files), then the job is submitted as JSON naming
      // them: a JSON submit carries labels, which a multipart one would take for an input.
      // Empty inputs are left out so the server reports them as missing.
      const request = { model: spec.name, inputs: {}, params: { ...fields, ...parsed } };
      if (Object.keys(labels).length) request.labels = labels;
      for (const name of inputs) {
        const file = form.elements[`file.${name}`].files[0];
        const text = form.elements[`input.${name}`].value;
        if (file) {
          const upload = new FormData();
          upload.append('file', file, file.name);
          const stored = await api('/v1/files', { method: 'POST', body: upload });
          request.inputs[name] = { object: stored.files[0].name };
        } else if (text !== '') {
          request.inputs[name] = text;
        }
      }
      const reply = await api('/v1/jobs', { method: 'POST', json: request });
      if (ctx.alive) location.hash = `#/jobs/${encodeURIComponent(reply.job_id)}`;
    } catch (err) {
      showError(`${err.code}: ${err.message}`);
    } finally {
      button.disabled = false;
      button.textContent = 'Submit job';
    }
  });
}

// One typed field per declared param: a number (with its range), a checkbox, a list of its
// choices, or text; filled with its default.
function paramField(p) {
  const id = `param-${p.name}`;
  const name = `param.${p.name}`;
  const hint = [p.kind, p.min != null && `min ${p.min}`, p.max != null && `max ${p.max}`, p.required && 'required']
    .filter(Boolean).join(' · ');
  let input;
  if (p.kind === 'bool') {
    input = h('input', { type: 'checkbox', id, name, 'data-kind': p.kind });
    input.checked = p.default === true;
  } else if ((p.choices || []).length) {
    input = h('select', { id, name, 'data-kind': p.kind },
      p.required || p.default != null ? null : h('option', { value: '', text: '(not set)' }),
      p.choices.map((c) => h('option', { value: c, text: c })));
    input.value = p.default != null ? String(p.default) : '';
  } else if (p.kind === 'int' || p.kind === 'float') {
    input = h('input', { type: 'number', id, name, 'data-kind': p.kind, min: p.min, max: p.max, step: p.kind === 'int' ? 1 : 'any' });
    if (p.default != null) input.value = String(p.default);
  } else {
    input = h('input', { type: 'text', id, name, 'data-kind': p.kind, spellcheck: 'false',
      placeholder: p.kind === 'any' ? 'JSON value' : '' });
    if (p.default != null) input.value = p.kind === 'any' ? JSON.stringify(p.default) : String(p.default);
  }
  return h('div', { class: 'field', 'data-param': p.name },
    h('label', { for: id, text: p.name }), input, h('div', { class: 'hint', text: hint }));
}

// The declared params' fields as values of their kinds; an empty field is left out (the
// server fills in its default or says it is required).
function paramValues(form, declared) {
  const values = {};
  for (const p of declared) {
    const el = form.elements[`param.${p.name}`];
    if (!el) continue;
    if (p.kind === 'bool') { values[p.name] = el.checked; continue; }
    const raw = el.value.trim();
    if (raw === '') continue;
    if (p.kind === 'int' || p.kind === 'float') {
      const n = Number(raw);
      if (!Number.isFinite(n) || (p.kind === 'int' && !Number.isInteger(n))) {
        throw new Error(`Param ${p.name} must be ${p.kind === 'int' ? 'a whole number' : 'a number'}.`);
      }
      values[p.name] = n;
    } else if (p.kind === 'any') {
      try { values[p.name] = JSON.parse(raw); } catch { values[p.name] = raw; }
    } else {
      values[p.name] = raw;
    }
  }
  return values;
}

// `a=1, b=2` as {a: "1", b: "2"}.
function parseLabels(text) {
  const labels = {};
  for (const part of text.split(',').map((x) => x.trim()).filter(Boolean)) {
    const at = part.indexOf('=');
    if (at <= 0) throw new Error(`Label "${part}" is not name=value.`);
    labels[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return labels;
}

// ---------------------------------------------------------------- batch page

async function renderBatch(ctx, view, batchId) {
  const path = `/v1/batches/${encodeURIComponent(batchId)}`;
  let batch;
  try {
    batch = await api(path);
  } catch (err) {
    if (!ctx.alive) return;
    if (err.status === 404) return notFound(view, `Batch ${batchId}`);
    view.append(h('div', { class: 'error-box', text: `Could not load batch ${batchId}: ${err}` }));
    return;
  }
  if (!ctx.alive) return;

  const statusEl = h('span', { id: 'batch-status' });
  const liveEl = h('span', { class: 'live muted' });
  const actions = h('div', { class: 'actions' });
  const summaryEl = h('div', { class: 'summary', id: 'batch-summary' });
  const metaEl = h('p', { class: 'muted' });
  const linksEl = h('p', {});
  const errorEl = h('div', { id: 'batch-error', class: 'error-box', hidden: true });
  const itemsBody = h('tbody');
  const root = h('div', { id: 'batch', 'data-batch-id': batch.batch_id || batchId, 'data-status': batch.status },
    h('section', { class: 'panel' },
      h('div', { class: 'panel-head' },
        h('h2', {}, 'Batch ', h('span', { class: 'mono', text: batch.batch_id || batchId })), statusEl,
        h('span', { class: 'spacer' }), liveEl, actions),
      metaEl, linksEl, summaryEl, errorEl),
    h('section', { class: 'panel' },
      h('table', { id: 'batch-items' },
        h('thead', {}, h('tr', {}, ['#', 'Job', 'Status', 'Artifacts', 'Error'].map((t) => h('th', { text: t })))),
        itemsBody)));
  view.append(root);

  function apply(b) {
    if (!ctx.alive || !b) return;
    root.setAttribute('data-status', b.status);
    statusEl.replaceChildren(badge(b.status));
    metaEl.textContent = [`model ${b.model}`, `created ${fmtDateTime(b.created_ms)}`,
      b.finished_ms && `finished ${fmtDateTime(b.finished_ms)}`].filter(Boolean).join(' · ');
    linksEl.replaceChildren(
      b.retry_of ? h('span', {}, 'Retry of ', batchLink(b.retry_of), '. ') : '',
      b.retried_by ? h('span', {}, 'Retried by ', batchLink(b.retried_by), '.') : '');

    // Show every numeric summary field the server sends, known ones first.
    const summary = b.summary || {};
    const keys = ['total', 'completed', 'failed', 'cancelled',
      ...Object.keys(summary).filter((k) => !['total', 'completed', 'failed', 'cancelled'].includes(k))];
    summaryEl.replaceChildren(...keys.filter((k) => typeof summary[k] === 'number').map((k) =>
      h('div', { 'data-key': k }, h('span', { class: 'count', text: summary[k] }), h('span', { class: 'label', text: k }))));

    const items = [...(b.items || [])].sort((x, y) => x.index - y.index);
    itemsBody.replaceChildren(...items.map((it) => h('tr', { class: 'batch-item', 'data-index': it.index, 'data-status': it.status },
      h('td', { text: it.index }),
      h('td', {}, it.job_id ? jobLink(it.job_id) : ''),
      h('td', {}, badge(it.status)),
      h('td', { text: (it.artifacts || []).length || '' }),
      h('td', { class: 'error-cell', title: fmtError(it.error), text: fmtError(it.error) }))));

    // Retry is offered once the batch is over and something did not complete.
    const unfinished = items.filter((it) => it.status === 'failed' || it.status === 'cancelled').length
      || (summary.failed || 0) + (summary.cancelled || 0);
    const canRetry = b.status !== 'running' && unfinished > 0;
    let btn = $('#batch-retry', actions);
    if (canRetry && !btn) {
      btn = h('button', { id: 'batch-retry', type: 'button', text: `Retry failed (${unfinished})` });
      btn.addEventListener('click', () => retry(btn));
      actions.append(btn);
    } else if (!canRetry && btn) {
      btn.remove();
    }
  }

  async function retry(btn) {
    btn.disabled = true;
    errorEl.hidden = true;
    try {
      const reply = await api(`${path}/retry`, { method: 'POST' });
      if (ctx.alive) location.hash = `#/batches/${encodeURIComponent(reply.batch_id)}`;
    } catch (err) {
      btn.disabled = false;
      errorEl.textContent = `Retry failed: ${err}`;
      errorEl.hidden = false;
    }
  }

  const refetch = serial(async () => { if (ctx.alive) apply(await api(path)); });
  apply(batch);
  if (batch.status !== 'running') return;

  // Item events only say that something changed; the batch view is the truth.
  const es = ctx.stream(`${path}/events`);
  let finished = false;
  liveEl.textContent = 'connecting…';
  const onEvent = (e) => {
    let type = e.type;
    try { type = JSON.parse(e.data).type || type; } catch { /* keep the SSE event name */ }
    if (type === 'batch_finished') {
      finished = true;
      closeWhenEnded(ctx, es);
      liveEl.textContent = 'finished';
    }
    refetch();
  };
  for (const type of ['item_completed', 'item_failed', 'batch_finished']) es.addEventListener(type, onEvent);
  es.onmessage = onEvent;
  es.onopen = () => { liveEl.textContent = 'live'; };
  es.onerror = () => {
    if (!ctx.alive || finished) return;
    if (es.readyState === EventSource.CONNECTING) {
      liveEl.textContent = 'reconnecting…';
    } else {
      liveEl.textContent = 'live stream unavailable; polling';
      ctx.every(2000, async () => {
        if (root.getAttribute('data-status') === 'running') await refetch();
      });
    }
  };
}

// ---------------------------------------------------------------- boot

function setupApiKeyForm() {
  const form = $('#api-key-form');
  const input = $('#api-key');
  const state = $('#api-key-state');
  const show = () => { state.textContent = apiKey() ? 'key set' : 'no key'; input.value = ''; };
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setApiKey(key);
    show();
    clearBanner('auth');
    route(); // reload the page's data with the new credentials
  });
  $('#api-key-clear').addEventListener('click', () => {
    setApiKey('');
    show();
    route();
  });
  show();
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', () => {
  setupApiKeyForm();
  route();
});
