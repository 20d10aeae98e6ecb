import { h } from '../lib/dom.js';
import { identify, session } from '../lib/api.js';

export function render({ message, onSignedIn }) {
  const input = h('input', { id: 'api-key', type: 'password', name: 'key', autocomplete: 'off', spellcheck: 'false', placeholder: 'gr_…', required: true });
  const status = h('div', { class: 'signin-status', role: 'alert' }, message ? h('div', { class: 'alert alert-info' }, message) : null);
  const button = h('button', { class: 'btn btn-primary', type: 'submit', id: 'signin' }, 'Sign in');
  const form = h('form', {
    class: 'signin card',
    onsubmit: async (e) => {
      e.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      button.disabled = true;
      button.textContent = 'Checking…';
      try {
        const who = await identify(key);
        session.save(key, who);
        onSignedIn();
      } catch (err) {
        status.replaceChildren(h('div', { class: 'alert alert-error' },
          err.status === 401 ? 'This key is not accepted: unknown, revoked or expired.' : err.message));
        button.disabled = false;
        button.textContent = 'Sign in';
      }
    },
  },
  h('div', { class: 'signin-brand' }, h('img', { src: '/dashboard/assets/favicon.svg', alt: '', width: 40, height: 40 }), h('h1', {}, 'genroute')),
  h('p', { class: 'muted' }, 'Sign in with an API key. A tenant key shows its tenant\u2019s jobs and usage; an admin key also shows every tenant, the keys and the deployments.'),
  h('label', { for: 'api-key' }, 'API key'),
  input,
  h('p', { class: 'hint' }, 'The key stays in this browser tab (sessionStorage) and is sent only to this server, as a bearer header. Make one with ', h('code', {}, 'genroute keys create --name me'), '.'),
  status,
  button);
  setTimeout(() => input.focus(), 0);
  return form;
}
