// The dashboard's shell: sign-in gate, top navigation, and a hash router (#/jobs, #/jobs/ID,
// #/new, #/usage, #/admin/...). Each page module exports render(main, params, ctx) and may
// return a cleanup function (closing its websocket, timers).
import { h, clear, errorBox } from './lib/dom.js';
import { session, whenUnauthorized } from './lib/api.js';
import * as signin from './pages/signin.js';
import * as jobs from './pages/jobs.js';
import * as job from './pages/job.js';
import * as submit from './pages/submit.js';
import * as usage from './pages/usage.js';
import * as admin from './pages/admin.js';

const ROUTES = [
  [/^\/jobs\/([^/?]+)$/, job, (m) => ({ id: decodeURIComponent(m[1]) })],
  [/^\/jobs$/, jobs, () => ({})],
  [/^\/new(?:\/([^/?]+))?$/, submit, (m) => ({ model: m[1] ? decodeURIComponent(m[1]) : null })],
  [/^\/usage$/, usage, () => ({})],
  [/^\/admin(?:\/(\w+))?$/, admin, (m) => ({ tab: m[1] || 'tenants' })],
];

const NAV = [
  ['#/jobs', 'Jobs', /^\/jobs/],
  ['#/new', 'New job', /^\/new/],
  ['#/usage', 'Usage', /^\/usage/],
  ['#/admin', 'Admin', /^\/admin/, true],
];

let cleanup = null;
const app = document.getElementById('app');

export function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/jobs';
  const [path, qs] = raw.split('?');
  return { path, query: new URLSearchParams(qs || '') };
}

export function go(hash) {
  if (location.hash === hash) route(); else location.hash = hash;
}

function signOut(message) {
  session.clear();
  if (cleanup) { cleanup(); cleanup = null; }
  renderSignIn(message);
}

function renderSignIn(message) {
  clear(app, h('main', { class: 'signin-wrap' }, signin.render({ message, onSignedIn: () => route() })));
}

function shell(path, who) {
  const nav = h('nav', { class: 'nav', 'aria-label': 'Main' },
    NAV.filter(([, , , adminOnly]) => !adminOnly || who.admin).map(([href, label, re]) =>
      h('a', { href, class: re.test(path) ? 'active' : '', 'aria-current': re.test(path) ? 'page' : null }, label)));
  const header = h('header', { class: 'topbar' },
    h('a', { href: '#/jobs', class: 'brand' }, h('img', { src: '/dashboard/assets/favicon.svg', alt: '', width: 24, height: 24 }), 'genroute'),
    nav,
    h('div', { class: 'who' },
      h('span', { class: 'who-tenant', title: 'signed in as' }, who.admin ? h('span', { class: 'badge badge-admin' }, 'admin') : null, who.tenant),
      h('button', { class: 'btn btn-ghost btn-small', id: 'signout', onclick: () => signOut('Signed out.') }, 'Sign out')));
  const main = h('main', { class: 'page', id: 'main' });
  clear(app, header, main);
  return main;
}

async function route() {
  if (cleanup) { try { cleanup(); } catch { /* a page's cleanup must not stop navigation */ } cleanup = null; }
  const who = session.who;
  if (!session.key || !who) { renderSignIn(); return; }
  const { path, query } = parseHash();
  const main = shell(path, who);
  for (const [re, page, params] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    if (page === admin && !who.admin) {
      clear(main, errorBox({ code: 'forbidden', message: 'The admin pages need an admin key. Sign in with one to see tenants, keys and deployments.' }));
      return;
    }
    try {
      const r = await page.render(main, { ...params(m), query }, { who, go });
      if (typeof r === 'function') cleanup = r;
    } catch (err) {
      clear(main, errorBox(err, () => route()));
    }
    return;
  }
  clear(main, h('div', { class: 'empty' }, h('div', { class: 'empty-title' }, 'No such page'), h('p', {}, h('a', { href: '#/jobs' }, 'Go to the jobs'))));
}

whenUnauthorized(() => signOut('Your key is no longer accepted (revoked or expired). Sign in again.'));
window.addEventListener('hashchange', route);
window.addEventListener('error', (e) => {
  const main = document.getElementById('main');
  if (main && !main.childElementCount) clear(main, errorBox({ message: `the page failed: ${e.message}` }, () => route()));
});
route();
