// pdproxy console: reads /console/events (one snapshot per second), draws the topology, the
// rolling charts, the PD counters and the recent requests; adds and removes workers through
// /admin/workers; streams a prompt through /v1/chat/completions. No dependencies.
"use strict";

const $ = (sel) => document.querySelector(sel);
const POINTS = 120; // seconds of history in each chart
const ROWS = 60; // rows kept in the recent requests table

const keys = {
  admin: sessionStorage.getItem("pdproxy.admin") || "",
  api: sessionStorage.getItem("pdproxy.api") || "",
};
$("#admin-key").value = keys.admin;
$("#api-key").value = keys.api;

function headers(key, extra = {}) {
  const h = { ...extra };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

const fmt = (v, digits = 1) => (v === null || v === undefined || Number.isNaN(v) ? "-" : Number(v).toFixed(digits));
const pct = (v) => (v === null || v === undefined ? "-" : (v * 100).toFixed(0) + "%");

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

// --- charts ---------------------------------------------------------------------------------

class Chart {
  constructor(canvas, series) {
    this.canvas = canvas;
    this.series = series; // [{name, color}]
    this.data = series.map(() => []);
  }
  push(values) {
    values.forEach((v, i) => {
      this.data[i].push(v === undefined ? null : v);
      if (this.data[i].length > POINTS) this.data[i].shift();
    });
    this.draw();
  }
  draw() {
    const c = this.canvas, ratio = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (c.width !== w * ratio) { c.width = w * ratio; c.height = h * ratio; }
    const g = c.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const left = 42, bottom = 16, top = 14, plotW = w - left - 6, plotH = h - top - bottom;
    // The scale follows the bulk of the points: one outlier (a start-up stall) would otherwise
    // flatten the whole window; points above it are drawn clipped at the top, with a mark.
    const all = this.data.flat().filter((v) => v !== null).sort((a, b) => a - b);
    let max = all.length ? all[Math.floor(0.97 * (all.length - 1))] : 0;
    max = max > 0 ? niceCeil(max * 1.15) : 1;
    this.max = max;
    g.font = "11px system-ui, sans-serif";
    g.strokeStyle = "#e6e9ee"; g.fillStyle = "#6b7385"; g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + plotH - (plotH * i) / 4;
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + plotW, y); g.stroke();
      g.fillText(shortNum((max * i) / 4), 2, y + 4);
    }
    g.fillText(`-${POINTS}s`, left, h - 3);
    g.fillText("now", left + plotW - 22, h - 3);
    this.data.forEach((s, i) => {
      g.strokeStyle = this.series[i].color; g.fillStyle = this.series[i].color; g.lineWidth = 1.6; g.beginPath();
      let pen = false;
      const clipped = [];
      s.forEach((v, j) => {
        const x = left + (plotW * (j + POINTS - s.length)) / (POINTS - 1);
        if (v === null) { pen = false; return; }
        const y = top + plotH - (plotH * Math.min(v, max)) / max;
        if (v > max) clipped.push(x);
        if (pen) g.lineTo(x, y); else g.moveTo(x, y);
        pen = true;
      });
      g.stroke();
      for (const x of clipped) { g.beginPath(); g.moveTo(x - 3, top + 4); g.lineTo(x + 3, top + 4); g.lineTo(x, top - 1); g.fill(); }
      g.fillStyle = this.series[i].color;
      const last = [...s].reverse().find((v) => v !== null);
      g.fillText(`${this.series[i].name} ${last === undefined ? "-" : shortNum(last)}`, left + 6 + i * 110, 10);
    });
  }
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
function shortNum(v) {
  if (v >= 1000) return (v / 1000).toFixed(1) + "k";
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

const charts = {
  ttft: new Chart($("#chart-ttft"), [{ name: "p50", color: "#2f6fde" }, { name: "p99", color: "#d33" }]),
  itl: new Chart($("#chart-itl"), [{ name: "p50", color: "#2f6fde" }, { name: "p99", color: "#d33" }]),
  e2e: new Chart($("#chart-e2e"), [{ name: "p50", color: "#2f6fde" }, { name: "p99", color: "#d33" }]),
  rate: new Chart($("#chart-rate"), [{ name: "req/s", color: "#1f9d55" }, { name: "errors/s", color: "#d33" }]),
};

// --- topology -------------------------------------------------------------------------------

function workerCard(w, engine) {
  const e = engine || {};
  const hit = e.prefix_queries ? e.prefix_hits / e.prefix_queries : null;
  const classes = ["worker", w.state];
  if (w.health === "unhealthy") classes.push("unhealthy");
  if (w.breaker === "open") classes.push("open");
  const probe = w.last_probe ? (w.last_probe.passed ? "probe passed" : "probe failed") : "not probed";
  const actions = el("div");
  if (w.state === "active" || (w.state === "probing" && w.last_probe && !w.last_probe.passed)) {
    actions.append(el("button", { class: "remove", onclick: () => removeWorker(w) }, w.state === "active" ? "drain & remove" : "remove"));
  }
  const lean = w.role === "pool" && w.lean ? el("span", { class: "lean " + w.lean, title: "the side the pool's controller leans it to" }, "leans " + w.lean) : "";
  return el("div", { class: classes.join(" "), "data-id": w.id, "data-state": w.state, "data-lean": w.lean || "" },
    el("div", { class: "head" },
      el("span", { class: "id" }, w.id),
      lean,
      el("span", { class: "state" }, w.state)),
    el("div", { class: "url" }, w.url + (w.model ? "  ·  " + w.model : "") + (w.pod ? "  ·  pod " + w.pod : "")),
    el("div", { class: "facts" },
      el("span", {}, "health ", el("b", {}, w.health)),
      el("span", {}, "breaker ", el("b", {}, w.breaker)),
      el("span", {}, "in flight ", el("b", { class: "inflight" }, w.inflight)),
      el("span", {}, "running ", el("b", {}, fmt(e.running, 0))),
      el("span", {}, "waiting ", el("b", {}, fmt(e.waiting, 0))),
      el("span", {}, "prefix hit ", el("b", {}, pct(hit))),
      w.role !== "prefill" ? el("span", {}, "KV pulls ", el("b", {}, fmt(e.nixl_pulls, 0))) : el("span", {}, "requests ", el("b", {}, w.requests_total)),
      w.role === "pool" ? el("span", { title: "prompt tokens waiting to be computed, from this proxy" }, "prefill tok ", el("b", {}, w.prefill_tokens)) : "",
      w.role === "pool" ? el("span", { title: "answers being generated, from this proxy" }, "streams ", el("b", {}, w.decode_streams)) : "",
      el("span", {}, "failures ", el("b", {}, w.failures_total)),
      el("span", { title: w.last_probe ? JSON.stringify(w.last_probe.checks.map((c) => c.name + ": " + c.detail)) : "" }, probe)),
    el("div", { title: "KV cache usage " + pct(e.kv_usage) }, el("div", { class: "bar" }, el("span", { style: `width:${Math.round((e.kv_usage || 0) * 100)}%` }))),
    actions);
}

function drawTopology(snap) {
  for (const role of ["prefill", "pool", "decode"]) {
    const box = $(`#${role}-workers`);
    box.replaceChildren(...snap.workers.filter((w) => w.role === role).map((w) => workerCard(w, snap.engines[w.id])));
  }
  const pool = snap.pool, shown = Boolean(pool) && snap.workers.some((w) => w.role === "pool");
  $("#pool-role").hidden = !shown;
  $("#pool-arrow").hidden = !shown;
  if (shown) {
    const d = pool.demand;
    $("#pool-split").textContent = pool.mode === "colocated"
      ? "· colocated (no PD)"
      : `· ${pool.prefill} prefill : ${pool.decode} decode · ${fmt(d.long_tokens_per_second, 0)} long tok/s, ${fmt(d.streams, 1)} streams`;
  }
}

async function removeWorker(w) {
  const result = $("#add-result");
  const resp = await fetch(`/admin/workers/${encodeURIComponent(w.id)}`, { method: "DELETE", headers: headers(keys.admin) });
  if (resp.ok) {
    const body = await resp.json();
    result.className = "result good";
    result.textContent = `${body.id} is ${body.state} (${body.inflight} in flight)`;
  } else {
    result.className = "result bad";
    result.textContent = await errorMessage(resp);
  }
}

$("#add-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const result = $("#add-result");
  const body = { url: $("#add-url").value.trim(), role: $("#add-role").value };
  if ($("#add-force").checked) body.force = true;
  const ports = (sel) => $(sel).value.split(",").map((p) => p.trim()).filter(Boolean).map(Number);
  if ($("#add-init-ports").value || $("#add-alloc-ports").value) {
    body.lmcache = { init_ports: ports("#add-init-ports"), alloc_ports: ports("#add-alloc-ports") };
  }
  result.className = "result";
  result.textContent = `probing ${body.url} ...`;
  $("#add-button").disabled = true;
  try {
    const resp = await fetch("/admin/workers", { method: "POST", headers: headers(keys.admin, { "Content-Type": "application/json" }), body: JSON.stringify(body) });
    if (resp.status === 201) {
      const w = await resp.json();
      const checks = w.last_probe ? w.last_probe.checks.map((c) => `  ${c.name}: ${c.detail}`).join("\n") : "  (forced: no probes)";
      result.className = "result good";
      result.textContent = `${w.id} joined as a ${w.role} worker\n${checks}`;
      $("#add-url").value = "";
    } else {
      result.className = "result bad";
      result.textContent = await errorMessage(resp);
    }
  } finally {
    $("#add-button").disabled = false;
  }
});

// --- numbers --------------------------------------------------------------------------------

function sumOf(counter, test = () => true) {
  let total = 0;
  for (const [labels, v] of Object.entries(counter || {})) if (test(labels)) total += v;
  return total;
}
function byLabel(counter, name) {
  const out = {};
  for (const [labels, v] of Object.entries(counter || {})) {
    const m = labels.split(",").find((l) => l.startsWith(name + "="));
    const key = m ? m.slice(name.length + 1) : "";
    out[key] = (out[key] || 0) + v;
  }
  return out;
}
function detail(obj) {
  const parts = Object.entries(obj).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`);
  return parts.length ? parts.join(", ") : "";
}

function probeDetail(counter) {
  // results: "passed", or the name of the probe that failed
  const results = byLabel(counter, "result"), passed = results.passed || 0;
  const failed = Object.entries(results).filter(([r, v]) => r !== "passed" && v);
  const failedTotal = failed.reduce((t, [, v]) => t + v, 0);
  const parts = [];
  if (passed) parts.push(`passed ${passed}`);
  if (failedTotal) parts.push(`failed ${failedTotal} (at ${failed.map(([r, v]) => `${r} ${v}`).join(", ")})`);
  return parts.join("; ");
}

function drawCounters(snap) {
  const c = snap.counters;
  const pullers = snap.workers.filter((w) => w.role !== "prefill");
  const handed = snap.handed_over || {};
  const handedTotal = Object.values(handed).reduce((t, v) => t + v, 0);
  const pulls = pullers.reduce((t, w) => t + ((snap.engines[w.id] || {}).nixl_pulls || 0), 0);
  const recompute = byLabel(c.pdproxy_kv_recompute_total, "reason");
  const fallbacks = byLabel(c.pdproxy_prefill_fallbacks_total, "reason");
  const retries = byLabel(c.pdproxy_retries_total, "role");
  const migrations = byLabel(c.pdproxy_migrations_total, "reason");
  const disconnects = byLabel(c.pdproxy_client_disconnects_total, "phase");
  const failures = byLabel(c.pdproxy_upstream_failures_total, "role");
  const statuses = byLabel(c.pdproxy_requests_total, "status");
  const errors = Object.entries(statuses).filter(([s]) => Number(s) >= 400 && s !== "499").reduce((t, [, v]) => t + v, 0);
  const rows = [
    ["requests", sumOf(c.pdproxy_requests_total), detail(statuses)],
    ["errors (4xx/5xx)", errors, ""],
    ["KV handed over (requests)", handedTotal, pullers.map((w) => `${w.id} ${handed[w.id] || 0}`).join(", ")],
    ["engines' NIXL pulls (with probes')", snap.connector === "nixl" ? pulls : "-", snap.connector === "nixl" ? pullers.map((w) => `${w.id} ${fmt((snap.engines[w.id] || {}).nixl_pulls, 0)}`).join(", ") : "no NIXL"],
    ["KV recomputed", sumOf(c.pdproxy_kv_recompute_total), detail(recompute)],
    ["prefill fallbacks", sumOf(c.pdproxy_prefill_fallbacks_total), detail(fallbacks)],
    ["retries", sumOf(c.pdproxy_retries_total), detail(retries)],
    ["streams migrated", sumOf(c.pdproxy_migrations_total), detail(migrations)],
    ["client disconnects", sumOf(c.pdproxy_client_disconnects_total), detail(disconnects)],
    ["upstream failures", sumOf(c.pdproxy_upstream_failures_total), detail(failures)],
    ["admission rejections (429)", sumOf(c.pdproxy_admission_rejected_total), ""],
    ["admission probes", sumOf(c.pdproxy_worker_probes_total), probeDetail(c.pdproxy_worker_probes_total)],
  ];
  for (const w of snap.workers) {
    const e = snap.engines[w.id];
    if (e && e.prefix_queries) rows.push([`prefix-cache hit rate ${w.id}`, pct(e.prefix_hits / e.prefix_queries), `${fmt(e.prefix_hits, 0)} of ${fmt(e.prefix_queries, 0)} tokens`]);
  }
  $("#counters tbody").replaceChildren(...rows.map(([k, v, d]) => el("tr", { "data-counter": k }, el("td", {}, k), el("td", { class: "num" }, v), el("td", { class: "dim" }, d))));
}

function drawLatency(snap) {
  const names = { prefill: "prefill leg", decode_first_token: "prefill → first token", ttft: "TTFT", itl: "ITL", tpot: "TPOT", e2e: "end to end" };
  $("#latency tbody").replaceChildren(...Object.entries(names).map(([key, label]) => {
    const s = snap.latency[key];
    return el("tr", {}, el("td", {}, label), el("td", { class: "num" }, s ? s.count : 0),
      el("td", { class: "num" }, s ? fmt(s.p50 * 1e3, 2) : "-"), el("td", { class: "num" }, s ? fmt(s.p95 * 1e3, 2) : "-"),
      el("td", { class: "num" }, s ? fmt(s.p99 * 1e3, 2) : "-"));
  }));
}

function drawEvents(snap) {
  $("#events").replaceChildren(...[...snap.events].reverse().slice(0, 40).map((e) =>
    el("li", { class: e.event }, `${new Date(e.at * 1000).toLocaleTimeString()} ${e.event} ${e.id} ${e.url}${e.detail ? ": " + e.detail : ""}`)));
}

// --- timelines ------------------------------------------------------------------------------

// Bars share one time axis (`scale` ms: the longest request shown, rounded up): a 90 ms and
// a 900 ms request draw bars of different lengths. The light "whole" segment is the request.
function timelineBar(t, scale) {
  const a = t.at_ms, bar = el("div", { class: "timeline", title: hopText(t) });
  const span = scale || a.end || 1;
  const seg = (cls, from, to) => {
    if (from === null || to === null || to < from) return;
    bar.append(el("span", { class: "seg " + cls, style: `left:${(100 * from) / span}%;width:${Math.max(0.3, (100 * (to - from)) / span)}%` }));
  };
  seg("whole", 0, a.end);
  seg("admission", 0, a.admitted);
  seg("prefill", a.prefill_start, a.prefill_end);
  seg("handoff", a.prefill_end !== null ? a.prefill_end : a.admitted, a.first_token);
  seg("decode", a.first_token, a.last_token);
  return bar;
}

function timeAxis(scale) {
  const axis = el("div", { class: "axis", "data-scale": scale });
  for (let i = 0; i <= 4; i++) {
    const ms = (scale * i) / 4;
    axis.append(el("span", { style: `left:${25 * i}%` }, i === 0 ? "0" : ms >= 1000 ? `${shortNum(ms / 1000)} s` : `${shortNum(ms)} ms`));
  }
  return axis;
}

function hopText(t) {
  const m = t.ms;
  return [
    `plan ${planText(t)}`,
    `admission wait ${fmt(m.admission, 2)} ms`,
    `prefill ${fmt(m.prefill, 2)} ms on ${t.prefiller || "-"}`,
    `KV handoff to first token ${fmt(m.handoff, 2)} ms (${t.kv || "-"})`,
    `first token on ${t.decoder || "-"} at ${fmt(m.ttft, 2)} ms`,
    `decode to last token ${fmt(m.decode, 2)} ms (ITL ${fmt(m.itl, 2)}, TPOT ${fmt(m.tpot, 2)})`,
    `total ${fmt(m.total, 2)} ms` + (t.retries ? `, ${t.retries} retries` : ""),
    ...(t.seams || []).map(seamText),
  ].join("\n");
}

// Where a stream moved to another decoder mid-answer (proxy.flow.migrate).
function seamText(s) {
  return `moved ${s.from} → ${s.to} after ${s.tokens_moved} tokens (${s.reason}), the client waited ${fmt(s.gap_ms, 1)} ms`;
}

// The hops in one line, shown under each bar (no hovering needed).
function hopLine(t) {
  const m = t.ms, parts = [], ms = (v) => `${fmt(v, 1)} ms`;
  if (m.admission >= 0.05) parts.push(`wait ${ms(m.admission)}`);
  if (m.prefill !== null) parts.push(`prefill ${ms(m.prefill)} on ${t.prefiller || "-"}`);
  if (m.handoff !== null) parts.push(`${t.prefiller ? "KV → 1st token" : "1st token"} ${ms(m.handoff)}`);
  if (m.decode !== null) parts.push(`decode ${ms(m.decode)} on ${t.decoder || "-"}`);
  const seams = (t.seams || []).map((s) => `moved ${s.from} → ${s.to} (+${fmt(s.gap_ms, 1)} ms)`);
  return [...parts, ...seams].join(" · ") + (t.retries ? ` · ${t.retries} retries` : "");
}

// Where the prompt was computed and why. Outside a pool the plan may not say: then what the
// request did tells (a prefiller's leg: remote; none: local), and a recompute says why.
function planText(t) {
  const plan = t.plan || {};
  const where = plan.prefill || (t.prefiller ? "remote" : t.kv ? "local" : null);
  if (!where) return "-";
  let why = plan.reason;
  if (!why && t.kv && !["handed_over", "local"].includes(t.kv)) why = "recomputed: " + t.kv;
  const on = where === "remote" && t.prefiller ? ` on ${t.prefiller}` : "";
  return where + on + (why ? `: ${why}` : "") + (plan.tokens ? ` (${plan.tokens} tok)` : "");
}

function requestRow(t, scale) {
  const bad = t.error || (t.status >= 400 && t.status !== 499);
  return el("tr", { class: bad ? "error" : "", "data-request-id": t.request_id, "data-started": t.started_at, "data-total": t.ms.total, title: t.error || "" },
    el("td", {}, new Date(t.started_at * 1000).toLocaleTimeString()),
    el("td", {}, t.request_id.length > 22 ? t.request_id.slice(0, 22) + "…" : t.request_id),
    el("td", { class: bad ? "status-bad" : "" }, t.status),
    el("td", { class: "plan" }, planText(t)),
    el("td", {}, t.prefiller || "-"), el("td", {}, t.decoder || "-"), el("td", {}, t.kv || "-"),
    el("td", { class: "num" }, fmt(t.ms.ttft)), el("td", { class: "num" }, fmt(t.ms.total)),
    el("td", { class: "num" }, t.output_tokens || "-"),
    el("td", {}, timelineBar(t, scale), el("div", { class: "hops-inline" }, hopLine(t))));
}

// The newest ROWS requests by start time (as the time column says), newest first; every
// bar redrawn on the common axis of those shown.
let recent = [];
function addRequests(timelines) {
  if (!timelines.length && recent.length) return;
  const seen = new Set(recent.map((t) => t.seq));
  recent = recent.concat(timelines.filter((t) => !seen.has(t.seq)));
  recent.sort((x, y) => y.started_at - x.started_at || y.seq - x.seq);
  recent = recent.slice(0, ROWS);
  const longest = recent.reduce((m, t) => Math.max(m, t.at_ms.end || 0), 0);
  const scale = longest > 0 ? niceCeil(longest) : 1;
  $("#requests").dataset.scale = scale;
  $("#timeline-axis").replaceChildren(...(recent.length ? [timeAxis(scale)] : []));
  $("#requests tbody").replaceChildren(...recent.map((t) => requestRow(t, scale)));
}

// --- the feed -------------------------------------------------------------------------------

let since = 0;

function onSnapshot(snap) {
  since = snap.seq;
  const tick = snap.tick, per = tick.seconds > 0 ? tick.seconds : 1;
  const planner = snap.policies.planner === "pool" ? "pool planner" : `prefill ${snap.policies.prefill} · decode ${snap.policies.decode}`;
  $("#summary").textContent = `${snap.connector} · ${planner} · in flight ${snap.admission.active} · queued ${snap.admission.queued}${snap.draining ? " · DRAINING" : ""}`;
  for (const id of ["#add-init-ports", "#add-alloc-ports"]) $(id).hidden = snap.connector !== "lmcache";
  $("#feed-note").hidden = true;
  drawTopology(snap);
  drawCounters(snap);
  drawLatency(snap);
  drawEvents(snap);
  addRequests(snap.timelines);
  const p = (hop, q) => (tick[hop] ? tick[hop][q] : null);
  charts.ttft.push([p("ttft", "p50"), p("ttft", "p99")]);
  charts.itl.push([p("itl", "p50"), p("itl", "p99")]);
  charts.e2e.push([p("e2e", "p50"), p("e2e", "p99")]);
  charts.rate.push([tick.requests / per, tick.errors / per]);
  const model = $("#prompt-model");
  if (!model.value) {
    const w = snap.workers.find((x) => x.model);
    if (w) model.value = w.model;
    else if (!askedModels) learnModel();
  }
}

let askedModels = false;
async function learnModel() {
  askedModels = true;
  const resp = await fetch("/v1/models", { headers: headers(keys.api) });
  if (resp.ok) {
    const body = await resp.json();
    if (body.data && body.data.length && !$("#prompt-model").value) $("#prompt-model").value = body.data[0].id;
  } else {
    askedModels = false; // (an API key may be given later)
  }
}

function setStatus(text, on) {
  const s = $("#status");
  s.textContent = text;
  s.className = "pill " + (on ? "on" : "off");
}

async function connect() {
  for (;;) {
    try {
      const resp = await fetch(`/console/events?since=${since}`, { headers: headers(keys.admin) });
      if (!resp.ok) {
        const needsKey = resp.status === 401;
        setStatus(needsKey ? "admin key needed" : "refused", false);
        const note = $("#feed-note");
        note.hidden = false;
        note.textContent = needsKey
          ? (keys.admin ? "The admin key given is not one of this proxy's: " : "This proxy has admin keys: ") +
            "enter one under \"admin key\" (top right) and press \"use\" to see its workers and traffic."
          : await errorMessage(resp);
        await sleep(needsKey ? 1000 : 3000);
        continue;
      }
      setStatus("live", true);
      $("#feed-note").hidden = true; // the key was taken: the note goes with the refusal
      await readEvents(resp, (data) => onSnapshot(JSON.parse(data)));
    } catch (e) {
      console.warn("console feed:", e);
    }
    setStatus("reconnecting", false);
    await sleep(1000);
  }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Server-sent events from a fetch() response: `onData` gets each event's data, as it arrives.
async function readEvents(resp, onData) {
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (event.startsWith("data: ")) onData(event.slice(6));
    }
  }
}

$("#keys").addEventListener("submit", (ev) => {
  ev.preventDefault();
  keys.admin = $("#admin-key").value.trim();
  keys.api = $("#api-key").value.trim();
  sessionStorage.setItem("pdproxy.admin", keys.admin);
  sessionStorage.setItem("pdproxy.api", keys.api);
});

// --- the prompt box ---------------------------------------------------------------------------

// The proxy keeps a request's timeline once it has finished with the request, which can be a
// moment after the last byte reached the page: while it answers 404, ask again for a while.
async function finishedTimeline(id, tries = 50, pauseMs = 100) {
  for (let i = 0; i < tries; i++) {
    const t = await fetch(`/admin/requests/${encodeURIComponent(id)}`, { headers: headers(keys.admin) });
    if (t.ok) return t.json();
    if (t.status !== 404) return null;
    await new Promise((done) => setTimeout(done, pauseMs));
  }
  return null;
}

$("#prompt-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("#answer"), where = $("#answer-timeline");
  const id = "console-" + Math.random().toString(16).slice(2, 14);
  const body = {
    model: $("#prompt-model").value.trim(),
    messages: [{ role: "user", content: $("#prompt").value }],
    max_tokens: Number($("#prompt-max").value) || 64,
    stream: true,
    stream_options: { include_usage: true },
  };
  out.textContent = "";
  out.dataset.state = "streaming";
  where.replaceChildren();
  $("#send").disabled = true;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(keys.api, { "Content-Type": "application/json", "X-Request-Id": id }), body: JSON.stringify(body) });
    if (!resp.ok) {
      out.textContent = "error: " + (await errorMessage(resp));
      out.dataset.state = "error";
      return;
    }
    let tokens = 0;
    await readEvents(resp, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) { out.append("\n[error: " + chunk.error.message + "]"); out.dataset.state = "error"; return; }
      for (const choice of chunk.choices || []) {
        const text = (choice.delta && choice.delta.content) || "";
        if (text) { out.append(text); tokens++; out.dataset.chunks = String(tokens); }
      }
    });
    if (out.dataset.state === "streaming") out.dataset.state = "done";
    const timeline = await finishedTimeline(id);
    if (timeline) where.replaceChildren(timelineBar(timeline), el("pre", { class: "hops" }, hopText(timeline)));
  } finally {
    $("#send").disabled = false;
  }
});

connect();
window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.draw()));
