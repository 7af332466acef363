// The fleet console. No framework, no build step: it reads the contract's
// API with the session cookie, renders only the rows in view, and follows
// the event stream. Text from the server is only ever set as textContent.
"use strict";

const PAGE_SIZE = 500;
const $ = (id) => document.getElementById(id);

const state = {
  session: null,        // {auth, role, keyName, csrfToken}
  rows: [],             // machines loaded so far, in list order
  index: new Map(),     // id -> machine
  next: undefined,      // cursor of the next page; null at the end
  loading: false,
  autoLoads: 0,         // pages loaded since the reader last scrolled
  shown: [],            // rows passing the filter
  selected: null,
  source: null,
};

async function api(path, options = {}) {
  const headers = Object.assign({ accept: "application/json" }, options.headers || {});
  if (options.body !== undefined) headers["content-type"] = "application/json";
  if (options.method && options.method !== "GET" && state.session && state.session.csrfToken) {
    headers["x-csrf-token"] = state.session.csrfToken;
  }
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    credentials: "same-origin",
    cache: "no-store",
  });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((body.error && body.error.message) || response.statusText);
    error.status = response.status;
    error.code = body.error && body.error.code;
    throw error;
  }
  return body;
}

// ---- session ----

async function start() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  try {
    state.session = await api("/console/session");
  } catch (e) {
    if (e.status === 401) return showLogin();
    throw e;
  }
  enter();
}

function showLogin(message) {
  $("fleet").hidden = true;
  $("who").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("api-key").focus();
}

async function login(event) {
  event.preventDefault();
  const input = $("api-key");
  try {
    state.session = await api("/console/login", { method: "POST", body: { apiKey: input.value } });
  } catch (e) {
    $("login-error").textContent = e.status === 401 ? "That key is not valid." : e.message;
    return;
  } finally {
    input.value = "";
  }
  enter();
}

async function logout() {
  try {
    await api("/console/logout", { method: "POST" });
  } finally {
    location.reload();
  }
}

function isOperator() {
  return state.session && state.session.role === "operator";
}

function enter() {
  const s = state.session;
  $("login").hidden = true;
  $("fleet").hidden = false;
  $("open-banner").hidden = s.auth;
  if (s.auth) {
    $("who").textContent = `${s.keyName} · ${s.role}`;
    $("who").hidden = false;
    $("logout").hidden = false;
  }
  setUpTable();
  follow();
  refreshCounts();
  setInterval(refreshCounts, 15000);
  loadMore();
}

// ---- data ----

async function loadMore() {
  if (state.loading || state.next === null) return;
  state.loading = true;
  try {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (state.next) query.set("cursor", state.next);
    const page = await api(`/api/v1/machines?${query}`);
    for (const m of page.items) upsert(m, false);
    state.next = page.nextCursor || null;
  } catch (e) {
    if (e.status === 401) return showLogin("Your session has ended; sign in again.");
    $("loaded").textContent = `cannot load machines: ${e.message}`;
  } finally {
    state.loading = false;
  }
  applyFilter();
}

function upsert(machine, fresh) {
  const known = state.index.get(machine.id);
  if (known) {
    Object.assign(known, machine);
    known.fresh = fresh;
  } else {
    machine.fresh = fresh;
    state.index.set(machine.id, machine);
    state.rows.push(machine);
  }
}

function remove(id) {
  if (!state.index.delete(id)) return;
  state.rows = state.rows.filter((m) => m.id !== id);
}

let countsTimer = null;
async function refreshCounts() {
  countsTimer = null;
  try {
    const c = await api("/console/api/counts");
    $("count-total").textContent = c.total.toLocaleString();
    for (const s of ["active", "draft", "blocked"]) {
      $(`count-${s}`).textContent = (c.counts[s] || 0).toLocaleString();
    }
  } catch (e) {
    if (e.status === 401) showLogin("Your session has ended; sign in again.");
  }
}

// Machines changed by events, read again once each (a burst of events on
// one machine is one read).
const pending = new Set();
let pendingTimer = null;

function follow() {
  // The session cookie authenticates the stream (EventSource sends no
  // headers). Opened before the first page, so nothing falls between.
  const source = new EventSource("/api/v1/events");
  state.source = source;
  const live = $("live");
  source.onopen = () => { live.dataset.state = "on"; live.textContent = "live"; };
  source.onerror = () => { live.dataset.state = "retry"; live.textContent = "reconnecting"; };
  const onEvent = (e) => {
    let event;
    try { event = JSON.parse(e.data); } catch { return; }
    if (event.resource_type !== "machine") return;
    pending.add(event.resource_id);
    if (!pendingTimer) pendingTimer = setTimeout(readPending, 150);
    if (state.selected === event.resource_id) showHistory(event.resource_id);
  };
  for (const type of ["machine.created", "machine.updated", "machine.proof_renewed",
    "machine.activated", "machine.blocked", "machine.drafted", "machine.archived"]) {
    source.addEventListener(type, onEvent);
  }
  source.addEventListener("message", onEvent);
}

async function readPending() {
  pendingTimer = null;
  const ids = [...pending];
  pending.clear();
  await Promise.all(ids.map(async (id) => {
    try {
      const { item } = await api(`/api/v1/machines/${encodeURIComponent(id)}`);
      upsert(item, true);
    } catch (e) {
      if (e.status === 404) remove(id);
    }
  }));
  applyFilter();
  if (state.selected) showDetail(state.selected);
  // The server reuses a count for 2 s: ask once it is due again.
  if (!countsTimer) countsTimer = setTimeout(refreshCounts, 2100);
}

// ---- table ----

function rowHeight() {
  return parseFloat(getComputedStyle(document.documentElement).getPropertyValue("--row-h")) || 44;
}

function setUpTable() {
  $("viewport").addEventListener("scroll", () => { state.autoLoads = 0; render(); }, { passive: true });
  window.addEventListener("resize", render);
  $("filter-status").addEventListener("change", applyFilter);
  $("filter-identity").addEventListener("input", applyFilter);
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  for (const b of document.querySelectorAll(".count")) {
    b.addEventListener("click", () => {
      $("filter-status").value = b.dataset.status;
      applyFilter(true);
    });
  }
  $("rows").addEventListener("click", (e) => {
    const row = e.target.closest(".row");
    if (row) showDetail(row.dataset.id);
  });
  $("rows").addEventListener("keydown", (e) => {
    const row = e.target.closest(".row");
    if (row && e.key === "Enter") showDetail(row.dataset.id);
  });
  $("detail-close").addEventListener("click", () => {
    state.selected = null;
    $("detail").hidden = true;
    document.body.classList.remove("with-detail");
    render();
  });
  $("act-block").addEventListener("click", () => act("blocked"));
  $("act-unblock").addEventListener("click", () => act("draft"));
}

function applyFilter(event) {
  if (event) state.autoLoads = 0;
  const status = $("filter-status").value;
  const text = $("filter-identity").value.trim().toLowerCase();
  state.shown = state.rows.filter((m) =>
    (!status || m.status === status) &&
    (!text || m.identityRef.toLowerCase().includes(text) || m.id.toLowerCase().includes(text) ||
      m.displayName.toLowerCase().includes(text)));
  for (const b of document.querySelectorAll(".count")) {
    b.setAttribute("aria-pressed", String(b.dataset.status === status && status !== ""));
  }
  const more = state.next === null ? "" : " (more on scroll)";
  $("loaded").textContent = `${state.shown.length.toLocaleString()} shown of ${state.rows.length.toLocaleString()} loaded${more}`;
  $("empty").hidden = state.shown.length > 0 || state.loading;
  render();
}

// Only the rows in view (and a few around) exist in the document: the
// page stays as fast with 100,000 machines as with 10.
function render() {
  const h = rowHeight();
  const viewport = $("viewport");
  $("spacer").style.height = `${state.shown.length * h}px`;
  const first = Math.max(0, Math.floor(viewport.scrollTop / h) - 5);
  const last = Math.min(state.shown.length, Math.ceil((viewport.scrollTop + viewport.clientHeight) / h) + 5);
  const rows = $("rows");
  rows.style.transform = `translateY(${first * h}px)`;
  const fragment = document.createDocumentFragment();
  for (let i = first; i < last; i++) fragment.appendChild(rowOf(state.shown[i]));
  rows.replaceChildren(fragment);
  // Near the end of what is loaded: the next page. A filter that matches
  // little would otherwise page through the whole fleet; it loads a few
  // pages, then waits for the reader to scroll.
  if (last >= state.shown.length - 20 && state.next !== null && state.autoLoads < 4) {
    state.autoLoads += 1;
    loadMore();
  }
}

function cell(text, className) {
  const span = document.createElement("span");
  span.textContent = text;
  if (className) span.className = className;
  span.setAttribute("role", "cell");
  return span;
}

function badge(status) {
  const b = document.createElement("span");
  b.className = `badge ${status}`;
  b.textContent = status;
  return b;
}

function rowOf(m) {
  const row = document.createElement("div");
  row.className = m.fresh ? "row fresh" : "row";
  m.fresh = false;
  row.dataset.id = m.id;
  row.dataset.status = m.status;
  row.tabIndex = 0;
  row.setAttribute("role", "row");
  row.append(
    cell(m.identityRef, "mono c-identity"),
    cell(m.displayName, "c-name"),
    (() => { const c = cell("", "c-status"); c.appendChild(badge(m.status)); return c; })(),
    cell(proofExpiry(m, true), "c-proof"),
    cell(when(m.updatedAt, true), "c-changed"),
  );
  row.title = m.id;
  return row;
}

function proofExpiry(m, short) {
  const p = m.identityProof;
  if (!p) return "no proof";
  return p.expiresAt ? when(p.expiresAt, short) : "does not expire";
}

// "2026-12-07 04:21 (3 min ago)"; short: "3 min ago" (the table's cells).
function when(iso, short) {
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return iso;
  const s = Math.round((Date.now() - t.getTime()) / 1000);
  const ago = Math.abs(s) < 60 ? `${Math.abs(s)} s` : Math.abs(s) < 3600 ? `${Math.round(Math.abs(s) / 60)} min`
    : Math.abs(s) < 86400 ? `${Math.round(Math.abs(s) / 3600)} h` : `${Math.round(Math.abs(s) / 86400)} d`;
  const stamp = t.toISOString().replace("T", " ").slice(0, 16);
  const relative = s >= 0 ? `${ago} ago` : `in ${ago}`;
  return short ? relative : `${stamp} (${relative})`;
}

// ---- detail, history, actions ----

function showDetail(id) {
  const m = state.index.get(id);
  if (!m) return;
  const opening = state.selected !== id;
  state.selected = id;
  $("detail").hidden = false;
  document.body.classList.add("with-detail");
  $("detail-title").textContent = m.displayName || m.id;
  const fields = [
    ["Machine", m.id], ["Identity", m.identityRef], ["Status", m.status], ["Owner", m.ownerId],
    ["Type", m.machineType], ["Signer", m.identityProof ? m.identityProof.signerAddress : "-"],
    ["Proof expires", proofExpiry(m)], ["Created", when(m.createdAt)], ["Last change", when(m.updatedAt)],
  ];
  const dl = $("detail-fields");
  dl.replaceChildren(...fields.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    return [dt, dd];
  }));
  $("actions").hidden = !isOperator();
  $("act-block").hidden = m.status === "blocked";
  $("act-unblock").hidden = m.status !== "blocked";
  if (opening) {
    $("action-error").textContent = "";
    showHistory(id);
  }
}

async function showHistory(id) {
  const list = $("history");
  try {
    const page = await api(`/api/v1/audit-events?machineId=${encodeURIComponent(id)}&limit=100`);
    if (state.selected !== id) return;
    list.replaceChildren(...page.items.reverse().map((e) => {
      const li = document.createElement("li");
      const kind = document.createElement("b");
      kind.textContent = e.type.replace("machine.", "");
      li.append(kind, ` by ${e.actor}, ${when(e.created_at)}`);
      return li;
    }));
  } catch (e) {
    list.replaceChildren();
    $("action-error").textContent = `cannot read the history: ${e.message}`;
  }
}

function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

async function act(status) {
  const m = state.index.get(state.selected);
  if (!m) return;
  const text = status === "blocked"
    ? `Block ${m.displayName} (${m.identityRef})? It stops being active until an operator unblocks it.`
    : `Unblock ${m.displayName} (${m.identityRef}) to draft? Its agent may then prove it again.`;
  if (!(await confirmAction(text))) return;
  try {
    const { item } = await api(`/api/v1/machines/${encodeURIComponent(m.id)}`, { method: "PATCH", body: { status } });
    upsert(item, true);
    applyFilter();
    showDetail(m.id);
    showHistory(m.id);
  } catch (e) {
    $("action-error").textContent = e.message;
  }
}

start();
