// Pieces shared by the job pages: how a job's state reads in a row or a header.
import { h, progressBar, duration } from '../lib/dom.js';

export const TERMINAL = new Set(['succeeded', 'failed', 'canceled']);

export function promptOf(input) {
  if (!input) return '';
  if (typeof input.prompt === 'string') return input.prompt;
  if (typeof input.text === 'string') return input.text;
  if (Array.isArray(input.messages)) {
    const last = [...input.messages].reverse().find((m) => m && m.role === 'user');
    if (last && typeof last.content === 'string') return last.content;
  }
  return '';
}

export function waitText(job) {
  const parts = [];
  if (job.queue_position !== null && job.queue_position !== undefined) parts.push(`#${job.queue_position + 1} in queue`);
  else parts.push('waiting');
  if (job.eta_seconds !== null && job.eta_seconds !== undefined) parts.push(`ETA ${duration(job.eta_seconds * 1000)}`);
  return parts.join(' · ');
}

/** The live part of a job: a progress bar when running, its place and ETA when queued. */
export function stateCell(job) {
  if (job.status === 'running') {
    const pct = Math.round((job.progress?.fraction || 0) * 100);
    return h('div', { class: 'state state-running' },
      progressBar(job.progress?.fraction || 0, job.progress?.message),
      h('span', { class: 'state-text' }, `${pct}%`, job.progress?.message ? ` · ${job.progress.message}` : ''));
  }
  if (job.status === 'queued') return h('div', { class: 'state state-queued' }, h('span', { class: 'state-text' }, waitText(job)));
  if (job.status === 'failed' && job.error) return h('div', { class: 'state state-failed' }, h('span', { class: 'state-text', title: job.error.message }, job.error.code));
  if (job.status === 'succeeded') {
    const ms = job.started_at && job.finished_at ? new Date(job.finished_at) - new Date(job.created_at) : null;
    return h('div', { class: 'state' }, h('span', { class: 'state-text' }, `${job.outputs?.length ?? 0} output${job.outputs?.length === 1 ? '' : 's'}`, ms !== null ? ` · ${duration(ms)}` : ''));
  }
  return h('div', { class: 'state' }, h('span', { class: 'state-text muted' }, job.status));
}

/** Fold a live event into a job object (status, progress, queue place, ETA). A job that
 * ended stays as it ended: a late or replayed event of its run changes nothing. */
export function applyEvent(job, ev) {
  if (TERMINAL.has(job.status)) return job;
  const d = ev.data || {};
  const next = { ...job };
  if (d.status) next.status = d.status;
  if ('progress' in d) next.progress = { fraction: d.progress ?? 0, message: d.message ?? null };
  if ('queue_position' in d) next.queue_position = d.queue_position;
  if ('eta_seconds' in d) next.eta_seconds = d.eta_seconds;
  if (d.deployment) next.deployment = d.deployment;
  if (d.error) next.error = { ...d.error, details: null };
  return next;
}
