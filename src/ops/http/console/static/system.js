// System screen: the newest figures, and small line charts of the last ten minutes (latency,
// each camera's rates, each stage's load). Charts are plain SVG paths; missing values are gaps.
import { api, el, svg, $, fmtNum, fmtTime, badge, every, clearError } from './common.js';

const root = $('#system');
const WINDOW_MS = 10 * 60 * 1000;
const charts = new Map(); // data-series key -> chart

const dd = (id) => el('dd', { id }, '—');
const facts = el('dl', { class: 'facts' },
  el('dt', {}, 'Model'), dd('model'),
  el('dt', {}, 'Provider'), dd('provider'),
  el('dt', {}, 'MQTT'), dd('mqtt'),
  el('dt', {}, 'Sampled'), dd('sampled'));
const latencyBox = el('div', { class: 'charts' });
const camerasBox = el('div', { class: 'charts' });
const stagesBox = el('div', { class: 'charts' });
const note = el('p', { class: 'muted' }, 'Waiting for the first figures…');
root.append(
  el('section', { class: 'panel' }, el('h2', {}, 'Service'), facts, note),
  el('section', { class: 'panel' }, el('h2', {}, 'Latency ', el('span', { class: 'muted small' }, 'up to the last 10 minutes')), latencyBox),
  el('section', { class: 'panel' }, el('h2', {}, 'Cameras'), camerasBox),
  el('section', { class: 'panel' }, el('h2', {}, 'Stages'), stagesBox));

function makeChart(key, title, box) {
  const c = {
    title,
    svg: svg('svg', { class: 'chart', 'data-series': key, viewBox: '0 -3 100 106', preserveAspectRatio: 'none', role: 'img' }),
    max: el('span', { class: 'y max' }),
    min: el('span', { class: 'y min' }),
    legend: el('span', { class: 'legend' }),
    extra: el('span', { class: 'extra' }),
  };
  c.node = el('figure', { class: 'chart-box', 'data-key': key },
    el('figcaption', {}, el('span', { class: 'chart-title' }, title), c.extra, c.legend),
    el('div', { class: 'chart-area' }, c.svg, c.max, c.min));
  charts.set(key, c);
  box.append(c.node);
  return c;
}

/**
 * Draws series [{name, get(sample) -> number|null}] over the samples of the last ten minutes.
 * The y axis spans the data (or opts.lo..opts.hi; a nearly flat line starts at 0); its ends are
 * labelled with opts.fmt.
 */
function draw(c, samples, series, opts = {}) {
  const t1 = samples[samples.length - 1].t;
  const t0 = Math.max(samples[0].t, t1 - WINDOW_MS);
  const span = Math.max(1, t1 - t0);
  const fmt = opts.fmt || ((v) => fmtNum(v, 1));
  const all = [];
  const values = series.map((s) => samples.map((x) => {
    const v = x.t < t0 ? null : s.get(x);
    const ok = typeof v === 'number' && Number.isFinite(v);
    if (ok) all.push(v);
    return ok ? v : null;
  }));
  let lo = opts.lo ?? (all.length ? Math.min(...all) : 0);
  let hi = opts.hi ?? (all.length ? Math.max(...all) : 0);
  if (opts.lo === undefined && opts.hi === undefined && lo > 0 && (hi - lo) < hi * 0.05) lo = 0;
  const flat = hi <= lo;
  const y = (v) => (flat ? 50 : 100 - ((v - lo) / (hi - lo)) * 100);
  const paths = values.map((vals, i) => {
    let d = '';
    let pen = false;
    vals.forEach((v, j) => {
      const t = samples[j].t;
      if (v === null) { pen = false; return; }
      const x = ((t - t0) / span) * 100;
      d += `${pen ? 'L' : 'M'}${x.toFixed(2)} ${y(v).toFixed(2)}`;
      if (!pen) d += 'l0 0'; // a lone point still shows (round caps)
      pen = true;
    });
    return svg('path', { class: `line s${i + 1}`, d: d || 'M0 0', 'data-name': series[i].name, visibility: d ? null : 'hidden' });
  });
  c.svg.replaceChildren(...paths);
  c.max.textContent = all.length ? fmt(hi) : '';
  c.min.textContent = all.length ? fmt(lo) : 'no data';
  const now = series.map((s, i) => [s.name, values[i][values[i].length - 1]]);
  c.legend.replaceChildren(...now.map(([name, v], i) => el('span', { class: 'key' },
    el('span', { class: `swatch s${i + 1}`, 'aria-hidden': 'true' }), `${name} ${v === null ? '—' : fmt(v)}`)));
  c.svg.setAttribute('aria-label', `${c.title}: ${now.map(([n, v]) => `${n} ${v === null ? 'no value' : fmt(v)}`).join(', ')}`);
}

/** Keeps one chart per key in `box` (sorted), dropping the ones no longer reported. */
function syncCharts(prefix, names, box, title) {
  for (const [key, c] of charts) {
    if (key.startsWith(prefix) && !names.includes(key.slice(prefix.length))) { c.node.remove(); charts.delete(key); }
  }
  return names.slice().sort().map((n) => {
    const c = charts.get(prefix + n) || makeChart(prefix + n, title(n), box);
    box.append(c.node); // keeps the order
    return [n, c];
  });
}

function render(d) {
  const samples = (d && d.samples) || [];
  if (!samples.length) return;
  note.remove();
  const last = samples[samples.length - 1];
  const m = last.model || {};
  $('#model').textContent = [m.name, m.version !== undefined ? `v${m.version}` : null, m.variant].filter(Boolean).join(' · ') || '—';
  $('#provider').textContent = m.provider || '—';
  const q = last.mqtt;
  const mqtt = $('#mqtt');
  if (!q) {
    mqtt.replaceChildren('not configured');
  } else {
    mqtt.replaceChildren(el('span', { class: 'state', 'data-state': q.connected ? 'online' : 'offline' }, q.connected ? 'connected' : 'disconnected'),
      ` outbox ${q.outbox ?? 0} · delivered ${q.delivered ?? 0} · failed ${q.failed ?? q.dropped ?? 0}`);
  }
  $('#sampled').textContent = fmtTime(last.t);

  const lat = charts.get('latency') || makeChart('latency', 'Latency (ms)', latencyBox);
  draw(lat, samples, [
    { name: 'p50', get: (s) => s.latency_ms && s.latency_ms.p50 },
    { name: 'p99', get: (s) => s.latency_ms && s.latency_ms.p99 },
  ]);

  const cams = Object.keys(last.cameras || {});
  for (const [name, c] of syncCharts('camera:', cams, camerasBox, (n) => n)) {
    const cur = last.cameras[name];
    c.extra.replaceChildren(' ', badge(cur));
    const get = (k) => (s) => (s.cameras && s.cameras[name] ? s.cameras[name][k] : null);
    draw(c, samples, [
      { name: 'fps', get: get('fps') },
      { name: 'analysed/s', get: get('analysed_fps') },
      { name: 'dropped/s', get: get('dropped_per_s') },
    ]);
  }
  if (!cams.length) camerasBox.replaceChildren(el('p', { class: 'muted' }, 'No cameras.'));
  else camerasBox.querySelectorAll(':scope > p').forEach((p) => p.remove());

  const stages = Object.keys(last.stages || {});
  for (const [name, c] of syncCharts('stage:', stages, stagesBox, (n) => n)) {
    const cur = last.stages[name];
    c.extra.textContent = ` queue ${cur.queue ?? '—'}`;
    draw(c, samples, [{ name: 'busy', get: (s) => (s.stages && s.stages[name] ? s.stages[name].busy : null) }],
      { lo: 0, hi: 1, fmt: (v) => `${Math.round(v * 100)}%` });
  }
}

every(2000, async () => {
  const d = await api('/api/system');
  clearError();
  render(d);
  return d && d.interval_ms;
});
