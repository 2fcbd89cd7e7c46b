// Live screen: one tile per camera, kept in name order, refreshed from the stream's `cameras`
// messages. A tile's frame is reloaded only when the camera's latest analysed frame changed, and
// only while the tile is on screen.
import { api, el, fmtScore, fmtNum, stream, showError, clearError, cameraList, cameraName, stateOf,
  analysedCount, badge, plural, seg } from './common.js';

const tiles = document.getElementById('tiles');
const byName = new Map(); // name -> tile record

// Frames of off-screen tiles wait until the tile scrolls into view.
const seen = new IntersectionObserver((entries) => {
  for (const e of entries) {
    const t = byName.get(e.target.dataset.camera);
    if (!t) continue;
    t.visible = e.isIntersecting;
    if (t.visible && t.want) loadFrame(t, t.want);
  }
});

function makeTile(name) {
  const img = el('img', { class: 'frame', loading: 'lazy', alt: `latest analysed frame of ${name}` });
  const t = {
    name,
    img,
    link: el('a', { class: 'frame-link', href: `/cameras/${seg(name)}` }, img,
      el('span', { class: 'noframe' }, 'no analysed frame yet')),
    state: el('span'),
    label: el('span', { class: 'label' }),
    score: el('span', { class: 'score' }),
    figures: el('span', { class: 'figures' }),
    time: null, // latest.time shown
    want: null, // frame URL to show
    shown: null, // frame URL shown or loading
    visible: false,
  };
  t.node = el('article', { class: 'tile', 'data-camera': name },
    t.link,
    el('div', { class: 'tile-head' }, el('h2', {}, name), t.state),
    el('p', { class: 'tile-latest' }, t.label, ' ', t.score),
    el('p', { class: 'tile-figures muted' }, t.figures));
  seen.observe(t.node);
  return t;
}

/** Loads the frame off-screen, then swaps the element in: no blank flash between frames. */
function loadFrame(t, url) {
  if (t.shown === url) return;
  t.shown = url;
  const next = new Image();
  next.decoding = 'async';
  next.addEventListener('load', () => {
    if (t.shown !== url) return;
    next.className = 'frame';
    next.loading = 'lazy';
    next.alt = t.img.alt;
    t.img.replaceWith(next);
    t.img = next;
    t.link.classList.add('has-frame');
  });
  next.addEventListener('error', () => { if (t.shown === url) t.shown = null; });
  next.src = url;
}

function zoneCount(c) {
  if (typeof c.zones === 'number') return c.zones;
  if (Array.isArray(c.zones)) return c.zones.length;
  if (c.zones && typeof c.zones === 'object') return Object.keys(c.zones).length;
  const r = c.regions && c.regions.regions;
  return Array.isArray(r) ? r.filter((x) => x.zone !== null && x.zone !== undefined).length : 0;
}

function update(t, c) {
  const b = badge(c);
  if (b.dataset.state !== t.state.dataset.state || b.textContent !== t.state.textContent) {
    t.state.replaceWith(b);
    t.state = b;
  }
  t.node.dataset.state = stateOf(c);

  const latest = c.latest || null;
  if (latest) {
    t.label.textContent = latest.zone ? `${latest.zone}: ${latest.label ?? '—'}` : (latest.label ?? '—');
    t.score.textContent = fmtScore(latest.score);
    if (latest.time !== t.time) {
      t.time = latest.time;
      const v = analysedCount(c) ?? latest.time;
      t.want = `/api/cameras/${seg(t.name)}/latest.jpg?v=${encodeURIComponent(v)}`;
      if (t.visible) loadFrame(t, t.want);
    }
  } else {
    t.label.textContent = 'nothing analysed yet';
    t.score.textContent = '';
  }

  const parts = [plural(zoneCount(c), 'zone')];
  if (typeof c.input_fps === 'number') parts.push(`${fmtNum(c.input_fps)} fps`);
  if (typeof c.analysed_fps === 'number') parts.push(`${fmtNum(c.analysed_fps)} analysed/s`);
  t.figures.textContent = parts.join(' · ');
}

function render(data) {
  const list = cameraList(data).slice()
    .sort((a, b) => cameraName(a).localeCompare(cameraName(b)));
  if (!list.length) {
    for (const t of byName.values()) seen.unobserve(t.node);
    byName.clear();
    tiles.replaceChildren(el('p', { class: 'empty' }, 'No cameras are configured. Add a [cameras.NAME] section to config.toml.'));
    return;
  }
  const empty = tiles.querySelector('.empty');
  if (empty) empty.remove();
  const names = new Set();
  let prev = null;
  for (const c of list) {
    const name = cameraName(c);
    names.add(name);
    let t = byName.get(name);
    if (!t) { t = makeTile(name); byName.set(name, t); }
    update(t, c);
    const want = prev ? prev.nextSibling : tiles.firstChild;
    if (want !== t.node) tiles.insertBefore(t.node, want);
    prev = t.node;
  }
  for (const [name, t] of byName) {
    if (!names.has(name)) { seen.unobserve(t.node); t.node.remove(); byName.delete(name); }
  }
}

api('/api/cameras')
  .then((d) => { clearError(); render(d); })
  .catch((e) => showError(`Cannot list the cameras: ${e.message}`));
stream(null, render);
