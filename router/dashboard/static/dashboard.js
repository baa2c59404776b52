// The splitserve ops dashboard: reads /dashboard/api/events (a snapshot per second) and draws it.
// No framework and no build step: the router serves this file as it is. Everything shown from the server is set
// with textContent, never parsed as HTML.
"use strict";

const POOLS = ["prefill", "decode", "colocated"];
const PHASES = ["router", "queue", "prefill", "transfer", "decode"];
const PHASE_NOTES = {
  router: "placement, reservation and RPCs at the router",
  queue: "waiting in the prefill node's queue",
  prefill: "prompt compute",
  transfer: "KV transfer after the prompt (the rest overlaps compute)",
  decode: "first token to last token",
};
const KEY_STORAGE = "splitserve-api-key";

const $ = (id) => document.getElementById(id);
const cards = new Map(); // node id -> {root, pool, fields}
let pickedRequest = null;
let lastState = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function ms(seconds) {
  return seconds === null || seconds === undefined ? "-" : fmt(seconds * 1000, 1);
}

// --- actions ---------------------------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value || "";
}

async function act(nodeId, action, body) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  const message = $("action-message");
  try {
    const reply = await fetch(`/dashboard/api/nodes/${encodeURIComponent(nodeId)}/${action}`, {
      method: "POST", headers, body: JSON.stringify(body),
    });
    const data = await reply.json();
    if (!reply.ok) {
      message.className = "message bad";
      message.textContent = `${action} ${nodeId}: ${data.error ? data.error.message : reply.status}`;
      return;
    }
    message.className = "message";
    message.textContent = action === "drain"
      ? `${body.drain ? "draining" : "resuming"} ${nodeId}`
      : `moving ${nodeId} to the ${body.pool} pool (it drains, then restarts in that role)`;
  } catch (err) {
    message.className = "message bad";
    message.textContent = `${action} ${nodeId}: ${err}`;
  }
}

// --- cluster map -----------------------------------------------------------------------------------------------

function poolBox(pool) {
  let box = document.querySelector(`.pool[data-pool="${pool}"]`);
  if (!box) {
    box = el("div", `pool ${pool}`);
    box.dataset.pool = pool;
    const title = el("h3");
    title.append(el("span", "name", `${pool} pool `), el("span", "muted summary"));
    box.append(title, el("div", "members"));
    $("pools").append(box);
  }
  return box;
}

function machineGroup(pool, machineType) {
  const members = poolBox(pool).querySelector(".members");
  let group = members.querySelector(`[data-machine-type="${CSS.escape(machineType)}"]`);
  if (!group) {
    group = el("div", "group");
    group.dataset.machineType = machineType;
    group.append(el("div", "machine-type", machineType));
    members.append(group);
  }
  return group;
}

function makeCard(node) {
  const root = el("div", "node");
  root.dataset.nodeId = node.node_id;
  const head = el("div", "head");
  const health = el("span", "tag health");
  head.append(el("span", "id", node.node_id), health);
  const dl = el("dl");
  const fields = { health };
  for (const [key, label] of [
    ["load", "queue / running"], ["kv", "KV blocks used"], ["hits", "prefix cache hits"], ["power", "power"],
    ["cost", "$ / hour"],
    ["address", "address"],
  ]) {
    const dd = el("dd");
    dd.dataset.field = key;
    dl.append(el("dt", "", label), dd);
    fields[key] = dd;
  }
  const kvBar = el("div", "bar");
  const kvFill = el("div");
  kvBar.append(kvFill);
  fields.kvFill = kvFill;

  const actions = el("div", "actions");
  const drain = el("button", "drain", "Drain");
  drain.type = "button";
  drain.addEventListener("click", () => {
    const draining = root.dataset.health === "draining" || root.dataset.health === "drained";
    act(node.node_id, "drain", { drain: !draining });
  });
  const target = el("select", "move-target");
  const move = el("button", "move", "Move");
  move.type = "button";
  move.addEventListener("click", () => act(node.node_id, "move", { pool: target.value }));
  for (const pool of POOLS) {
    if (pool === node.pool) continue;
    const option = el("option", "", `to ${pool}`);
    option.value = pool;
    target.append(option);
  }
  actions.append(drain, target, move);
  fields.drain = drain;
  root.append(head, dl, kvBar, actions);
  return { root, pool: node.pool, machineType: node.machine_type, fields };
}

function updateCard(card, node) {
  const f = card.fields;
  card.root.dataset.health = node.health;
  f.health.textContent = node.borrowed ? `${node.health} · borrowed` : node.health;
  f.health.className = "tag health " + ({ ok: "ok", draining: "warn", drained: "warn" }[node.health] || "bad");
  f.load.textContent = `${fmt(node.queued_prompt_tokens)} tokens / ${fmt(node.running_requests)} requests`;
  const used = node.kv_total_blocks ? node.kv_used_blocks / node.kv_total_blocks : 0;
  f.kv.textContent = `${fmt(node.kv_used_blocks)} / ${fmt(node.kv_total_blocks)} (${fmt(used * 100, 0)}%)`;
  f.kvFill.style.width = `${Math.min(100, used * 100)}%`;
  f.hits.textContent = node.prefix_hit_rate == null ? "-" : `${fmt(node.prefix_hit_rate * 100, 0)}% of blocks`;
  f.power.textContent = `${fmt(node.power_w, 0)} W of ${fmt(node.max_power_w, 0)} (${node.power_source || "-"})`;
  f.cost.textContent = fmt(node.cost_per_hour, 2);
  f.address.textContent = node.address;
  const draining = node.health === "draining" || node.health === "drained";
  f.drain.textContent = draining ? "Resume" : "Drain";
}

function renderNodes(state) {
  const seen = new Set();
  for (const node of state.nodes) {
    seen.add(node.node_id);
    let card = cards.get(node.node_id);
    if (card && (card.pool !== node.pool || card.machineType !== node.machine_type)) {
      card.root.remove();
      card = undefined;
    }
    if (!card) {
      card = makeCard(node);
      cards.set(node.node_id, card);
      machineGroup(node.pool, node.machine_type).append(card.root);
    }
    updateCard(card, node);
  }
  for (const [id, card] of cards) {
    if (!seen.has(id)) {
      card.root.remove();
      cards.delete(id);
    }
  }
  for (const pool of POOLS) {
    const summary = state.cluster.pools[pool];
    const box = poolBox(pool);
    box.hidden = summary.nodes === 0;
    box.querySelector(".summary").textContent =
      `${summary.healthy}/${summary.nodes} healthy · ${fmt(summary.queued_prompt_tokens)} queued tokens · ` +
      `${fmt(summary.power_w)} W · $${fmt(summary.cost_per_hour, 2)}/h`;
    for (const group of box.querySelectorAll(".group")) {
      if (!group.querySelector(".node")) group.remove();
    }
  }
}

// --- totals and charts ----------------------------------------------------------------------------------------

function renderTotals(state) {
  const c = state.cluster;
  $("model").textContent = state.model;
  $("policy").textContent = `policy: ${state.policy}`;
  $("key-box").hidden = !state.api_key_required;
  $("stat-nodes").textContent = fmt(c.nodes);
  $("stat-running").textContent = fmt(state.requests.running);
  $("stat-finished").textContent = fmt(state.requests.finished);
  $("stat-failed").textContent = fmt(state.requests.failed);
  const last = state.requests.series[state.requests.series.length - 1];
  $("stat-rate").textContent = last ? fmt(last.requests_per_s, 1) : "-";
  const limit = c.power_budget_w || c.rated_power_w;
  $("stat-power").textContent = c.power_budget_w
    ? `${fmt(c.power_w)} W of ${fmt(c.power_budget_w)} W budget`
    : `${fmt(c.power_w)} W of ${fmt(c.rated_power_w)} W rated`;
  const sources = new Set(state.nodes.map((n) => n.power_source).filter(Boolean));
  $("power-source").textContent = sources.size ? `(${[...sources].join(", ")})` : "";
  const bar = $("power-bar");
  bar.style.width = `${limit ? Math.min(100, (100 * c.power_w) / limit) : 0}%`;
  bar.classList.toggle("over", Boolean(c.power_budget_w) && c.power_w > c.power_budget_w);
  $("stat-cost").textContent = `$${fmt(c.cost_per_hour, 2)}/h`;
}

const COLORS = ["#3b6fd8", "#d64545", "#2a9d8f"];

function lineChart(canvasId, series, lines) {
  const canvas = $(canvasId);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 44, bottom = 18;
  ctx.clearRect(0, 0, w, h);
  let max = 0;
  for (const line of lines) for (const p of series) max = Math.max(max, line.value(p) || 0);
  max = max > 0 ? max * 1.15 : 1;
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#dde1e7";
  ctx.fillStyle = "#6b7482";
  for (let i = 0; i <= 3; i++) {
    const y = (h - bottom) * (1 - i / 3);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(fmt((max * i) / 3, max < 10 ? 1 : 0), 2, Math.max(10, y));
  }
  if (series.length > 0) {
    ctx.fillText(new Date(series[0].at * 1000).toLocaleTimeString(), left, h - 4);
    const lastLabel = new Date(series[series.length - 1].at * 1000).toLocaleTimeString();
    ctx.fillText(lastLabel, w - ctx.measureText(lastLabel).width - 2, h - 4);
  }
  lines.forEach((line, index) => {
    ctx.strokeStyle = COLORS[index % COLORS.length];
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawing = false;
    series.forEach((p, i) => {
      const v = line.value(p);
      const x = left + ((w - left) * i) / Math.max(1, series.length - 1);
      if (v === null || v === undefined) { drawing = false; return; }
      const y = (h - bottom) * (1 - v / max);
      if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
    ctx.fillStyle = ctx.strokeStyle;
    series.forEach((p, i) => { // a dot per point, so a lone point (the first window with data) shows too
      const v = line.value(p);
      if (v === null || v === undefined) return;
      const x = left + ((w - left) * i) / Math.max(1, series.length - 1);
      ctx.beginPath();
      ctx.arc(x, (h - bottom) * (1 - v / max), 2.5, 0, 2 * Math.PI);
      ctx.fill();
    });
    ctx.fillText(line.label, left + 6 + index * 90, 12);
  });
  ctx.lineWidth = 1;
}

function renderCharts(state) {
  const s = state.requests.series;
  const toMs = (v) => (v === null || v === undefined ? null : v * 1000);
  lineChart("chart-rate", s, [
    { label: "requests/s", value: (p) => p.requests_per_s },
    { label: "failures/s", value: (p) => p.failures_per_s },
    { label: "tokens/s ÷ 10", value: (p) => p.tokens_per_s / 10 },
  ]);
  lineChart("chart-ttft", s, [
    { label: "p50", value: (p) => toMs(p.ttft_p50_s) },
    { label: "p99", value: (p) => toMs(p.ttft_p99_s) },
  ]);
  lineChart("chart-tbt", s, [
    { label: "p50", value: (p) => toMs(p.tbt_p50_s) },
    { label: "p99", value: (p) => toMs(p.tbt_p99_s) },
  ]);
  lineChart("chart-transfer", s, [{ label: "MB/s", value: (p) => p.transfer_bytes_per_s / 1e6 }]);
}

// --- requests, traces, errors ----------------------------------------------------------------------------------

function renderRequests(state) {
  const body = document.querySelector("#requests tbody");
  const rows = state.requests.recent.map((r) => {
    const tr = el("tr");
    tr.dataset.requestId = r.request_id;
    if (r.request_id === pickedRequest) tr.className = "picked";
    const route = r.route === "pair" ? `${r.nodes.prefill} → ${r.nodes.decode}` : Object.values(r.nodes).join("");
    for (const [text, cls] of [
      [r.request_id, "id"], [route || "-", ""], [`${r.prompt_tokens} + ${r.output_tokens}`, ""],
      [ms(r.ttft_s), ""], [ms(r.tbt_s), ""], [ms(r.e2e_s), ""], [r.outcome, ""],
    ]) {
      tr.append(el("td", cls, text));
    }
    tr.addEventListener("click", () => pick(r.request_id));
    return tr;
  });
  body.replaceChildren(...rows);
  if (pickedRequest) {
    const record = state.requests.recent.find((r) => r.request_id === pickedRequest);
    if (record) renderTrace(record);
  }
  const errors = state.requests.errors.map((e) =>
    el("li", "", `${new Date(e.at * 1000).toLocaleTimeString()} ${e.request_id} ${e.code}: ${e.message}`));
  $("errors").replaceChildren(...(errors.length ? errors : [el("li", "muted", "none")]));
}

async function pick(requestId) {
  pickedRequest = requestId;
  const reply = await fetch(`/dashboard/api/requests/${encodeURIComponent(requestId)}`);
  if (reply.ok) renderTrace(await reply.json());
  else $("trace").textContent = `request ${requestId} is no longer kept by the router`;
}

function renderTrace(r) {
  $("trace-id").textContent = r.request_id;
  const box = $("trace");
  box.className = "trace";
  const total = PHASES.reduce((sum, p) => sum + (r.phases[p] || 0), 0);
  const stack = el("div", "stack");
  const legend = el("div", "legend");
  for (const phase of PHASES) {
    const seconds = r.phases[phase] || 0;
    const part = el("div", `phase-${phase}`);
    part.style.width = `${total ? (100 * seconds) / total : 0}%`;
    part.title = `${phase}: ${ms(seconds)} ms`;
    stack.append(part);
    const swatch = el("span", `swatch phase-${phase}`);
    const value = el("span", "", `${ms(seconds)} ms`);
    value.dataset.phase = phase;
    legend.append(swatch, el("span", "", `${phase} — ${PHASE_NOTES[phase]}`), value);
  }
  const facts = el("div", "muted",
    `${r.outcome} · TTFT ${ms(r.ttft_s)} ms · E2E ${ms(r.e2e_s)} ms · KV ${fmt(r.transfer_bytes / 1e3, 1)} kB in ` +
    `${ms(r.transfer_seconds)} ms · ${fmt(r.energy_joules, 2)} J · $${fmt(r.cost_usd, 6)} · ${r.attempts} attempt(s)`);
  const extra = r.retries.map((why) => el("div", "muted", `retried: ${why}`));
  if (r.error) extra.push(el("div", "message bad", r.error));
  box.replaceChildren(stack, legend, facts, ...extra);
}

// --- the event stream ------------------------------------------------------------------------------------------

function render(state) {
  lastState = state;
  renderTotals(state);
  renderNodes(state);
  renderCharts(state);
  renderRequests(state);
  document.body.dataset.updatedAt = String(state.at);
}

function connect() {
  const source = new EventSource("/dashboard/api/events");
  const status = $("connection");
  source.addEventListener("open", () => { status.textContent = "live"; status.className = "tag ok"; });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself; the tag says so meanwhile.
    status.textContent = "reconnecting";
    status.className = "tag bad";
  });
  source.addEventListener("state", (event) => render(JSON.parse(event.data)));
}

$("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
$("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, $("api-key").value));
window.splitserveDashboard = { state: () => lastState };
connect();
