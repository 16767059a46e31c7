"use strict";
// The gate explorer's page logic: vanilla JS, no network. The header (JSON) says what the byte blob holds;
// the blob is deflated and base64-encoded; every gate value is a byte over its (channel, unit) range.
(function () {
  const H = JSON.parse(document.getElementById("explorer-header").textContent);
  const SIGNED = { candidate: true, cell: true };
  const NAMES = { input_gate: "input gate i", forget_gate: "forget gate f", candidate: "candidate g",
                  output_gate: "output gate o", cell: "cell c" };
  const $ = (id) => document.getElementById(id);
  const state = { sample: 0, channel: "cell", unit: 0, threshold: 0.5, below: false, sort: "saturation",
                  probe: null, selection: null, hover: null, dragging: null };
  const api = { ready: false, state: state, header: H };
  window.explorer = api;
  let buffer = null;
  const cache = new Map();

  async function inflate(b64) {
    const raw = Uint8Array.from(atob(b64.trim()), (c) => c.charCodeAt(0));
    const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
    return await new Response(stream).arrayBuffer();
  }

  function view(ref) {
    const n = ref.shape.reduce((a, b) => a * b, 1);
    return ref.dtype === "u16" ? new Uint16Array(buffer, ref.offset, n) : new Uint8Array(buffer, ref.offset, n);
  }

  // (steps x units) float values of one sample and channel, decoded once; the cell as tanh(c) for colour
  function values(s, ch) {
    const key = s + "/" + ch;
    if (cache.has(key)) return cache.get(key);
    const smp = H.samples[s], q = view(smp.gates[ch]), U = H.units.length, lo = H.ranges[ch].lo, hi = H.ranges[ch].hi;
    const out = new Float32Array(q.length);
    for (let i = 0; i < q.length; i++) {
      const u = i % U, l = lo[u] === null ? 0 : lo[u], h = hi[u] === null ? 0 : hi[u];
      out[i] = l + q[i] * (h - l) / 255;
    }
    cache.set(key, out);
    return out;
  }
  const shown = (ch, v) => (ch === "cell" ? Math.tanh(v) : v);
  const value = (s, ch, t, u) => values(s, ch)[t * H.units.length + u];

  // colours: gates 0..1 white -> blue; signed values -1..1 blue -> white -> red
  function colour(ch, v) {
    let r, g, b;
    if (SIGNED[ch]) {
      const x = Math.max(-1, Math.min(1, v));
      if (x >= 0) { r = 255; g = 255 - 190 * x; b = 255 - 205 * x; } else { r = 255 + 205 * x; g = 255 + 150 * x; b = 255; }
    } else {
      const x = Math.max(0, Math.min(1, v));
      r = 255 - 230 * x; g = 255 - 175 * x; b = 255 - 100 * x;
    }
    return "rgb(" + Math.round(r) + "," + Math.round(g) + "," + Math.round(b) + ")";
  }
  const ink = (ch, v) => ((SIGNED[ch] ? Math.abs(v) : v) > 0.6 ? "#fff" : "#000");
  const visible = (c) => ({ " ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "": "\u2205" }[c] ?? c);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  const fmt = (x, d) => (x === null || x === undefined || Number.isNaN(x) ? "–" : x.toFixed(d === undefined ? 2 : d));

  // --- the input, drawn once per sample ------------------------------------------------------------------
  let stepEls = [];

  function drawSample() {
    const smp = H.samples[state.sample], box = $("steps");
    box.className = H.kind;
    box.innerHTML = "";
    stepEls = [];
    $("sample-title").textContent = smp.title;
    if (H.kind === "text") {
      const frag = document.createDocumentFragment();
      smp.labels.forEach((c, t) => {
        const el = document.createElement("span");
        el.className = "step";
        el.dataset.t = t;
        el.textContent = c === "\n" ? "\u21b5" : c;
        frag.appendChild(el);
        if (c === "\n") frag.appendChild(document.createTextNode("\n"));
        stepEls.push(el);
      });
      box.appendChild(frag);
    } else if (H.kind === "tokens") {
      if (smp.picture) box.appendChild(picture(smp.picture));
      smp.labels.forEach((w, t) => {
        const el = document.createElement("span");
        el.className = "step";
        el.dataset.t = t;
        el.textContent = w;
        if (smp.sub && smp.sub[t]) { const s = document.createElement("small"); s.textContent = smp.sub[t]; el.appendChild(s); }
        box.appendChild(el);
        stepEls.push(el);
      });
    } else if (H.kind === "images") {
      const q = view(smp.values), [T, h, w] = smp.values.shape;
      for (let t = 0; t < T; t++) {
        const c = document.createElement("canvas");
        c.width = w; c.height = h; c.className = "step"; c.dataset.t = t;
        const ctx = c.getContext("2d"), img = ctx.createImageData(w, h);
        for (let i = 0; i < w * h; i++) {
          const g = 255 - q[t * w * h + i];
          img.data[4 * i] = g; img.data[4 * i + 1] = g; img.data[4 * i + 2] = g; img.data[4 * i + 3] = 255;
        }
        ctx.putImageData(img, 0, 0);
        c.title = smp.labels[t];
        box.appendChild(c);
        stepEls.push(c);
      }
    } else {
      drawSeries(smp, box);
    }
    colourSteps();
  }

  // the image a sequence is conditioned on (a caption's picture): RGB bytes, drawn pixel for pixel, scaled by CSS
  function picture(ref) {
    const [h, w] = ref.shape, q = view(ref), c = document.createElement("canvas");
    c.width = w; c.height = h; c.className = "picture";
    const ctx = c.getContext("2d"), img = ctx.createImageData(w, h);
    for (let i = 0; i < w * h; i++) {
      img.data[4 * i] = q[3 * i]; img.data[4 * i + 1] = q[3 * i + 1]; img.data[4 * i + 2] = q[3 * i + 2]; img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return c;
  }

  function drawSeries(smp, box) {
    const NS = "http://www.w3.org/2000/svg", q = view(smp.values), [N, C] = smp.values.shape;
    const T = smp.steps, per = smp.per_step, W = Math.max(760, Math.min(2400, T * per * 3)), plotH = 150, stripH = 26;
    const lab = smp.labels.some((l) => l) ? 16 : 0;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", plotH + stripH + lab + 6);
    const x = (i) => (i / Math.max(1, T * per)) * W;
    const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    for (let c = 0; c < C; c++) {
      let d = "";
      for (let i = 0; i < N; i++) d += (i ? "L" : "M") + x(i + 0.5).toFixed(1) + "," + (plotH - 4 - (q[i * C + c] / 255) * (plotH - 8)).toFixed(1);
      const p = document.createElementNS(NS, "path");
      p.setAttribute("d", d); p.setAttribute("fill", "none"); p.setAttribute("stroke", palette[c % palette.length]); p.setAttribute("stroke-width", "1.2");
      const tip = document.createElementNS(NS, "title"); tip.textContent = (H.channel_names || [])[c] || "channel " + c;
      p.appendChild(tip);
      svg.appendChild(p);
    }
    for (let t = 0; t < T; t++) {
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", x(t * per)); r.setAttribute("y", plotH + lab); r.setAttribute("width", Math.max(1, x(per) - x(0)));
      r.setAttribute("height", stripH); r.setAttribute("class", "step"); r.dataset.t = t;
      svg.appendChild(r);
      stepEls.push(r);
      if (lab && (t === 0 || smp.labels[t] !== smp.labels[t - 1])) {
        const tx = document.createElementNS(NS, "text");
        tx.setAttribute("x", x(t * per) + 2); tx.setAttribute("y", plotH + 12); tx.textContent = smp.labels[t];
        svg.appendChild(tx);
      }
    }
    box.appendChild(svg);
    if (H.channel_names) {
      const key = document.createElement("div");
      key.className = "hint";
      key.innerHTML = H.channel_names.map((n, c) => '<span style="color:' + palette[c % palette.length] + '">\u25a0 ' + esc(n) + "</span>").join(" ");
      box.appendChild(key);
    }
  }

  function colourSteps() {
    const ch = state.channel, s = state.sample;
    stepEls.forEach((el, t) => {
      const v = shown(ch, value(s, ch, t, state.unit)), c = colour(ch, v);
      if (H.kind === "series") el.setAttribute("fill", c);
      else if (H.kind === "images") el.style.borderColor = c;
      else { el.style.background = c; el.style.color = ink(ch, v); }
      const sel = state.selection && t >= state.selection[0] && t <= state.selection[1];
      el.classList.toggle("sel", !!sel);
    });
    const lo = SIGNED[ch] ? -1 : 0;
    $("legend").innerHTML = fmt(lo, 0) + ' <i style="background:linear-gradient(90deg,' + colour(ch, lo) + "," + colour(ch, (lo + 1) / 2) + "," + colour(ch, 1) + ')"></i> 1 · ' + esc(NAMES[ch]) + (ch === "cell" ? " as tanh(c)" : "");
  }

  // --- hover: the unit's gates and cell, the model's top predictions -----------------------------------------
  function hover(t) {
    if (state.hover !== null && stepEls[state.hover]) stepEls[state.hover].classList.remove("hov");
    state.hover = t;
    if (stepEls[t]) stepEls[t].classList.add("hov");
    const smp = H.samples[state.sample], s = state.sample, u = state.unit;
    $("hover-step").textContent = t + " of " + smp.steps + ", unit " + H.units[u];
    const label = smp.labels[t];
    $("hover-label").textContent = H.kind === "text" ? "'" + visible(label) + "'" : label + (smp.sub && smp.sub[t] ? " " + smp.sub[t] : "");
    $("hover-gates").innerHTML = H.channels.map((ch) => {
      const v = value(s, ch, t, u), b = SIGNED[ch] ? Math.min(1, Math.abs(shown(ch, v))) : v;
      return "<tr><td>" + esc(NAMES[ch]) + '</td><td class="num">' + fmt(v, 3) + '</td><td class="bar' + (SIGNED[ch] ? " signed" : "") +
        '"><b style="width:' + (100 * b).toFixed(0) + '%"></b></td></tr>';
    }).join("");
    let top = "";
    if (smp.top_ids && H.vocab) {
      const k = smp.top_ids.shape[1], ids = view(smp.top_ids), ps = view(smp.top_p);
      const next = smp.actual ? smp.actual[t] : undefined;
      const what = H.kind === "images" || H.kind === "series" ? "the model's top classes here" : "the model's top " + k + " next";
      top = "<div>" + what + (next !== undefined && next !== "" ? " (actual: <code>" + esc(visible(next)) + "</code>)" : "") + "</div><table>" +
        Array.from({ length: k }, (_, j) => {
          const tok = H.vocab[ids[t * k + j]], p = ps[t * k + j] / 255;
          return '<tr class="' + (tok === next ? "actual" : "") + '"><td><code>' + esc(visible(tok)) + '</code></td><td>' + fmt(p, 3) +
            '</td><td class="bar"><b style="width:' + (100 * p).toFixed(0) + '%"></b></td></tr>';
        }).join("") + "</table>";
    }
    $("hover-top").innerHTML = top;
  }

  // --- selection (drag or shift-click) -------------------------------------------------------------------
  function select(a, b) {
    state.selection = [Math.min(a, b), Math.max(a, b)];
    const [lo, hi] = state.selection, smp = H.samples[state.sample];
    const text = H.kind === "text" || H.kind === "tokens" ? ": <code>" + esc(smp.labels.slice(lo, hi + 1).map(H.kind === "text" ? (c) => c : (w) => w + " ").join("").slice(0, 160)) + "</code>" : "";
    $("selection").innerHTML = "steps " + lo + "–" + hi + " (" + (hi - lo + 1) + ")" + text +
      ' · <button class="link" id="rank-match">rank units by match</button> · <button class="link" id="clear-selection">clear</button>';
    $("rank-match").onclick = () => { state.sort = "match"; $("sort").value = "match"; rankUnits(); };
    $("clear-selection").onclick = () => { state.selection = null; $("selection").textContent = "none: drag across steps to select a range"; colourSteps(); rankUnits(); };
    state.sort = "match";
    $("sort").value = "match";
    colourSteps();
    rankUnits();
  }

  function stepOf(ev) {
    const el = ev.target.closest ? ev.target.closest(".step") : null;
    return el && el.dataset.t !== undefined ? Number(el.dataset.t) : null;
  }

  // --- unit scores -----------------------------------------------------------------------------------------
  const isOn = (v) => (state.below ? v < state.threshold : v > state.threshold);

  function saturation(u) {  // fraction of steps near the ends of the range: gates < 0.1 or > 0.9; tanh values |v| > 0.9
    const ch = state.channel;
    let n = 0, k = 0;
    H.samples.forEach((smp, s) => {
      for (let t = 0; t < smp.steps; t++) {
        const v = shown(ch, value(s, ch, t, u));
        n++;
        if (SIGNED[ch] ? Math.abs(v) > 0.9 : v < 0.1 || v > 0.9) k++;
      }
    });
    return n ? k / n : NaN;
  }

  function correlation(u, probe) {  // Pearson r over every page step where the probe is defined
    if (!probe) return NaN;
    const ch = state.channel;
    let n = 0, sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
    H.samples.forEach((smp, s) => {
      const p = smp.probes[probe];
      if (!p) return;
      for (let t = 0; t < smp.steps; t++) {
        const y = p[t];
        if (y === null) continue;
        const x = shown(ch, value(s, ch, t, u));
        n++; sx += x; sy += y; sxx += x * x; syy += y * y; sxy += x * y;
      }
    });
    if (n < 2) return NaN;
    const vx = sxx / n - (sx / n) ** 2, vy = syy / n - (sy / n) ** 2;
    return vx > 1e-12 && vy > 1e-12 ? (sxy / n - (sx / n) * (sy / n)) / Math.sqrt(vx * vy) : NaN;
  }

  function match(u) {  // LSTMVis: on (above the threshold) inside the selection, off outside: inside - outside share
    if (!state.selection) return NaN;
    const [a, b] = state.selection, ch = state.channel, s = state.sample, T = H.samples[s].steps;
    let inside = 0, outside = 0;
    for (let t = 0; t < T; t++) {
      const on = isOn(shown(ch, value(s, ch, t, u))) ? 1 : 0;
      if (t >= a && t <= b) inside += on; else outside += on;
    }
    const nIn = b - a + 1, nOut = T - nIn;
    return inside / nIn - (nOut > 0 ? outside / nOut : 0);
  }

  function rankUnits() {
    const U = H.units.length, rows = [];
    for (let u = 0; u < U; u++) rows.push({ u: u, sat: saturation(u), r: correlation(u, state.probe), m: match(u) });
    const key = { saturation: (r) => -r.sat, probe: (r) => -Math.abs(r.r), match: (r) => -r.m, unit: (r) => r.u }[state.sort];
    rows.sort((p, q) => { const a = key(p), b = key(q); return (Number.isNaN(a) ? Infinity : a) - (Number.isNaN(b) ? Infinity : b) || p.u - q.u; });
    $("units").tBodies[0].innerHTML = rows.slice(0, 40).map((r) =>
      '<tr data-u="' + r.u + '" class="' + (r.u === state.unit ? "current" : "") + '"><td>' + esc(H.units[r.u]) + "</td><td>" + fmt(r.sat) +
      "</td><td>" + (Number.isNaN(r.r) ? "–" : (r.r >= 0 ? "+" : "") + r.r.toFixed(2)) + "</td><td>" + fmt(r.m) + "</td></tr>").join("");
    api.ranking = rows.map((r) => r.u);
  }

  // --- where the unit fires: runs above the threshold on every sample of the page -------------------------
  function fires() {
    const ch = state.channel, u = state.unit, runs = [];
    H.samples.forEach((smp, s) => {
      let start = -1;
      for (let t = 0; t <= smp.steps; t++) {
        const on = t < smp.steps && isOn(shown(ch, value(s, ch, t, u)));
        if (on && start < 0) start = t;
        if (!on && start >= 0) { runs.push([s, start, t - 1]); start = -1; }
      }
    });
    runs.sort((p, q) => (q[2] - q[1]) - (p[2] - p[1]));
    $("fires-unit").textContent = H.units[u] + " (" + NAMES[ch] + (state.below ? " < " : " > ") + state.threshold.toFixed(2) + "): " + runs.length + " runs";
    $("fires").innerHTML = runs.slice(0, 15).map(([s, a, b]) => {
      const smp = H.samples[s];
      let ctx = "";
      if (H.kind === "text" || H.kind === "tokens") {
        const sep = H.kind === "text" ? "" : " ", show = (x) => esc(H.kind === "text" ? x.replace(/\n/g, "\u21b5") : x);
        const pre = smp.labels.slice(Math.max(0, a - 20), a).join(sep), mid = smp.labels.slice(a, b + 1).join(sep), post = smp.labels.slice(b + 1, b + 21).join(sep);
        ctx = " " + show(pre) + sep + "<mark>" + show(mid) + "</mark>" + sep + show(post);
      } else if (smp.labels.some((l) => l)) {
        ctx = " labels: " + esc([...new Set(smp.labels.slice(a, b + 1))].join(", "));
      }
      return '<li data-s="' + s + '" data-a="' + a + '" data-b="' + b + '">sample ' + s + ", steps " + a + "–" + b + ":" + ctx + "</li>";
    }).join("");
  }

  function refresh(rank) {
    colourSteps();
    if (rank !== false) rankUnits();
    fires();
    if (state.hover !== null) hover(state.hover);
  }

  function setUnit(u) {
    state.unit = u;
    $("unit").value = String(u);
    refresh();
  }

  function setThresholdRange() {
    const th = $("threshold");
    th.min = SIGNED[state.channel] ? "-1" : "0";
    if (state.threshold < Number(th.min)) state.threshold = 0.5;
    th.value = String(state.threshold);
    $("threshold-value").textContent = state.threshold.toFixed(2);
  }

  // --- wiring ----------------------------------------------------------------------------------------------
  function facts() {
    const a = H.about || {};
    $("facts").textContent = H.topology + " · " + H.units.length + " units shown (" + (a.layer_shown || "top layer") +
      (a.directions === 2 ? ", both directions: → forward, ← backward" : "") + ") · hidden size " + a.hidden_size +
      " · " + H.samples.length + " sample" + (H.samples.length > 1 ? "s" : "") + (a.split ? " from the " + a.split + " split" : "");
    const probes = a.probes || {};
    const names = Object.keys(probes);
    if (!names.length) return;
    $("probe-summary").innerHTML = "<table><tr><th>probe</th><th>best unit (tanh cell)</th><th>r</th><th>untrained model's best r</th><th>steps</th></tr>" +
      names.map((p) => { const v = probes[p];
        return "<tr><td>" + esc(p) + '</td><td><button class="link" data-probe="' + esc(p) + '" data-unit="' + v.unit + '">' + esc(H.units[v.unit]) + "</button></td><td>" +
          (v.corr >= 0 ? "+" : "") + v.corr.toFixed(2) + "</td><td>" + (v.control_corr === undefined ? "–" : (v.control_corr >= 0 ? "+" : "") + v.control_corr.toFixed(2)) +
          "</td><td>" + v.steps + "</td></tr>"; }).join("") + "</table>";
    $("probe-summary").addEventListener("click", (ev) => {
      const b = ev.target.closest("button[data-unit]");
      if (!b) return;
      state.channel = "cell"; $("channel").value = "cell";
      if ([...$("probe").options].some((o) => o.value === b.dataset.probe)) { state.probe = b.dataset.probe; $("probe").value = state.probe; }
      state.sort = "probe"; $("sort").value = "probe";
      setThresholdRange();
      setUnit(Number(b.dataset.unit));
    });
  }

  function init() {
    facts();
    $("sample").innerHTML = H.samples.map((s, i) => '<option value="' + i + '">' + i + ": " + esc(s.title.slice(0, 80)) + "</option>").join("");
    $("unit").innerHTML = H.units.map((n, u) => '<option value="' + u + '">' + esc(n) + "</option>").join("");
    const probes = [...new Set(H.samples.flatMap((s) => Object.keys(s.probes)))];
    $("probe").innerHTML = probes.map((p) => '<option value="' + esc(p) + '">' + esc(p) + "</option>").join("") || "<option value=''>(none)</option>";
    state.probe = probes[0] || null;
    const best = (H.about && H.about.probes && probes.length) ? (H.about.probes[probes[0]] || null) : null;
    if (best) state.unit = best.unit;
    // a link can choose what the page opens on: page.html#unit=155&channel=forget_gate&sample=2&probe=...
    const want = new URLSearchParams(location.hash.slice(1));
    const pick = (name, count) => { const v = Number(want.get(name)); return want.has(name) && Number.isInteger(v) && v >= 0 && v < count ? v : null; };
    if (pick("unit", H.units.length) !== null) state.unit = pick("unit", H.units.length);
    if (pick("sample", H.samples.length) !== null) state.sample = pick("sample", H.samples.length);
    if (H.channels.includes(want.get("channel"))) { state.channel = want.get("channel"); $("channel").value = state.channel; }
    if (probes.includes(want.get("probe"))) state.probe = want.get("probe");
    $("unit").value = String(state.unit);
    $("sample").value = String(state.sample);
    $("probe").value = state.probe || "";
    $("sample").onchange = () => { state.sample = Number($("sample").value); state.selection = null; state.hover = null; drawSample(); refresh(); };
    $("channel").onchange = () => { state.channel = $("channel").value; setThresholdRange(); refresh(); };
    $("unit").onchange = () => setUnit(Number($("unit").value));
    $("threshold").oninput = () => { state.threshold = Number($("threshold").value); $("threshold-value").textContent = state.threshold.toFixed(2); refresh(state.sort === "match"); };
    $("below").onchange = () => { state.below = $("below").checked; refresh(); };
    $("sort").onchange = () => { state.sort = $("sort").value; rankUnits(); };
    $("probe").onchange = () => { state.probe = $("probe").value; rankUnits(); };
    $("units").tBodies[0].addEventListener("click", (ev) => { const tr = ev.target.closest("tr[data-u]"); if (tr) setUnit(Number(tr.dataset.u)); });
    $("fires").addEventListener("click", (ev) => {
      const li = ev.target.closest("li[data-s]");
      if (!li) return;
      const s = Number(li.dataset.s);
      if (s !== state.sample) { state.sample = s; $("sample").value = String(s); drawSample(); }
      state.selection = [Number(li.dataset.a), Number(li.dataset.b)];
      colourSteps();
      if (stepEls[state.selection[0]] && stepEls[state.selection[0]].scrollIntoView) stepEls[state.selection[0]].scrollIntoView({ block: "nearest" });
    });
    const box = $("steps");
    box.addEventListener("mouseover", (ev) => {
      const t = stepOf(ev);
      if (t === null) return;
      hover(t);
      if (state.dragging !== null && t !== state.dragging.last) { state.dragging.last = t; state.dragging.moved = true; }
    });
    box.addEventListener("mousedown", (ev) => {
      const t = stepOf(ev);
      if (t === null) return;
      ev.preventDefault();
      if (ev.shiftKey && state.selection) { select(state.selection[0], t); return; }
      state.dragging = { first: t, last: t, moved: false };
    });
    document.addEventListener("mouseup", () => {
      const d = state.dragging;
      state.dragging = null;
      if (d) select(d.first, d.last);
    });
    setThresholdRange();
    drawSample();
    refresh();
    hover(0);
  }

  inflate(document.getElementById("explorer-blob").textContent)
    .then((buf) => { buffer = buf; init(); api.ready = true; document.body.dataset.ready = "1"; })
    .catch((err) => { document.body.insertAdjacentHTML("afterbegin", '<p style="color:#b00">could not read the page data: ' + esc(err) + "</p>"); throw err; });
})();
