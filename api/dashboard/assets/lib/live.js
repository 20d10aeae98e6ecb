// One websocket to /v1/ws per page: authenticates with a first message (the key never goes
// into a URL), re-subscribes after a drop with the last event id it saw, so nothing is missed.

export class Live {
  constructor(key, { onMessage, onStatus } = {}) {
    this.key = key;
    this.onMessage = onMessage || (() => {});
    this.onStatus = onStatus || (() => {});
    this.all = null; // {tenant?} when following every job
    this.jobs = new Map(); // job id -> last seq seen (0: from the start)
    this.ws = null;
    this.closed = false;
    this.delay = 500;
    this.timer = null;
  }

  start() { this._open(); return this; }

  followAll(tenant) {
    this.all = { tenant: tenant || null };
    this._send(this._allMessage());
  }

  follow(jobId, fromSeq = 0) {
    if (!this.jobs.has(jobId)) this.jobs.set(jobId, fromSeq);
    this._send({ op: 'subscribe', job_ids: [jobId], last_event_ids: { [jobId]: String(this.jobs.get(jobId)) } });
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000);
  }

  _allMessage() {
    const m = { op: 'subscribe', all: true };
    if (this.all && this.all.tenant) m.tenant = this.all.tenant;
    return m;
  }

  _send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  _open() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${proto}//${location.host}/v1/ws`);
    this.ws = ws;
    this.onStatus('connecting');
    ws.onopen = () => {
      ws.send(JSON.stringify({ op: 'auth', token: this.key }));
      if (this.all) ws.send(JSON.stringify(this._allMessage()));
      if (this.jobs.size) {
        const ids = [...this.jobs.keys()];
        ws.send(JSON.stringify({ op: 'subscribe', job_ids: ids, last_event_ids: Object.fromEntries(ids.map((id) => [id, String(this.jobs.get(id))])) }));
      }
      this.delay = 500;
      this.onStatus('live');
    };
    ws.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch { return; }
      if (msg.job_id && typeof msg.seq === 'number' && this.jobs.has(msg.job_id)) {
        this.jobs.set(msg.job_id, Math.max(this.jobs.get(msg.job_id), msg.seq));
      }
      if (msg.type !== 'ping' && msg.type !== 'pong') this.onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (this.closed) return;
      if (ev.code === 4401) { this.onStatus('unauthorized'); return; }
      this.onStatus('reconnecting');
      this.timer = setTimeout(() => this._open(), this.delay);
      this.delay = Math.min(this.delay * 2, 10000);
    };
  }
}
