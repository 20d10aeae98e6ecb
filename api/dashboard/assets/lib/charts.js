// Small SVG charts: no library, readable at any width (viewBox scales), a <title> per bar.
import { h, s } from './dom.js';

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/** The axis' top and ticks: counts get whole-number ticks (no "1, 1, 2, 2"), money any. */
function axis(v, integer) {
  if (!integer) { const max = niceMax(v); return { max, ticks: [0, 0.25, 0.5, 0.75, 1].map((f) => max * f) }; }
  const step = Math.max(1, Math.ceil(niceMax(v / 4)));
  const n = Math.max(1, Math.ceil(v / step));
  return { max: step * n, ticks: Array.from({ length: n + 1 }, (_, i) => i * step) };
}

/**
 * A bar chart of `rows` ([{label, value, short?}]), values formatted by `format`: vertical
 * bars for a time axis (days), horizontal ones for categories (models, keys) so that long
 * names stay readable on a phone. `width` is the width it is shown at (its container's):
 * the drawing is laid out for it, so its text keeps its size on a phone instead of being
 * scaled down with the picture. `integer`: the values are counts.
 */
export function barChart(rows, { format = String, horizontal = false, title = '', width = 720, integer = false } = {}) {
  if (!rows.length) return h('div', { class: 'chart-empty' }, 'Nothing in this range.');
  const W = Math.max(260, Math.round(width));
  return horizontal ? hbars(rows, format, title, W, integer) : vbars(rows, format, title, W, integer);
}

function vbars(rows, format, title, W, integer) {
  const H = W < 480 ? 200 : 260, L = 64, R = 12, T = 16, B = 44;
  const { max, ticks } = axis(Math.max(...rows.map((r) => r.value)), integer);
  const bw = (W - L - R) / rows.length;
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const grid = ticks.map((v) => [
    s('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid' }),
    s('text', { x: L - 8, y: y(v) + 4, 'text-anchor': 'end', class: 'axis' }, format(v)),
  ]);
  const every = Math.ceil(rows.length / Math.max(2, Math.floor((W - L - R) / 46)));
  const bars = rows.map((r, i) => {
    const x = L + i * bw + bw * 0.15;
    const top = y(r.value);
    return s('g', { class: 'bar' },
      s('title', {}, `${r.label}: ${format(r.value)}`),
      s('rect', { x, y: top, width: Math.max(1, bw * 0.7), height: Math.max(0, H - B - top), rx: 2 }),
      i % every === 0 ? s('text', { x: x + bw * 0.35, y: H - B + 16, 'text-anchor': 'middle', class: 'axis' }, r.short || r.label) : null);
  });
  return s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: 'chart', role: 'img', 'aria-label': title }, grid, bars);
}

function hbars(rows, format, title, W, integer) {
  const row = 30, L = Math.min(180, Math.round(W * 0.36)), R = W < 480 ? 64 : 90, T = 8;
  const H = T * 2 + rows.length * row;
  const { max } = axis(Math.max(...rows.map((r) => r.value)), integer);
  const chars = Math.floor((L - 8) / 7);
  const bars = rows.map((r, i) => {
    const y = T + i * row;
    const w = ((W - L - R) * r.value) / max;
    const label = r.label.length > chars ? `${r.label.slice(0, chars - 1)}…` : r.label;
    return s('g', { class: 'bar' },
      s('title', {}, `${r.label}: ${format(r.value)}`),
      s('text', { x: L - 8, y: y + row / 2 + 4, 'text-anchor': 'end', class: 'label' }, label),
      s('rect', { x: L, y: y + 5, width: Math.max(1, w), height: row - 10, rx: 3 }),
      s('text', { x: L + Math.max(1, w) + 6, y: y + row / 2 + 4, class: 'value' }, format(r.value)));
  });
  return s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: 'chart', role: 'img', 'aria-label': title }, bars);
}

/** A thin meter: used / total (budget). */
export function meter(used, total) {
  const pct = total ? Math.min(100, (100 * used) / total) : 0;
  const cls = pct > 90 ? 'meter-fill danger' : pct > 70 ? 'meter-fill warn' : 'meter-fill';
  return h('div', { class: 'meter', title: `${pct.toFixed(1)}%` }, h('div', { class: cls, style: { width: `${pct}%` } }));
}
