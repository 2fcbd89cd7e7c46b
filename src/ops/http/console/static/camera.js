// Camera screen: the zone editor over the latest frame, and the camera's status.
// Zones are kept as fractions of the frame (0..1), the same as config.toml and the API.
import { api, el, svg, $, fmtTime, fmtNum, stream, showError, clearError, cameraList, cameraName,
  analysedCount, badge, plural, every, seg } from './common.js';

const stage = $('#stage');
const camera = stage.dataset.camera;
const base = `/api/cameras/${seg(camera)}`;
const overlay = $('#overlay');
const list = $('#zones');
const listError = $('#zones-error');
const status = $('#save-status');
const facts = $('#camera-status');
const polyBtn = $('#add-polygon');
const saveBtn = $('#save');

// {uid, name, rect: [x0,y0,x1,y1]|null, polygon: [[x,y],...]|null, head: text, thresholds: text}
let zones = [];
let uids = 0;
let selected = null; // uid of the selected zone
let drag = null; // pointer drag in progress: {id, a, b, hit}
let poly = null; // polygon being drawn: {points, hover}
let dirty = false;
let loadedFrame = false;
let lastStatus = {}; // the camera's last known status (GET, then the stream)

const draftBox = el('div', { class: 'draft-rect', hidden: true });
stage.append(draftBox);
stage.tabIndex = 0;

const clamp = (v) => Math.min(1, Math.max(0, v));
const r4 = (v) => Math.round(v * 10000) / 10000;
const f3 = (v) => Number(v).toFixed(3);
const byUid = (uid) => zones.find((z) => z.uid === uid) || null;
const rowOf = (uid) => list.querySelector(`li[data-uid="${uid}"]`);

/** Pointer position as fractions of the displayed frame. */
function frac(e) {
  const r = stage.getBoundingClientRect();
  return [clamp((e.clientX - r.left) / r.width), clamp((e.clientY - r.top) / r.height)];
}

/** Distance in screen pixels between two fraction points. */
function px(p, q) {
  const r = stage.getBoundingClientRect();
  return Math.hypot((p[0] - q[0]) * r.width, (p[1] - q[1]) * r.height);
}

const bigEnough = (a, b) => Math.abs(a[0] - b[0]) >= 0.01 && Math.abs(a[1] - b[1]) >= 0.01;

function markDirty() {
  dirty = true;
  status.textContent = 'Unsaved changes';
}

function firstFreeName() {
  const taken = new Set(zones.map((z) => z.name.trim()));
  let n = 1;
  while (taken.has(`zone${n}`)) n++;
  return `zone${n}`;
}

function thresholdsText(t) {
  return t && typeof t === 'object' ? Object.entries(t).map(([k, v]) => `${k}=${v}`).join(', ') : '';
}

/** "label=0.8, other=0.5" -> {label: 0.8, other: 0.5}, and the parts that are not label=number. */
function parseThresholds(text) {
  const out = {};
  const bad = [];
  for (const part of text.split(',')) {
    const p = part.trim();
    if (!p) continue;
    const m = /^(.+?)\s*[=:]\s*(\S+)$/.exec(p);
    const v = m ? Number(m[2]) : NaN;
    if (!m || !Number.isFinite(v)) bad.push(p);
    else out[m[1].trim()] = v;
  }
  return { out, bad };
}

function toZones(raw) {
  const items = Array.isArray(raw) ? raw
    : raw && typeof raw === 'object' ? Object.entries(raw).map(([name, z]) => ({ name, ...z })) : [];
  return items.map((z) => ({
    uid: ++uids,
    name: String(z.name ?? ''),
    polygon: Array.isArray(z.polygon) && z.polygon.length ? z.polygon.map((p) => [p[0], p[1]]) : null,
    rect: Array.isArray(z.rect) ? z.rect.slice(0, 4) : null,
    head: z.head ? String(z.head) : '',
    thresholds: thresholdsText(z.thresholds),
  }));
}

function coordsText(z) {
  if (z.polygon) return `polygon ${z.polygon.map((p) => `(${f3(p[0])}, ${f3(p[1])})`).join(' ')}`;
  if (z.rect) return `rect ${f3(z.rect[0])}, ${f3(z.rect[1])} → ${f3(z.rect[2])}, ${f3(z.rect[3])}`;
  return 'no area';
}

// ---- overlay ----

function renderShapes() {
  const r = stage.getBoundingClientRect();
  const nodes = zones.map((z) => {
    let shape;
    let at;
    if (z.polygon) {
      shape = svg('polygon', { points: z.polygon.map((p) => p.join(',')).join(' ') });
      at = [Math.min(...z.polygon.map((p) => p[0])), Math.min(...z.polygon.map((p) => p[1]))];
    } else if (z.rect) {
      const [x0, y0, x1, y1] = z.rect;
      shape = svg('rect', { x: Math.min(x0, x1), y: Math.min(y0, y1), width: Math.abs(x1 - x0), height: Math.abs(y1 - y0) });
      at = [Math.min(x0, x1), Math.min(y0, y1)];
    } else {
      return null;
    }
    const g = svg('g', {
      class: 'zone-shape' + (z.uid === selected ? ' selected' : ''), 'data-uid': z.uid,
      tabindex: 0, role: 'button', 'aria-label': `zone ${z.name}`,
    }, shape);
    // The label is drawn in pixels: undo the stretch of the 0..1 view box.
    if (r.width && r.height) {
      g.append(svg('text', {
        transform: `translate(${at[0] + 4 / r.width} ${at[1] + 15 / r.height}) scale(${1 / r.width} ${1 / r.height})`,
        'font-size': 13,
      }, z.name));
    }
    return g;
  });
  if (poly && poly.points.length) {
    const pts = poly.hover ? [...poly.points, poly.hover] : poly.points;
    nodes.push(svg('polyline', { class: 'draft', points: pts.map((p) => p.join(',')).join(' ') }));
    nodes.push(svg('path', { class: 'draft-dots', d: poly.points.map((p) => `M${p[0]} ${p[1]}l0 0`).join('') }));
  }
  overlay.replaceChildren(...nodes.filter(Boolean));
}

function showDraftBox(a, b) {
  Object.assign(draftBox.style, {
    left: `${Math.min(a[0], b[0]) * 100}%`, top: `${Math.min(a[1], b[1]) * 100}%`,
    width: `${Math.abs(a[0] - b[0]) * 100}%`, height: `${Math.abs(a[1] - b[1]) * 100}%`,
  });
  draftBox.hidden = false;
}

// ---- list ----

function zoneRow(z) {
  const slot = (field) => el('span', { class: 'error', 'data-for': field, id: `err-${z.uid}-${field}` });
  const input = (cls, field, value, attrs) => el('input', {
    class: cls, value, autocomplete: 'off', spellcheck: 'false', 'aria-describedby': `err-${z.uid}-${field}`, ...attrs,
  });
  const name = input('zone-name', 'name', z.name, { 'aria-label': 'zone name' });
  const head = input('zone-head', 'head', z.head, { placeholder: 'head (optional)', 'aria-label': 'head' });
  const thr = input('zone-thresholds', 'thresholds', z.thresholds, { placeholder: 'label=0.8, other=0.5', 'aria-label': 'thresholds' });
  const del = el('button', { class: 'zone-delete', type: 'button' }, 'Delete');
  const li = el('li', { class: 'zone' + (z.uid === selected ? ' selected' : ''), 'data-zone': z.name, 'data-uid': z.uid },
    el('div', { class: 'field' }, name, slot('name')),
    el('div', { class: 'field' }, el('span', { class: 'coords', 'aria-describedby': `err-${z.uid}-coords` }, coordsText(z)), slot('coords')),
    el('div', { class: 'field' }, head, slot('head')),
    el('div', { class: 'field' }, thr, slot('thresholds')),
    del);
  name.addEventListener('input', () => {
    z.name = name.value;
    li.dataset.zone = name.value;
    markDirty();
    renderShapes();
  });
  head.addEventListener('input', () => { z.head = head.value; markDirty(); });
  thr.addEventListener('input', () => { z.thresholds = thr.value; markDirty(); });
  del.addEventListener('click', () => removeZone(z.uid));
  li.addEventListener('focusin', () => select(z.uid, false));
  li.addEventListener('click', () => select(z.uid, false));
  return li;
}

function renderList() {
  list.replaceChildren(...zones.map(zoneRow));
  if (!zones.length) list.append(el('li', { class: 'empty muted' }, 'No zones: the whole frame is analysed. Drag on the frame to add one.'));
}

function render() {
  renderShapes();
  renderList();
}

function select(uid, scroll = true) {
  if (selected === uid) return;
  selected = uid;
  for (const g of overlay.querySelectorAll('.zone-shape')) g.classList.toggle('selected', g.dataset.uid === String(uid));
  for (const li of list.querySelectorAll('li.zone')) {
    const on = li.dataset.uid === String(uid);
    li.classList.toggle('selected', on);
    if (on && scroll) li.scrollIntoView({ block: 'nearest' });
  }
}

function addZone(area) {
  const z = { uid: ++uids, name: firstFreeName(), rect: null, polygon: null, head: '', thresholds: '', ...area };
  zones.push(z);
  selected = z.uid;
  render();
  markDirty();
}

function removeZone(uid) {
  zones = zones.filter((z) => z.uid !== uid);
  if (selected === uid) selected = null;
  render();
  markDirty();
}

// ---- drawing ----

function setPolygonMode(on) {
  poly = on ? { points: [], hover: null } : null;
  polyBtn.setAttribute('aria-pressed', String(on));
  polyBtn.textContent = on ? 'Cancel polygon' : 'Draw polygon';
  stage.classList.toggle('drawing-polygon', on);
  renderShapes();
}

function closePolygon() {
  if (!poly) return;
  if (poly.points.length < 3) {
    status.textContent = 'A polygon needs at least 3 points.';
    return;
  }
  const points = poly.points;
  setPolygonMode(false);
  addZone({ polygon: points });
}

function addPoint(p) {
  const pts = poly.points;
  if (pts.length && px(p, pts[pts.length - 1]) < 6) return; // second click of a double-click
  if (pts.length >= 3 && px(p, pts[0]) < 10) { closePolygon(); return; }
  pts.push(p);
  renderShapes();
}

stage.addEventListener('pointerdown', (e) => {
  if (e.button !== 0) return;
  const hit = e.target.closest ? e.target.closest('[data-uid]') : null;
  e.preventDefault();
  stage.focus({ preventScroll: true });
  stage.setPointerCapture(e.pointerId);
  const p = frac(e);
  drag = { id: e.pointerId, a: p, b: p, hit: hit ? Number(hit.dataset.uid) : null };
});

stage.addEventListener('pointermove', (e) => {
  if (poly) { poly.hover = frac(e); renderShapes(); }
  if (!drag || drag.id !== e.pointerId) return;
  drag.b = frac(e);
  if (!poly && bigEnough(drag.a, drag.b)) showDraftBox(drag.a, drag.b);
  else draftBox.hidden = true;
});

stage.addEventListener('pointerup', (e) => {
  if (!drag || drag.id !== e.pointerId) return;
  const d = drag;
  drag = null;
  draftBox.hidden = true;
  if (poly) { addPoint(d.b); return; }
  if (bigEnough(d.a, d.b)) {
    const [a, b] = [d.a, d.b];
    addZone({ rect: [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])] });
  } else {
    select(d.hit); // a click: select the zone under it, or none
  }
});

stage.addEventListener('pointercancel', () => { drag = null; draftBox.hidden = true; });
stage.addEventListener('pointerleave', () => { if (poly && poly.hover) { poly.hover = null; renderShapes(); } });
stage.addEventListener('dblclick', (e) => { if (poly) { e.preventDefault(); closePolygon(); } });
overlay.addEventListener('focusin', (e) => {
  const g = e.target.closest('[data-uid]');
  if (g) select(Number(g.dataset.uid));
});

polyBtn.addEventListener('click', () => setPolygonMode(!poly));

document.addEventListener('keydown', (e) => {
  // Only for the frame and its shapes, never while typing in a field.
  if (!(e.target === document.body || stage.contains(e.target))) return;
  if (e.key === 'Escape') {
    if (poly) setPolygonMode(false);
    else if (drag) { drag = null; draftBox.hidden = true; }
    else select(null);
  } else if (e.key === 'Enter' && poly) {
    e.preventDefault();
    closePolygon();
  } else if (e.key === 'Delete' && selected !== null && !poly) {
    e.preventDefault();
    removeZone(selected);
    stage.focus({ preventScroll: true });
  }
});

new ResizeObserver(() => renderShapes()).observe(stage);

// ---- saving ----

function clearProblems() {
  for (const s of list.querySelectorAll('.error')) s.textContent = '';
  for (const i of list.querySelectorAll('[aria-invalid]')) i.removeAttribute('aria-invalid');
  listError.replaceChildren();
}

function mark(uid, field, message) {
  const li = rowOf(uid);
  const slot = li && li.querySelector(`.error[data-for="${field}"]`);
  if (!slot) { listError.append(el('span', {}, message)); return; }
  slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
  const input = li.querySelector(`[aria-describedby="${slot.id}"]`);
  if (input) input.setAttribute('aria-invalid', 'true');
}

/** A problem key -> the zone and field it is about, e.g. cameras.NAME.zones.ZONE.thresholds.LABEL. */
function locate(key) {
  let rest = key;
  const pre = `cameras.${camera}.`;
  if (rest.startsWith(pre)) rest = rest.slice(pre.length);
  if (!rest.startsWith('zones.')) return null;
  rest = rest.slice('zones.'.length);
  // The longest zone name the key goes on with (a name may hold dots).
  let zone = null;
  for (const z of zones) {
    const n = z.name.trim();
    if ((rest === n || rest.startsWith(n + '.')) && (!zone || n.length > zone.name.trim().length)) zone = z;
  }
  if (!zone) return null;
  const field = rest.slice(zone.name.trim().length + 1);
  const head = field.split('.')[0];
  if (head === 'rect' || head === 'polygon') return { zone, field: 'coords' };
  if (head === 'head') return { zone, field: 'head' };
  if (head === 'thresholds') return { zone, field: 'thresholds', label: field.slice('thresholds.'.length) };
  return { zone, field: 'name', prefix: field };
}

function showProblems(problems) {
  for (const p of problems) {
    const where = locate(String(p.key ?? ''));
    const message = String(p.message ?? 'invalid');
    if (!where) {
      const whole = p.key === `cameras.${camera}.zones` || p.key === 'zones' || !p.key;
      listError.append(el('span', {}, whole ? message : `${p.key}: ${message}`));
    } else {
      const tag = where.label || where.prefix;
      mark(where.zone.uid, where.field, tag ? `${tag}: ${message}` : message);
    }
  }
  status.textContent = `Not saved: ${plural(problems.length, 'problem')}`;
}

async function save() {
  clearProblems();
  const body = { zones: {} };
  const problems = [];
  const names = new Set();
  for (const z of zones) {
    const name = z.name.trim();
    if (!name) { problems.push([z.uid, 'name', 'A zone needs a name.']); continue; }
    if (names.has(name)) { problems.push([z.uid, 'name', `Another zone is named ${name}.`]); continue; }
    names.add(name);
    const t = parseThresholds(z.thresholds);
    if (t.bad.length) problems.push([z.uid, 'thresholds', `Not label=number: ${t.bad.join(', ')}`]);
    const entry = {};
    if (z.polygon) entry.polygon = z.polygon.map((p) => [r4(p[0]), r4(p[1])]);
    else if (z.rect) entry.rect = z.rect.map(r4);
    if (z.head.trim()) entry.head = z.head.trim();
    if (Object.keys(t.out).length) entry.thresholds = t.out;
    body.zones[name] = entry;
  }
  if (problems.length) {
    for (const [uid, field, message] of problems) mark(uid, field, message);
    status.textContent = `Not saved: ${plural(problems.length, 'problem')}`;
    return;
  }
  saveBtn.disabled = true;
  status.textContent = 'Saving…';
  try {
    await api(`${base}/zones`, { method: 'PUT', body });
    dirty = false;
    try {
      await loadCamera();
      status.textContent = 'Saved and reloaded';
    } catch (e) {
      status.textContent = `Saved, but reading the zones back failed: ${e.message}`;
    }
  } catch (e) {
    const list422 = e.status === 422 && e.body && e.body.error && e.body.error.problems;
    if (Array.isArray(list422) && list422.length) showProblems(list422);
    else status.textContent = e.status ? e.message : `Not saved: ${e.message}`; // the server's words say what happened
  } finally {
    saveBtn.disabled = false;
  }
}

saveBtn.addEventListener('click', save);
window.addEventListener('beforeunload', (e) => { if (dirty) { e.preventDefault(); e.returnValue = ''; } });

// ---- status and frame ----

/** Frames analysed per region ("whole frame 120 · door 40"), when the server reports them. */
function regionCounts(c) {
  const r = c.regions && c.regions.regions;
  if (!Array.isArray(r) || !r.length) return null;
  return r.map((x) => `${x.zone ?? 'whole frame'} ${x.analysed ?? 0}`).join(' · ');
}

function showFacts(c) {
  const f = c.frames || {};
  const dropped = f.dropped_behind ?? f.dropped;
  const rows = [
    ['State', badge(c)],
    ['Since', c.since ? fmtTime(c.since) : null],
    ['Input', typeof c.input_fps === 'number' ? `${fmtNum(c.input_fps)} fps` : null],
    ['Analysed', typeof c.analysed_fps === 'number' ? `${fmtNum(c.analysed_fps)} fps` : null],
    ['Frames decoded', f.decoded],
    ['Frames analysed', analysedCount(c) ?? regionCounts(c)],
    ['Frames dropped', dropped],
    ['Reconnects', c.reconnects],
    ['Head', c.head || null],
    ['Last error', c.last_error || 'none'],
    ['Events', el('a', { href: `/events?camera=${encodeURIComponent(camera)}` }, `events of ${camera}`)],
  ];
  facts.replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null)
    .flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v instanceof Node ? v : String(v))]));
}

async function loadCamera() {
  const c = await api(base);
  lastStatus = c || {};
  showFacts(lastStatus);
  zones = toZones(lastStatus.zones);
  selected = null;
  render();
}

/** Loads the next frame off-screen, then swaps it in (no flash); resolves either way. */
function refreshFrame() {
  return new Promise((resolve) => {
    const next = new Image();
    next.addEventListener('load', () => {
      const cur = $('#frame');
      next.id = 'frame';
      next.alt = cur.alt;
      next.draggable = false;
      cur.replaceWith(next);
      loadedFrame = true;
      stage.classList.remove('no-frame');
      if (next.naturalWidth && next.naturalHeight) stage.style.aspectRatio = `${next.naturalWidth} / ${next.naturalHeight}`;
      resolve();
    });
    next.addEventListener('error', () => { stage.classList.toggle('no-frame', !loadedFrame); resolve(); });
    next.src = `${base}/latest.jpg?outline=false&t=${Date.now()}`;
  });
}

loadCamera().then(() => clearError(), (e) => {
  showError(e.status === 404 ? `There is no camera named ${camera}.` : `Cannot load the camera: ${e.message}`);
  render();
});
every(2000, refreshFrame);
stream(null, (data) => {
  const c = cameraList(data).find((x) => cameraName(x) === camera);
  if (c) { lastStatus = { ...lastStatus, ...c }; showFacts(lastStatus); }
});
