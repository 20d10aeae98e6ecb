// A submit form per model, generated from its parameter schema (GET /v1/models `parameters`,
// the modality's JSON schema) narrowed by the model's capabilities (sizes, voices, ...).
import { h, clear, card, empty, errorBox, money, toast } from '../lib/dom.js';
import { api, models } from '../lib/api.js';

const TEXTAREAS = new Set(['prompt', 'text', 'negative_prompt']);
// capability lists that turn a free field into a choice
const CHOICES = { size: 'sizes', aspect_ratio: 'aspect_ratios', output_format: 'output_formats', resolution: 'resolutions', fps: 'fps', voice: 'voices', format: 'formats' };
const ORDER = ['prompt', 'text', 'messages', 'negative_prompt'];

/** The one non-null branch of `anyOf: [X, {type: null}]`, and whether null was allowed. */
function unwrap(schema) {
  if (Array.isArray(schema.anyOf)) {
    const branches = schema.anyOf.filter((b) => b.type !== 'null');
    const nullable = branches.length < schema.anyOf.length;
    if (branches.length === 1) return { ...schema, ...branches[0], anyOf: undefined, nullable };
    return { ...schema, nullable, union: branches };
  }
  return { ...schema, nullable: false };
}

function fieldFor(name, raw, required, caps, initial) {
  // a model that takes no input image refuses both forms of one (core/routing/catalog.py)
  if ((name === 'input_images' || name === 'image') && caps.input_images === false) return null;
  const sc = unwrap(raw);
  const id = `p-${name}`;
  const title = name.replace(/_/g, ' ');
  const help = sc.description || '';
  let choices = sc.enum || null;
  if (CHOICES[name] && Array.isArray(caps[CHOICES[name]]) && caps[CHOICES[name]].length) choices = caps[CHOICES[name]];
  const def = initial !== undefined ? initial : sc.default;
  let control;
  let read;
  if (name === 'messages') {
    const first = Array.isArray(initial) ? [...initial].reverse().find((m) => m.role === 'user') : null;
    control = h('textarea', { id, name, rows: 4, placeholder: 'Your message to the model', required: true }, first && typeof first.content === 'string' ? first.content : '');
    read = () => (control.value.trim() ? [{ role: 'user', content: control.value }] : undefined);
  } else if (choices) {
    const opts = choices.map((c) => String(c));
    control = h('select', { id, name },
      required ? null : h('option', { value: '' }, sc.default !== undefined && sc.default !== null ? `default (${sc.default})` : 'default'),
      opts.map((c) => h('option', { value: c, selected: def !== undefined && def !== null && String(def) === c && (required || initial !== undefined) }, c)));
    const numeric = sc.type === 'integer' || sc.type === 'number' || choices.every((c) => typeof c === 'number');
    read = () => (control.value === '' ? undefined : numeric ? Number(control.value) : control.value);
  } else if (sc.type === 'integer' || sc.type === 'number') {
    let max = sc.maximum ?? sc.exclusiveMaximum;
    if (name === 'n' && caps.max_n) max = caps.max_n;
    if (name === 'duration_seconds' && caps.max_duration_seconds) max = Math.min(max ?? Infinity, caps.max_duration_seconds);
    control = h('input', { id, name, type: 'number', min: sc.minimum ?? null, max: Number.isFinite(max) ? max : null,
      step: sc.type === 'integer' ? 1 : 'any', placeholder: sc.default !== undefined && sc.default !== null ? `default ${sc.default}` : '',
      value: initial !== undefined && initial !== null ? String(initial) : '' });
    read = () => (control.value === '' ? undefined : Number(control.value));
  } else if (sc.type === 'boolean') {
    control = h('input', { id, name, type: 'checkbox', checked: Boolean(def) });
    read = () => control.checked;
  } else if (sc.type === 'array') {
    control = h('textarea', { id, name, rows: 2, placeholder: 'One URL per line (https:// or data:image/…)' }, Array.isArray(initial) ? initial.join('\n') : '');
    read = () => { const v = control.value.split('\n').map((x) => x.trim()).filter(Boolean); return v.length ? v : undefined; };
  } else if (sc.union) {
    control = h('input', { id, name, type: 'text', placeholder: 'text, or a JSON list', value: initial !== undefined ? (typeof initial === 'string' ? initial : JSON.stringify(initial)) : '' });
    read = () => { const v = control.value.trim(); if (!v) return undefined; try { return JSON.parse(v); } catch { return v; } };
  } else if (TEXTAREAS.has(name)) {
    control = h('textarea', { id, name, rows: name === 'negative_prompt' ? 2 : 4, required, maxlength: sc.maxLength ?? null,
      placeholder: name === 'prompt' ? 'Describe what to make' : '' }, typeof initial === 'string' ? initial : '');
    read = () => (control.value.trim() ? control.value : undefined);
  } else {
    control = h('input', { id, name, type: 'text', maxlength: sc.maxLength ?? null, required, placeholder: sc.default ? `default ${sc.default}` : '',
      value: typeof initial === 'string' ? initial : '' });
    read = () => (control.value.trim() ? control.value.trim() : undefined);
  }
  const wide = control.tagName === 'TEXTAREA';
  const el = h('label', { class: `field${wide ? ' field-wide' : ''}`, 'data-field': name },
    h('span', {}, title, required ? h('span', { class: 'req', title: 'required' }, ' *') : null),
    control,
    help ? h('small', { class: 'hint' }, help) : null,
    h('small', { class: 'field-error' }));
  return { name, el, read };
}

function priceText(m) {
  const p = m.deployments?.[0]?.price;
  if (!p) return null;
  const first = Object.entries(p)[0];
  if (!first) return null;
  const [k, v] = first;
  const amount = typeof v === 'object' ? v.default ?? Object.values(v)[0] : v;
  return `${money(amount)} ${k.replace('per_', 'per ').replace(/_/g, ' ')}`;
}

export async function render(main, { model, query }, { go }) {
  const list = await models();
  if (!list.length) {
    clear(main, h('div', { class: 'page-head' }, h('h1', {}, 'New job')), empty('No models for this key', 'Its scopes allow no model of the catalog. An admin can widen them.'));
    return;
  }
  let initial = null;
  const from = query.get('from');
  if (from) {
    try { initial = await api.get(`/v1/jobs/${encodeURIComponent(from)}`); } catch (err) { toast(`could not load ${from}: ${err.message}`, 'error'); }
  }
  const chosen = list.find((m) => m.id === (model || initial?.model)) || list[0];
  const picker = h('div', { class: 'model-picker', role: 'tablist' },
    list.map((m) => h('a', { href: `#/new/${encodeURIComponent(m.id)}`, role: 'tab', class: `model-chip${m.id === chosen.id ? ' active' : ''}`, 'aria-selected': m.id === chosen.id ? 'true' : 'false', 'data-model': m.id },
      h('strong', {}, m.id), h('span', { class: 'muted small' }, m.modality))));

  const params = chosen.parameters || { properties: {}, required: [] };
  const props = params.properties || {};
  const required = new Set(params.required || []);
  const names = Object.keys(props).filter((n) => n !== 'provider_params')
    .sort((a, b) => (ORDER.indexOf(a) + 1 || 99) - (ORDER.indexOf(b) + 1 || 99));
  const init = initial && initial.model === chosen.id ? initial.input : {};
  const fields = names.map((n) => fieldFor(n, props[n], required.has(n), chosen.capabilities || {}, init[n])).filter(Boolean);
  const main1 = fields.filter((f) => ORDER.includes(f.name));
  const rest = fields.filter((f) => !ORDER.includes(f.name));

  const pp = h('textarea', { id: 'p-provider_params', name: 'provider_params', rows: 3, placeholder: '{"latency_seconds": 5, "progress_steps": 5}' },
    init.provider_params && Object.keys(init.provider_params).length ? JSON.stringify(init.provider_params) : '');
  const webhook = h('input', { id: 'p-webhook_url', name: 'webhook_url', type: 'url', placeholder: 'https://example.com/hooks/genroute', value: initial?.webhook_url || '' });
  const meta = h('textarea', { id: 'p-metadata', name: 'metadata', rows: 2, placeholder: '{"order": "1234"}' },
    initial?.metadata && Object.keys(initial.metadata).length ? JSON.stringify(initial.metadata) : '');
  const status = h('div', { id: 'submit-status' });
  const button = h('button', { class: 'btn btn-primary', type: 'submit', id: 'submit' }, 'Submit job');

  const form = h('form', { class: 'form', id: 'job-form', novalidate: true, onsubmit: async (e) => {
    e.preventDefault();
    form.querySelectorAll('.field-error').forEach((x) => { x.textContent = ''; });
    form.querySelectorAll('.invalid').forEach((x) => x.classList.remove('invalid'));
    const input = {};
    for (const f of fields) { const v = f.read(); if (v !== undefined) input[f.name] = v; }
    const body = { model: chosen.id, input };
    const parse = (el, what) => {
      if (!el.value.trim()) return undefined;
      try { const v = JSON.parse(el.value); if (v && typeof v === 'object' && !Array.isArray(v)) return v; } catch { /* below */ }
      throw new Error(`${what} must be a JSON object, e.g. ${el.placeholder}`);
    };
    try {
      const p = parse(pp, 'provider_params');
      if (p) input.provider_params = p;
      const m = parse(meta, 'metadata');
      if (m) body.metadata = m;
    } catch (err) {
      clear(status, errorBox({ code: 'invalid_input', message: err.message }));
      return;
    }
    if (webhook.value.trim()) body.webhook_url = webhook.value.trim();
    button.disabled = true;
    button.textContent = 'Submitting…';
    try {
      const job = await api.post('/v1/jobs', body);
      toast(`Submitted ${job.id}`);
      go(`#/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      button.disabled = false;
      button.textContent = 'Submit job';
      // put each field's message next to it (details: [{loc: ["input", field, ...], msg}])
      for (const d of Array.isArray(err.details) ? err.details : []) {
        const loc = (d.loc || []).filter((x) => x !== 'body');
        const name = loc[0] === 'input' ? loc[1] : loc[0];
        const el = form.querySelector(`[data-field="${CSS.escape(String(name))}"]`);
        if (el) { el.classList.add('invalid'); el.querySelector('.field-error').textContent = d.msg; }
      }
      clear(status, errorBox(err));
    }
  } },
  h('div', { class: 'form-grid' }, main1.map((f) => f.el), rest.map((f) => f.el)),
  h('details', { class: 'advanced', open: Boolean(pp.value || webhook.value || meta.value) },
    h('summary', {}, 'Advanced: provider parameters, webhook, metadata'),
    h('div', { class: 'form-grid' },
      h('label', { class: 'field field-wide', 'data-field': 'provider_params' }, h('span', {}, 'provider params (JSON)'), pp,
        h('small', { class: 'hint' }, props.provider_params?.description || 'Passed to the provider as-is.'), h('small', { class: 'field-error' })),
      h('label', { class: 'field field-wide', 'data-field': 'webhook_url' }, h('span', {}, 'webhook URL'), webhook, h('small', { class: 'hint' }, 'Signed (Standard Webhooks) calls with this job\u2019s events.'), h('small', { class: 'field-error' })),
      h('label', { class: 'field field-wide', 'data-field': 'metadata' }, h('span', {}, 'metadata (JSON)'), meta, h('small', { class: 'field-error' })))),
  status,
  h('div', { class: 'form-actions' }, button));

  const price = priceText(chosen);
  clear(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'New job')),
    picker,
    card(null,
      h('div', { class: 'model-head' }, h('h2', { class: 'card-title' }, chosen.id), h('span', { class: 'tag' }, chosen.modality), price ? h('span', { class: 'muted small' }, `from ${price}`) : null),
      chosen.description ? h('p', { class: 'muted' }, chosen.description) : null,
      initial ? h('div', { class: 'alert alert-info' }, `Prefilled from ${initial.id}.`) : null,
      form));
}
