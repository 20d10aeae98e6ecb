// Usage: cost and requests by model, key or day over a range (chart + table), and the balance.
import { h, clear, card, empty, errorBox, money, number, duration } from '../lib/dom.js';
import { api } from '../lib/api.js';
import { barChart, meter } from '../lib/charts.js';

const RANGES = [['1', 'Today'], ['7', '7 days'], ['30', '30 days'], ['90', '90 days']];
const GROUPS = [['day', 'By day'], ['model', 'By model'], ['key', 'By key']];
const METRICS = [['cost', 'Cost'], ['requests', 'Requests']];

function dayStart(d) { return new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate())); }

/** Every day of the range, with zeros where nothing happened, so the time axis is honest. */
function fillDays(rows, start, end) {
  const by = new Map(rows.map((r) => [r.group, r]));
  const out = [];
  for (let d = dayStart(start); d < end; d = new Date(d.getTime() + 86400e3)) {
    const key = d.toISOString().slice(0, 10);
    out.push(by.get(key) || { group: key, requests: 0, succeeded: 0, failed: 0, canceled: 0, cost: 0, duration_ms_avg: 0, prompt_tokens: 0, completion_tokens: 0 });
  }
  return out;
}

export async function render(main, { query }, { who, go }) {
  const days = query.get('days') || '30';
  const group = query.get('group') || 'day';
  const metric = query.get('metric') || 'cost';
  const tenant = who.admin ? (query.get('tenant') || who.tenant) : '';
  const set = (changes) => {
    const next = { days, group, metric, tenant, ...changes };
    go(`#/usage?${new URLSearchParams(Object.entries(next).filter(([, v]) => v))}`);
  };
  const seg = (name, options, current) => h('div', { class: 'segmented', role: 'group', 'aria-label': name },
    options.map(([v, label]) => h('button', { type: 'button', class: current === v ? 'active' : '', 'aria-pressed': current === v ? 'true' : 'false', 'data-value': v, onclick: () => set({ [name]: v }) }, label)));

  const end = new Date(dayStart(new Date()).getTime() + 86400e3);
  const start = new Date(end.getTime() - Number(days) * 86400e3);
  let tenants = [];
  let keyNames = {};
  if (who.admin) {
    try { tenants = (await api.get('/v1/admin/tenants', { limit: 100 })).data.map((t) => t.id); } catch { /* optional */ }
    if (group === 'key') {
      try { keyNames = Object.fromEntries((await api.get('/v1/admin/keys', { tenant, limit: 100 })).data.map((k) => [k.id, k.name])); } catch { /* ids then */ }
    }
  }
  const controls = h('div', { class: 'toolbar' },
    seg('days', RANGES, days), seg('group', GROUPS, group), seg('metric', METRICS, metric),
    who.admin ? h('label', { class: 'field field-inline' }, h('span', {}, 'Tenant'),
      h('select', { id: 'u-tenant', onchange: (e) => set({ tenant: e.target.value }) },
        [...new Set([who.tenant, ...tenants, tenant])].map((t) => h('option', { value: t, selected: t === tenant }, t)))) : null);
  const body = h('div', { id: 'usage-body' }, h('p', { class: 'muted' }, 'Loading…'));
  clear(main, h('div', { class: 'page-head' }, h('h1', {}, 'Usage'), h('span', { class: 'muted' }, `${start.toISOString().slice(0, 10)} – ${new Date(end - 1).toISOString().slice(0, 10)} (UTC)`)), controls, body);

  let report;
  try {
    report = await api.get('/v1/usage', { from: start.toISOString(), to: end.toISOString(), group_by: group, tenant: who.admin ? tenant : '' });
  } catch (err) {
    clear(body, errorBox(err, () => set({})));
    return;
  }
  const b = report.balance;
  const balance = card('Balance',
    b.budget === null ? h('p', { class: 'muted' }, 'No budget: spending is not capped.') : meter(b.spent + b.held, b.budget),
    h('div', { class: 'stats' },
      stat('Budget', b.budget === null ? 'no cap' : money(b.budget)),
      stat('Spent', money(b.spent)),
      stat('Held', money(b.held), 'by work in flight'),
      stat('Available', b.available === null ? '∞' : money(b.available))));
  const t = report.total;
  const totals = h('div', { class: 'stats stats-row' },
    stat('Requests', number(t.requests)), stat('Succeeded', number(t.succeeded)), stat('Failed', number(t.failed)),
    stat('Canceled', number(t.canceled)), stat('Cost', money(t.cost)), stat('Avg duration', duration(t.duration_ms_avg)));

  const rows = group === 'day' ? fillDays(report.data, start, end) : [...report.data].sort((a, b2) => b2[metric] - a[metric]);
  const label = (r) => (group === 'key' ? keyNames[r.group] || r.group || '(none)' : r.group || '(none)');
  const fmt = metric === 'cost' ? (v) => money(v) : (v) => number(Math.round(v));
  const chartRows = rows.map((r) => ({ label: label(r), short: group === 'day' ? r.group.slice(5) : undefined, value: r[metric] }));
  // the chart is drawn for the width it gets, once it is on the page, and again on a resize
  const chart = t.requests === 0
    ? empty('No usage in this range', 'Finished jobs and chat calls are counted here. Submit a job to see it.', h('a', { class: 'btn btn-primary', href: '#/new' }, 'New job'))
    : h('div', { class: 'chart-wrap', id: 'usage-chart' });
  const drawChart = () => {
    if (t.requests === 0 || !chart.isConnected) return;
    clear(chart, barChart(chartRows, { format: fmt, horizontal: group !== 'day', title: `${metric} ${group}`, width: chart.clientWidth, integer: metric === 'requests' }));
  };
  const table = report.data.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'usage-table' },
    h('thead', {}, h('tr', {}, h('th', {}, group === 'day' ? 'Day' : group === 'key' ? 'Key' : 'Model'), h('th', { class: 'num' }, 'Requests'), h('th', { class: 'num' }, 'Succeeded'), h('th', { class: 'num' }, 'Failed'), h('th', { class: 'num' }, 'Tokens'), h('th', { class: 'num' }, 'Avg duration'), h('th', { class: 'num' }, 'Cost'))),
    h('tbody', {}, report.data.map((r) => h('tr', {}, h('td', {}, label(r)), h('td', { class: 'num' }, number(r.requests)), h('td', { class: 'num' }, number(r.succeeded)), h('td', { class: 'num' }, number(r.failed)),
      h('td', { class: 'num' }, number(r.prompt_tokens + r.completion_tokens)), h('td', { class: 'num' }, duration(r.duration_ms_avg)), h('td', { class: 'num' }, money(r.cost))))))) : null;
  clear(body, h('div', { class: 'grid-usage' }, h('div', { class: 'col' }, card(`${metric === 'cost' ? 'Cost' : 'Requests'} ${GROUPS.find(([v]) => v === group)[1].toLowerCase()}`, totals, chart), table ? card('Breakdown', table) : null), h('div', { class: 'col' }, balance)));
  drawChart();
  let last = chart.clientWidth;
  const onResize = () => { if (chart.clientWidth !== last) { last = chart.clientWidth; drawChart(); } };
  window.addEventListener('resize', onResize);
  return () => window.removeEventListener('resize', onResize);
}

function stat(label, value, hint) {
  return h('div', { class: 'stat' }, h('div', { class: 'stat-label' }, label), h('div', { class: 'stat-value' }, value), hint ? h('div', { class: 'muted small' }, hint) : null);
}
