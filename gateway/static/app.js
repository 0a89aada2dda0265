// The live event page of `walcast demo`: pick a demo user, connect as that user with the
// ticket flow (session → ticket → socket), show every event as it arrives, and fire custom broadcasts.
// Data from the server is only ever inserted as text (textContent), never as HTML.
"use strict";

const MAX_EVENTS = 200;
const HIDDEN_FIELDS = new Set(["organizationId"]);
const BROADCAST_TEMPLATES = {
  "screening:started": { applicationId: "app_demo" },
  "screening:progress": { applicationId: "app_demo", percent: 50 },
  "screening:complete": { applicationId: "app_demo", passed: true, score: 87.5 },
  announcement: { message: "Team stand-up in 5 minutes" },
};

const state = {
  demo: null, // GET /demo/api/users
  user: null,
  ws: null,
  generation: 0, // bumps on every user switch: callbacks of older sockets are ignored
  lastId: null, // cursor of the last event, for `since` on reconnect
  attempts: 0,
  count: 0,
  paused: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function setStatus(kind, text) {
  $("status").dataset.state = kind;
  $("status-text").textContent = text;
}

// -- users and connection ----------------------------------------------------------------------

async function start() {
  const response = await fetch("/demo/api/users", { cache: "no-store" });
  state.demo = await response.json();
  $("org").textContent = state.demo.organization.name;
  renderUsers();
  setupBroadcastForm();
  const wanted = location.hash.slice(1);
  const user = state.demo.users.find((u) => u.id === wanted) || state.demo.users[1] || state.demo.users[0];
  selectUser(user);
}

function renderUsers() {
  const box = $("users");
  box.replaceChildren();
  for (const user of state.demo.users) {
    const button = el(
      "button",
      { type: "button", class: "user", role: "radio", "aria-checked": "false", "data-id": user.id },
      el("span", { class: "avatar", text: initials(user.name) }),
      el("span", { class: "who" }, el("strong", { text: user.name }), el("span", { class: "roles", text: user.roles.join(", ") })),
    );
    button.addEventListener("click", () => selectUser(user));
    box.append(button);
  }
}

function initials(name) {
  return name.split(/\s+/).map((part) => part[0] || "").join("").slice(0, 2).toUpperCase();
}

function selectUser(user) {
  state.user = user;
  state.generation += 1;
  state.lastId = null;
  state.attempts = 0;
  history.replaceState(null, "", `#${user.id}`);
  for (const button of document.querySelectorAll(".user")) {
    button.setAttribute("aria-checked", String(button.dataset.id === user.id));
  }
  if (state.ws) state.ws.close(1000, "switching user");
  clearFeed();
  renderRules();
  renderTargets();
  connect(state.generation);
}

async function connect(generation) {
  const user = state.user;
  const org = state.demo.organization.id;
  setStatus("connecting", `connecting as ${user.name}…`);
  let wsTicket;
  try {
    // Step 1 of the ticket flow: a fresh 60 s ticket for every connection attempt.
    const response = await fetch("/realtime/v1/ws-ticket", {
      method: "POST",
      headers: { Authorization: `Bearer ${user.sessionToken}`, "Content-Type": "application/json" },
      body: JSON.stringify({ organizationId: org }),
    });
    if (!response.ok) throw new Error(`ticket refused (${response.status})`);
    ({ wsTicket } = await response.json());
  } catch (error) {
    if (generation === state.generation) retry(generation, String(error.message || error));
    return;
  }
  if (generation !== state.generation) return;
  // Step 2: the ticket in the URL; `since` resumes after the last event we showed.
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const params = new URLSearchParams({ ws_ticket: wsTicket, organizationId: org });
  // Without a cursor (a fresh page): the current rows first, so a reload shows them at once.
  if (state.lastId) params.set("since", state.lastId);
  else params.set("snapshot", "true");
  const ws = new WebSocket(`${scheme}://${location.host}/realtime/v1/websocket?${params}`);
  state.ws = ws;
  ws.onmessage = (event) => {
    if (generation === state.generation) handleMessage(JSON.parse(event.data));
  };
  ws.onclose = (event) => {
    if (generation !== state.generation) return;
    retry(generation, event.code === 4403 ? "access changed" : `closed (${event.code})`);
  };
}

function retry(generation, why) {
  state.attempts += 1;
  const delay = Math.min(10000, 500 * 2 ** Math.min(state.attempts, 5)) * (0.5 + Math.random() / 2);
  setStatus("reconnecting", `${why}: reconnecting in ${(delay / 1000).toFixed(1)} s`);
  setTimeout(() => {
    if (generation === state.generation) connect(generation);
  }, delay);
}

// -- messages ----------------------------------------------------------------------------------

function handleMessage(msg) {
  if (msg.id) state.lastId = msg.id;
  if (msg.type === "system") {
    if (msg.event === "ready") {
      state.attempts = 0;
      const roles = (msg.payload.roles || []).join(", ");
      setStatus("live", `live as ${state.user.name} (${roles})`);
    } else if (msg.event === "snapshot-complete") {
      state.lastId = msg.payload.cursor;
      addNotice("Current rows loaded; live changes follow.");
    } else if (msg.event === "resync_required") {
      clearFeed();
      addNotice("The server's history no longer reaches back to our last event: starting afresh.");
    }
    return;
  }
  if (msg.type === "snapshot") {
    for (const row of msg.rows) addEntry("snapshot", "CURRENT", msg.table, "", null, fieldList(msg.table, row, Object.keys(row)));
    return;
  }
  if (state.paused) return;
  if (msg.type === "postgres_changes") addChange(msg);
  else if (msg.type === "broadcast") addBroadcast(msg);
}

function clock(timestamp) {
  const date = timestamp ? new Date(timestamp) : new Date();
  return date.toLocaleTimeString([], { hour12: false });
}

function maskInfo(table, column, row) {
  const config = state.demo.config.tables[table];
  const rule = config && config.masking[column];
  if (!rule) return null;
  const roles = state.user.roles;
  const byRole = rule.showRoles.some((role) => roles.includes(role));
  const byOwner = rule.showOwner && config.ownerColumn && row && row[config.ownerColumn] === state.user.id;
  if (byRole) return { raw: true, why: `raw: ${column} is shown to ${rule.showRoles.join(", ")}` };
  if (byOwner) return { raw: true, why: `raw: you created this row (${config.ownerColumn})` };
  return { raw: false, why: `${rule.type} mask: raw only for ${rule.showRoles.join(", ") || "nobody"}` };
}

function valueNode(table, column, value, row) {
  const text = value === null ? "null" : typeof value === "object" ? JSON.stringify(value) : String(value);
  const node = el("span", { class: value === null ? "value null" : "value", text });
  const mask = value === null ? null : maskInfo(table, column, row);
  if (mask) {
    node.classList.add(mask.raw ? "raw" : "masked");
    node.title = mask.why;
    node.append(el("span", { class: "lock", text: mask.raw ? "raw" : "masked" }));
  }
  return node;
}

function fieldList(table, row, keys, old) {
  const list = el("dl", { class: "fields" });
  for (const key of keys) {
    if (HIDDEN_FIELDS.has(key)) continue;
    const dd = el("dd");
    if (old && key in old && JSON.stringify(old[key]) !== JSON.stringify(row[key])) {
      dd.append(valueNode(table, key, old[key], old), el("span", { class: "arrow", text: "→" }));
      dd.classList.add("changed");
    }
    dd.append(valueNode(table, key, row[key], row));
    list.append(el("dt", { text: key }), dd);
  }
  return list;
}

function addChange(msg) {
  const { table, eventType, new: newRecord, old: oldRecord } = msg;
  let body = null;
  if (eventType === "INSERT") {
    body = fieldList(table, newRecord, Object.keys(newRecord));
  } else if (eventType === "UPDATE") {
    const changed = Object.keys(newRecord).filter(
      (key) => key === "id" || !oldRecord || JSON.stringify(oldRecord[key]) !== JSON.stringify(newRecord[key]),
    );
    body = fieldList(table, newRecord, changed, oldRecord);
  } else if (eventType === "DELETE") {
    body = fieldList(table, oldRecord, Object.keys(oldRecord));
  }
  addEntry(eventType.toLowerCase(), eventType, table, clock(msg.commitTimestamp), msg.id, body);
}

function addBroadcast(msg) {
  const payload = msg.payload && typeof msg.payload === "object" ? msg.payload : { value: msg.payload };
  const body = fieldList(null, payload, Object.keys(payload));
  addEntry("broadcast", "BROADCAST", msg.event, clock(), msg.id, body);
}

function addNotice(text) {
  addEntry("notice", "NOTICE", text, clock(), null, null);
}

function addEntry(kind, badge, title, time, cursor, body) {
  const head = el(
    "div",
    { class: "ev-head" },
    el("span", { class: "badge", text: badge }),
    el("span", { class: "title", text: title }),
    el("span", { class: "time", text: time }),
  );
  if (cursor) head.append(el("span", { class: "cursor", title: "event id (resume cursor)", text: cursor }));
  const item = el("li", { class: `ev ev-${kind} fresh` }, head, body);
  const feed = $("feed");
  feed.prepend(item);
  while (feed.children.length > MAX_EVENTS) feed.lastElementChild.remove();
  state.count += 1;
  $("count").textContent = String(state.count);
  $("empty").hidden = true;
  setTimeout(() => item.classList.remove("fresh"), 1200);
}

function clearFeed() {
  $("feed").replaceChildren();
  state.count = 0;
  $("count").textContent = "0";
  $("empty").hidden = false;
}

// -- the explanation panel ---------------------------------------------------------------------

function renderRules() {
  const user = state.user;
  $("who").textContent = user.name.split(" ")[0];
  const list = $("rules");
  list.replaceChildren();
  for (const [table, config] of Object.entries(state.demo.config.tables)) {
    const allowed = config.requiredRoles.length === 0 || config.requiredRoles.some((r) => user.roles.includes(r));
    const item = el("li", { class: allowed ? "rule yes" : "rule no" }, el("strong", { text: table }));
    if (!allowed) item.append(` — not for ${user.roles.join(", ")}`);
    else if (config.userColumn) item.append(` — only rows whose ${config.userColumn} is ${user.id}`);
    else item.append(" — every row of the organization");
    for (const [column, rule] of Object.entries(config.masking)) {
      const raw = rule.showRoles.some((role) => user.roles.includes(role));
      const owner = !raw && rule.showOwner ? ` (raw where ${config.ownerColumn} is you)` : "";
      item.append(el("div", { class: "mask", text: `${column}: ${raw ? "raw" : `${rule.type} mask${owner}`}` }));
    }
    list.append(item);
  }
  for (const [name, ns] of Object.entries(state.demo.config.namespaces)) {
    const roles = ns.requiredRoles;
    const allowed = roles.length === 0 || roles.some((r) => user.roles.includes(r));
    const text = allowed ? " — by default" : ` — only when targeted (default: ${roles.join(", ")})`;
    list.append(el("li", { class: allowed ? "rule yes" : "rule no" }, el("strong", { text: `${name}:*` }), text));
  }
}

// -- broadcasts --------------------------------------------------------------------------------

function setupBroadcastForm() {
  const select = $("b-event");
  for (const [name, ns] of Object.entries(state.demo.config.namespaces)) {
    for (const event of ns.events || []) select.append(el("option", { value: `${name}:${event}`, text: `${name}:${event}` }));
  }
  select.append(el("option", { value: "announcement", text: "announcement (no namespace)" }));
  select.addEventListener("change", () => {
    renderTargets();
    fillPayload();
  });
  fillPayload();
  $("broadcast").addEventListener("submit", sendBroadcast);
}

function fillPayload() {
  const template = BROADCAST_TEMPLATES[$("b-event").value] || {};
  $("b-payload").value = JSON.stringify(template, null, 2);
}

function namespaceRoles(event) {
  const [name, rest] = event.split(":");
  const ns = rest === undefined ? null : state.demo.config.namespaces[name];
  return ns ? ns.requiredRoles : [];
}

function renderTargets() {
  if (!state.demo || !state.user) return;
  const select = $("b-target");
  const previous = select.value;
  select.replaceChildren();
  const defaults = namespaceRoles($("b-event").value);
  select.append(el("option", { value: "default", text: defaults.length ? `default (${defaults.join(", ")})` : "default (everyone)" }));
  select.append(el("option", { value: "everyone", text: "everyone in the organization" }));
  const roles = [...new Set(state.demo.users.flatMap((u) => u.roles))];
  for (const role of roles) select.append(el("option", { value: `role:${role}`, text: `role: ${role}` }));
  select.append(el("option", { value: "me", text: `only ${state.user.name}` }));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

async function sendBroadcast(submit) {
  submit.preventDefault();
  const result = $("b-result");
  const event = $("b-event").value;
  let payload;
  try {
    payload = JSON.parse($("b-payload").value || "{}");
  } catch (error) {
    result.className = "result error";
    result.textContent = `payload is not JSON: ${error.message}`;
    return;
  }
  const body = { event, payload };
  const target = $("b-target").value;
  let roles = namespaceRoles(event);
  if (target === "everyone") roles = body.targetRoles = [];
  else if (target.startsWith("role:")) roles = body.targetRoles = [target.slice(5)];
  else if (target === "me") body.targetUserId = state.user.id;
  $("b-send").disabled = true;
  try {
    const response = await fetch("/demo/api/broadcast", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (response.status === 202) {
      const seen = roles.length === 0 || roles.some((role) => state.user.roles.includes(role));
      result.className = "result ok";
      result.textContent = `accepted at LSN ${answer.lsn}` + (seen ? "" : ` — ${state.user.name} is not a target, so it will not appear here`);
    } else {
      result.className = "result error";
      result.textContent = `${response.status} ${answer.error || ""}: ${JSON.stringify(answer.detail ?? "")}`;
    }
  } catch (error) {
    result.className = "result error";
    result.textContent = String(error);
  } finally {
    $("b-send").disabled = false;
  }
}

$("pause").addEventListener("change", (event) => {
  state.paused = event.target.checked;
});
$("clear").addEventListener("click", clearFeed);
start().catch((error) => setStatus("error", `could not load the demo: ${error}`));
