// Admin (admin keys): tenants and budgets, keys, deployments' health, the catalog.
import { h, clear, card, empty, errorBox, money, number, duration, when, ago, statusPill, toast } from '../lib/dom.js';
import { api, forgetModels, models } from '../lib/api.js';
import { meter } from '../lib/charts.js';

const TABS = [['tenants', 'Tenants'], ['keys', 'Keys'], ['deployments', 'Deployments'], ['catalog', 'Catalog']];

const usd = (v) => (v === '' || v === null || v === undefined ? null : Math.round(Number(v) * 1e6));
const field = (label, control, hint) => h('label', { class: 'field' }, h('span', {}, label), control, hint ? h('small', { class: 'hint' }, hint) : null);

export async function render(main, { tab, query }, ctx) {
  const tabs = h('nav', { class: 'tabs', 'aria-label': 'Admin' },
    TABS.map(([id, label]) => h('a', { href: `#/admin/${id}`, class: tab === id ? 'active' : '', 'aria-current': tab === id ? 'page' : null }, label)));
  const body = h('div', { id: `admin-${tab}` });
  clear(main, h('div', { class: 'page-head' }, h('h1', {}, 'Admin')), tabs, body);
  const page = { tenants, keys, deployments, catalog }[tab];
  if (!page) { clear(body, empty('No such admin page', '', h('a', { class: 'btn', href: '#/admin' }, 'Tenants'))); return; }
  return page(body, query, ctx);
}

// tenants -------------------------------------------------------------------------------
async function tenants(body) {
  const listBox = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const id = h('input', { id: 't-id', required: true, pattern: '[A-Za-z0-9][A-Za-z0-9._\\-]*', maxlength: 100, placeholder: 'acme' });
  const name = h('input', { id: 't-name', maxlength: 200, placeholder: 'Acme Inc.' });
  const budget = h('input', { id: 't-budget', type: 'number', min: 0, step: '0.01', placeholder: 'no cap' });
  const status = h('div');
  const form = h('form', { class: 'form-inline', onsubmit: async (e) => {
    e.preventDefault();
    try {
      await api.post('/v1/admin/tenants', { id: id.value.trim(), ...(name.value.trim() ? { name: name.value.trim() } : {}), budget: usd(budget.value) });
      toast(`Tenant ${id.value} created`);
      form.reset(); status.replaceChildren();
      await load();
    } catch (err) { status.replaceChildren(errorBox(err)); }
  } }, field('Id', id), field('Name', name), field('Budget (USD)', budget), h('button', { class: 'btn btn-primary', type: 'submit' }, 'Create tenant'));

  async function setBudget(t) {
    const v = prompt(`New budget for ${t.id} in USD (empty: no cap)`, t.budget === null ? '' : String(t.budget / 1e6));
    if (v === null) return;
    try { await api.patch(`/v1/admin/tenants/${encodeURIComponent(t.id)}`, { budget: usd(v.trim()) }); toast('Budget saved'); await load(); } catch (err) { toast(err.message, 'error'); }
  }
  async function load() {
    try {
      const r = await api.get('/v1/admin/tenants', { limit: 100 });
      clear(listBox, r.data.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'tenants-table' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Tenant'), h('th', {}, 'Budget'), h('th', { class: 'num' }, 'Spent'), h('th', { class: 'num' }, 'Held'), h('th', { class: 'num' }, 'Available'), h('th', {}, ''))),
        h('tbody', {}, r.data.map((t) => h('tr', { 'data-tenant': t.id },
          h('td', {}, h('strong', {}, t.id), t.name !== t.id ? h('div', { class: 'muted small' }, t.name) : null),
          h('td', {}, t.budget === null ? h('span', { class: 'muted' }, 'no cap') : [money(t.budget), meter(t.spent + t.held, t.budget)]),
          h('td', { class: 'num' }, money(t.spent)), h('td', { class: 'num' }, money(t.held)),
          h('td', { class: 'num' }, t.available === null ? '∞' : money(t.available)),
          h('td', { class: 'row-actions' },
            h('button', { class: 'btn btn-small', onclick: () => setBudget(t) }, 'Budget'),
            h('a', { class: 'btn btn-small btn-ghost', href: `#/jobs?tenant=${encodeURIComponent(t.id)}` }, 'Jobs'),
            h('a', { class: 'btn btn-small btn-ghost', href: `#/usage?tenant=${encodeURIComponent(t.id)}` }, 'Usage')))))))
        : empty('No tenants yet', 'Keys made without a tenant belong to "default". Create tenants to give them budgets.'));
    } catch (err) { clear(listBox, errorBox(err, load)); }
  }
  clear(body, card('New tenant', form, status), card('Tenants', listBox));
  await load();
}

// keys ----------------------------------------------------------------------------------
function secretPanel(title, plain, note) {
  const input = h('input', { class: 'secret', id: 'new-key', readonly: true, value: plain, onfocus: (e) => e.target.select() });
  return h('div', { class: 'alert alert-ok new-key', role: 'status' },
    h('strong', {}, title), h('p', {}, 'Copy it now: it is shown this once and never stored. ', note || ''),
    h('div', { class: 'copy-row' }, input,
      h('button', { class: 'btn btn-small', type: 'button', onclick: async () => {
        try { await navigator.clipboard.writeText(plain); toast('Copied'); } catch { input.select(); toast('Press Ctrl+C to copy', 'error'); }
      } }, 'Copy')));
}

async function keys(body, query) {
  const tenantFilter = query.get('tenant') || '';
  let catalog = [];
  try { catalog = await models(); } catch { /* scopes by modality still work */ }
  const listBox = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const shown = h('div', { id: 'shown-key' });
  const f = {
    tenant: h('input', { id: 'k-tenant', required: true, placeholder: 'acme', value: tenantFilter, list: 'k-tenants' }),
    name: h('input', { id: 'k-name', required: true, maxlength: 100, placeholder: 'production' }),
    admin: h('input', { id: 'k-admin', type: 'checkbox' }),
    models: h('select', { id: 'k-models', multiple: true, size: Math.min(5, Math.max(2, catalog.length)) }, catalog.map((m) => h('option', { value: m.id }, m.id))),
    rpm: h('input', { id: 'k-rpm', type: 'number', min: 1, placeholder: 'no limit' }),
    conc: h('input', { id: 'k-concurrency', type: 'number', min: 1, placeholder: 'no limit' }),
    webhooks: h('input', { id: 'k-webhooks', type: 'checkbox' }),
    queue: h('input', { id: 'k-queue', type: 'checkbox', checked: true }),
    days: h('input', { id: 'k-expires', type: 'number', min: 1, placeholder: 'never' }),
  };
  const modalities = ['image', 'video', 'audio', 'text'].map((m) => [m, h('input', { type: 'checkbox', value: m, id: `k-mod-${m}` })]);
  const datalist = h('datalist', { id: 'k-tenants' });
  const status = h('div');
  const form = h('form', { class: 'form', id: 'key-form', onsubmit: async (e) => {
    e.preventDefault();
    const chosenModels = [...f.models.selectedOptions].map((o) => o.value);
    const chosenMods = modalities.filter(([, c]) => c.checked).map(([m]) => m);
    const req = { tenant: f.tenant.value.trim(), name: f.name.value.trim(), admin: f.admin.checked, queue_when_busy: f.queue.checked };
    // no scope at all: every model and the webhooks; any scope: only what is ticked
    if (chosenModels.length || chosenMods.length || f.webhooks.checked) {
      req.scopes = { models: chosenModels, modalities: chosenMods };
      if (f.webhooks.checked) req.scopes.webhooks = true;
    }
    if (f.rpm.value) req.rpm = Number(f.rpm.value);
    if (f.conc.value) req.max_concurrency = Number(f.conc.value);
    if (f.days.value) req.expires_in_seconds = Math.round(Number(f.days.value) * 86400);
    try {
      const k = await api.post('/v1/admin/keys', req);
      clear(shown, secretPanel(`New key "${k.name}" for ${k.tenant}`, k.key));
      status.replaceChildren();
      f.name.value = '';
      await load();
    } catch (err) { status.replaceChildren(errorBox(err)); }
  } },
  h('div', { class: 'form-grid' },
    field('Tenant', f.tenant, 'Create it first on the Tenants tab.'), field('Name', f.name),
    field('Requests per minute', f.rpm), field('Max concurrency', f.conc), field('Expires in (days)', f.days),
    h('label', { class: 'field' }, h('span', {}, 'Models (scopes)'), f.models, h('small', { class: 'hint' }, 'None selected and no modality: any model.')),
    h('fieldset', { class: 'field' }, h('legend', {}, 'Modalities (scopes)'), h('div', { class: 'checks' }, modalities.map(([m, c]) => h('label', { class: 'check' }, c, m)))),
    h('fieldset', { class: 'field' }, h('legend', {}, 'Webhooks (scope)'), h('div', { class: 'checks' }, h('label', { class: 'check' }, f.webhooks, 'may manage webhooks')),
      h('small', { class: 'hint' }, 'Endpoints, the signing secret and deliveries. A key with no scope ticked may do everything; a key scoped to models or modalities manages webhooks only with this box (ticked alone: webhooks only, no model).')),
    h('fieldset', { class: 'field' }, h('legend', {}, 'Options'), h('div', { class: 'checks' },
      h('label', { class: 'check' }, f.queue, 'queue when busy (else 429)'), h('label', { class: 'check' }, f.admin, 'admin key')))),
  datalist, status, h('div', { class: 'form-actions' }, h('button', { class: 'btn btn-primary', type: 'submit', id: 'create-key' }, 'Create key')));

  const act = async (k, what) => {
    if (what === 'revoke') {
      if (!confirm(`Revoke ${k.name} (${k.prefix}…)? It stops working at once, on every API process.`)) return;
      try { await api.post(`/v1/admin/keys/${encodeURIComponent(k.id)}/revoke`); toast(`Revoked ${k.name}`); await load(); } catch (err) { toast(err.message, 'error'); }
    } else {
      const grace = prompt(`Rotate ${k.name}: how many seconds may the old key keep working? (0: revoked at once)`, '0');
      if (grace === null) return;
      try {
        const r = await api.post(`/v1/admin/keys/${encodeURIComponent(k.id)}/rotate`, { grace_seconds: Number(grace) || 0 });
        clear(shown, secretPanel(`Rotated key "${r.name}" for ${r.tenant}`, r.key, Number(grace) ? `The old key works for ${grace} s more.` : 'The old key is revoked.'));
        await load();
      } catch (err) { toast(err.message, 'error'); }
    }
  };
  const scopeText = (s) => (s ? [...(s.models || []), ...(s.modalities || []).map((m) => `any ${m}`), ...(s.webhooks ? ['webhooks'] : [])].join(', ') : 'any model');
  async function load() {
    try {
      const [r, t] = await Promise.all([api.get('/v1/admin/keys', { tenant: tenantFilter, limit: 100 }), api.get('/v1/admin/tenants', { limit: 100 })]);
      clear(datalist, t.data.map((x) => h('option', { value: x.id })));
      clear(listBox, r.data.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'keys-table' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Key'), h('th', {}, 'Tenant'), h('th', {}, 'Scopes'), h('th', {}, 'Limits'), h('th', {}, 'Status'), h('th', {}, 'Created'), h('th', {}, ''))),
        h('tbody', {}, r.data.map((k) => h('tr', { 'data-key-id': k.id, 'data-key-name': k.name, 'data-status': k.status },
          h('td', {}, h('strong', {}, k.name), k.admin ? h('span', { class: 'badge badge-admin' }, 'admin') : null, h('div', { class: 'muted small' }, h('code', {}, `${k.prefix}…`))),
          h('td', {}, k.tenant), h('td', { class: 'small' }, scopeText(k.scopes)),
          h('td', { class: 'small' }, [k.rpm ? `${k.rpm}/min` : null, k.max_concurrency ? `${k.max_concurrency} at once${k.queue_when_busy ? '' : ' (429)'}` : null, k.expires_at ? `until ${when(k.expires_at)}` : null].filter(Boolean).join(' · ') || '—'),
          h('td', {}, h('span', { class: `pill pill-key-${k.status}` }, k.status)),
          h('td', { class: 'small', title: k.created_at }, ago(k.created_at)),
          h('td', { class: 'row-actions' }, k.status === 'active' ? [
            h('button', { class: 'btn btn-small rotate', onclick: () => act(k, 'rotate') }, 'Rotate'),
            h('button', { class: 'btn btn-small btn-danger revoke', onclick: () => act(k, 'revoke') }, 'Revoke')] : null))))))
        : empty('No keys', tenantFilter ? `Tenant ${tenantFilter} has no keys.` : 'Create the first one above.'));
    } catch (err) { clear(listBox, errorBox(err, load)); }
  }
  clear(body, card('New key', shown, form), card(tenantFilter ? `Keys of ${tenantFilter}` : 'Keys', listBox));
  await load();
}

// deployments ---------------------------------------------------------------------------
async function deployments(body) {
  const box = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const stamp = h('span', { class: 'muted small' });
  async function load() {
    try {
      const r = await api.get('/v1/admin/deployments');
      stamp.textContent = `catalog ${r.catalog_version.slice(0, 12)} · updated ${new Date().toLocaleTimeString()}`;
      clear(box, r.data.length ? h('div', { class: 'dep-grid', id: 'deployments' }, r.data.map((d) => {
        const rec = d.recent;
        const lim = d.limits || {};
        return h('article', { class: `dep dep-${d.status}`, 'data-deployment': d.name },
          h('header', { class: 'dep-head' }, h('strong', {}, d.name), h('span', { class: `pill pill-dep-${d.status}` }, d.status.replace('_', ' '))),
          h('div', { class: 'muted small' }, `${d.provider} · ${d.provider_model} · for ${d.models.join(', ')}`),
          h('div', { class: 'stats stats-dep' },
            statBox('In flight', `${number(d.in_flight)}${lim.max_concurrency ? ` / ${lim.max_concurrency}` : ''}`),
            statBox('Last minute', `${number(d.requests_in_window)}${lim.rpm ? ` / ${lim.rpm}` : ''} req`),
            statBox('Error rate', rec.error_rate === null ? '—' : `${(rec.error_rate * 100).toFixed(1)}%`, `${rec.errors}/${rec.calls} calls, ${Math.round(rec.window_seconds / 60)} min`),
            statBox('Latency', rec.latency_ms_avg === null ? '—' : duration(rec.latency_ms_avg), rec.latency_ms_p95 === null ? '' : `p95 ${duration(rec.latency_ms_p95)}`)),
          d.cooldown_until ? h('div', { class: 'alert alert-warn' }, `Cooling down until ${when(d.cooldown_until)} (${d.failures} failures in a row)`) : null,
          !d.cooldown_until && d.failures ? h('div', { class: 'muted small' }, `${d.failures} failure${d.failures === 1 ? '' : 's'} in a row`) : null,
          d.unhealthy ? h('div', { class: 'alert alert-error' }, 'Marked unhealthy (bad key or gone model): fix the key or reload the catalog.') : null,
          Object.keys(rec.errors_by_code).length ? h('div', { class: 'small muted' }, 'Errors: ', Object.entries(rec.errors_by_code).map(([c, n]) => `${c} ×${n}`).join(', ')) : null);
      })) : empty('No deployments', 'The catalog lists none.'));
    } catch (err) { clear(box, errorBox(err, load)); }
  }
  clear(body, card(null, h('div', { class: 'card-title-row' }, h('h2', { class: 'card-title' }, 'Deployments'), stamp, h('button', { class: 'btn btn-small', onclick: load }, 'Refresh')), box));
  await load();
  const timer = setInterval(load, 5000);
  return () => clearInterval(timer);
}

function statBox(label, value, hint) {
  return h('div', { class: 'stat' }, h('div', { class: 'stat-label' }, label), h('div', { class: 'stat-value' }, value), hint ? h('div', { class: 'muted small' }, hint) : null);
}

// catalog -------------------------------------------------------------------------------
async function catalog(body) {
  const box = h('div', {});
  const result = h('div', { id: 'reload-result' });
  async function load(force) {
    try {
      const list = await models(force);
      clear(box, list.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'catalog-table' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Model'), h('th', {}, 'Modality'), h('th', {}, 'Strategy'), h('th', {}, 'Deployments'), h('th', {}, 'Fallbacks'))),
        h('tbody', {}, list.map((m) => h('tr', {}, h('td', {}, h('strong', {}, m.id), m.description ? h('div', { class: 'muted small' }, m.description) : null),
          h('td', {}, m.modality), h('td', {}, m.strategy),
          h('td', { class: 'small' }, (m.deployments || []).map((d) => h('div', {}, `${d.name} (${d.provider}: ${d.model})`))),
          h('td', { class: 'small' }, m.fallback_models.join(', ') || '—')))))) : empty('The catalog is empty', ''));
    } catch (err) { clear(box, errorBox(err, () => load(true))); }
  }
  const button = h('button', { class: 'btn btn-primary', id: 'reload-catalog', onclick: async () => {
    button.disabled = true;
    try {
      const r = await api.post('/v1/admin/catalog/reload');
      clear(result, h('div', { class: 'alert alert-ok' }, `Reloaded: version ${r.version.slice(0, 12)}, ${r.models.length} models. Only this API process reloaded; send SIGHUP to the others and to the workers.`));
      forgetModels();
      await load(true);
    } catch (err) { clear(result, errorBox(err)); }
    button.disabled = false;
  } }, 'Reload catalog');
  clear(body, card(null, h('div', { class: 'card-title-row' }, h('h2', { class: 'card-title' }, 'Catalog'), button), h('p', { class: 'muted' }, 'Reload re-reads the catalog file (GENROUTE_CATALOG); a file with errors is refused and the current catalog keeps serving.'), result, box));
  await load(false);
}
