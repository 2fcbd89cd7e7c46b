// Teach screen: per head, its inbox of captured frames to label (mouse or keyboard), training
// with its report, and its versions.
import { api, el, $, fmtTime, fmtScore, showError, clearError, seg } from './common.js';

const root = $('#heads');
const POLL_MS = 500;

const pct = (x) => (typeof x === 'number' && Number.isFinite(x) ? `${(x * 100).toFixed(1)}%` : '—');
const headPath = (H) => `/api/heads/${seg(H.name)}`;
const REASONS = { uncertain: 'uncertain', event_start: 'event start', event_end: 'event end', flagged: 'flagged wrong' };

function noHeads() {
  return el('div', { class: 'panel' },
    el('h2', {}, 'No heads yet'),
    el('p', {}, 'A head is a small classifier vigil trains on your own labels, on top of the model. ',
      'To start one, bind it in config.toml: add ', el('code', {}, 'head = "name"'), ' to a camera (',
      el('code', {}, '[cameras.porch]'), ') or to one of its zones (', el('code', {}, '[cameras.porch.zones.steps]'),
      '), then reload the config. Frames for it then collect in its inbox here, ready to label and train.'));
}

/** Known labels in a stable order: numbers 1..9 must not move while the operator works. */
function mergeLabels(H) {
  const d = H.data;
  const cur = (d.versions || []).find((v) => v.version === d.current);
  const known = [...Object.keys(d.labels || {}), ...(cur ? cur.labels || [] : [])].sort();
  for (const l of known) if (!H.order.includes(l)) H.order.push(l);
}

function labelButtons(H) {
  return H.order.map((l, i) => el('button', { class: 'label-btn', 'data-label': l, type: 'button' },
    i < 9 ? el('span', { class: 'key' }, String(i + 1)) : null, i < 9 ? ' ' : null, l));
}

function refreshButtons(H) {
  for (const box of H.inbox.querySelectorAll('.label-btns')) box.replaceChildren(...labelButtons(H));
}

function renderCounts(H) {
  const labels = H.data.labels || {};
  const names = Object.keys(labels).sort();
  H.counts.replaceChildren(...names.map((l) => el('li', { 'data-label': l }, `${l}: ${labels[l]}`)));
  if (!names.length) H.counts.append(el('li', { class: 'muted' }, 'no labelled samples yet'));
}

function showInboxCount(H) {
  const shown = H.inbox.querySelectorAll('figure.sample').length;
  H.inboxCount.textContent = H.total > shown ? `${H.total} (showing ${shown})` : String(H.total);
}

function sampleFigure(H, s) {
  const top = Array.isArray(s.top) && s.top.length ? s.top[0] : null;
  const guess = top ? `${top[0]} ${fmtScore(top[1])}` : 'none';
  const where = s.zone ? `${s.camera}/${s.zone}` : s.camera;
  const reason = REASONS[s.reason] || s.reason;
  return el('figure', { class: 'sample', 'data-id': s.id, tabindex: 0, 'aria-label': `${where}, ${reason}, guess ${guess}` },
    el('img', { loading: 'lazy', src: `${headPath(H)}/inbox/${seg(s.id)}/image.jpg`, alt: `frame from ${where}` }),
    el('figcaption', {},
      el('span', { class: 'where' }, where), ' ',
      el('span', { class: 'reason', 'data-reason': s.reason }, reason),
      el('span', { class: 'guess' }, `guess: ${guess}`),
      s.time ? el('time', { datetime: s.time, class: 'muted' }, fmtTime(s.time)) : null),
    el('div', { class: 'label-btns' }, ...labelButtons(H)),
    el('button', { class: 'discard', type: 'button' }, 'Discard'),
    el('p', { class: 'error sample-error' }));
}

async function loadInbox(H) {
  H.inboxError.textContent = '';
  try {
    const d = await api(`${headPath(H)}/inbox`);
    const samples = (d && d.samples) || [];
    H.total = d && typeof d.total === 'number' ? d.total : samples.length;
    H.inbox.replaceChildren(...samples.map((s) => sampleFigure(H, s)));
    if (!samples.length) H.inbox.append(el('p', { class: 'muted empty' }, 'The inbox is empty.'));
    showInboxCount(H);
  } catch (e) {
    H.inboxError.textContent = `Cannot read the inbox: ${e.message}`;
  }
}

/** Labels (label) or discards (null) a sample; then the next one gets the focus. */
async function act(H, fig, label) {
  if (fig.dataset.busy) return;
  fig.dataset.busy = '1';
  const err = fig.querySelector('.sample-error');
  err.textContent = '';
  const path = `${headPath(H)}/inbox/${seg(fig.dataset.id)}`;
  try {
    if (label === null) await api(path, { method: 'DELETE' });
    else await api(`${path}/label`, { method: 'POST', body: { label } });
  } catch (e) {
    err.textContent = e.message;
    delete fig.dataset.busy;
    return;
  }
  const next = fig.nextElementSibling || fig.previousElementSibling;
  const hadFocus = fig.contains(document.activeElement);
  fig.remove();
  H.total = Math.max(0, H.total - 1);
  if (label !== null) {
    const labels = H.data.labels || (H.data.labels = {});
    labels[label] = (labels[label] || 0) + 1;
    renderCounts(H);
  }
  showInboxCount(H);
  if (next && next.matches('figure.sample')) {
    if (hadFocus) next.focus();
  } else if (H.total > 0) {
    loadInbox(H); // the server holds more than it listed
  } else {
    H.inbox.replaceChildren(el('p', { class: 'muted empty' }, 'The inbox is empty.'));
  }
}

function onInboxKey(H, e) {
  if (e.ctrlKey || e.altKey || e.metaKey) return;
  const fig = e.target.closest('figure.sample');
  if (!fig) return;
  if (/^[1-9]$/.test(e.key)) {
    const label = H.order[Number(e.key) - 1];
    if (label) { e.preventDefault(); act(H, fig, label); }
    return;
  }
  if (e.key === 'x' || e.key === 'X' || e.key === 'Delete') { e.preventDefault(); act(H, fig, null); return; }
  const figs = [...H.inbox.querySelectorAll('figure.sample')];
  const i = figs.indexOf(fig);
  let cols = 1;
  while (cols < figs.length && figs[cols].offsetTop === figs[0].offsetTop) cols++;
  const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -cols, ArrowDown: cols }[e.key];
  if (step === undefined || e.target !== fig) return;
  e.preventDefault();
  const to = figs[Math.min(figs.length - 1, Math.max(0, i + step))];
  if (to) to.focus();
}

// ---- training ----

function renderReport(H, r) {
  const m = r.metrics || {};
  const labels = r.labels || [];
  const per = m.per_class || {};
  const prev = r.previous ? ` (version ${r.previous.version} had ${pct(r.previous.accuracy)})` : '';
  const perClass = el('table', { class: 'per-class' },
    el('caption', {}, 'Per class'),
    el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Label'), el('th', { scope: 'col' }, 'Precision'), el('th', { scope: 'col' }, 'Recall'))),
    el('tbody', {}, ...labels.map((l) => el('tr', {},
      el('th', { scope: 'row' }, l), el('td', {}, pct(per[l] && per[l].precision)), el('td', {}, pct(per[l] && per[l].recall))))));
  const conf = Array.isArray(m.confusion) ? m.confusion : [];
  const confusion = el('table', { class: 'confusion' },
    el('caption', {}, 'Confusion: rows are the true labels, columns the predicted ones'),
    el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'true \\ predicted'), ...labels.map((l) => el('th', { scope: 'col' }, l)))),
    el('tbody', {}, ...labels.map((l, i) => el('tr', {}, el('th', { scope: 'row' }, l),
      ...labels.map((_, j) => el('td', { class: i === j ? 'diag' : ((conf[i] && conf[i][j]) ? 'off' : null) },
        String((conf[i] && conf[i][j]) ?? 0)))))));
  H.result.replaceChildren(
    el('p', {}, 'Accuracy ', el('strong', {}, pct(m.accuracy)),
      m.folds ? ` over ${m.folds} folds` : '', `, ${r.samples ?? '?'} samples`, prev),
    r.decision ? el('p', { class: 'decision' }, r.decision) : null,
    el('div', { class: 'tables' }, perClass, confusion));
}

function showJob(H, j, t0) {
  H.trainStatus.classList.remove('error');
  if (!j) { H.trainStatus.textContent = ''; return; }
  if (j.state === 'running') {
    H.trainStatus.textContent = `Training… ${Math.max(0, Math.round((Date.now() - t0) / 1000))} s`;
  } else if (j.state === 'done' && j.report) {
    const r = j.report;
    const secs = r.seconds && typeof r.seconds.total === 'number' ? ` in ${r.seconds.total.toFixed(1)} s` : '';
    H.trainStatus.textContent = `Trained version ${r.version}${secs}${r.live ? ', now in service' : ', not put in service'}`;
    renderReport(H, r);
  } else if (j.state === 'failed') {
    H.trainStatus.textContent = `Training failed: ${j.error}`;
    H.trainStatus.classList.add('error');
  }
}

function follow(H, since) {
  let t0 = since ? Date.parse(since) : NaN;
  if (!Number.isFinite(t0) || t0 > Date.now()) t0 = Date.now();
  clearTimeout(H.timer);
  H.trainBtn.disabled = true;
  const tick = async () => {
    let j;
    try {
      j = await api(`${headPath(H)}/train`);
    } catch (e) {
      H.trainStatus.textContent = `Cannot read the training state: ${e.message}`;
      H.trainBtn.disabled = false;
      return;
    }
    showJob(H, j, t0);
    if (j && j.state === 'running') {
      H.timer = setTimeout(tick, POLL_MS);
    } else {
      H.trainBtn.disabled = false;
      refreshHead(H);
    }
  };
  tick();
}

async function train(H) {
  H.trainBtn.disabled = true;
  H.trainStatus.classList.remove('error');
  H.trainStatus.textContent = 'Starting…';
  try {
    const j = await api(`${headPath(H)}/train`, { method: 'POST' });
    H.result.replaceChildren();
    follow(H, j && j.since);
  } catch (e) {
    H.trainStatus.textContent = e.message;
    H.trainStatus.classList.add('error');
    H.trainBtn.disabled = false;
    if (e.status === 409) follow(H, null); // one is running already: follow it
  }
}

// ---- versions ----

function renderVersions(H) {
  const d = H.data;
  const versions = (d.versions || []).slice().sort((a, b) => b.version - a.version);
  H.current.textContent = d.current ? `version ${d.current} in service` : 'not trained yet';
  if (!versions.length) {
    H.versions.replaceChildren(el('p', { class: 'muted' }, 'No versions yet: label some samples and train.'));
    return;
  }
  H.versions.replaceChildren(el('table', { class: 'versions' },
    el('thead', {}, el('tr', {}, ...['Version', 'Created', 'Samples', 'Accuracy', 'Labels', ''].map((t) => el('th', { scope: 'col' }, t)))),
    el('tbody', {}, ...versions.map((v) => {
      const live = v.version === d.current;
      let action;
      if (live) {
        action = el('span', { class: 'in-service' }, 'in service');
      } else {
        action = el('button', { class: 'activate', type: 'button' }, 'Switch to');
        action.addEventListener('click', () => activate(H, v.version, action));
      }
      return el('tr', { 'data-version': v.version, class: live ? 'current' : null },
        el('td', {}, `v${v.version}`), el('td', {}, fmtTime(v.created)), el('td', {}, String(v.samples ?? '—')),
        el('td', {}, pct(v.accuracy)), el('td', {}, (v.labels || []).join(', ')), el('td', {}, action));
    }))));
}

async function activate(H, version, btn) {
  btn.disabled = true;
  H.versionsStatus.textContent = '';
  try {
    await api(`${headPath(H)}/versions/${version}/activate`, { method: 'POST' });
    H.versionsStatus.textContent = `Version ${version} is in service.`;
    await refreshHead(H);
  } catch (e) {
    H.versionsStatus.textContent = e.message;
    btn.disabled = false;
  }
}

/** Reads the head again (versions, counts); the inbox is left as it is. */
async function refreshHead(H) {
  try {
    const d = await api('/api/heads');
    const h = ((d && d.heads) || []).find((x) => x.head === H.name);
    if (!h) return;
    H.data = h;
    mergeLabels(H);
    refreshButtons(H);
    renderCounts(H);
    renderVersions(H);
  } catch (e) {
    showError(`Cannot read the heads: ${e.message}`);
  }
}

// ---- a head ----

function headSection(h) {
  const H = { name: h.head, data: h, order: [], total: h.inbox || 0, timer: null };
  mergeLabels(H);
  H.current = el('span', { class: 'muted' });
  H.counts = el('ul', { class: 'label-counts' });
  H.inbox = el('div', { class: 'inbox', role: 'group', 'aria-label': `inbox of ${H.name}` });
  H.inboxCount = el('span', { class: 'inbox-count' }, String(H.total));
  H.inboxError = el('p', { class: 'error' });
  H.trainBtn = el('button', { class: 'train primary', type: 'button' }, 'Train');
  H.trainStatus = el('p', { class: 'train-status', role: 'status' });
  H.result = el('div', { class: 'train-result' });
  H.versions = el('div', { class: 'versions-box' });
  H.versionsStatus = el('p', { role: 'status', class: 'muted' });

  const newLabel = el('input', { class: 'new-label', placeholder: 'new label', 'aria-label': 'new label', autocomplete: 'off' });
  const addBtn = el('button', { class: 'add-label', type: 'button' }, 'Add label');
  const addError = el('span', { class: 'error' });
  const add = () => {
    const l = newLabel.value.trim();
    addError.textContent = '';
    if (!l) { addError.textContent = 'Type a label first.'; return; }
    if (H.order.includes(l)) { addError.textContent = `${l} is there already.`; return; }
    H.order.push(l);
    newLabel.value = '';
    refreshButtons(H);
  };
  addBtn.addEventListener('click', add);
  newLabel.addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); add(); } });

  const refresh = el('button', { type: 'button', class: 'refresh' }, 'Refresh');
  refresh.addEventListener('click', () => loadInbox(H));
  H.inbox.addEventListener('click', (e) => {
    const fig = e.target.closest('figure.sample');
    const b = e.target.closest('button');
    if (!fig || !b) return;
    if (b.classList.contains('label-btn')) act(H, fig, b.dataset.label);
    else if (b.classList.contains('discard')) act(H, fig, null);
  });
  H.inbox.addEventListener('keydown', (e) => onInboxKey(H, e));
  H.trainBtn.addEventListener('click', () => train(H));

  const regions = h.regions || [];
  const section = el('section', { class: 'head panel', 'data-head': H.name },
    el('h2', {}, H.name, ' ', H.current),
    el('p', { class: 'regions' }, regions.length ? `Bound to ${regions.join(', ')}`
      : 'Not bound to a camera or zone: add head = "' + H.name + '" to one in config.toml.'),
    el('h3', {}, 'Labels'),
    H.counts,
    el('div', { class: 'add-label-row' }, newLabel, addBtn, addError),
    el('h3', {}, 'Inbox ', H.inboxCount, ' ', refresh),
    el('p', { class: 'hint' }, 'Focus a sample: 1–9 labels it, x or Delete discards it, the arrows move.'),
    H.inboxError,
    H.inbox,
    el('h3', {}, 'Training'),
    el('div', { class: 'train-row' }, H.trainBtn, H.trainStatus),
    H.result,
    el('h3', {}, 'Versions'),
    H.versionsStatus,
    H.versions);

  renderCounts(H);
  renderVersions(H);
  loadInbox(H);
  const job = h.job;
  if (job && job.state === 'running') follow(H, job.since);
  else if (job) showJob(H, job, Date.now());
  return section;
}

async function load() {
  try {
    const d = await api('/api/heads');
    const heads = (d && Array.isArray(d.heads)) ? d.heads : [];
    clearError();
    root.replaceChildren(...(heads.length ? heads.map(headSection) : [noHeads()]));
  } catch (e) {
    showError(`Cannot read the heads: ${e.message}`);
  }
}

load();
