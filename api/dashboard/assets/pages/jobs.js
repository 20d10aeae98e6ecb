// Jobs: newest first, filtered (status, model, deployment, time range, prompt text), live.
import { h, clear, empty, errorBox, statusPill, ago, money, shortId, toast } from '../lib/dom.js';
import { api, models, session } from '../lib/api.js';
import { Live } from '../lib/live.js';
import { TERMINAL, applyEvent, promptOf, stateCell } from './common.js';

const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'canceled'];
const RANGES = [['', 'Any time'], ['1h', 'Last hour'], ['24h', 'Last 24 hours'], ['7d', 'Last 7 days'], ['30d', 'Last 30 days'], ['custom', 'Custom…']];
const SPANS = { '1h': 3600e3, '24h': 86400e3, '7d': 7 * 86400e3, '30d': 30 * 86400e3 };

function toLocalInput(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}

/** The query for GET /v1/jobs from the page's filters (hash parameters). */
function apiQuery(f) {
  const q = { limit: 25, status: f.status, model: f.model, deployment: f.deployment, q: f.q, tenant: f.tenant };
  if (SPANS[f.range]) q.from = new Date(Date.now() - SPANS[f.range]).toISOString();
  if (f.range === 'custom') {
    if (f.from) q.from = new Date(f.from).toISOString();
    if (f.to) q.to = new Date(f.to).toISOString();
  }
  return q;
}

/** Whether a job (seen live) belongs in the list under these filters: as the API decides. */
function matches(job, f) {
  if (f.status && job.status !== f.status) return false;
  if (f.model && job.model !== f.model) return false;
  if (f.deployment && job.deployment !== f.deployment) return false;
  if (f.q) {
    const needle = f.q.toLowerCase();
    const hay = [job.input?.prompt, job.input?.text].filter((x) => typeof x === 'string').join('\n').toLowerCase();
    if (!hay.includes(needle)) return false;
  }
  if (f.range === 'custom' && f.to && new Date(job.created_at) >= new Date(f.to)) return false;
  return true;
}

function row(job, who) {
  const prompt = promptOf(job.input);
  return h('a', { class: `job-row status-${job.status}`, href: `#/jobs/${encodeURIComponent(job.id)}`, 'data-job-id': job.id, 'data-status': job.status },
    h('div', { class: 'c-status' }, statusPill(job.status)),
    h('div', { class: 'c-main' },
      h('div', { class: 'job-prompt' }, prompt || h('span', { class: 'muted' }, '(no prompt)')),
      h('div', { class: 'job-meta' }, h('code', {}, shortId(job.id)), who.admin && job.tenant ? h('span', { class: 'tag' }, job.tenant) : null)),
    h('div', { class: 'c-model' }, h('div', {}, job.model), h('div', { class: 'muted small' }, job.deployment || '—')),
    h('div', { class: 'c-state' }, stateCell(job)),
    h('div', { class: 'c-when muted', title: job.created_at }, ago(job.created_at)),
    h('div', { class: 'c-cost' }, job.cost ? money(job.cost.settled ?? job.cost.held) : '—',
      job.cost ? h('div', { class: 'muted small' }, job.cost.status) : null));
}

export async function render(main, { query }, { who, go }) {
  const f = Object.fromEntries(['status', 'model', 'deployment', 'range', 'from', 'to', 'q', 'tenant'].map((k) => [k, query.get(k) || '']));
  if (who.admin && !f.tenant) f.tenant = who.tenant;
  const setFilter = (changes) => {
    const next = { ...f, ...changes };
    const qs = new URLSearchParams(Object.entries(next).filter(([, v]) => v));
    go(`#/jobs${qs.toString() ? `?${qs}` : ''}`);
  };

  let catalog = [];
  try { catalog = await models(); } catch (err) { toast(`models: ${err.message}`, 'error'); }
  let tenants = [];
  if (who.admin) {
    try { tenants = (await api.get('/v1/admin/tenants', { limit: 100 })).data.map((t) => t.id); } catch { /* the list still works */ }
  }
  const deployments = [...new Set(catalog.flatMap((m) => (m.deployments || []).map((d) => d.name)))];
  const select = (name, label, options) => h('label', { class: 'field' }, h('span', {}, label),
    h('select', { name, id: `f-${name}`, onchange: (e) => setFilter({ [name]: e.target.value }) },
      options.map(([v, text]) => h('option', { value: v, selected: f[name] === v }, text))));

  const search = h('input', { type: 'search', id: 'f-q', name: 'q', placeholder: 'Text in the prompt', value: f.q, maxlength: 200 });
  const filters = h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); setFilter({ q: search.value.trim() }); } },
    h('label', { class: 'field field-grow' }, h('span', {}, 'Search'), search),
    select('status', 'Status', [['', 'Any status'], ...STATUSES.map((x) => [x, x])]),
    select('model', 'Model', [['', 'Any model'], ...catalog.map((m) => [m.id, m.id])]),
    select('deployment', 'Deployment', [['', 'Any deployment'], ...deployments.map((d) => [d, d])]),
    select('range', 'Created', RANGES),
    f.range === 'custom' ? [
      h('label', { class: 'field' }, h('span', {}, 'From'), h('input', { type: 'datetime-local', id: 'f-from', value: toLocalInput(f.from), onchange: (e) => setFilter({ from: e.target.value }) })),
      h('label', { class: 'field' }, h('span', {}, 'To'), h('input', { type: 'datetime-local', id: 'f-to', value: toLocalInput(f.to), onchange: (e) => setFilter({ to: e.target.value }) })),
    ] : null,
    who.admin ? select('tenant', 'Tenant', [['*', 'All tenants'], ...[...new Set([who.tenant, ...tenants, f.tenant])].filter((t) => t && t !== '*').map((t) => [t, t])]) : null,
    h('button', { class: 'btn', type: 'submit' }, 'Search'));

  const liveBadge = h('span', { class: 'live live-connecting', id: 'live' }, 'connecting');
  const list = h('div', { class: 'job-list', id: 'job-list' });
  const more = h('div', { class: 'more' });
  const anyFilter = ['status', 'model', 'deployment', 'range', 'q'].some((k) => f[k]);
  clear(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Jobs'), liveBadge, h('a', { class: 'btn btn-primary', href: '#/new' }, 'New job')),
    filters,
    list,
    more);

  const jobs = new Map();
  const q = apiQuery(f);
  const put = (job, { prepend = false } = {}) => {
    const el = row(job, who);
    const old = list.querySelector(`[data-job-id="${CSS.escape(job.id)}"]`);
    jobs.set(job.id, job);
    if (old) old.replaceWith(el);
    else if (prepend) list.prepend(el);
    else list.append(el);
    list.querySelector('.empty')?.remove();
  };
  const showEmpty = () => {
    if (jobs.size) return;
    clear(list, empty(anyFilter ? 'No jobs match these filters' : 'No jobs yet',
      anyFilter ? 'Widen the filters, or clear them.' : 'Submit one from the form: it appears here and updates live.',
      anyFilter ? h('a', { class: 'btn', href: '#/jobs' }, 'Clear filters') : h('a', { class: 'btn btn-primary', href: '#/new' }, 'Submit a job')));
  };

  async function loadPage(cursor) {
    more.replaceChildren(h('span', { class: 'muted' }, 'Loading…'));
    try {
      const page = await api.get('/v1/jobs', { ...q, cursor });
      page.data.forEach((j) => put(j));
      more.replaceChildren(page.next_cursor ? h('button', { class: 'btn', id: 'load-more', onclick: () => loadPage(page.next_cursor) }, 'Load more') : '');
      showEmpty();
    } catch (err) {
      more.replaceChildren(errorBox(err, () => loadPage(cursor)));
    }
  }
  await loadPage(null);

  // live: every job of the tenant over /v1/ws; "all tenants" has no single channel: poll
  // (reads of one job may answer out of order: only the newest one asked is shown, and a
  // row that ended never goes back to running)
  const asked = new Map();
  const refresh = async (id) => {
    const n = (asked.get(id) || 0) + 1;
    asked.set(id, n);
    try {
      const job = await api.get(`/v1/jobs/${encodeURIComponent(id)}`);
      if (asked.get(id) !== n) return;
      const known = jobs.get(id);
      if (known && TERMINAL.has(known.status) && !TERMINAL.has(job.status)) return;
      if (known || matches(job, f)) put(job, { prepend: !known });
    } catch { /* gone, or not visible: leave the list as it is */ }
  };
  let live = null;
  let poll = null;
  if (f.tenant === '*') {
    liveBadge.className = 'live live-poll';
    liveBadge.textContent = 'refreshing every 5 s';
    poll = setInterval(async () => {
      try {
        const page = await api.get('/v1/jobs', q);
        page.data.slice().reverse().forEach((j) => put(j, { prepend: !jobs.has(j.id) }));
      } catch { /* next round */ }
    }, 5000);
  } else {
    live = new Live(session.key, {
      onStatus: (st) => { liveBadge.className = `live live-${st}`; liveBadge.textContent = st; },
      onMessage: (msg) => {
        if (!msg.job_id || !msg.type?.startsWith('job.')) return;
        const known = jobs.get(msg.job_id);
        if (msg.type === 'job.progress' && known) put(applyEvent(known, msg));
        else refresh(msg.job_id); // new jobs, and transitions (outputs, cost): the row is the truth
      },
    }).start();
    live.followAll(who.admin ? f.tenant : null);
  }
  // relative times and waiting jobs age: redraw the rows each 15 s
  const tick = setInterval(() => jobs.forEach((j) => put(j)), 15000);
  return () => { live?.close(); clearInterval(poll); clearInterval(tick); };
}
