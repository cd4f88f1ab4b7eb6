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
const jobFilters = { status: '', model: '' };

function renderOverview(ctx, view) {
  const nodeSummary = h('ul', { class: 'node-summary' });
  const clusterBody = h('tbody');
  const clusterErr = h('span', { class: 'hint' });
  const modelsList = h('ul', { id: 'models' });
  const jobsBody = h('tbody');
  const jobsErr = h('span', { class: 'hint' });

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
        h('thead', {}, h('tr', {}, ['Node', 'Slot', 'State', 'Warm models', 'Current job', 'Restarts', 'Heartbeat', 'Last error']
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
          h('thead', {}, h('tr', {}, ['Job', 'Model', 'Status', 'Attempt', 'Created', 'Duration', 'Placement', 'Batch']
            .map((t) => h('th', { text: t })))),
          jobsBody))));

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
    const query = new URLSearchParams({ limit: '50' });
    if (jobFilters.status) query.set('status', jobFilters.status);
    if (jobFilters.model) query.set('model', jobFilters.model);
    try {
      const data = await api(`/v1/jobs?${query}`);
      if (!ctx.alive) return;
      renderJobRows(data.jobs || [], jobsBody);
      jobsErr.textContent = '';
    } catch (err) {
      jobsErr.textContent = `update failed: ${err}`;
    }
  });

  statusSelect.addEventListener('change', () => { jobFilters.status = statusSelect.value; refreshJobs(); });
  modelSelect.addEventListener('change', () => { jobFilters.model = modelSelect.value; refreshJobs(); });

  // Models change only with the config, so one fetch (retried until it works) is enough.
  ctx.every(5000, async () => {
    if (modelsList.dataset.loaded) return;
    try {
      const data = await api('/v1/models');
      if (!ctx.alive) return;
      renderModels(data.models || [], modelsList, modelSelect);
      modelsList.dataset.loaded = '1';
    } catch (err) {
      modelsList.replaceChildren(h('li', { class: 'muted', text: `Could not load models: ${err}` }));
    }
  });
  ctx.every(1000, refreshCluster);
  ctx.every(2000, refreshJobs);
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
    h('td', {}, g.current_job ? jobLink(g.current_job) : ''),
    h('td', { text: g.restarts ?? 0 }),
    h('td', { class: 'muted', text: fmtAge(g.heartbeat_ms) }),
    h('td', { class: 'error-cell', title: g.last_error || '', text: g.last_error || '' })));
  body.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 8, class: 'empty', text: 'No GPU slots reported.' }))]));
}

function renderModels(models, list, select) {
  list.replaceChildren(...models.map((m) => h('li', {},
    h('div', { class: 'model-head' },
      h('strong', { text: m.name }),
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

function renderJobRows(jobs, body) {
  const rows = jobs.map((j) => {
    const end = j.finished_ms || (j.started_ms ? Date.now() : null);
    const row = h('tr', { class: 'job-row', 'data-job-id': j.job_id },
      h('td', {}, jobLink(j.job_id)),
      h('td', { text: j.model }),
      h('td', {}, badge(j.status)),
      h('td', { text: `${j.attempt ?? 0}/${j.max_attempts ?? '?'}` }),
      h('td', { class: 'muted', text: fmtDateTime(j.created_ms) }),
      h('td', { class: 'muted', text: j.started_ms ? fmtDuration(end - j.started_ms) : '' }),
      h('td', { text: j.node ? `${j.node}/${j.slot ?? '?'}` : '' }),
      h('td', {}, j.batch ? batchLink(j.batch.batch_id, `${j.batch.batch_id}#${j.batch.index}`) : ''));
    // The whole row is clickable; clicks on the inner links keep their own target.
    row.addEventListener('click', (e) => {
      if (!e.target.closest('a')) location.hash = `#/jobs/${encodeURIComponent(j.job_id)}`;
    });
    return row;
  });
  body.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 8, class: 'empty', text: 'No jobs match.' }))]));
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
  const progress = h('progress', { id: 'job-progress', max: 100, value: 0 });
  const progressLabel = h('span', { class: 'muted', text: '0%' });
  const liveEl = h('span', { class: 'live muted' });
  const errorEl = h('div', { id: 'job-error', class: 'error-box', hidden: true });
  const actions = h('div', { class: 'actions' });
  const artifactsEl = h('div', { id: 'artifacts' });
  const artifactsEmpty = h('p', { class: 'muted', text: 'No artifacts yet.' });
  const timeline = h('ol', { id: 'job-timeline' });
  const detailsPre = h('pre', { class: 'json' });
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
        job.batch && h('dt', { text: 'Batch' }),
        job.batch && h('dd', {}, batchLink(job.batch.batch_id), ` item ${job.batch.index}`),
        h('dt', { text: 'Flags' }), flagsEl),
      h('div', { class: 'progress-line' }, progress, progressLabel),
      errorEl),
    h('section', { class: 'panel' }, h('h3', { text: 'Artifacts' }), artifactsEmpty, artifactsEl),
    h('section', { class: 'panel' }, h('h3', { text: 'Timeline' }), timeline),
    h('section', { class: 'panel' }, h('details', {}, h('summary', { text: 'Params and inputs' }), detailsPre)));
  view.append(root);

  // Errors keyed by attempt: a retried job shows why each earlier attempt failed.
  const errors = new Map();
  let status = null;
  let terminalSeen = false;

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
    timesEl.textContent = [
      `created ${fmtDateTime(v.created_ms)}`,
      v.started_ms && `started ${fmtDateTime(v.started_ms)}`,
      v.finished_ms && `finished ${fmtDateTime(v.finished_ms)}`,
      v.started_ms && v.finished_ms && `(${fmtDuration(v.finished_ms - v.started_ms)})`,
    ].filter(Boolean).join(' · ');
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
  });

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
    timeline.append(timelineItem(type, ev));
    if (ev.error) { errors.set(Number(ev.attempt) || 0, ev.error); showErrors(); }
    // A job already ended shows its ending: the replayed history must not move the bar back.
    if (type === 'progress' && ev.progress != null && !terminalSeen) setProgress(ev.progress);
    if (ev.attempt != null && !terminalSeen) attemptEl.textContent = `${ev.attempt} / ${job.max_attempts ?? '?'}`;
    if (type === 'status') {
      setStatus(ev.status);
      if (TERMINAL.has(ev.status)) {
        closeWhenEnded(ctx, es);
        liveEl.textContent = 'finished';
      }
      refetch(); // picks up node/slot, error and final artifacts
    } else if (type === 'artifact') {
      refetch();
    }
  };
  for (const type of ['status', 'progress', 'message', 'artifact']) es.addEventListener(type, onEvent);
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

function timelineItem(type, ev) {
  const parts = [];
  if (ev.status) parts.push(`status ${ev.status}`);
  if (ev.stage) parts.push(`stage ${ev.stage}`);
  if (ev.progress != null) parts.push(`${Number(ev.progress).toFixed(1)}%`);
  if (ev.message) parts.push(ev.message);
  if (ev.artifact) parts.push(`artifact ${ev.artifact.name || ''} (${fmtBytes(ev.artifact.size)})`);
  if (ev.error) parts.push(`error ${fmtError(ev.error)}`);
  return h('li', { class: `event event-${type}${ev.error ? ' has-error' : ''}`, 'data-type': type },
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

  if (/^image\/(png|jpeg)\b/.test(type)) {
    card.append(h('img', { class: 'artifact-preview', src: withToken(url), alt: a.name, loading: 'lazy' }));
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
  const params = h('textarea', { id: 'params', name: 'params', spellcheck: 'false', rows: 6 });
  params.value = '{}';
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
    h('div', { class: 'field' },
      h('label', { for: 'params', text: 'Params (JSON object)' }), params),
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

    // Multipart: file parts become file inputs, other text parts inline inputs.
    // Empty inputs are left out so the server reports them as missing.
    const body = new FormData();
    body.append('model', spec.name);
    body.append('params', JSON.stringify(parsed));
    for (const name of inputs) {
      const file = form.elements[`file.${name}`].files[0];
      const text = form.elements[`input.${name}`].value;
      if (file) body.append(name, file, file.name);
      else if (text !== '') body.append(name, text);
    }

    button.disabled = true;
    button.textContent = 'Submitting…';
    try {
      const reply = await api('/v1/jobs', { method: 'POST', body });
      if (ctx.alive) location.hash = `#/jobs/${encodeURIComponent(reply.job_id)}`;
    } catch (err) {
      showError(`${err.code}: ${err.message}`);
    } finally {
      button.disabled = false;
      button.textContent = 'Submit job';
    }
  });
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
