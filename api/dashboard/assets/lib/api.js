// The REST client: the key lives in sessionStorage and goes out as a bearer header only.

const KEY = 'genroute.key';
const WHO = 'genroute.who';

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get who() {
    try { return JSON.parse(sessionStorage.getItem(WHO) || 'null'); } catch { return null; }
  },
  save(key, who) {
    sessionStorage.setItem(KEY, key);
    sessionStorage.setItem(WHO, JSON.stringify(who));
  },
  clear() {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(WHO);
  },
};

let onUnauthorized = () => {};
export function whenUnauthorized(fn) { onUnauthorized = fn; }

async function parseError(r) {
  let body = null;
  try { body = await r.json(); } catch { /* not JSON */ }
  const e = body && body.error ? body.error : null;
  if (e && typeof e === 'object') return new ApiError(r.status, e.code || String(r.status), e.message || r.statusText, e.details);
  if (body && body.detail) return new ApiError(r.status, String(r.status), typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail));
  return new ApiError(r.status, String(r.status), `${r.status} ${r.statusText || 'request failed'}`);
}

export async function request(path, { method = 'GET', body, query, key } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== '' && v !== null && v !== undefined) url.searchParams.set(k, v);
  }
  const headers = { Accept: 'application/json' };
  const token = key || session.key;
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let r;
  try {
    r = await fetch(url, { method, headers, body: body !== undefined ? JSON.stringify(body) : undefined });
  } catch (exc) {
    throw new ApiError(0, 'network_error', `the API did not answer (${exc.message}); is the server running?`);
  }
  if (!r.ok) {
    const err = await parseError(r);
    if (r.status === 401 && !key) onUnauthorized(err);
    throw err;
  }
  if (r.status === 204) return null;
  return r.json();
}

export const api = {
  get: (path, query) => request(path, { query }),
  post: (path, body, query) => request(path, { method: 'POST', body: body ?? {}, query }),
  patch: (path, body) => request(path, { method: 'PATCH', body }),
  del: (path) => request(path, { method: 'DELETE' }),
};

/** Who a key belongs to: its tenant (GET /v1/usage names it) and whether it is an admin key. */
export async function identify(key) {
  const usage = await request('/v1/usage', { key, query: { group_by: 'model' } });
  let admin = false;
  try {
    await request('/v1/admin/tenants', { key, query: { limit: 1 } });
    admin = true;
  } catch (e) {
    if (e.status !== 403) throw e;
  }
  return { tenant: usage.tenant, admin };
}

let modelsCache = null;
export async function models(force = false) {
  if (!modelsCache || force) modelsCache = request('/v1/models').then((r) => r.data).catch((e) => { modelsCache = null; throw e; });
  return modelsCache;
}
export function forgetModels() { modelsCache = null; }
