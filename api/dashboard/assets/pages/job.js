// One job: state, outputs in place, input, timeline (live), attempts, cost, webhooks.
import { h, clear, card, kv, empty, errorBox, statusPill, money, when, duration, between, bytes, toast, progressBar } from '../lib/dom.js';
import { api, session } from '../lib/api.js';
import { Live } from '../lib/live.js';
import { TERMINAL, applyEvent, waitText } from './common.js';

function preview(asset, job) {
  const type = asset.content_type || '';
  const label = `output ${asset.index}`;
  let media;
  if (type.startsWith('video/')) {
    media = h('video', { src: asset.url, controls: true, loop: true, playsinline: true, preload: 'metadata', class: 'media', 'aria-label': label });
  } else if (type.startsWith('audio/')) {
    media = h('audio', { src: asset.url, controls: true, preload: 'metadata', class: 'media-audio', 'aria-label': label });
  } else if (type.startsWith('image/')) {
    // an animated WebP is the local provider's video: <img> plays it; a click pauses it by
    // swapping in the first frame (the thumbnail) and back
    const animated = job.modality === 'video';
    const img = h('img', { src: asset.url, alt: label, class: 'media', loading: 'lazy' });
    if (animated && asset.thumbnail_url) {
      let playing = true;
      const toggle = h('button', { class: 'btn btn-small play-toggle', type: 'button', onclick: () => {
        playing = !playing;
        img.src = playing ? asset.url : asset.thumbnail_url;
        toggle.textContent = playing ? 'Pause' : 'Play';
      } }, 'Pause');
      media = h('div', { class: 'media-wrap' }, img, toggle);
    } else media = img;
  } else if (type.startsWith('text/') || type.includes('json')) {
    const pre = h('pre', { class: 'code output-text' }, 'Loading…');
    fetch(asset.url).then((r) => r.text()).then((t) => { pre.textContent = t.length > 20000 ? `${t.slice(0, 20000)}…` : t; })
      .catch((e) => { pre.textContent = `could not load: ${e.message}`; });
    media = pre;
  } else {
    media = h('div', { class: 'muted' }, 'No preview for ', type);
  }
  const facts = [type, bytes(asset.bytes), asset.width && asset.height ? `${asset.width}×${asset.height}` : null,
    asset.duration_seconds ? duration(asset.duration_seconds * 1000) : null].filter(Boolean).join(' · ');
  return h('figure', { class: 'output', 'data-content-type': type },
    media,
    h('figcaption', {}, h('span', { class: 'muted small' }, facts),
      h('a', { class: 'btn btn-small', href: asset.url, download: `${job.id}-${asset.index}`, target: '_blank', rel: 'noopener' }, 'Download')));
}

const EVENT_LABEL = {
  'job.queued': 'Queued', 'job.started': 'Started', 'job.progress': 'Progress', 'job.output': 'Output stored',
  'job.succeeded': 'Succeeded', 'job.failed': 'Failed', 'job.canceled': 'Canceled',
};

function eventDetail(ev) {
  const d = ev.data || {};
  switch (ev.type) {
    case 'job.started': return [d.deployment, d.attempt ? `attempt ${d.attempt}` : null].filter(Boolean).join(' · ');
    case 'job.progress':
      if (d.status === 'queued') return d.queue_position !== null && d.queue_position !== undefined ? `#${d.queue_position + 1} in the provider's queue` : 'waiting';
      return [`${Math.round((d.progress || 0) * 100)}%`, d.message].filter(Boolean).join(' · ');
    case 'job.output': return [d.content_type, bytes(d.bytes), d.width ? `${d.width}×${d.height}` : null].filter(Boolean).join(' · ');
    case 'job.failed': case 'job.canceled': return d.error ? `${d.error.code}: ${d.error.message}` : '';
    case 'job.succeeded': return d.cost ? `charged ${money(d.cost.settled)}` : '';
    default: return '';
  }
}

// an event's place: its seq, then its sub-step (progress between two events shares their seq)
const order = (ev) => ev.seq + (ev.sub || 0) / 1e4;

function timelineItem(ev) {
  return h('li', { class: `tl tl-${ev.type.replace('job.', '')}`, 'data-order': order(ev) },
    h('span', { class: 'tl-dot' }),
    h('div', { class: 'tl-body' },
      h('div', {}, h('strong', {}, EVENT_LABEL[ev.type] || ev.type), ' ', h('span', { class: 'muted small' }, when(ev.at))),
      h('div', { class: 'muted small' }, eventDetail(ev))));
}

/** A timeline from the row alone, for a job whose events have left Redis. */
function rowTimeline(job) {
  const items = [['job.queued', job.created_at, {}]];
  if (job.started_at) items.push(['job.started', job.started_at, { deployment: job.deployment }]);
  if (job.finished_at) items.push([`job.${job.status}`, job.finished_at, { error: job.error }]);
  return items.map(([type, at, data], i) => ({ type, at, data, seq: i + 1 }));
}

function deliveryItem(d, onRedeliver) {
  const attempts = d.attempts || [];
  return h('div', { class: 'delivery', 'data-delivery-id': d.id, 'data-status': d.status },
    h('div', { class: 'delivery-head' },
      statusPill(d.status === 'delivered' ? 'succeeded' : d.status === 'exhausted' ? 'failed' : 'queued'),
      h('div', { class: 'delivery-main' },
        h('div', {}, h('strong', {}, d.event_type), ' → ', h('span', { class: 'break' }, d.url)),
        h('div', { class: 'muted small' }, `${d.status} · ${d.attempt_count} attempt${d.attempt_count === 1 ? '' : 's'}`,
          d.last_status_code ? ` · last HTTP ${d.last_status_code}` : '', d.last_error ? ` · ${d.last_error}` : '')),
      h('button', { class: 'btn btn-small redeliver', type: 'button', onclick: (e) => onRedeliver(d, e.target) }, 'Redeliver')),
    attempts.length ? h('details', {}, h('summary', {}, 'Attempts'),
      h('table', { class: 'table small' }, h('thead', {}, h('tr', {}, h('th', {}, 'At'), h('th', {}, 'HTTP'), h('th', {}, 'Latency'), h('th', {}, 'Error'))),
        h('tbody', {}, attempts.map((a) => h('tr', {}, h('td', {}, when(a.at)), h('td', {}, a.status_code ?? '—'), h('td', {}, duration(a.latency_ms)), h('td', {}, a.error || '—')))))) : null);
}

export async function render(main, { id }, { who, go }) {
  let job;
  try {
    job = await api.get(`/v1/jobs/${encodeURIComponent(id)}`);
  } catch (err) {
    clear(main, h('div', { class: 'page-head' }, h('a', { href: '#/jobs', class: 'back' }, '← Jobs')),
      err.status === 404 ? empty('No such job', `There is no job ${id} for this key.`, h('a', { class: 'btn', href: '#/jobs' }, 'Back to the jobs')) : errorBox(err));
    return;
  }
  const head = h('div', { class: 'page-head' });
  const stateBox = h('div', { id: 'job-state' });
  const outputsBox = h('div', { class: 'outputs', id: 'outputs' });
  const timeline = h('ol', { class: 'timeline', id: 'timeline' });
  const attemptsBox = h('div', { id: 'attempts' });
  const costBox = h('div', { id: 'cost' });
  const hooksBox = h('div', { id: 'deliveries' });
  const input = h('pre', { class: 'code', id: 'job-input' }, JSON.stringify(job.input, null, 2));

  const resubmit = async (btn) => {
    btn.disabled = true;
    try {
      const body = { model: job.model, input: job.input };
      if (job.metadata && Object.keys(job.metadata).length) body.metadata = job.metadata;
      const created = await api.post('/v1/jobs', body);
      toast(`Submitted ${created.id}`);
      go(`#/jobs/${encodeURIComponent(created.id)}`);
    } catch (err) {
      toast(err.message, 'error');
      btn.disabled = false;
    }
  };
  const cancel = async (btn) => {
    btn.disabled = true;
    try {
      draw(await api.post(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`));
      toast('Canceled');
    } catch (err) {
      toast(err.message, 'error');
      btn.disabled = false;
    }
  };

  function drawHead() {
    clear(head,
      h('a', { href: '#/jobs', class: 'back' }, '← Jobs'),
      h('h1', { class: 'job-title' }, h('code', {}, job.id)),
      statusPill(job.status),
      h('div', { class: 'actions' },
        !TERMINAL.has(job.status) ? h('button', { class: 'btn btn-danger', id: 'cancel', onclick: (e) => cancel(e.target) }, 'Cancel') : null,
        h('button', { class: 'btn', id: 'resubmit', onclick: (e) => resubmit(e.target) }, 'Submit again'),
        h('a', { class: 'btn btn-ghost', href: `#/new/${encodeURIComponent(job.model)}?from=${encodeURIComponent(job.id)}` }, 'Edit & submit')));
  }

  function drawState() {
    const rows = [
      ['Model', job.model], ['Modality', job.modality], who.admin ? ['Tenant', job.tenant] : null,
      ['Deployment', job.deployment || '—'], ['Created', when(job.created_at)], ['Started', when(job.started_at)],
      ['Finished', when(job.finished_at)],
      ['Took', job.finished_at ? duration(between(job.created_at, job.finished_at)) : job.started_at ? `${duration(between(job.created_at))} so far` : '—'],
      ['Deadline', when(job.deadline_at)], job.idempotency_key ? ['Idempotency key', job.idempotency_key] : null,
      Object.keys(job.metadata || {}).length ? ['Metadata', JSON.stringify(job.metadata)] : null,
    ];
    let live = null;
    if (job.status === 'running') {
      const pct = Math.round((job.progress?.fraction || 0) * 100);
      live = h('div', { class: 'big-progress' }, progressBar(job.progress?.fraction || 0), h('div', { class: 'state-text' }, `${pct}%`, job.progress?.message ? ` · ${job.progress.message}` : ''));
    } else if (job.status === 'queued') {
      live = h('div', { class: 'alert alert-info' }, `Waiting: ${waitText(job)}`);
    } else if (job.error) {
      live = h('div', { class: job.status === 'canceled' ? 'alert alert-info' : 'alert alert-error' }, h('strong', {}, job.error.code), ': ', job.error.message);
    }
    clear(stateBox, live, kv(rows));
  }

  function drawOutputs() {
    if (job.outputs?.length) clear(outputsBox, job.outputs.map((a) => preview(a, job)));
    else if (job.status === 'succeeded') clear(outputsBox, empty('No outputs', 'The job succeeded without outputs.'));
    else if (TERMINAL.has(job.status)) clear(outputsBox, empty('No outputs', `The job ${job.status}.`));
    else clear(outputsBox, h('div', { class: 'output-pending' }, h('div', { class: 'spinner' }), h('span', {}, 'Outputs appear here when the job finishes.')));
  }

  function drawAttempts() {
    const list = job.attempts || [];
    clear(attemptsBox, list.length
      ? h('div', { class: 'table-wrap' }, h('table', { class: 'table' },
        h('thead', {}, h('tr', {}, h('th', {}, '#'), h('th', {}, 'Deployment'), h('th', {}, 'Model'), h('th', {}, 'Started'), h('th', {}, 'Took'), h('th', {}, 'Result'))),
        h('tbody', {}, list.map((a, i) => h('tr', {}, h('td', {}, i + 1), h('td', {}, a.deployment), h('td', {}, a.model || job.model), h('td', {}, when(a.started_at)), h('td', {}, duration(a.duration_ms)),
          h('td', {}, a.error ? h('span', { class: 'text-error' }, `${a.error.code}: ${a.error.message}`) : h('span', { class: 'text-ok' }, 'accepted')))))))
      : h('p', { class: 'muted' }, job.status === 'queued' ? 'Not sent to a provider yet.' : 'No provider attempts recorded.'));
  }

  function drawCost() {
    const c = job.cost;
    // why a job that delivered nothing was charged: it was canceled after the provider took it
    const why = c && job.status === 'canceled' && c.status === 'settled' && c.settled
      ? h('p', { class: 'hint' }, 'Canceled after the provider took the task: charged at the hold, as providers bill a started task.') : null;
    clear(costBox, c ? [kv([['Held at submit', money(c.held, { precise: true })], ['Settled', c.settled === null || c.settled === undefined ? 'not yet' : money(c.settled, { precise: true })], ['Status', c.status]]), why]
      : h('p', { class: 'muted' }, 'No cost recorded for this job.'));
  }

  async function drawDeliveries() {
    try {
      const r = await api.get('/v1/webhooks/deliveries', { job_id: job.id, limit: 50 });
      clear(hooksBox, r.data.length ? r.data.map((d) => deliveryItem(d, redeliver))
        : h('p', { class: 'muted' }, 'No webhook deliveries for this job (no webhook_url, and no endpoint for its events).'));
    } catch (err) {
      clear(hooksBox, errorBox(err));
    }
  }
  let hookTimer = null;
  async function redeliver(d, btn) {
    btn.disabled = true;
    try {
      await api.post(`/v1/webhooks/deliveries/${encodeURIComponent(d.id)}/redeliver`);
      toast('Redelivery queued');
      await drawDeliveries();
      // watch the new attempt land
      let n = 0;
      clearInterval(hookTimer);
      hookTimer = setInterval(async () => { n += 1; await drawDeliveries(); if (n >= 10) clearInterval(hookTimer); }, 1000);
    } catch (err) {
      toast(err.message, 'error');
      btn.disabled = false;
    }
  }

  // outputs are redrawn only when they change, so a playing video is not restarted
  const outputsKey = (j) => `${j.status}:${(j.outputs || []).map((a) => a.index).join(',')}`;
  let shownOutputs = null;
  function draw(fresh) {
    job = fresh;
    drawHead(); drawState(); drawAttempts(); drawCost();
    if (outputsKey(job) !== shownOutputs) { shownOutputs = outputsKey(job); drawOutputs(); }
  }

  // two columns on a wide screen; on a phone one, in the order a person looks: status first
  const named = (name, el) => { el.classList.add(`card-${name}`); return el; };
  clear(main, head,
    h('div', { class: 'grid-2 job-grid' },
      h('div', { class: 'col' },
        named('outputs', card('Outputs', outputsBox)),
        named('input', card('Input', input)),
        named('attempts', card('Provider attempts', attemptsBox)),
        named('deliveries', card('Webhook deliveries', hooksBox))),
      h('div', { class: 'col' },
        named('status', card('Status', stateBox)),
        named('cost', card('Cost', costBox)),
        named('timeline', card('Timeline', timeline)))));
  draw(job); drawDeliveries();

  // the timeline: the job's events from its first (replayed from Redis), then live
  // (events up to the state's seq are history: they fill the timeline but do not redraw
  // the job, which the state already shows as it is now)
  const seen = new Set();
  let fromRow = rowTimeline(job);
  rowTimeline(job).forEach((ev) => timeline.append(timelineItem(ev)));
  let refetch = null;
  let stateSeq = 0;
  const live = new Live(session.key, {
    onMessage: (msg) => {
      if (msg.type === 'job.state') { stateSeq = msg.seq || 0; draw({ ...job, ...msg.job }); return; }
      if (msg.job_id !== job.id || !msg.type?.startsWith('job.')) return;
      if (fromRow) { timeline.replaceChildren(); fromRow = null; }
      const key = msg.id || `${msg.seq}.${msg.sub || 0}`;
      if (!seen.has(key)) {
        seen.add(key);
        const item = timelineItem(msg);
        const after = [...timeline.children].find((li) => Number(li.dataset.order) > order(msg));
        timeline.insertBefore(item, after || null);
      }
      if (order(msg) <= stateSeq) return; // as the server counts: (seq, sub) after (state seq, 0) is news
      if (msg.type === 'job.progress') draw(applyEvent(job, msg));
      else {
        // a transition: the row has the outputs, cost and error; read it (coalesced). A job's
        // last events are published just before its row commits: after one, read again
        // until the row shows the end (on a busy server the first read can be early).
        const ending = ['job.succeeded', 'job.failed', 'job.canceled'].includes(msg.type);
        clearTimeout(refetch);
        const read = async (tries) => {
          try { draw(await api.get(`/v1/jobs/${encodeURIComponent(job.id)}`)); } catch { /* keep what is shown */ }
          if (ending && !TERMINAL.has(job.status) && tries < 40) { refetch = setTimeout(() => read(tries + 1), 250); return; }
          if (TERMINAL.has(job.status)) setTimeout(drawDeliveries, 1500);
        };
        refetch = setTimeout(() => read(0), 100);
      }
    },
  }).start();
  live.follow(job.id, 0);
  const tick = setInterval(() => { if (!TERMINAL.has(job.status)) drawState(); }, 5000);
  return () => { live.close(); clearInterval(tick); clearInterval(hookTimer); clearTimeout(refetch); };
}
