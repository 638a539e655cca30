// Magi Gateway console: one WebSocket to this gateway, one panel per agent.
//
// Protocol (DESIGN §2): connect to /ws?appid&token, ask `get_agents`, send
// `agent_judgement` (with a request_id, so a retry after a drop does not start a second
// session), then read the session's messages, each with a per-session `seq` 1, 2, 3...
// When the connection drops (any close but 4001, auth failed) the console reconnects
// with capped exponential backoff and a fresh token, and sends `resume` with the last
// seq it applied: the gateway replays what was missed. Messages are applied strictly in
// seq order, each once; what was applied is visible in #session[data-seqs].
// The page's address names the session on screen (#session=ID): opened in another tab
// (or browser) it follows the same session as one more viewer (`resume` from seq 0),
// and shows the same panels; any viewer may cancel it.
//
// Everything from the network is shown with textContent, never parsed as HTML.

import { TokenError, debugToken, seedToken } from "./token.js";

const MAGI = {
  melchior: { name: "MELCHIOR-1", role: "the scientist" },
  balthasar: { name: "BALTHASAR-2", role: "the mother" },
  casper: { name: "CASPER-3", role: "the woman" },
};
const MAGI_ORDER = Object.keys(MAGI);
const RESULT_CODES = {
  1: "agent error",
  2: "timeout",
  3: "no such agent",
  4: "cancelled",
  5: "worker lost",
};
const CLOSE_AUTH_FAILED = 4001;
const BACKOFF_BASE_MS = 250;
const BACKOFF_CAP_MS = 5000;
const RETRY_LATER_MS = 1000;
const RETRYABLE = new Set(["backend_unavailable", "rate_limited"]);
const MAX_NOTICES = 5;
const STORAGE_KEY = "magi-console"; // remembers appid and token mode, never the secret

const $ = (selector) => document.querySelector(selector);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function displayName(agentId) {
  return MAGI[agentId]?.name ?? agentId.toUpperCase();
}

function newRequestId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// -- connection ---------------------------------------------------------------------------

/** One logical link to the gateway, re-established after drops until `close()`. */
class Link {
  constructor({ onOpen, onMessage, onState }) {
    this.onOpen = onOpen;
    this.onMessage = onMessage;
    this.onState = onState;
    this.ws = null;
    this.credentials = null;
    this.wanted = false;
    this.attempt = 0;
    this.timer = null;
    this.reconnects = 0;
    this.everConnected = false;
    this.state = "disconnected";
  }

  get connected() {
    return this.state === "connected";
  }

  /** Connect with `credentials` ({appid, mode, token(): Promise<string>}), replacing any link. */
  open(credentials) {
    this.close("disconnected");
    this.credentials = credentials;
    this.wanted = true;
    this.attempt = 0;
    this.everConnected = false;
    this.dial();
  }

  /** Stop: close the socket and do not reconnect. */
  close(state = "disconnected") {
    this.wanted = false;
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "closed by the console");
    this.setState(state);
  }

  send(message) {
    if (!this.connected) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  /** Try again now (e.g. the browser came back online) instead of waiting out the backoff. */
  hurry() {
    if (this.wanted && this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
      this.dial();
    }
  }

  setState(state, detail = {}) {
    this.state = state;
    this.onState(state, { attempt: this.attempt, ...detail });
  }

  async dial() {
    const credentials = this.credentials;
    this.setState(this.attempt > 0 ? "reconnecting" : "connecting");
    let token;
    try {
      token = await credentials.token(); // fresh for every attempt: tokens live a minute or two
    } catch (error) {
      if (credentials !== this.credentials || !this.wanted) return;
      if (error instanceof TokenError && error.final) {
        this.close("auth_failed");
        this.onMessage({ error: error.message, code: "auth_failed" });
      } else {
        this.retry();
      }
      return;
    }
    if (credentials !== this.credentials || !this.wanted) return;
    const url = new URL("/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ appid: credentials.appid, token }).toString();
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.type === "connection_established") {
        if (this.everConnected) this.reconnects += 1;
        this.everConnected = true;
        this.attempt = 0;
        this.setState("connected", { connectionId: message.connection_id });
        this.onOpen();
        return;
      }
      this.onMessage(message);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return; // a socket we already replaced or closed
      this.ws = null;
      if (event.code === CLOSE_AUTH_FAILED) {
        this.close("auth_failed");
      } else if (this.wanted) {
        this.retry();
      } else {
        this.setState("disconnected");
      }
    };
  }

  retry() {
    this.attempt += 1;
    this.setState("reconnecting");
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** (this.attempt - 1));
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.wanted) this.dial();
    }, delay);
  }
}

// -- panels -------------------------------------------------------------------------------

/** One agent's column: its streamed thinking, then its final decision. */
class Panel {
  constructor(agentId) {
    this.agentId = agentId;
    this.attempt = 1;
    const node = $("#panel-template").content.firstElementChild.cloneNode(true);
    this.node = node;
    node.dataset.agentId = agentId;
    node.querySelector(".panel-name").textContent = displayName(agentId);
    node.querySelector(".panel-role").textContent = MAGI[agentId] ? `${agentId} · ${MAGI[agentId].role}` : agentId;
    this.log = node.querySelector(".panel-log");
    this.stateLabel = node.querySelector(".panel-state");
    this.badge = node.querySelector(".badge");
    this.finalText = node.querySelector(".final-text");
    this.setState("standby", "Standby");
  }

  setState(state, label) {
    this.node.dataset.state = state;
    this.stateLabel.textContent = label;
  }

  think(seq, data) {
    const attempt = Number(data.attempt ?? 1);
    if (attempt !== this.attempt) {
      // The agent's worker died and another one started over (DESIGN §3).
      this.attempt = attempt;
      this.log.append(el("li", "attempt", `— retry, attempt ${attempt} —`));
    }
    const line = el("li", "line");
    line.dataset.seq = seq;
    line.append(el("span", "seq", String(seq).padStart(3, "0")), el("span", "text", String(data.thinking ?? "")));
    this.log.append(line);
    this.log.scrollTop = this.log.scrollHeight;
    this.node.dataset.chunks = this.log.querySelectorAll(".line").length;
    this.setState("thinking", "Thinking");
  }

  decide(resultCode, data) {
    this.node.dataset.resultCode = resultCode;
    if (resultCode === 0) {
      const decision = ["approve", "reject", "abstain"].includes(data.decision) ? data.decision : "none";
      this.node.dataset.decision = decision;
      this.badge.textContent = decision === "none" ? "No decision" : decision;
      this.finalText.textContent = String(data.judgement ?? "");
      this.setState("decided", "Decided");
    } else {
      const reason = RESULT_CODES[resultCode] ?? `result ${resultCode}`;
      this.node.dataset.decision = "none";
      this.badge.textContent = reason;
      this.finalText.textContent = String(data.error ?? reason);
      this.setState(resultCode === 4 ? "cancelled" : "failed", resultCode === 4 ? "Cancelled" : "Failed");
    }
  }
}

// -- the console --------------------------------------------------------------------------

const ui = {
  status: $("#status"),
  statusText: $("#status-text"),
  connectForm: $("#connect-form"),
  appid: $("#appid"),
  secret: $("#secret"),
  secretField: $("#secret-field"),
  linkSummary: $("#link-summary"),
  connect: $("#connect"),
  disconnect: $("#disconnect"),
  agentList: $("#agent-list"),
  refreshAgents: $("#refresh-agents"),
  askForm: $("#ask-form"),
  question: $("#question"),
  submit: $("#submit"),
  cancel: $("#cancel"),
  verdict: $("#verdict"),
  verdictText: $("#verdict-text"),
  verdictDetail: $("#verdict-detail"),
  session: $("#session"),
  sessionId: $("#session-id"),
  sessionSeq: $("#session-seq"),
  sessionInfo: $("#session-info"),
  panels: $("#panels"),
  empty: $("#empty-state"),
  notices: $("#notices"),
};

let agents = []; // [{agent_id, workers}] from get_agents
const unselected = new Set(); // agents the user unticked (new agents start ticked)
let session = null; // the judgement on screen
let retryTimer = null; // a pending pickUpSession after a retryable error
let followId = sessionInAddress(); // a session to follow once connected (from #session=ID)

const link = new Link({ onOpen: linkUp, onMessage: handleMessage, onState: showState });

function showState(state, { attempt, connectionId }) {
  const labels = {
    disconnected: "Disconnected",
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: `Reconnecting (attempt ${attempt})`,
    auth_failed: "Auth failed",
  };
  ui.status.dataset.state = state;
  ui.status.dataset.attempt = attempt;
  document.body.dataset.link = state;
  const history = (ui.status.dataset.history ?? "").split(" ").filter(Boolean);
  if (history.at(-1) !== state) ui.status.dataset.history = [...history, state].slice(-50).join(" ");
  ui.statusText.textContent = labels[state] ?? state;
  ui.status.title = connectionId ? `connection ${connectionId}` : "";
  const live = state === "connecting" || state === "connected" || state === "reconnecting";
  ui.connect.disabled = live;
  ui.disconnect.disabled = !live;
  ui.connectForm.dataset.live = live;
  if (live && link.credentials) {
    const how = link.credentials.mode === "secret" ? "token from secret" : "debug token";
    ui.linkSummary.replaceChildren("App ", el("strong", "", link.credentials.appid), ` · ${how}`);
  }
  ui.session.dataset.reconnects = link.reconnects;
  if (state !== "connected") ui.refreshAgents.disabled = true;
  updateButtons();
  renderSessionInfo();
}

/** Connected (first time or again): list agents, then pick up the judgement on screen. */
function linkUp() {
  ui.refreshAgents.disabled = false;
  link.send({ type: "get_agents" });
  if (followId && followId !== session?.id) followSession(followId);
  followId = null;
  pickUpSession();
}

/** The session id in the page's address (`#session=ID`), or null. */
function sessionInAddress() {
  const id = new URLSearchParams(location.hash.slice(1)).get("session");
  return id ? id : null;
}

/** Put the session on screen into the page's address, so another tab can follow it. */
function showSessionInAddress(id) {
  history.replaceState(null, "", `#session=${encodeURIComponent(id)}`);
}

/** Show a session this page did not start: its panels come with its accepted message. */
function followSession(id) {
  session = {
    request: null,
    id,
    lastSeq: 0,
    seqs: [],
    duplicates: 0,
    gapAt: -1,
    complete: false,
    lost: false,
    panels: new Map(),
  };
  Object.assign(ui.session.dataset, { sessionId: id, seqs: "", lastSeq: 0, duplicates: 0, complete: "false" });
  ui.sessionId.textContent = id;
  renderPanels([]);
  showVerdict("pending", "Following", "a session started elsewhere");
  updateButtons();
  renderSessionInfo();
}

/** Resume the judgement on screen, or send it again if it was never accepted. */
function pickUpSession() {
  if (!session || session.complete || session.lost) return;
  if (session.id) {
    link.send({ type: "resume", session_id: session.id, last_seq: session.lastSeq });
  } else {
    link.send(session.request); // not accepted yet: same request_id, so never started twice
  }
}

function handleMessage(message) {
  if ("error" in message) {
    handleError(message);
  } else if (message.type === "agents") {
    agents = Array.isArray(message.agents) ? message.agents : [];
    renderAgents();
  } else if (message.type === "broadcast") {
    notice(`Operator: ${String(message.message ?? "")}`, "broadcast", "info");
  } else if (typeof message.seq === "number" && message.session_id) {
    handleSessionMessage(message);
  }
}

function handleError({ error, code, session_id: sessionId }) {
  if (code === "auth_failed" || code === "auth_throttled") {
    notice(`${error}. Check the appid and secret (and this computer's clock: tokens change every minute).`, code);
    return;
  }
  if (!link.connected) {
    notice(error, code, "warn"); // refused before the greeting (e.g. too many connections): it retries
    return;
  }
  const running = session && !session.complete && !session.lost;
  const ours = running && (sessionId === undefined || sessionId === session.id);
  if (ours && RETRYABLE.has(code)) {
    // Redis unreachable behind the gateway, or we sent too fast: the same request
    // (same request_id) or resume is safe to repeat a little later.
    notice(`${error}: retrying`, code, "warn");
    if (retryTimer === null) {
      retryTimer = setTimeout(() => {
        retryTimer = null;
        pickUpSession();
      }, RETRY_LATER_MS);
    }
    return;
  }
  if (running && sessionId === session.id && code === "session_not_found") {
    session.lost = true;
    showVerdict("lost", "Session lost", "it expired or belongs to another appid");
  } else if (running && sessionId === session.id && code === "too_many_viewers") {
    session.lost = true;
    showVerdict("lost", "Not following", "the session has as many viewers as allowed; reload later");
  } else if (running && !session.id && sessionId === undefined) {
    // The judgement itself was refused (invalid input, too many agents...).
    session.lost = true;
    showVerdict("idle", "Not started", "");
    for (const panel of session.panels.values()) panel.setState("standby", "Standby");
  }
  updateButtons();
  renderSessionInfo();
  notice(error, code);
}

function handleSessionMessage(message) {
  if (!session) return;
  if (message.session_id !== session.id) {
    const ours = message.type === "agent_judgement_accepted" && message.request_id === session.request?.request_id;
    if (!ours || session.id) return; // a session no longer on screen
    session.id = message.session_id;
    ui.session.dataset.sessionId = session.id;
    ui.sessionId.textContent = session.id;
    showSessionInAddress(session.id);
  }
  if (message.seq <= session.lastSeq) {
    session.duplicates += 1; // already applied (a replay overlapping what we had)
    ui.session.dataset.duplicates = session.duplicates;
    return;
  }
  if (message.seq > session.lastSeq + 1) {
    // A gap: never expected from the gateway, but recoverable: ask for the log again.
    if (session.gapAt !== session.lastSeq) {
      session.gapAt = session.lastSeq;
      link.send({ type: "resume", session_id: session.id, last_seq: session.lastSeq });
    }
    return;
  }
  session.lastSeq = message.seq;
  session.seqs.push(message.seq);
  applySessionMessage(message);
  ui.session.dataset.seqs = session.seqs.join(" ");
  ui.session.dataset.lastSeq = session.lastSeq;
  renderSessionInfo();
}

function applySessionMessage(message) {
  const data = message.data ?? {};
  const panel = session.panels.get(message.agent_id);
  switch (message.type) {
    case "agent_judgement_accepted":
      if (session.panels.size === 0 && Array.isArray(message.agent_ids)) {
        // A followed session: its agents are known from here on.
        const agentIds = message.agent_ids.map(String);
        renderPanels(agentIds);
        showVerdict("pending", "Deliberating", `${agentIds.length} agent${agentIds.length === 1 ? "" : "s"}`);
      }
      for (const p of session.panels.values()) if (p.node.dataset.state === "standby") p.setState("queued", "Queued");
      updateButtons();
      break;
    case "agent_judgement_stream":
      panel?.think(message.seq, data);
      break;
    case "agent_judgement_final":
      panel?.decide(message.result_code, data);
      break;
    case "agent_judgement_complete":
      session.complete = true;
      ui.session.dataset.complete = "true";
      showVerdict(data.verdict ?? "abstain", String(data.verdict ?? "abstain"), tally(data.results ?? {}));
      updateButtons();
      break;
  }
}

function tally(results) {
  const counts = new Map();
  for (const { decision, result_code: code } of Object.values(results)) {
    const key = code === 0 && decision ? decision : RESULT_CODES[code] ?? "no decision";
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return [...counts].map(([key, n]) => `${n} ${key}`).join(" · ");
}

// -- actions ------------------------------------------------------------------------------

function submitJudgement() {
  const question = ui.question.value.trim();
  const agentIds = selectedAgents();
  if (!question || agentIds.length === 0 || !link.connected) return;
  const request = {
    type: "agent_judgement",
    agent_ids: agentIds,
    data: { user_input: question },
    request_id: newRequestId(),
  };
  session = {
    request,
    id: null,
    lastSeq: 0,
    seqs: [],
    duplicates: 0,
    gapAt: -1,
    complete: false,
    lost: false,
    panels: new Map(),
  };
  Object.assign(ui.session.dataset, { sessionId: "", seqs: "", lastSeq: 0, duplicates: 0, complete: "false" });
  ui.sessionId.textContent = "pending";
  renderPanels(agentIds);
  showVerdict("pending", "Deliberating", `${agentIds.length} agent${agentIds.length === 1 ? "" : "s"}`);
  link.send(request);
  updateButtons();
  renderSessionInfo();
}

function cancelJudgement() {
  if (session?.id && !session.complete) link.send({ type: "cancel", session_id: session.id });
}

function selectedAgents() {
  return [...ui.agentList.querySelectorAll("input:checked")].map((box) => box.value);
}

function updateButtons() {
  const running = Boolean(session && !session.complete && !session.lost);
  ui.submit.disabled = !link.connected || running || selectedAgents().length === 0 || !ui.question.value.trim();
  ui.cancel.disabled = !link.connected || !running || !session.id;
  ui.askForm.dataset.running = running;
}

// -- rendering ----------------------------------------------------------------------------

function sortAgents(list) {
  const rank = (id) => (MAGI_ORDER.includes(id) ? MAGI_ORDER.indexOf(id) : MAGI_ORDER.length);
  return [...list].sort((a, b) => rank(a.agent_id) - rank(b.agent_id) || a.agent_id.localeCompare(b.agent_id));
}

function renderAgents() {
  ui.agentList.replaceChildren();
  if (agents.length === 0) {
    ui.agentList.append(el("li", "hint", "No agent has a live worker. Start one: magi-gateway agent demo"));
  }
  for (const { agent_id: id, workers } of sortAgents(agents)) {
    const item = el("li", "agent");
    const label = el("label");
    const box = el("input");
    box.type = "checkbox";
    box.value = id;
    box.checked = !unselected.has(id);
    box.addEventListener("change", () => {
      if (box.checked) unselected.delete(id);
      else unselected.add(id);
      if (!session) renderPanels(selectedAgents());
      updateButtons();
    });
    const count = Number(workers) || 0;
    label.append(box, el("span", "agent-name", displayName(id)), el("span", "agent-id", id));
    label.append(el("span", "agent-workers", `${count} worker${count === 1 ? "" : "s"}`));
    item.append(label);
    ui.agentList.append(item);
  }
  if (!session) renderPanels(selectedAgents());
  updateButtons();
}

function renderPanels(agentIds) {
  const panels = new Map(agentIds.map((id) => [id, new Panel(id)]));
  if (session) session.panels = panels;
  ui.panels.replaceChildren(...[...panels.values()].map((p) => p.node));
  ui.panels.dataset.count = panels.size;
  ui.empty.hidden = panels.size > 0;
}

function showVerdict(kind, text, detail) {
  ui.verdict.dataset.verdict = kind;
  ui.verdictText.textContent = text;
  ui.verdictDetail.textContent = detail;
}

function renderSessionInfo() {
  if (!session) {
    ui.sessionInfo.textContent = "";
    return;
  }
  ui.sessionSeq.textContent = session.lastSeq;
  const running = !session.complete && !session.lost;
  const parts = [session.complete ? "complete" : session.lost ? "lost" : session.id ? "streaming" : "submitted"];
  if (running && !link.connected) parts[0] = `link lost: resumes after seq ${session.lastSeq}`;
  if (link.reconnects) parts.push(`${link.reconnects} reconnect${link.reconnects === 1 ? "" : "s"}`);
  if (session.duplicates) parts.push(`${session.duplicates} duplicates dropped`);
  ui.sessionInfo.textContent = parts.join(" · ");
}

function notice(text, code, level = "error") {
  const item = el("li", `notice ${level}`);
  item.dataset.code = code ?? "";
  const close = el("button", "notice-close", "×");
  close.type = "button";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", () => item.remove());
  item.append(el("span", "notice-code", code ?? level), el("span", "notice-text", String(text ?? "")), close);
  ui.notices.prepend(item);
  while (ui.notices.children.length > MAX_NOTICES) ui.notices.lastElementChild.remove();
}

// -- wiring -------------------------------------------------------------------------------

function tokenMode() {
  return ui.connectForm.elements.mode.value;
}

function showTokenMode() {
  ui.secretField.hidden = tokenMode() !== "secret";
  ui.secret.required = tokenMode() === "secret";
}

function remember() {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify({ appid: ui.appid.value.trim(), mode: tokenMode() }));
  } catch {
    // storage disabled: nothing to remember
  }
}

function restore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "{}");
    if (typeof saved.appid === "string") ui.appid.value = saved.appid;
    if (saved.mode === "secret" || saved.mode === "debug") ui.connectForm.elements.mode.value = saved.mode;
  } catch {
    // nothing saved, or unreadable
  }
}

ui.connectForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const appid = ui.appid.value.trim();
  if (!appid) return;
  const secret = ui.secret.value; // kept in this closure only: never in a URL, log or storage
  const mode = tokenMode();
  const token = mode === "secret" ? () => seedToken(appid, secret) : () => debugToken(appid);
  remember();
  link.open({ appid, mode, token });
});
ui.disconnect.addEventListener("click", () => link.close());
ui.refreshAgents.addEventListener("click", () => link.send({ type: "get_agents" }));
for (const radio of ui.connectForm.elements.mode) radio.addEventListener("change", showTokenMode);
ui.askForm.addEventListener("submit", (event) => {
  event.preventDefault();
  submitJudgement();
});
ui.question.addEventListener("input", updateButtons);
ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    submitJudgement();
  }
});
ui.cancel.addEventListener("click", cancelJudgement);
window.addEventListener("online", () => link.hurry());
window.addEventListener("hashchange", () => {
  // Another session's address pasted into this tab: follow that one.
  const id = sessionInAddress();
  if (!id || id === session?.id) return;
  if (link.connected) {
    followSession(id);
    pickUpSession();
  } else {
    followId = id;
  }
});

restore();
showTokenMode();
showState("disconnected", { attempt: 0 });
ui.verdict.dataset.verdict = "idle";
