// shardgate's admin page: draws the status that `GET /events` streams (the JSON
// of `shardgate status --json`), live.
//
// No framework and no build step. The DOM is built with createElement and
// textContent, never from HTML text: shadow samples hold SQL that clients sent.
// Every field is read defensively (a node of another version may lack some).
'use strict';

(function () {
  const SVG = 'http://www.w3.org/2000/svg';
  const TOKEN_KEY = 'shardgate.admin-token';
  const ENDED = new Set(['done', 'cancelled', 'failed']);
  const PHASE_COLORS = {
    plan: '#98a2b3', copy: '#2f5fd0', dual_write: '#5c8ae6', shadow: '#7c4dff', verify: '#d08a00',
    cutover: '#c62828', reverse: '#1a7f37', cleanup: '#5b6b82', done: '#1a7f37', cancelled: '#98a2b3',
    failed: '#c62828',
  };
  const SHARD_COLORS = ['#2f5fd0', '#e07b00', '#1a9e77', '#c2185b', '#7c4dff', '#8d6e00', '#0097a7', '#6d4c41',
    '#5e7d14', '#455a64'];

  // ---- reading the status defensively ----
  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);
  const arr = (v) => (Array.isArray(v) ? v : []);
  const str = (v) => (typeof v === 'string' ? v : v === null || v === undefined ? '' : String(v));
  const obj = (v) => (v && typeof v === 'object' && !Array.isArray(v) ? v : {});
  /** A shard's size in bytes, when the node reports one. */
  const shardSize = (sh) => num(sh.bytes) ?? num(sh.size_bytes);

  // ---- formatting ----
  const fmtInt = (n) => (n === undefined ? '–' : Math.round(n).toLocaleString('en-US'));
  function fmtBytes(n) {
    if (n === undefined) return '–';
    const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + ' ' + units[i];
  }
  function fmtDuration(ms) {
    if (ms === undefined) return '–';
    if (ms < 1000) return Math.round(ms) + ' ms';
    const s = ms / 1000;
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + ' s';
    const m = Math.floor(s / 60);
    if (m < 60) return m + ' min ' + Math.round(s % 60) + ' s';
    return Math.floor(m / 60) + ' h ' + (m % 60) + ' min';
  }
  function fmtMicros(us) {
    if (us === undefined) return '–';
    if (us < 1000) return us + ' µs';
    return (us / 1000).toFixed(us < 10000 ? 2 : 1) + ' ms';
  }
  const fmtTime = (ms) => (num(ms) === undefined ? '–' : new Date(ms).toLocaleTimeString());

  // ---- building the DOM ----
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    append(el, children);
    return el;
  }
  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : String(c));
    }
  }
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) el.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const title = (text) => svg('title', {}, text);
  const $ = (id) => document.getElementById(id);
  function swatch(color) {
    const el = h('span', { class: 'swatch' });
    el.style.background = color;
    return el;
  }

  // ---- the token ----
  // Taken from ?token= once, kept for this tab only, and removed from the address
  // bar so that it is not shown, bookmarked or screenshotted.
  function takeToken() {
    const url = new URL(location.href);
    const fromUrl = url.searchParams.get('token');
    if (fromUrl !== null) {
      keepToken(fromUrl);
      url.searchParams.delete('token');
      history.replaceState(null, '', url.pathname + url.search + url.hash);
      return fromUrl;
    }
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }
  function keepToken(t) {
    try { sessionStorage.setItem(TOKEN_KEY, t); } catch (e) { /* private mode: kept in memory only */ }
  }

  // ---- the connection ----
  let token = takeToken();
  let source = null;
  let lastMessage = 0;
  let retryTimer = null;

  function setConnection(state, text) {
    const el = $('connection');
    el.dataset.state = state;
    el.textContent = text;
  }

  // A plain request first: an EventSource cannot tell a refused token from a
  // network error, a fetch can.
  async function connect() {
    retryTimer = null;
    setConnection('connecting', 'connecting…');
    let res;
    try {
      res = await fetch('status', {
        headers: token ? { Authorization: 'Bearer ' + token } : {},
        cache: 'no-store',
      });
    } catch (e) {
      retryLater();
      return;
    }
    if (res.status === 401) {
      showLogin(token ? 'The admin token was refused.' : null);
      return;
    }
    if (!res.ok) {
      retryLater();
      return;
    }
    try { render(await res.json()); } catch (e) { /* the stream sends it again */ }
    openStream();
  }

  function openStream() {
    if (source) source.close();
    source = new EventSource('events' + (token ? '?token=' + encodeURIComponent(token) : ''));
    source.onmessage = (ev) => {
      let status;
      try { status = JSON.parse(ev.data); } catch (e) { return; }
      render(status);
    };
    source.onerror = () => {
      // The browser reconnects by itself after a dropped stream; it gives up only
      // on an error answer (a refused token, a full server): then ask again.
      if (source && source.readyState === EventSource.CLOSED) {
        source = null;
        retryLater();
      } else {
        setConnection('reconnecting', 'reconnecting…');
      }
    };
  }

  function retryLater() {
    setConnection('reconnecting', 'reconnecting…');
    if (!retryTimer) retryTimer = setTimeout(connect, 2000);
  }

  function showLogin(reason) {
    setConnection('unauthorized', 'admin token needed');
    if (reason) $('login-reason').textContent = reason + ' Enter the [admin] token of the node\u2019s configuration.';
    $('login').hidden = false;
    $('main').hidden = true;
    $('login-token').focus();
  }

  $('login').addEventListener('submit', (ev) => {
    ev.preventDefault();
    token = $('login-token').value;
    keepToken(token);
    $('login-token').value = '';
    $('login').hidden = true;
    connect();
  });

  // Events come at least every second; say so when they stop.
  setInterval(() => {
    if (!source || !lastMessage) return;
    const quiet = Date.now() - lastMessage;
    if (quiet > 3000) setConnection('stale', 'no update for ' + Math.round(quiet / 1000) + ' s');
  }, 1000);

  // ---- rendering ----
  function render(st) {
    st = obj(st);
    lastMessage = Date.now();
    setConnection('live', 'live');
    $('main').hidden = false;
    $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    const now = num(st.now_ms) ?? Date.now();
    const shards = arr(st.shards).map(obj);
    const colorOf = new Map(shards.map((sh, i) => [str(sh.name), SHARD_COLORS[i % SHARD_COLORS.length]]));
    const moves = arr(st.moves).map(obj);
    renderSummary(st, moves);
    renderShards(shards, colorOf, st.sizes_age_ms);
    renderPlacements(arr(st.placements).map(str), shards, colorOf, moves);
    renderMoves(moves, now);
    renderDirectory(st, now);
  }

  function renderSummary(st, moves) {
    const active = moves.filter((m) => !ENDED.has(str(m.phase))).length;
    const tables = arr(st.sharded_tables).map(str);
    const items = [
      ['epoch', fmtInt(num(st.epoch))],
      ['buckets', fmtInt(num(st.bucket_count))],
      ['key', st.key_column ? str(st.key_column) + ' (' + (str(st.key_type) || '?') + ')' : '–'],
      ['clients', fmtInt(num(st.clients))],
      ['moves under way', String(active)],
      ['pinned tenants', String(arr(st.pins).length)],
      ['sharded tables', tables.length ? tables.join(', ') : '(none yet)'],
    ];
    $('summary').replaceChildren(...items.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v))));
  }

  function renderShards(shards, colorOf, sizesAgeMs) {
    $('shards').tBodies[0].replaceChildren(...shards.map((sh) => {
      const size = shardSize(sh);
      return h('tr', { class: 'shard', dataset: { shard: str(sh.name) } },
        h('td', { class: 'name' }, swatch(colorOf.get(str(sh.name))), str(sh.name)),
        h('td', { class: 'state' }, str(sh.state)),
        h('td', { class: 'num buckets' }, fmtInt(num(sh.buckets))),
        h('td', { class: 'num size' }, size === undefined ? '–' : fmtBytes(size)),
        h('td', { class: 'mono muted' }, str(sh.url)));
    }));

    // Bytes when every shard reports its size, else buckets.
    const bytes = shards.length > 0 && shards.every((sh) => shardSize(sh) !== undefined);
    const values = shards.map((sh) => (bytes ? shardSize(sh) : num(sh.buckets) ?? 0));
    const max = Math.max(1, ...values);
    const W = 360, row = 24, left = 90, right = 80;
    const chart = $('shard-chart');
    const H = Math.max(1, shards.length) * row;
    chart.setAttribute('viewBox', `0 0 ${W} ${H}`);
    chart.setAttribute('width', W);
    chart.setAttribute('height', H);
    chart.replaceChildren(...shards.map((sh, i) => {
      const label = bytes ? fmtBytes(values[i]) : fmtInt(values[i]) + ' buckets';
      const width = Math.max(values[i] > 0 ? 2 : 0, ((W - left - right) * values[i]) / max);
      const y = i * row;
      return svg('g', { class: 'bar', 'data-shard': str(sh.name) },
        title(str(sh.name) + ': ' + label),
        svg('text', { x: 0, y: y + 16 }, str(sh.name)),
        svg('rect', { x: left, y: y + 4, width, height: row - 8, rx: 3, fill: colorOf.get(str(sh.name)) }),
        svg('text', { x: left + width + 6, y: y + 16 }, label));
    }));
    const age = num(sizesAgeMs);
    $('shard-chart-caption').textContent = bytes
      ? 'bytes per shard' + (age === undefined ? '' : `, measured ${Math.round(age / 1000)} s ago`)
      : 'buckets per shard (sizes not measured yet)';
  }

  let placementsDrawn = '';
  function renderPlacements(placements, shards, colorOf, moves) {
    const moving = new Set();
    for (const m of moves) {
      const b = /^bucket (\d+)$/.exec(str(m.subject));
      if (b && !ENDED.has(str(m.phase))) moving.add(Number(b[1]));
    }
    const key = JSON.stringify([placements, [...moving], [...colorOf]]);
    if (key === placementsDrawn) return;
    placementsDrawn = key;
    const n = placements.length;
    const cols = Math.max(1, Math.min(64, n));
    const cell = n > 1024 ? 6 : 12;
    const rows = Math.ceil(n / cols);
    const el = $('placements');
    el.setAttribute('viewBox', `0 0 ${cols * cell} ${Math.max(1, rows) * cell}`);
    el.setAttribute('width', cols * cell);
    el.setAttribute('height', Math.max(1, rows) * cell);
    el.replaceChildren(...placements.map((shard, b) => svg('rect', {
      x: (b % cols) * cell + 0.5, y: Math.floor(b / cols) * cell + 0.5, width: cell - 2, height: cell - 2,
      fill: colorOf.get(shard) || '#ccc',
      stroke: moving.has(b) ? '#111' : null, 'stroke-width': moving.has(b) ? 1.5 : null,
      class: moving.has(b) ? 'moving' : null,
    }, title('bucket ' + b + ': ' + shard + (moving.has(b) ? ' (moving)' : '')))));
    $('placements-legend').replaceChildren(
      ...shards.map((sh) => h('span', {}, swatch(colorOf.get(str(sh.name))), str(sh.name))),
      moving.size ? h('span', {}, '▣ outlined: moving') : null);
  }

  function renderMoves(moves, now) {
    const box = $('moves');
    if (moves.length === 0) return;
    // What the reader opened stays open across updates.
    const open = new Set([...box.querySelectorAll('details[open]')].map((d) => d.dataset.key));
    const sorted = [...moves].sort((a, b) => {
      const ended = (m) => (ENDED.has(str(m.phase)) ? 1 : 0);
      return ended(a) - ended(b) || (num(b.id) ?? 0) - (num(a.id) ?? 0);
    });
    box.replaceChildren(...sorted.map((m) => renderMove(m, now, open)));
  }

  function renderMove(m, now, open) {
    const c = obj(m.counters);
    const n = (k) => num(c[k]);
    const id = str(m.id);
    const phase = str(m.phase) || '?';
    const active = !ENDED.has(phase);
    const note = str(m.note);
    const badNote = phase === 'failed' || /refused|differ|undone|failed/.test(note);
    const details = (key, summary, ...body) =>
      h('details', { dataset: { key: id + ':' + key }, open: open.has(id + ':' + key) }, h('summary', {}, summary), body);
    return h('article', { class: 'move', id: 'move-' + id, dataset: { phase, active: String(active) } },
      h('div', { class: 'move-head' },
        h('span', { class: 'move-title' }, 'move ' + id + ' · ' + str(m.subject)),
        h('span', { class: 'route' }, str(m.source) + ' → ' + str(m.target)),
        h('span', { class: 'phase', dataset: { phase } }, phase),
        m.owner ? h('span', { class: 'owner muted' }, 'rows on ' + str(m.owner)) : null,
        m.holding === true ? h('span', { class: 'held' }, 'statements held') : null,
        m.cutover_auto === true ? h('span', { class: 'muted' }, 'cutover auto') : null,
        m.request ? h('span', { class: 'muted' }, describeRequest(m.request) + ' requested') : null),
      note ? h('p', { class: 'note', dataset: { kind: badNote ? 'bad' : 'info' } }, note) : null,
      h('div', { class: 'facts' },
        copyFact(phase, c, n), streamFact(phase, n), shadowFact(phase, n),
        verifyFact(phase, n, m.verified_clean === true), cutoverFact(phase, n)),
      timeline(m, phase, active, now),
      samples(m),
      pauses(m),
      details('counters', 'all counters', countersTable(c)));
  }

  function countersTable(c) {
    const rows = Object.keys(c).sort().map((k) =>
      h('tr', {}, h('td', { class: 'mono' }, k), h('td', { class: 'num' }, fmtInt(num(c[k])))));
    return h('table', { class: 'counters' }, h('tbody', {}, rows));
  }

  // The API sends a request as `{"request": "cutover", "force": false}`.
  function describeRequest(r) {
    if (typeof r === 'string') return r;
    if (typeof obj(r).request === 'string') return r.request;
    const k = Object.keys(obj(r))[0];
    return k || 'a change';
  }

  const fact = (cls, heading, ...body) => h('div', { class: 'fact ' + cls }, h('h4', {}, heading), body);

  function copyFact(phase, c, n) {
    const total = n('rows_total');
    if (total === undefined && phase !== 'copy') return null;
    const copying = phase === 'copy' || phase === 'plan';
    const copied = n('rows_copied') ?? (copying ? 0 : total);
    const pct = total > 0 ? Math.min(100, (100 * (copied ?? 0)) / total) : copying ? 0 : 100;
    const bar = h('div', { class: 'progress-bar' });
    bar.style.width = pct.toFixed(1) + '%';
    const perTable = Object.keys(c).filter((k) => k.startsWith('copy_rows:')).map((k) => k.slice('copy_rows:'.length));
    const parts = [];
    if (copying) {
      parts.push(fmtInt(n('copy_rows_per_s') ?? 0) + ' rows/s');
      parts.push('ETA ' + (n('eta_s') === undefined ? '–' : fmtDuration(n('eta_s') * 1000)));
    }
    if (n('tables') !== undefined) parts.push(fmtInt(n('tables_ready') ?? (copying ? 0 : n('tables'))) + '/' + fmtInt(n('tables')) + ' tables ready');
    if (n('bytes_total') !== undefined) parts.push(fmtBytes(n('bytes_total')));
    return fact('copy', 'copy',
      h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(pct) }, bar),
      h('p', { class: 'copy-rows' }, fmtInt(copied) + ' / ' + fmtInt(total) + ' rows (' + Math.floor(pct) + '%)'),
      parts.length ? h('p', { class: 'muted' }, parts.join(' · ')) : null,
      perTable.length ? h('table', { class: 'tables' },
        h('thead', {}, h('tr', {}, h('th', {}, 'table'), h('th', { class: 'num' }, 'rows'), h('th', { class: 'num' }, 'bytes'))),
        h('tbody', {}, perTable.map((t) => h('tr', {},
          h('td', { class: 'mono' }, t),
          h('td', { class: 'num' }, fmtInt(n('copy_rows:' + t))),
          // 0: the copy ended before its byte count was seen.
          h('td', { class: 'num' }, n('copy_bytes:' + t) ? fmtBytes(n('copy_bytes:' + t)) : '–'))))) : null);
  }

  function streamFact(phase, n) {
    if (n('lag_bytes') === undefined && n('lag_ms') === undefined) return null;
    const heading = phase === 'reverse' ? 'reverse stream (new → old)' : 'change stream (old → new)';
    const parts = ['lag ' + fmtBytes(n('lag_bytes'))];
    if (n('lag_ms') !== undefined) parts.push(fmtDuration(n('lag_ms')));
    return fact('lag', heading, h('p', {}, parts.join(' / ')));
  }

  function shadowFact(phase, n) {
    const any = ['shadow_compared', 'shadow_mismatched', 'shadow_lag_explained', 'shadow_unsettled', 'shadow_skipped',
      'shadow_matched']
      .some((k) => n(k) !== undefined);
    if (!any && phase !== 'shadow') return null;
    const mismatched = n('shadow_mismatched') ?? 0;
    const more = [];
    if (n('shadow_lag_explained') !== undefined) more.push(fmtInt(n('shadow_lag_explained')) + ' explained by lag');
    if (n('shadow_unsettled') !== undefined) more.push(fmtInt(n('shadow_unsettled')) + ' unsettled (rows kept changing)');
    if (n('shadow_skipped') !== undefined) more.push(fmtInt(n('shadow_skipped')) + ' skipped');
    return fact('shadow', 'shadow reads',
      h('p', {}, fmtInt(n('shadow_compared') ?? 0) + ' compared, ',
        h('span', { class: mismatched > 0 ? 'bad' : 'good' }, fmtInt(mismatched) + ' mismatched')),
      more.length ? h('p', { class: 'muted' }, more.join(' · ')) : null);
  }

  // `clean`: the move's `verified_clean` flag (a field of the move, not a counter).
  function verifyFact(phase, n, clean) {
    let result;
    if (phase === 'verify') result = h('p', {}, 'verifying…');
    else if (n('verified_at_ms') === undefined) {
      if (!['dual_write', 'shadow'].includes(phase)) return null;
      result = h('p', { class: 'muted' }, 'not verified yet');
    } else if (clean) result = h('p', { class: 'good' }, 'verified clean');
    else result = h('p', { class: 'bad' }, fmtInt(n('verify_mismatches') ?? 0) + ' chunk(s) differ');
    const more = [];
    if (n('verify_chunks') !== undefined) more.push(fmtInt(n('verify_chunks')) + ' chunks');
    if (n('verify_rows') !== undefined) more.push(fmtInt(n('verify_rows')) + ' rows');
    if (n('verify_pause_us') !== undefined) more.push('held ' + fmtMicros(n('verify_pause_us')));
    if (n('verified_at_ms') !== undefined) more.push('at ' + fmtTime(n('verified_at_ms')));
    return fact('verify', 'verify', result, more.length ? h('p', { class: 'muted' }, more.join(' · ')) : null);
  }

  function cutoverFact(phase, n) {
    if (n('cutovers') === undefined && n('cutover_failures') === undefined && phase !== 'cutover') return null;
    const lines = [];
    if (phase === 'cutover') lines.push(h('p', {}, 'cutting over…'));
    if (n('pause_us') !== undefined) lines.push(h('p', { class: 'pause' }, 'pause ' + fmtMicros(n('pause_us'))));
    const counts = [fmtInt(n('cutovers') ?? 0) + ' cutover(s)'];
    if (n('cutover_failures')) counts.push(fmtInt(n('cutover_failures')) + ' undone');
    lines.push(h('p', { class: 'muted' }, counts.join(' · ')));
    const steps = [['hold', 'hold_us'], ['fence', 'fence_us'], ['catch up', 'catch_up_us'], ['flip', 'flip_us']]
      .filter(([, k]) => n(k) !== undefined).map(([label, k]) => label + ' ' + fmtMicros(n(k)));
    if (steps.length) lines.push(h('p', { class: 'muted' }, steps.join(' · ')));
    return fact('cutover', 'cutover', lines);
  }

  // The phases from `history`, as bars whose widths follow their durations
  // (every phase keeps a sliver, so a cutover of milliseconds stays visible).
  function timeline(m, phase, active, now) {
    const history = arr(m.history).filter((e) => Array.isArray(e) && typeof e[0] === 'string' && num(e[1]) !== undefined);
    if (history.length === 0) return null;
    const steps = history.map(([p, at], i) => {
      const end = i + 1 < history.length ? history[i + 1][1] : active ? Math.max(now, at) : at;
      return { phase: p, at, ms: Math.max(0, end - at), current: i + 1 === history.length };
    });
    const total = steps.reduce((s, x) => s + x.ms, 0);
    const W = 900, H = 30, sliver = 8;
    const free = Math.max(0, W - sliver * steps.length);
    let x = 0;
    const bars = steps.map((st) => {
      const w = sliver + (total > 0 ? (free * st.ms) / total : free / steps.length);
      const g = svg('g', { class: 'step', 'data-phase': st.phase },
        title(st.phase + ': ' + fmtDuration(st.ms) + ', from ' + fmtTime(st.at)),
        svg('rect', { x: x + 0.5, y: 0, width: Math.max(1, w - 1), height: 18, rx: 2, fill: PHASE_COLORS[st.phase] || '#888' }),
        w > 60 ? svg('text', { x: x + 4, y: 13, class: 'on-bar' }, st.phase) : null,
        w > 60 ? svg('text', { x: x + 4, y: 29 }, fmtDuration(st.ms)) : null);
      x += w;
      return g;
    });
    const el = svg('svg', { class: 'timeline', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'phases of move ' + str(m.id) }, ...bars);
    const text = steps.map((st) => st.phase + ' ' + fmtDuration(st.ms) + (st.current && active ? ' (now)' : '')).join(' → ');
    return h('div', { class: 'timeline-box' }, h('h4', { class: 'muted' }, 'timeline'), el, h('p', { class: 'timeline-steps' }, text));
  }

  // Each hold of the move (verify's cut, cutovers, rollbacks), newest first:
  // how many statements waited and how long, in all and per router.
  function pauses(m) {
    const list = arr(m.pauses).map(obj);
    if (list.length === 0) return null;
    const held = (x) => {
      const s = obj(x);
      if (!num(s.statements)) return ['none', '–', '–', '–'];
      return [fmtInt(s.statements), fmtMicros(num(s.p50_us)), fmtMicros(num(s.p99_us)), fmtMicros(num(s.max_us))];
    };
    const rows = [];
    for (const p of list) {
      rows.push(h('tr', {}, h('td', {}, str(p.kind)), h('td', {}, fmtTime(p.at_ms)), h('td', {}, 'all routers'),
        ...held(p.held).map((v) => h('td', { class: 'num' }, v))));
      const routers = arr(p.routers).filter((r) => Array.isArray(r) && r.length === 2);
      if (routers.length > 1) {
        for (const [router, s] of routers) {
          rows.push(h('tr', { class: 'muted' }, h('td', {}), h('td', {}), h('td', { class: 'mono' }, str(router)),
            ...held(s).map((v) => h('td', { class: 'num' }, v))));
        }
      }
    }
    return h('div', { class: 'pauses-box' },
      h('h4', { class: 'muted' }, 'statements held (the pause clients felt)'),
      h('table', { class: 'pauses' },
        h('thead', {}, h('tr', {}, ...['hold', 'at', 'router', 'statements', 'p50', 'p99', 'max'].map((t) => h('th', {}, t)))),
        h('tbody', {}, rows)));
  }

  function samples(m) {
    const list = arr(m.shadow_samples).map(obj);
    if (list.length === 0) return null;
    return h('div', { class: 'samples-box' },
      h('h4', { class: 'bad' }, 'last proven shadow read differences'),
      h('table', { class: 'samples' },
        h('thead', {}, h('tr', {}, h('th', {}, 'tenant'), h('th', {}, 'query'), h('th', {}, 'source'), h('th', {}, 'target'), h('th', {}, 'at'))),
        h('tbody', {}, list.map((x) => h('tr', {},
          h('td', { class: 'mono' }, str(x.keys)),
          h('td', { class: 'query mono' }, str(x.query)),
          h('td', { class: 'mono' }, str(x.source)),
          h('td', { class: 'mono' }, str(x.target)),
          h('td', {}, fmtTime(x.at_ms)))))));
  }

  function renderDirectory(st, now) {
    const r = st.replica && typeof st.replica === 'object' ? st.replica : null;
    if (r) {
      const list = (v) => (arr(v).length ? arr(v).join(', ') : 'none');
      $('replica').replaceChildren(
        'directory node ' + str(r.node_id) + ' (' + (str(r.role) || '?') + '), leader ' + (r.leader ?? 'unknown') +
          ', term ' + str(r.term) + ', applied index ' + str(r.applied_index) + ', voters ' + list(r.voters) +
          ', learners ' + list(r.learners) + ', lease ',
        r.lease_valid === true ? h('span', { class: 'good' }, 'valid') : h('span', { class: 'bad' }, 'EXPIRED: writes refused'));
    } else {
      $('replica').textContent = 'static directory (from the configuration file)';
    }
    $('routers').tBodies[0].replaceChildren(...arr(st.routers).map(obj).map((rt) => h('tr', {},
      h('td', {}, str(rt.id)),
      h('td', { class: 'mono' }, str(rt.address)),
      h('td', { class: 'num' }, num(rt.last_heartbeat_ms) === undefined ? '–' : fmtDuration(Math.max(0, now - rt.last_heartbeat_ms)) + ' ago'),
      h('td', { class: 'num' }, fmtInt(num(rt.applied_epoch))))));
  }

  connect();
})();
