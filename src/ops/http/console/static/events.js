// Events screen: the last events matching the filters, then live ones from the stream (a message
// about a listed event replaces its row; a new event that matches goes on top).
import { api, el, fmtScore, fmtNum, fmtTime, stream, showError, clearError, cameraList, cameraName,
  seg } from './common.js';

const LIMIT = 100;
const form = document.getElementById('filters');
const fCamera = document.getElementById('f-camera');
const fZone = document.getElementById('f-zone');
const fLabel = document.getElementById('f-label');
const fSince = document.getElementById('f-since');
const list = document.getElementById('events');
const count = document.getElementById('events-count');

let loading = 0; // id of the load in flight (0: none)
let held = []; // stream messages that arrived during a load

function filters() {
  const f = {};
  if (fCamera.value) f.camera = fCamera.value;
  if (fZone.value.trim()) f.zone = fZone.value.trim();
  if (fLabel.value.trim()) f.label = fLabel.value.trim();
  if (fSince.value) {
    const d = new Date(fSince.value);
    if (!Number.isNaN(d.getTime())) f.since = d.toISOString();
  }
  return f;
}

/** Whether a live event belongs in the list (time: it is new, so after any `since`). */
function matches(e, f) {
  return (!f.camera || e.camera === f.camera)
    && (!f.label || e.label === f.label)
    && (!f.zone || (e.zone ?? '') === f.zone);
}

function row(e) {
  const id = String(e.id);
  const msg = el('span', { class: 'event-msg', role: 'status' });
  // The picture that started the event goes to its head's inbox; an event of the model's own
  // classes has no head to teach.
  const wrong = el('button', {
    class: 'wrong', type: 'button',
    title: e.head ? `Tell vigil this ${e.label} was wrong: its picture goes to head ${e.head.name}'s inbox`
      : 'The model\'s own classes: bind a head to this camera or zone to teach it',
  }, 'Wrong');
  wrong.disabled = !e.head;
  wrong.addEventListener('click', async () => {
    wrong.disabled = true;
    msg.classList.remove('error');
    msg.textContent = 'sending…';
    try {
      const r = await api(`/api/events/${seg(id)}/wrong`, { method: 'POST' });
      msg.textContent = `its picture is in ${r.head}'s inbox`;
    } catch (err) {
      msg.classList.add('error');
      msg.textContent = err.message;
    } finally {
      wrong.disabled = false;
    }
  });
  const model = e.model ? `${e.model.name} v${e.model.version}` : '';
  const head = e.head ? `head ${e.head.name} v${e.head.version}` : null;
  return el('li', {
    class: 'event', 'data-id': id, 'data-camera': e.camera, 'data-zone': e.zone ?? '',
    'data-label': e.label, 'data-type': e.type,
  },
  e.snapshot
    ? el('a', { class: 'snapshot-link', href: e.snapshot },
      el('img', { class: 'snapshot', loading: 'lazy', src: e.snapshot, alt: `snapshot of ${e.label} on ${e.camera}` }))
    : el('div', { class: 'snapshot none' }, 'no snapshot'),
  el('div', { class: 'event-body' },
    el('p', { class: 'event-title' },
      el('strong', { class: 'label' }, e.label), ' ',
      el('span', { class: 'score', title: 'score' }, fmtScore(e.score)), ' ',
      el('span', { class: 'type', 'data-type': e.type }, e.type)),
    el('p', {}, el('span', { class: 'camera' }, e.camera), ' · ',
      el('span', { class: 'zone' }, e.zone ?? 'whole frame')),
    el('p', { class: 'muted' },
      el('time', { datetime: e.start }, fmtTime(e.start)), ' · ',
      `${fmtNum(e.duration, 1)} s`),
    el('p', { class: 'muted small' }, model, head ? ` · ${head}` : '')),
  el('div', { class: 'event-actions' }, wrong, msg));
}

function findRow(id) {
  return [...list.children].find((li) => li.dataset.id === String(id)) || null;
}

function showCount() {
  const n = list.children.length;
  count.textContent = n ? `${n} event${n === 1 ? '' : 's'}` : 'No events match.';
}

function onEvent(e) {
  if (loading) { held.push(e); return; }
  const old = findRow(e.id);
  if (old) {
    const fresh = row(e);
    // Keep what the operator did on the row (a "Wrong" reply).
    const msg = old.querySelector('.event-msg');
    if (msg && msg.textContent) fresh.querySelector('.event-msg').replaceWith(msg);
    old.replaceWith(fresh);
  } else if (matches(e, filters())) {
    list.prepend(row(e));
    while (list.children.length > LIMIT) list.lastElementChild.remove();
  }
  showCount();
}

async function load() {
  const f = filters();
  const q = new URLSearchParams({ limit: String(LIMIT), ...f });
  // The filters go in the address too, so the view can be shared or reloaded.
  const shown = new URLSearchParams(f);
  shown.delete('since');
  history.replaceState(null, '', location.pathname + (shown.toString() ? `?${shown}` : ''));
  const me = ++loading;
  try {
    const data = await api(`/api/events?${q}`);
    if (me !== loading) return; // a newer load is in flight
    const events = Array.isArray(data) ? data : (data && data.events) || [];
    list.replaceChildren(...events.filter((e) => matches(e, f)).map(row));
    clearError();
  } catch (e) {
    if (me === loading) showError(`Cannot load the events: ${e.message}`);
  } finally {
    if (me === loading) {
      loading = 0;
      const h = held;
      held = [];
      h.forEach(onEvent);
      showCount();
    }
  }
}

let debounce = null;
form.addEventListener('input', (ev) => {
  clearTimeout(debounce);
  debounce = setTimeout(load, ev.target === fZone || ev.target === fLabel ? 350 : 0);
});
form.addEventListener('submit', (ev) => { ev.preventDefault(); clearTimeout(debounce); load(); });
form.addEventListener('reset', () => setTimeout(load, 0));

async function fillCameras() {
  try {
    const names = cameraList(await api('/api/cameras')).map(cameraName).sort();
    const keep = fCamera.value;
    if (keep && !names.includes(keep)) names.push(keep);
    fCamera.replaceChildren(el('option', { value: '' }, 'All cameras'),
      ...names.map((n) => el('option', { value: n }, n)));
    fCamera.value = keep;
  } catch (e) {
    showError(`Cannot list the cameras: ${e.message}`, 'cameras');
  }
}

// Filters given in the address (e.g. from a camera page).
const given = new URLSearchParams(location.search);
if (given.get('camera')) {
  fCamera.append(el('option', { value: given.get('camera') }, given.get('camera')));
  fCamera.value = given.get('camera');
}
fZone.value = given.get('zone') || '';
fLabel.value = given.get('label') || '';

fillCameras();
load();
stream(onEvent, null, () => { if (!loading) load(); }); // missed messages: read the list again
