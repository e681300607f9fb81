// The mlmirror dashboard: polls GET /history every 2 s and draws each panel of the chosen route with uPlot.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {  // taken once, kept for this tab, and out of the address bar
    sessionStorage.setItem("mlmirror-token", params.get("token"));
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
  }
  const $ = (id) => document.getElementById(id);
  const COLORS = ["#2b6cb0", "#dd6b20", "#38a169", "#b00020", "#805ad5", "#718096", "#d69e2e", "#319795"];
  const charts = {};
  let route = params.get("route") || "";
  let data = null;

  function headers() {
    const token = sessionStorage.getItem("mlmirror-token");
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function sum(obj) { return Object.values(obj || {}).reduce((a, b) => a + b, 0); }
  function fmt(x, digits) { return x === null || x === undefined ? "-" : (+x).toFixed(digits === undefined ? 3 : digits); }
  function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%"; }

  // One line chart: xs (Unix s) and named series of ys; rebuilt when the series change.
  function chart(id, title, xs, series, unit) {
    const names = Object.keys(series);
    const key = names.join("|");
    const el = $(id);
    const width = Math.max(300, el.clientWidth || 560);
    const values = [xs, ...names.map((n) => series[n])];
    if (!charts[id] || charts[id].key !== key) {
      if (charts[id]) charts[id].plot.destroy();
      const opts = {
        title: title, width: width, height: 170,
        scales: { x: { time: true } },
        axes: [{}, { label: unit || "", size: 55 }],
        series: [{}, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 1.5,
                                                spanGaps: true }))],
      };
      charts[id] = { key: key, plot: new uPlot(opts, values, el) };
    } else {
      charts[id].plot.setData(values);
    }
    el.dataset.series = key;
    el.dataset.points = String(xs.length);
  }

  // Per bucket: the route's counts turned into per-second rates, one series per key.
  function rates(buckets, pick) {
    const keys = new Set();
    buckets.forEach((b) => Object.keys(pick(b) || {}).forEach((k) => keys.add(k)));
    const out = {};
    keys.forEach((k) => { out[k] = buckets.map((b) => { const v = (pick(b) || {})[k]; return v === undefined ? 0 : v / (b.seconds || 1); }); });
    return out;
  }

  function routeOf(b) { return b.routes[route] || {}; }

  function drawTraffic(buckets, xs, status) {
    const calls = status.calls || {};
    const total = sum(calls);
    $("route-calls").textContent = String(total);
    $("route-errors").textContent = String(total - (calls.OK || 0));
    $("route-fallbacks").textContent = String(sum(status.fallbacks));
    chart("chart-served", "calls/s by who served", xs, rates(buckets, (b) => routeOf(b).served), "calls/s");
    const errors = rates(buckets, (b) => { const c = Object.assign({}, routeOf(b).calls); delete c.OK; return c; });
    chart("chart-errors", "client-visible errors/s by code", xs, Object.keys(errors).length ? errors : { none: xs.map(() => 0) }, "calls/s");
    const fallbacks = rates(buckets, (b) => routeOf(b).fallbacks);
    chart("chart-fallbacks", "fallbacks/s by reason", xs, Object.keys(fallbacks).length ? fallbacks : { none: xs.map(() => 0) }, "calls/s");
  }

  function drawLatency(buckets, xs) {
    const series = {};
    buckets.forEach((b) => Object.keys(routeOf(b).latency || {}).forEach((n) => { series[n + " p50"] = []; series[n + " p99"] = []; }));
    Object.keys(series).forEach((name) => {
      const [who, q] = [name.slice(0, name.lastIndexOf(" ")), name.slice(name.lastIndexOf(" ") + 1)];
      series[name] = buckets.map((b) => { const l = (routeOf(b).latency || {})[who]; return l && l[q] !== null ? l[q] * 1000 : null; });
    });
    chart("chart-latency", "latency", xs, Object.keys(series).length ? series : { none: xs.map(() => null) }, "ms");
  }

  function drawShadows(buckets, xs, status) {
    const body = $("shadow-table").tBodies[0];
    body.innerHTML = "";
    const last = routeOf(buckets[buckets.length - 1] || { routes: {} }).shadows || {};
    (status.shadows || []).forEach((s) => {
      const w = s.window || {};
      const row = body.insertRow();
      row.dataset.shadow = s.name;
      row.dataset.agreement = w.agreement === null ? "" : String(w.agreement);
      const threshold = (last[s.name] || {}).threshold;
      const verdict = s.promotable ? "PROMOTABLE" : "not yet: " + (s.reasons || []).join("; ");
      [s.name, pct(w.agreement), pct(w.lower_bound), pct(threshold), String(w.samples), fmt(w.mae), fmt(w.rmse), verdict]
        .forEach((text, i) => { const c = row.insertCell(); c.textContent = text; if (i === 1) c.className = "agreement"; if (i === 7) c.className = s.promotable ? "ok" : "warn"; });
    });
    const series = {};
    buckets.forEach((b) => Object.entries(routeOf(b).shadows || {}).forEach(([n, s]) => { series[n + " agreement"] = []; series[n + " lower bound"] = []; series[n + " needs"] = []; }));
    Object.keys(series).forEach((label) => {
      const name = label.replace(/ (agreement|lower bound|needs)$/, "");
      const field = label.endsWith("agreement") ? "agreement" : label.endsWith("needs") ? "threshold" : "lower_bound";
      series[label] = buckets.map((b) => { const s = (routeOf(b).shadows || {})[name]; return s && s[field] !== null && s[field] !== undefined ? s[field] : null; });
    });
    chart("chart-agreement", "agreement and its Wilson lower bound vs what promotion needs", xs, Object.keys(series).length ? series : { none: xs.map(() => null) }, "ratio");
    const dropped = {};
    buckets.forEach((b) => Object.entries(routeOf(b).shadows || {}).forEach(([n, s]) => Object.keys(s.dropped || {}).forEach((r) => { dropped[n + " " + r] = true; })));
    const drops = {};
    Object.keys(dropped).forEach((label) => {
      const cut = label.lastIndexOf(" ");
      drops[label] = buckets.map((b) => { const s = (routeOf(b).shadows || {})[label.slice(0, cut)]; return s ? (s.dropped[label.slice(cut + 1)] || 0) / (b.seconds || 1) : 0; });
    });
    chart("chart-dropped", "shadow copies dropped/s by reason", xs, Object.keys(drops).length ? drops : { none: xs.map(() => 0) }, "copies/s");
  }

  function drawDrift(windows, status) {
    const heat = $("heatmap");
    const latest = ((status.drift || {}).latest || []);
    const newest = latest.length ? latest.reduce((a, b) => ((a.ended || 0) >= (b.ended || 0) ? a : b)) : null;
    $("drifted-features").textContent = latest.length ? latest.map((w) => "version " + w.version + " window " + w.index + ": " + (w.drifted.join(", ") || "none")).join("; ") : "reference or first window filling";
    heat.innerHTML = "";
    const table = document.createElement("table");
    const names = [];
    windows.forEach((w) => w.series.forEach((s) => { if (!names.includes(s.name)) names.push(s.name); }));
    const head = table.createTHead().insertRow();
    head.insertCell().textContent = "";
    windows.forEach((w) => { const th = document.createElement("th"); th.textContent = w.version + "#" + w.index; head.appendChild(th); });
    names.forEach((name) => {
      const row = table.insertRow();
      const th = document.createElement("th"); th.textContent = name; row.appendChild(th);
      windows.forEach((w) => {
        const s = w.series.find((x) => x.name === name);
        const cell = row.insertCell();
        if (!s) return;
        const pvalue = s.method === "ks" || s.method === "chi2";  // small is drifted; else large is
        const strength = pvalue ? 1 - Math.min(1, s.score) : Math.min(1, (s.score || 0) / (2 * (s.threshold || 1)));
        cell.style.background = "rgba(176,0,32," + (0.1 + 0.8 * strength).toFixed(2) + ")";
        cell.title = name + " " + s.method + " " + fmt(s.score) + (s.drifted ? " drifted" : "");
        if (s.drifted) { cell.className = "drifted"; cell.textContent = "●"; }
      });
    });
    heat.appendChild(table);
    heat.dataset.windows = String(windows.length);
    const body = $("drift-latest").tBodies[0];
    body.innerHTML = "";
    (newest ? newest.series : []).forEach((s) => {
      const row = body.insertRow();
      [s.name, s.kind, s.method, fmt(s.scores[s.method]), fmt(s.threshold), s.drifted ? "yes" : "no"].forEach((t) => { row.insertCell().textContent = t; });
      if (s.drifted) row.className = "bad";
    });
    const xs = windows.map((w) => w.ended || 0);
    const series = {};
    const versions = [...new Set(windows.map((w) => w.version))];
    versions.forEach((v) => {
      series["v" + v + " feature share"] = windows.map((w) => (w.version === v ? w.share : null));
      series["v" + v + " multivariate error/upper"] = windows.map((w) => (w.version === v && w.multivariate ? w.multivariate.reconstruction_error / (w.multivariate.upper || 1) : null));
      series["v" + v + " attribution ndcg"] = windows.map((w) => (w.version === v && w.attribution ? w.attribution.ndcg : null));
    });
    chart("chart-drift", "feature-drift share, multivariate and attribution drift per window", xs, Object.keys(series).length ? series : { none: [] }, "");
  }

  function drawQuality(windows) {
    const measured = windows.filter((w) => w.quality);
    $("quality-none").style.display = measured.length ? "none" : "";
    const series = {};
    measured.forEach((w) => Object.keys(w.quality).forEach((k) => { series["v" + w.version + " " + k] = []; }));
    Object.keys(series).forEach((label) => {
      series[label] = measured.map((w) => { const k = label.slice(label.indexOf(" ") + 1); return "v" + w.version === label.split(" ")[0] ? w.quality[k] : null; });
    });
    chart("chart-quality", "quality per window", measured.map((w) => w.ended || 0), Object.keys(series).length ? series : { none: [] }, "");
  }

  function drawHealth(buckets, xs, status) {
    const body = $("health-table").tBodies[0];
    body.innerHTML = "";
    const add = (name, value, cls) => { const r = body.insertRow(); r.insertCell().textContent = name; const c = r.insertCell(); c.textContent = value; if (cls) c.className = cls; r.dataset.name = name; };
    Object.entries(status.upstreams || {}).forEach(([name, u]) => add("circuit " + name, u.circuit.state + (u.reachable ? "" : " (unreachable)"), u.circuit.state === "closed" ? "ok" : "bad"));
    if (status.observer) add("observer", (status.observer.up ? "up" : "down") + ", restarts " + status.observer.restarts, status.observer.up ? "ok" : "bad");
    const h = (buckets[buckets.length - 1] || {}).health || {};
    if (h.handoff_in_flight !== null && h.handoff_in_flight !== undefined) add("observer hand-off in flight", String(h.handoff_in_flight));
    add("observer drops (last 10 s)", JSON.stringify(h.handoff_dropped || {}));
    add("config reloads", Object.entries(status.config_reloads || {}).map(([k, v]) => k + " " + v).join(", "));
    add("event loop lag", fmt(h.lag_seconds, 4) + " s");
    const series = { "event loop lag (ms)": buckets.map((b) => (b.health.lag_seconds || 0) * 1000) };
    const drops = rates(buckets, (b) => b.health.handoff_dropped);
    Object.keys(drops).forEach((k) => { series["hand-off dropped/s " + k] = drops[k]; });
    chart("chart-lag", "observer lag and drops", xs, series, "");
  }

  function draw() {
    const status = data.status || {};
    const routes = (status.routes || []).map((r) => r.name);
    const select = $("route");
    if (select.dataset.routes !== routes.join("|")) {
      select.innerHTML = "";
      routes.forEach((n) => { const o = document.createElement("option"); o.value = o.textContent = n; select.appendChild(o); });
      select.dataset.routes = routes.join("|");
    }
    if (!routes.includes(route)) route = routes[0] || "";
    select.value = route;
    const routeStatus = (status.routes || []).find((r) => r.name === route) || {};
    const buckets = data.buckets;
    const xs = buckets.map((b) => b.t);
    $("summary").textContent = "primary " + (routeStatus.primary || "-") + (status.workers ? " · " + status.workers.length + " workers" : "") + " · mlmirror " + (status.version || "");
    drawTraffic(buckets, xs, routeStatus);
    drawLatency(buckets, xs);
    drawShadows(buckets, xs, routeStatus);
    const windows = data.windows[route] || [];
    drawDrift(windows, routeStatus);
    drawQuality(windows);
    drawHealth(buckets, xs, status);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.route = route;
    document.body.dataset.updates = String(+(document.body.dataset.updates || 0) + 1);
  }

  // After the first answer, only what changed: the buckets from the last one on, the windows that ended lately.
  function merge(fresh) {
    if (!data) return fresh;
    const from = fresh.buckets.length ? fresh.buckets[0].t : Infinity;
    const buckets = data.buckets.filter((b) => b.t < from).concat(fresh.buckets);
    const limit = 3600 / (fresh.bucket_seconds || 10);
    const windows = {};
    Object.keys(Object.assign({}, data.windows, fresh.windows)).forEach((r) => {
      const byKey = new Map();
      (data.windows[r] || []).concat(fresh.windows[r] || []).forEach((w) => byKey.set(w.model + "|" + w.version + "|" + w.index, w));
      windows[r] = [...byKey.values()].slice(-limit);
    });
    return Object.assign({}, fresh, { buckets: buckets.slice(-limit), windows: windows });
  }

  async function poll() {
    try {
      const since = data && data.buckets.length ? data.buckets[data.buckets.length - 1].t : 0;
      const answer = await fetch("/history" + (since ? "?since=" + since : ""), { headers: headers(), cache: "no-store" });
      if (answer.status === 401) {
        const token = window.prompt("This mlmirror admin endpoint needs its admin token:");
        if (token) sessionStorage.setItem("mlmirror-token", token);
        $("updated").textContent = "needs the admin token";
      } else if (answer.ok) {
        data = merge(await answer.json());
        draw();
      } else {
        $("updated").textContent = "history: HTTP " + answer.status;
      }
    } catch (err) {
      $("updated").textContent = "cannot reach mlmirror (" + err.message + "); retrying";
    }
    setTimeout(poll, 2000);
  }

  $("route").addEventListener("change", (e) => { route = e.target.value; if (data) draw(); });
  poll();
})();
