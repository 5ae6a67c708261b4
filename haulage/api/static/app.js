// Haulage live progress page: the caller's runs, each followed over GET /v1/runs/{id}/events.
// Plain JS, no build step. All text goes through textContent (the CSP forbids inline script too).
"use strict";

const TOKEN_KEY = "haulage.token";
// Browsers allow about 6 HTTP/1.1 connections per host; keep some for ordinary calls.
const MAX_STREAMS = 4;
const LIST_REFRESH_MS = 10000;
const ACTIVE = new Set(["PENDING", "PROCESSING"]);

const $ = (id) => document.getElementById(id);
const streams = new Map(); // run id -> AbortController
let me = null;
let detailId = null;
let listedFailures = false; // the open run's document lists its failures (schema 1)

// --- token ------------------------------------------------------------
async function takeTokenFromFragment() {
  // "#token=..." lets `haulage dev` open the page signed in; the fragment never reaches the server.
  // Anyone can send a link, though (login CSRF: you would work, unknowingly, in their account), so it
  // is honoured only by a development service, and only once the person confirms the account it names.
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (!m) return;
  history.replaceState(null, "", location.pathname + location.search);
  const offered = decodeURIComponent(m[1]);
  if (offered === token()) return;
  let who = null;
  try {
    const res = await fetch("/v1/me", { headers: { Authorization: `Bearer ${offered}` } });
    if (res.ok) who = await res.json();
  } catch (e) {
    who = null;
  }
  if (!who || who.auth !== "dev") return; // production tokens are pasted, never taken from a link
  const current = token() ? " instead of the account you are signed in with" : "";
  if (window.confirm(`This link signs you in as "${who.email || who.id}"${current}. Continue?`)) {
    localStorage.setItem(TOKEN_KEY, offered);
  }
}
const token = () => localStorage.getItem(TOKEN_KEY);

function signOut(message) {
  localStorage.removeItem(TOKEN_KEY);
  for (const c of streams.values()) c.abort();
  streams.clear();
  $("main").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    let text = err.message || `HTTP ${status}`;
    for (const f of err.fields || []) text += `\n  ${f.field}: ${f.message}`;
    super(text);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { ...options, headers });
  const body = res.headers.get("content-type")?.includes("json") ? await res.json() : null;
  if (res.status === 401) {
    signOut((body && body.error && body.error.message) || "Your token was refused.");
    throw new ApiError(401, body);
  }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

// --- formatting -------------------------------------------------------
const pct = (doc) => Math.max(0, Math.min(100, Number(doc.percent) || 0));
const totalUsd = (doc) => Object.values(doc.cost || {}).reduce((s, c) => s + (c.usd || 0), 0);
const usd = (v) => `$${v.toFixed(v >= 1 ? 2 : 4)}`;
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
function steps(doc) {
  const s = doc.steps || {};
  return `${s.done || 0}/${s.total || 0}` + (s.failed ? ` (${s.failed} failed)` : "");
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function setBar(bar, doc) {
  const p = pct(doc);
  bar.dataset.percent = String(p);
  bar.dataset.status = doc.status;
  bar.querySelector(".fill").style.width = `${p}%`;
  bar.querySelector(".label").textContent = `${Math.round(p)}%`;
}
function setStatus(node, status) {
  node.className = `status ${status}`;
  node.textContent = status;
}

// --- the list -----------------------------------------------------------
function rowFor(id) {
  let row = document.querySelector(`tr.run[data-run-id="${CSS.escape(id)}"]`);
  if (row) return row;
  row = el("tr", "run");
  row.dataset.runId = id;
  const cells = ["workflow", "id", "state", "progress", "message", "steps", "cost", "started"];
  for (const c of cells) row.appendChild(el("td", c));
  row.querySelector(".state").appendChild(el("span", "status"));
  const bar = el("div", "bar");
  bar.append(el("div", "fill"), el("span", "label"));
  row.querySelector(".progress").appendChild(bar);
  row.addEventListener("click", () => { location.hash = `run=${id}`; });
  return row;
}

function renderRow(doc) {
  const row = rowFor(doc.id);
  // A list refresh and a stream event can cross; never show an older document over a newer one.
  if (Number(row.dataset.updated || 0) > doc.updated_at) return row;
  row.dataset.updated = String(doc.updated_at);
  row.dataset.status = doc.status;
  row.querySelector(".workflow").textContent = doc.workflow;
  row.querySelector(".id").textContent = doc.id.slice(0, 8);
  row.querySelector(".id").title = doc.id;
  setStatus(row.querySelector(".status"), doc.status);
  setBar(row.querySelector(".bar"), doc);
  row.querySelector(".message").textContent = doc.error || doc.message || "";
  row.querySelector(".message").title = doc.error || doc.message || "";
  row.querySelector(".steps").textContent = steps(doc);
  row.querySelector(".cost").textContent = usd(totalUsd(doc));
  row.querySelector(".started").textContent = when(doc.started_at || doc.created_at);
  return row;
}

async function loadRuns() {
  const q = new URLSearchParams({ limit: "50" });
  if (me && me.admin && !$("all").checked) q.set("created_by", me.id);
  let page;
  try {
    page = await api(`/v1/runs?${q}`);
  } catch (e) {
    $("list-status").textContent = e.message;
    return;
  }
  $("list-status").textContent = "";
  const tbody = $("run-rows");
  const rows = page.runs.map(renderRow);
  tbody.replaceChildren(...rows);
  $("no-runs").hidden = rows.length > 0;
  for (const doc of page.runs) if (ACTIVE.has(doc.status)) follow(doc.id);
}

// --- live updates -------------------------------------------------------
function onDoc(doc) {
  if (document.querySelector(`tr.run[data-run-id="${CSS.escape(doc.id)}"]`)) renderRow(doc);
  if (doc.id === detailId) renderDetail(doc);
}

// EventSource cannot send an Authorization header, so the stream is read with fetch.
function follow(id) {
  if (streams.has(id) || (streams.size >= MAX_STREAMS && id !== detailId)) return;
  const ctrl = new AbortController();
  streams.set(id, ctrl);
  let ended = false;
  (async () => {
    try {
      const res = await fetch(`/v1/runs/${encodeURIComponent(id)}/events`, {
        headers: { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" },
        signal: ctrl.signal,
      });
      if (!res.ok) return;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let event = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (event === "run" && data) onDoc(JSON.parse(data));
          if (event === "end") { ended = true; finished(id, JSON.parse(data).status); }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;
    } finally {
      streams.delete(id);
    }
    // The server closes long streams; pick up again if the run is still going.
    if (!ended && !ctrl.signal.aborted) setTimeout(() => follow(id), 3000);
  })();
}

// Only a finished run that was not cancelled has results (the endpoint answers 409 otherwise).
const HAS_RESULTS = new Set(["COMPLETE", "FAILED"]);

function finished(id, status) {
  if (id === detailId && HAS_RESULTS.has(status)) loadFailures(id);
}

// --- detail -------------------------------------------------------------
function renderDetail(doc) {
  $("d-title").textContent = doc.workflow;
  setStatus($("d-status"), doc.status);
  setBar($("d-bar"), doc);
  $("d-message").textContent = doc.message || "";
  $("d-id").textContent = doc.id;
  $("d-owner").textContent = doc.created_by || "—";
  $("d-steps").textContent = steps(doc);
  $("d-cost").textContent = usd(totalUsd(doc));
  $("d-started").textContent = when(doc.started_at);
  $("d-finished").textContent = when(doc.finished_at);
  $("d-error").textContent = doc.error || "";
  $("d-cancel").hidden = !ACTIVE.has(doc.status);
  $("d-params").textContent = JSON.stringify(doc.params, null, 2);
  $("d-result").textContent = doc.result === null ? "—" : JSON.stringify(doc.result, null, 2);
  const costs = Object.entries(doc.cost || {}).map(([model, c]) => {
    const tr = el("tr");
    for (const v of [model, usd(c.usd), c.input_tokens, c.output_tokens, c.calls]) tr.appendChild(el("td", "", String(v)));
    return tr;
  });
  $("d-costs").replaceChildren(...costs);
  $("d-costs-panel").hidden = costs.length === 0;
  const history = [...(doc.history || [])].reverse().map((e) => {
    const li = el("li");
    li.append(el("span", "when", clock(e.at)), el("span", "kind", e.kind));
    if (e.step) li.appendChild(el("span", "step", e.step));
    li.appendChild(el("span", "", e.message));
    return li;
  });
  $("d-history").replaceChildren(...history);
  $("d-stages").textContent = (doc.stages || [])
    .map((st) => `${st.name} ${st.done + st.failed}/${st.total === null ? "?" : st.total}` + (st.failed ? ` (${st.failed} failed)` : ""))
    .join(" \u2192 ");
  // The run lists every failed item with its parameters, whatever stage came after the fan-out.
  listedFailures = Boolean(doc.failures && doc.failures.length);
  const failures = (listedFailures ? doc.failures : (doc.result && doc.result.failures)) || [];
  if (failures.length) showFailures(failures);
  loadItems(doc.id);
}

// --- per-item rows (GET /v1/runs/{id}/steps), at most one request a second per open run -----------
const ITEMS_REFRESH_MS = 1000;
let itemsPending = false; // a request is scheduled or in flight
let itemsAgain = false; // a document event came meanwhile: ask once more after it
let itemsLast = 0;

function loadItems(id) {
  if (itemsPending) {
    itemsAgain = true;
    return;
  }
  itemsPending = true;
  itemsAgain = false;
  setTimeout(async () => {
    itemsLast = Date.now();
    try {
      const res = await api(`/v1/runs/${encodeURIComponent(id)}/steps`);
      if (id === detailId) showItems(res.steps);
    } catch (e) {
      // the page keeps what it showed; the next document event asks again
    } finally {
      itemsPending = false;
      if (itemsAgain && id === detailId) loadItems(id);
    }
  }, Math.max(0, itemsLast + ITEMS_REFRESH_MS - Date.now()));
}

function showItems(steps) {
  const items = steps.filter((s) => s.index !== null && s.index !== undefined);
  const rows = items.map((s) => {
    const tr = el("tr", "item");
    tr.dataset.status = s.status;
    tr.dataset.key = s.key;
    const bar = el("div", "bar");
    bar.append(el("div", "fill"), el("span", "label"));
    const progress = el("td", "progress");
    progress.appendChild(bar);
    const state = el("td", "state");
    state.appendChild(el("span", "status"));
    tr.append(el("td", "index", String(s.index)), el("td", "label", s.label || s.key), state, progress,
      el("td", "message", s.error ? `${s.error_type}: ${s.error}` : s.message || ""), el("td", "attempt", String(s.attempt)),
      el("td", "started", s.started_at ? clock(s.started_at) : "—"), el("td", "finished", s.finished_at ? clock(s.finished_at) : "—"));
    setStatus(state.firstChild, s.status);
    setBar(bar, { percent: s.status === "COMPLETE" ? 100 : s.percent, status: s.status });
    return tr;
  });
  $("d-items").replaceChildren(...rows);
  $("d-items-panel").hidden = rows.length === 0;
}

function showFailures(failures) {
  // In item order, not the order they failed in (parallel items land in any order).
  const ordered = [...failures].sort((a, b) => (a.index ?? 0) - (b.index ?? 0) || String(a.step).localeCompare(String(b.step)));
  const rows = ordered.map((f) => {
    const tr = el("tr");
    tr.append(el("td", "", f.step || ""), el("td", "", f.label || ""), el("td", "", JSON.stringify(f.params)),
      el("td", "", `${f.error_type}: ${f.message}`));
    return tr;
  });
  $("d-failures").replaceChildren(...rows);
  $("d-failures-panel").hidden = rows.length === 0;
}

async function loadFailures(id) {
  try {
    const res = await api(`/v1/runs/${encodeURIComponent(id)}/results`);
    // The document's own list has the items' labels; the results are for runs written before it had one.
    if (id === detailId && !listedFailures && res.failures && res.failures.length) showFailures(res.failures);
  } catch (e) {
    // 409: not finished or cancelled; nothing to show
  }
}

async function openDetail(id) {
  detailId = id;
  $("list-view").hidden = true;
  $("detail-view").hidden = false;
  $("d-failures-panel").hidden = true;
  $("d-items-panel").hidden = true;
  $("d-error").textContent = "";
  try {
    const doc = await api(`/v1/runs/${encodeURIComponent(id)}`);
    renderDetail(doc);
    if (ACTIVE.has(doc.status)) follow(id);
    else finished(id, doc.status);
  } catch (e) {
    $("d-title").textContent = "Run";
    $("d-error").textContent = e.message;
  }
}

function route() {
  const m = location.hash.match(/^#run=([A-Za-z0-9_-]+)/);
  if (m) return openDetail(m[1]);
  detailId = null;
  $("detail-view").hidden = true;
  $("list-view").hidden = false;
  loadRuns();
}

// --- starting runs ------------------------------------------------------
let workflows = [];

function exampleParams(schema) {
  const out = {};
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    if ("default" in prop) out[name] = prop.default;
    else if ((schema.required || []).includes(name)) out[name] = prop.type === "integer" ? 0 : prop.type === "array" ? [] : "";
  }
  return out;
}

function chooseWorkflow() {
  const wf = workflows.find((w) => w.name === $("workflow").value);
  if (!wf) return;
  $("workflow-doc").textContent = wf.description || "";
  $("params").value = JSON.stringify(exampleParams(wf.parameters));
}

async function loadWorkflows() {
  workflows = (await api("/v1/workflows")).workflows;
  $("workflow").replaceChildren(...workflows.map((w) => el("option", "", w.name)));
  chooseWorkflow();
}

async function startRun(ev) {
  ev.preventDefault();
  $("start-error").textContent = "";
  let params;
  try {
    params = JSON.parse($("params").value || "{}");
  } catch (e) {
    $("start-error").textContent = `Parameters are not JSON: ${e.message}`;
    return;
  }
  $("start").disabled = true;
  try {
    const accepted = await api(`/v1/workflows/${encodeURIComponent($("workflow").value)}/runs`, {
      method: "POST",
      body: JSON.stringify({ params }),
    });
    const doc = await api(accepted.status_url);
    $("run-rows").prepend(renderRow(doc));
    $("no-runs").hidden = true;
    follow(doc.id);
  } catch (e) {
    $("start-error").textContent = e.message;
  } finally {
    $("start").disabled = false;
  }
}

async function cancelDetail() {
  if (!detailId) return;
  try {
    await api(`/v1/runs/${encodeURIComponent(detailId)}/cancel`, { method: "POST" });
  } catch (e) {
    $("d-error").textContent = e.message;
  }
}

// --- start --------------------------------------------------------------
async function boot() {
  await takeTokenFromFragment();
  if (!token()) return signOut("");
  $("signin").hidden = true;
  try {
    me = await api("/v1/me");
  } catch (e) {
    if (e.status !== 401) signOut(e.message);
    return;
  }
  $("who").textContent = `${me.email || me.id}${me.admin ? " (admin)" : ""}`;
  $("all-label").hidden = !me.admin;
  $("signout").hidden = false;
  $("main").hidden = false;
  await loadWorkflows();
  route();
}

$("signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  boot();
});
$("signout").addEventListener("click", () => signOut(""));
$("start-form").addEventListener("submit", startRun);
$("workflow").addEventListener("change", chooseWorkflow);
$("all").addEventListener("change", loadRuns);
$("d-cancel").addEventListener("click", cancelDetail);
window.addEventListener("hashchange", route);
setInterval(() => { if (!$("main").hidden && !detailId) loadRuns(); }, LIST_REFRESH_MS);
boot();
