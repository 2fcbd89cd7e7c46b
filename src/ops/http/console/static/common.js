// Shared helpers of the console screens: API calls, a DOM builder, formatting, the live stream
// and the error banner. Server strings only ever reach the page through textContent/attributes.

const SVG_NS = 'http://www.w3.org/2000/svg';

/** Sends the browser to the login page, coming back here afterwards. */
export function toLogin() {
  const here = location.pathname + location.search;
  location.assign('/login?next=' + encodeURIComponent(here));
}

/**
 * Calls the JSON API. Resolves to the parsed body (null when empty); rejects with an Error whose
 * `.status` is the HTTP status (0: no answer) and `.body` the parsed error body.
 */
export async function api(path, { method = 'GET', body } = {}) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    const err = new Error('vigil did not answer (' + e.message + ')');
    err.status = 0;
    err.body = null;
    throw err;
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (res.status === 401) toLogin();
  if (!res.ok) {
    const msg = (data && data.error && data.error.message) || `${res.status} ${res.statusText}`.trim();
    const err = new Error(msg);
    err.status = res.status;
    err.body = data;
    throw err;
  }
  return data;
}

function build(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  const add = (c) => {
    if (c === null || c === undefined || c === false) return;
    if (Array.isArray(c)) c.forEach(add);
    else node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  };
  add(children);
  return node;
}

/** `el('a', {href, class}, 'text', child, [more])`: attributes as strings, children as text or nodes. */
export function el(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** The same for SVG elements. */
export function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

/** A time (RFC 3339 text or unix ms) in local time; the date only when not today. */
export function fmtTime(iso) {
  if (iso === null || iso === undefined || iso === '') return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  if (d.toDateString() === new Date().toDateString()) return time;
  return d.toLocaleDateString([], { year: 'numeric', month: 'short', day: 'numeric' }) + ' ' + time;
}

export function fmtScore(x) {
  return typeof x === 'number' && Number.isFinite(x) ? x.toFixed(2) : '—';
}

/** A number with `digits` decimals, or a dash. */
export function fmtNum(x, digits = 1) {
  return typeof x === 'number' && Number.isFinite(x) ? x.toFixed(digits) : '—';
}

export const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

/** The list of GET /api/cameras, bare or as `{"cameras": [...]}`. */
export function cameraList(data) {
  if (Array.isArray(data)) return data;
  return (data && Array.isArray(data.cameras)) ? data.cameras : [];
}

export const cameraName = (c) => String(c.camera ?? c.name ?? '');

/** What a camera's badge says: "paused" when analysis is off, else its state. */
export const stateOf = (c) => (c.enabled === false ? 'paused' : String(c.state || 'starting'));

/** Frames analysed so far, where the server reports the count (else null). */
export function analysedCount(c) {
  if (typeof c.analysed === 'number') return c.analysed;
  const f = c.frames || {};
  return typeof f.analysed === 'number' ? f.analysed : null;
}

/** The state badge of a camera (with the reason when reconnecting). */
export function badge(c) {
  const state = stateOf(c);
  const node = el('span', { class: 'state', 'data-state': state }, state);
  if (state === 'reconnecting' && c.last_error) node.append(' ', el('span', { class: 'reason' }, c.last_error));
  return node;
}

/** Shows (or replaces) an error banner at the top of main; `key` lets a later call clear it. */
export function showError(message, key = 'main') {
  const main = document.getElementById('main') || document.body;
  let b = main.querySelector(`.banner.error[data-key="${key}"]`);
  if (!b) {
    b = el('div', { class: 'banner error', role: 'alert', 'data-key': key });
    main.prepend(b);
  }
  b.textContent = message instanceof Error ? message.message : String(message);
}

export function clearError(key = 'main') {
  const b = document.querySelector(`.banner.error[data-key="${key}"]`);
  if (b) b.remove();
}

/**
 * Opens the live stream: `event` messages go to onEvent(event), `cameras` messages to
 * onCameras(list body), `lagged` (event messages this reader missed) to onLagged(n).
 * EventSource reconnects by itself; when it gives up (an error status), this checks the login
 * and opens a new one a few seconds later.
 */
export function stream(onEvent, onCameras, onLagged) {
  let es;
  const handler = (fn) => (m) => {
    let data;
    try { data = JSON.parse(m.data); } catch { return; }
    try { fn(data); } catch (e) { showError(e, 'stream-handler'); }
  };
  const open = () => {
    es = new EventSource('/api/stream');
    if (onEvent) es.addEventListener('event', handler(onEvent));
    if (onCameras) es.addEventListener('cameras', handler(onCameras));
    if (onLagged) es.addEventListener('lagged', handler(onLagged));
    es.addEventListener('open', () => { clearError('stream'); document.body.dataset.stream = 'open'; });
    es.addEventListener('error', () => {
      if (es.readyState === EventSource.CLOSED) {
        showError('Live updates stopped; trying again…', 'stream');
        setTimeout(() => api('/api/cameras').then(open, open), 5000);
      } else {
        showError('Live updates interrupted; reconnecting…', 'stream');
      }
    });
  };
  open();
  return { close: () => es.close() };
}

/**
 * Runs `fn` now and then every `ms` (or what it returns, when a number), one run at a time,
 * skipping runs while the page is hidden. Returns a function that stops it.
 */
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    let next = ms;
    if (!document.hidden) {
      try {
        const r = await fn();
        if (typeof r === 'number' && r > 0) next = r;
        clearError('poll');
      } catch (e) {
        showError(e, 'poll');
      }
    }
    if (!stopped) timer = setTimeout(tick, next);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

/** A path segment for a name (camera, head, zone). */
export const seg = (s) => encodeURIComponent(s);
