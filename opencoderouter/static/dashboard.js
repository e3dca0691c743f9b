// OpenCodeRouter dashboard: follows GET /api/events (SSE) and renders every backend and its agents.
// Everything that comes from a backend is hostile data: it only ever reaches the page as
// text nodes (textContent) or as validated URL parts, never as markup.
"use strict";

(function () {
  const SLUG = /^[a-z0-9][a-z0-9-]*$/;
  const LABEL = /^[a-z0-9][a-z0-9.-]*$/i;
  const IDENT = /^[A-Za-z0-9_-]{1,128}$/;
  const WEB_PATH = /^\/[A-Za-z0-9_-]+\/session\/[A-Za-z0-9_-]{1,128}$/;
  const INSTANCE_POLL_MS = 3000;
  const RECONNECT_MS = 3000;
  const NOTIFY_KEY = "opencoderouter.notify";
  // Most urgent first: the rows that need a person come first.
  const URGENCY = { needs_you: 0, error: 1, working: 2, idle: 3, unknown: 4 };
  const STATE_TEXT = { needs_you: "needs you", error: "error", working: "working", idle: "idle", unknown: "unknown" };

  const state = {
    router: null,            // facts from the snapshot
    backends: new Map(),     // slug -> backend JSON
    agents: new Map(),       // slug -> {agents: summary, sessions: [...]}
    agentsSeen: false,       // a first agent state arrived (changes after it may notify)
    instances: null,         // launcher instances (array) or null when there is no launcher
    skew: 0,                 // server clock minus ours, seconds
    openLogs: new Set(),     // instance keys whose log expander is open
    openFolds: new Set(),    // "links:slug" / "sessions:slug" folds that are open
    actionErrors: new Map(), // instance key -> last start/stop error sentence
    replies: new Map(),      // request id -> "sending" | "sent" | an error sentence
    filter: "",
  };
  const rowCache = new Map(); // row key -> {sig, node}
  let source = null;
  let instanceTimer = null;
  let lastInstancesText = null;

  // -- small DOM helpers (text only) ---------------------------------------
  const { el, str } = window.OpenCodeRouterDOM;
  const $ = (id) => document.getElementById(id);
  const now = () => Date.now() / 1000 + state.skew;
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  function ago(unix) {
    if (typeof unix !== "number" || !unix) return "";
    const seconds = Math.max(0, Math.round(now() - unix));
    if (seconds < 60) return `${seconds} s ago`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ago`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return `${hours} h ago`;
    return `${Math.floor(hours / 24)} days ago`;
  }
  function unixOf(iso) {
    const parsed = Date.parse(str(iso));
    return Number.isFinite(parsed) ? parsed / 1000 : 0;
  }

  // -- URLs: built only from validated parts ---------------------------------
  function portSuffix(port) {
    const n = Number(port);
    return Number.isInteger(n) && n > 0 && n < 65536 && n !== 80 ? `:${n}` : "";
  }
  function hostName(backend) {
    // The advertised mDNS name when the router has one (it may differ after a conflict).
    const advertised = str(backend.mdns_name).replace(/\.$/, "");
    const domain = advertised || str(backend.domain);
    const label = domain.replace(/\.local$/i, "");
    return LABEL.test(label) ? label : null;
  }
  function hereLabel(backend) {
    const label = hostName(backend);
    return str(backend.host_label) && LABEL.test(backend.host_label) ? backend.host_label : label;
  }
  function routerPort() {
    return state.router && state.router.listen_port ? state.router.listen_port : location.port;
  }
  function links(backend) {
    const out = [];
    const label = hostName(backend);
    if (label) {
      // .local: other machines on the LAN reach the router's real port (only when they can:
      // mDNS on and the router listening beyond the loopback).
      if (state.router && state.router.lan_links && backend.mdns_name) {
        out.push(["LAN", `http://${label}.local${portSuffix(routerPort())}/`]);
      }
      // .localhost: this browser's own way in (an SSH tunnel's local port, or the router's).
      out.push(["tunnel", `http://${hereLabel(backend)}.localhost${portSuffix(location.port)}/`]);
    }
    if (SLUG.test(str(backend.slug))) {
      out.push(["path", `${location.origin}/${encodeURIComponent(backend.slug)}/`]);
    }
    return out;
  }
  function onLoopback() {
    const host = location.hostname.toLowerCase();
    return host === "localhost" || host === "[::1]" || host === "::1" || /^127\./.test(host) || host.endsWith(".localhost");
  }
  function sessionUrl(backend, session) {
    // The OpenCode web UI opens a session at /<base64url(directory)>/session/<id>, through host mode.
    // The .local name only where the backend rows offer it (mDNS on, the router reachable from the LAN),
    // else the .localhost name, as /api/agents' web_url does.
    const path = str(session.web_path);
    if (!WEB_PATH.test(path)) return null;
    const lan = !onLoopback() && state.router && state.router.lan_links && backend.mdns_name && hostName(backend);
    if (lan) return `http://${hostName(backend)}.local${portSuffix(routerPort())}${path}`;
    const label = hereLabel(backend);
    return label ? `http://${label}.localhost${portSuffix(location.port)}${path}` : null;
  }

  // -- copying -----------------------------------------------------------------
  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    // Plain http on a LAN name is not a secure context: fall back to a selected textarea.
    const area = el("textarea", { readonly: "", class: "offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    try {
      if (!document.execCommand("copy")) throw new Error("copy refused");
    } finally {
      area.remove();
    }
  }
  function copyButton(text, what) {
    const button = el("button", { type: "button", class: "copy", title: `Copy ${what}`, "aria-label": `Copy ${what}` }, "Copy");
    button.addEventListener("click", () => {
      copyText(text).then(
        () => flash(button, "Copied", "copied"),
        () => flash(button, "Select it", ""),
      );
    });
    return button;
  }
  function flash(button, label, cls) {
    button.textContent = label;
    if (cls) button.classList.add(cls);
    setTimeout(() => { button.textContent = "Copy"; button.classList.remove("copied"); }, 1500);
  }
  function fold(key, summary, cls, ...content) {
    const details = el("details", { class: cls }, el("summary", {}, summary), ...content);
    if (state.openFolds.has(key)) details.open = true;
    details.addEventListener("toggle", () => (details.open ? state.openFolds.add(key) : state.openFolds.delete(key)));
    return details;
  }

  // -- launcher instances --------------------------------------------------------
  function instanceFor(backend) {
    if (!Array.isArray(state.instances)) return null;
    return state.instances.find((i) => i && (i.slug === backend.slug || i.directory === backend.project_path)) || null;
  }
  function instanceKey(instance) {
    return str(instance.slug) || str(instance.directory);
  }
  function logLines(instance) {
    for (const key of ["logs", "log", "log_tail", "last_lines", "output"]) {
      const value = instance[key];
      if (Array.isArray(value)) return value.map(str);
      if (typeof value === "string" && value) return value.split("\n");
    }
    return null;
  }
  async function instanceAction(instance, action) {
    const key = instanceKey(instance);
    state.actionErrors.delete(key);
    let response;
    try {
      response = action === "stop"
        ? await fetch(`/api/instances/${encodeURIComponent(str(instance.slug))}`, { method: "DELETE" })
        : await fetch("/api/instances", {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ directory: str(instance.directory) }),
          });
    } catch (error) {
      state.actionErrors.set(key, `Could not reach the router to ${action} it.`);
      render();
      return;
    }
    if (!response.ok) {
      let message = `The router refused to ${action} it (HTTP ${response.status}).`;
      if (response.status === 401 || response.status === 403) message = `You may not ${action} instances from here (HTTP ${response.status}).`;
      try {
        const body = await response.json();
        if (body && typeof body.message === "string") message += ` ${body.message}`;
      } catch (ignored) { /* not JSON: the status says enough */ }
      state.actionErrors.set(key, message);
    }
    render();
    pollInstances();
  }
  function managedBlock(instance) {
    const stateName = str(instance.state) || "unknown";
    const key = instanceKey(instance);
    const block = el("div", { class: "managed" },
      el("span", { class: `pill st-${/^[a-z]+$/.test(stateName) ? stateName : "unknown"}` }, `managed: ${stateName}`));
    const restarts = Number(instance.restarts);
    if (Number.isFinite(restarts) && restarts > 0) block.append(` · ${restarts} restart${restarts === 1 ? "" : "s"}`);
    if (instance.last_exit !== undefined && instance.last_exit !== null && stateName !== "running") {
      block.append(` · last exit: ${typeof instance.last_exit === "object" ? JSON.stringify(instance.last_exit) : str(instance.last_exit)}`);
    }
    if (instance.reason) block.append(` · ${str(instance.reason)}`);
    const controls = el("span", { class: "controls" });
    if (["running", "starting", "restarting"].includes(stateName) && str(instance.slug)) {
      const stop = el("button", { type: "button" }, "Stop");
      stop.addEventListener("click", () => instanceAction(instance, "stop"));
      controls.append(stop);
    } else if (["stopped", "failed"].includes(stateName) && str(instance.directory)) {
      const start = el("button", { type: "button" }, "Start");
      start.addEventListener("click", () => instanceAction(instance, "start"));
      controls.append(start);
    }
    block.append(controls);
    if (state.actionErrors.has(key)) block.append(el("div", { class: "action-error" }, state.actionErrors.get(key)));
    const lines = logLines(instance);
    if (lines) {
      const details = el("details", { class: "logs" }, el("summary", {}, `logs (${lines.length} line${lines.length === 1 ? "" : "s"})`), el("pre", {}, lines.join("\n")));
      if (state.openLogs.has(key)) details.open = true;
      details.addEventListener("toggle", () => (details.open ? state.openLogs.add(key) : state.openLogs.delete(key)));
      block.append(details);
    }
    return block;
  }
  async function pollInstances() {
    clearTimeout(instanceTimer);
    if (!state.router || !state.router.launcher) { state.instances = null; lastInstancesText = null; return; }
    try {
      const response = await fetch("/api/instances", { headers: { Accept: "application/json" } });
      if (response.ok) {
        const text = await response.text();
        // Re-render only on a change: a rebuilt row under the pointer can swallow a click.
        if (text !== lastInstancesText) {
          lastInstancesText = text;
          const body = JSON.parse(text);
          state.instances = Array.isArray(body) ? body : Array.isArray(body && body.instances) ? body.instances : null;
          render();
        }
      }
    } catch (ignored) { /* the event stream reports the router being away */ }
    instanceTimer = setTimeout(pollInstances, INSTANCE_POLL_MS);
  }

  // -- agents --------------------------------------------------------------------
  function agentsOf(slug) {
    return state.agents.get(slug) || null;
  }
  function summaryOf(backend) {
    const entry = agentsOf(backend.slug);
    const summary = entry && entry.agents && typeof entry.agents === "object" ? entry.agents : null;
    if (!summary) {
      const off = state.router && state.router.agents === false;
      return { state: "unknown", label: "unknown", reason: off ? "the router does not follow agents (--agents=false)" : "" };
    }
    return summary;
  }
  function stateName(summary) {
    return Object.prototype.hasOwnProperty.call(URGENCY, summary.state) ? summary.state : "unknown";
  }
  function asking(session) {
    const out = [];
    for (const p of Array.isArray(session.permissions) ? session.permissions : []) if (p && IDENT.test(str(p.id))) out.push(["permission", p]);
    for (const q of Array.isArray(session.questions) ? session.questions : []) if (q && IDENT.test(str(q.id))) out.push(["question", q]);
    return out;
  }
  async function reply(backend, session, kind, request, answer) {
    // A state-changing call through the router like any other (path mode): it passes the router's
    // authentication, Host and Origin checks, and reaches that server's own reply endpoint.
    const id = str(request.id);
    const directory = str(session.directory);
    const query = directory ? `?directory=${encodeURIComponent(directory)}` : "";
    const base = `/${encodeURIComponent(backend.slug)}`;
    let url, body;
    if (kind === "permission") {
      url = `${base}/permission/${encodeURIComponent(id)}/reply${query}`;
      body = JSON.stringify({ reply: answer });
    } else if (answer === null) {
      url = `${base}/question/${encodeURIComponent(id)}/reject${query}`;
      body = "{}";
    } else {
      url = `${base}/question/${encodeURIComponent(id)}/reply${query}`;
      body = JSON.stringify({ answers: [[answer]] });
    }
    state.replies.set(id, "sending");
    render();
    try {
      const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body });
      if (response.ok) {
        state.replies.set(id, "sent");
      } else {
        let message = `The answer was refused (HTTP ${response.status}).`;
        if (response.status === 401 || response.status === 403) message = `You may not answer from here (HTTP ${response.status}).`;
        try {
          const answerBody = await response.json();
          const detail = answerBody && (answerBody.message || (answerBody.data && answerBody.data.message));
          if (typeof detail === "string") message += ` ${detail}`;
        } catch (ignored) { /* not JSON */ }
        state.replies.set(id, message);
      }
    } catch (error) {
      state.replies.set(id, "Could not reach the router to send the answer.");
    }
    render();
  }
  function requestLine(backend, session, kind, request) {
    const id = str(request.id);
    const line = el("div", { class: `ask ask-${kind}`, "data-request": id }, el("span", { class: "asking", title: str(request.asking) }, str(request.asking)));
    const sent = state.replies.get(id);
    const controls = el("span", { class: "answers" });
    if (sent === "sending" || sent === "sent") {
      controls.append(el("span", { class: "muted" }, sent === "sending" ? "sending…" : "answered, waiting for the agent…"));
    } else if (kind === "permission") {
      for (const [answer, text] of [["once", "Allow once"], ["always", "Always"], ["reject", "Reject"]]) {
        const button = el("button", { type: "button", class: `reply-${answer}`, title: answer === "always" && Array.isArray(request.always) && request.always.length ? `Always allow ${request.always.map(str).join(", ")}` : null }, text);
        button.addEventListener("click", () => reply(backend, session, kind, request, answer));
        controls.append(button);
      }
    } else {
      const items = Array.isArray(request.questions) ? request.questions : [];
      const first = items[0];
      // One single-choice question is answered here; anything more in the web UI.
      if (items.length === 1 && first && !first.multiple && Array.isArray(first.options)) {
        for (const option of first.options.slice(0, 10)) {
          const button = el("button", { type: "button", class: "reply-option" }, str(option));
          button.addEventListener("click", () => reply(backend, session, kind, request, str(option)));
          controls.append(button);
        }
      }
      const dismiss = el("button", { type: "button", class: "reply-dismiss" }, "Dismiss");
      dismiss.addEventListener("click", () => reply(backend, session, kind, request, null));
      controls.append(dismiss);
    }
    line.append(controls);
    if (sent && sent !== "sending" && sent !== "sent") line.append(el("div", { class: "action-error" }, sent));
    return line;
  }
  function sessionItem(backend, session) {
    const status = ["working", "retrying", "idle", "error"].includes(session.status) ? session.status : "idle";
    const needs = asking(session);
    const shown = needs.length ? "needs_you" : status;
    const line = el("div", { class: "session-line" }, el("span", { class: `mini ss-${shown}` }, needs.length ? "needs you" : status));
    const url = sessionUrl(backend, session);
    const title = str(session.title) || str(session.id);
    line.append(url
      ? el("a", { class: "session-link", href: url, target: "_blank", rel: "noopener noreferrer", title: `${title} — open this session in the OpenCode web UI` }, title)
      : el("span", { class: "session-title", title }, title));
    const notes = [];
    if (status === "error" && session.last_error) notes.push(`${str(session.last_error.name)}: ${str(session.last_error.message)}`);
    if (status === "retrying" && session.retry) notes.push(`retry ${str(session.retry.attempt)}: ${str(session.retry.message)}`);
    if (session.todo && Number(session.todo.total)) notes.push(`todo ${str(session.todo.done)}/${str(session.todo.total)}`);
    const since = unixOf(session.last_activity);
    if (since) notes.push(el("span", { class: "ago", "data-since": String(since) }, ago(since)));
    for (const note of notes) line.append(el("span", { class: "note", title: typeof note === "string" ? note : null }, note));
    const item = el("li", { class: `session ss-${shown}`, "data-session": str(session.id) }, line);
    for (const [kind, request] of needs) item.append(requestLine(backend, session, kind, request));
    return item;
  }
  function sessionsBlock(backend) {
    const entry = agentsOf(backend.slug);
    const sessions = entry && Array.isArray(entry.sessions) ? entry.sessions.filter((s) => s && IDENT.test(str(s.id))) : [];
    if (!sessions.length) return null;
    const active = sessions.filter((s) => s.status !== "idle" || asking(s).length);
    const idle = sessions.filter((s) => !active.includes(s));
    const block = el("div", { class: "agent-sessions" });
    if (active.length) block.append(el("ul", { class: "sessions" }, ...active.map((s) => sessionItem(backend, s))));
    if (idle.length) {
      const label = active.length ? `+ ${plural(idle.length, "idle session")}` : plural(idle.length, "idle session");
      block.append(fold(`sessions:${backend.slug}`, label, "idle-sessions",
        el("ul", { class: "sessions" }, ...idle.map((s) => sessionItem(backend, s)))));
    }
    return block;
  }

  // -- notifications (opt-in) ------------------------------------------------------
  function notifyWanted() {
    return "Notification" in window && Notification.permission === "granted" && localStorage.getItem(NOTIFY_KEY) === "1";
  }
  function renderNotifyButton() {
    const button = $("notify");
    if (!("Notification" in window)) { button.hidden = true; return; }
    button.hidden = false;
    const on = notifyWanted();
    button.textContent = on ? "Notifications on" : Notification.permission === "denied" ? "Notifications blocked" : "Notify me";
    button.setAttribute("aria-pressed", on ? "true" : "false");
    button.title = on ? "Turn off notifications for agents that need you, finish or fail"
      : "Get a notification when an agent needs you, finishes or fails";
  }
  async function toggleNotifications() {
    if (notifyWanted()) {
      localStorage.setItem(NOTIFY_KEY, "0");
    } else if (Notification.permission === "granted") {
      localStorage.setItem(NOTIFY_KEY, "1");
    } else if (Notification.permission !== "denied") {
      const answer = await Notification.requestPermission();
      if (answer === "granted") localStorage.setItem(NOTIFY_KEY, "1");
    }
    renderNotifyButton();
  }
  function notify(kind, backend, session, text) {
    if (!notifyWanted()) return;
    const project = str(backend.project_name) || str(backend.slug);
    try {
      const note = new Notification(`${kind}: ${project}`, { body: text, tag: `${str(backend.slug)}/${str(session.id)}/${kind}` });
      note.onclick = () => {
        window.focus();
        const row = rowCache.get(`b:${backend.slug}`);
        if (row) row.node.scrollIntoView({ block: "center" });
      };
    } catch (error) { console.warn(error); }
  }
  function noticeChanges(slug, before, after) {
    // Only what changed since the page last knew: never for the first state it sees.
    const backend = state.backends.get(slug);
    if (!backend || !state.agentsSeen || !before) return;
    const old = new Map((Array.isArray(before.sessions) ? before.sessions : []).map((s) => [str(s.id), s]));
    for (const session of Array.isArray(after.sessions) ? after.sessions : []) {
      const previous = old.get(str(session.id));
      const wasAsked = new Set(previous ? asking(previous).map(([, r]) => str(r.id)) : []);
      for (const [, request] of asking(session)) {
        if (!wasAsked.has(str(request.id))) notify("Needs you", backend, session, str(request.asking));
      }
      if (!previous) continue;
      const wasBusy = previous.status === "working" || previous.status === "retrying";
      if (session.status === "error" && previous.status !== "error") {
        const error = session.last_error || {};
        notify("Failed", backend, session, `${str(session.title)}: ${str(error.name)} ${str(error.message)}`.trim());
      } else if (wasBusy && session.status === "idle") {
        notify("Finished", backend, session, str(session.title) || str(session.id));
      }
    }
  }
  function takeAgents(list) {
    for (const entry of Array.isArray(list) ? list : []) {
      if (!entry || typeof entry.slug !== "string") continue;
      noticeChanges(entry.slug, state.agents.get(entry.slug), entry);
      state.agents.set(entry.slug, entry);
    }
    // Answers the agents no longer wait for are forgotten.
    const waiting = new Set();
    for (const entry of state.agents.values()) for (const s of entry.sessions || []) for (const [, r] of asking(s)) waiting.add(str(r.id));
    for (const id of [...state.replies.keys()]) if (!waiting.has(id) && state.replies.get(id) !== "sending") state.replies.delete(id);
    state.agentsSeen = true;
  }

  // -- rendering -----------------------------------------------------------------
  function cell(label, ...children) {
    return el("td", { "data-label": label }, ...children);
  }
  function livenessOf(backend, instance) {
    const managedState = instance ? str(instance.state) : "";
    if (managedState === "restarting" || managedState === "failed" || managedState === "starting") return managedState;
    return backend.up ? "up" : "down";
  }
  function badge(summary) {
    const name = stateName(summary);
    return el("span", { class: `badge ag-${name}`, title: str(summary.reason) || null }, str(summary.label) || STATE_TEXT[name]);
  }
  function backendRow(backend) {
    const instance = instanceFor(backend);
    const liveness = livenessOf(backend, instance);
    const summary = summaryOf(backend);
    const name = stateName(summary);
    const row = el("tr", { class: `${backend.up ? "is-up" : "is-down"} row-${name}`, "data-slug": str(backend.slug), "data-state": name });
    const stateCell = cell("State", badge(summary), el("span", { class: `pill liveness st-${liveness}` }, liveness));
    // A password-protected backend (the router holds no credentials for it) is listed but locked.
    if (backend.locked === true) stateCell.append(el("span", { class: "pill locked", title: "needs the backend's password" }, "locked"));
    row.append(stateCell);
    const project = el("div", { class: "project" },
      backend.project_path === null
        ? el("div", { class: "project-line" },
          el("span", { class: "project-name" }, "password-protected server"),
          el("span", { class: "project-path unlock" },
            "Unknown project: start the router with --opencode-password-file FILE (the server's OPENCODE_SERVER_PASSWORD) to open it."))
        : el("div", { class: "project-line" },
          el("span", { class: "project-name" }, str(backend.project_name)),
          el("span", { class: "project-path mono", title: str(backend.project_path) }, str(backend.project_path))));
    if (instance) project.append(managedBlock(instance));
    row.append(cell("Project", project));
    const doing = sessionsBlock(backend)
      || (name === "unknown" && summary.reason ? el("span", { class: "reason muted", title: str(summary.reason) }, str(summary.reason)) : "");
    row.append(cell("Now", doing));
    const owner = str(backend.owner);
    const details = [owner, backend.port ? `:${str(backend.port)}` : "", str(backend.version)].filter(Boolean).join(" · ");
    row.append(cell("Slug", el("code", {}, str(backend.slug)), el("span", { class: "muted detail" }, details ? ` · ${details}` : "")));
    row.append(cell("Seen", el("span", { class: "ago", "data-since": String(Number(backend.last_seen_unix) || "") }, ago(backend.last_seen_unix))));
    const box = el("div", { class: "links" });
    for (const [kind, url] of links(backend)) {
      box.append(el("div", { class: "link-line" },
        el("span", { class: "link-kind" }, kind),
        el("a", { href: url, class: `link-${kind}`, rel: "noreferrer" }, url.replace(/^https?:\/\//, "")),
        copyButton(url, `${kind} link`)));
    }
    row.append(cell("Links", fold(`links:${backend.slug}`, "links", "open-links", box)));
    return row;
  }
  function instanceOnlyRow(instance) {
    // A managed instance not (yet, or no longer) answering: starting, failed, stopped.
    const stateName_ = str(instance.state) || "unknown";
    const row = el("tr", { class: "is-down row-unknown", "data-instance": instanceKey(instance), "data-state": "unknown" });
    row.append(cell("State", el("span", { class: `pill st-${/^[a-z]+$/.test(stateName_) ? stateName_ : "unknown"}` }, stateName_)));
    const directory = str(instance.directory);
    const name = directory.replace(/\/+$/, "").split("/").pop() || directory;
    row.append(cell("Project", el("div", { class: "project" },
      el("div", { class: "project-line" }, el("span", { class: "project-name" }, name),
        el("span", { class: "project-path mono" }, directory)), managedBlock(instance))));
    row.append(cell("Now", ""));
    row.append(cell("Slug", el("code", {}, str(instance.slug)), instance.port ? el("span", { class: "muted detail" }, ` · :${str(instance.port)}`) : null));
    row.append(cell("Seen", ""));
    row.append(cell("Links", el("span", { class: "muted" }, "not answering yet")));
    return row;
  }

  function renderHeader() {
    const router = state.router || {};
    $("version").textContent = router.version ? `v${str(router.version)}` : "";
    const facts = $("facts");
    facts.replaceChildren();
    const fact = (name, value) => facts.append(el("div", {}, el("dt", {}, name), el("dd", {}, value)));
    if (router.username) fact("user", str(router.username));
    if (router.listen) fact("listening", str(router.listen));
    if (router.scan_start !== undefined) {
      fact("scanning", `127.0.0.1 ports ${str(router.scan_start)}–${str(router.scan_end)} every ${str(router.scan_interval)} s`);
    }
    if (router.stale_after !== undefined) fact("forget after", `${str(router.stale_after)} s unseen`);
    if (router.mdns !== undefined) {
      // Advertised names as host names people type: {name}.local.
      const names = [...state.backends.values()].map((b) => str(b.mdns_name).replace(/\.$/, "").replace(/\.local$/i, ""))
        .filter(Boolean).map((name) => `${name}.local`);
      fact("mDNS", router.mdns ? (names.length ? `on: ${names.join(", ")}` : "on") : "off");
    }
    const all = [...state.backends.values()];
    const up = all.filter((b) => b.up).length;
    let counts = `${all.length} backend${all.length === 1 ? "" : "s"}: ${up} up, ${all.length - up} down`;
    if (Array.isArray(state.instances)) counts += ` · ${state.instances.length} managed`;
    const totals = { needs_you: 0, working: 0, errors: 0 };
    for (const backend of all) {
      const summary = summaryOf(backend);
      if (stateName(summary) === "unknown") continue;
      for (const key of Object.keys(totals)) totals[key] += Number(summary[key]) || 0;
    }
    const agentParts = [];
    if (totals.needs_you) agentParts.push(`${totals.needs_you} waiting for you`);
    if (totals.working) agentParts.push(`${totals.working} working`);
    if (totals.errors) agentParts.push(`${totals.errors} failed`);
    if (agentParts.length) counts += ` · agents: ${agentParts.join(", ")}`;
    $("counts").textContent = counts;
    document.title = totals.needs_you ? `(${totals.needs_you}) OpenCodeRouter` : "OpenCodeRouter";
  }
  function renderEmpty(empty) {
    $("empty").hidden = !empty;
    $("backends").hidden = empty;
    if (!empty || !state.router) return;
    const r = state.router;
    $("empty-scan").textContent =
      `The router scans 127.0.0.1 ports ${str(r.scan_start)}–${str(r.scan_end)} every ${str(r.scan_interval)} s for OpenCode servers and has found none.`;
    $("empty-serve").textContent = `cd ~/my-project && opencode serve --port ${str(r.scan_start)}`;
  }
  function haystack(backend) {
    const summary = summaryOf(backend);
    const entry = agentsOf(backend.slug);
    const titles = entry && Array.isArray(entry.sessions) ? entry.sessions.map((s) => str(s && s.title)) : [];
    return [str(backend.slug), str(backend.project_name), str(backend.project_path), str(backend.owner),
      stateName(summary), STATE_TEXT[stateName(summary)], str(summary.label), backend.up ? "up" : "down", ...titles]
      .join("\n").toLowerCase();
  }
  function matches(text) {
    const words = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
    return words.every((word) => text.includes(word));
  }
  function rowSig(backend) {
    // Everything a backend's row shows (the "seen" time aside, which is updated in place).
    const instance = instanceFor(backend);
    const shown = { ...backend, last_seen_unix: undefined, last_seen: undefined };
    return JSON.stringify([shown, instance, agentsOf(backend.slug), [...state.replies.entries()].sort(),
      state.actionErrors.get(instance ? instanceKey(instance) : "")]);
  }
  function keyed(key, sig, build) {
    // Rows are rebuilt only when what they show changed: a rebuilt row under the pointer can swallow a click.
    const cached = rowCache.get(key);
    if (cached && cached.sig === sig) return cached.node;
    const node = build();
    rowCache.set(key, { sig, node });
    return node;
  }
  function render() {
    renderHeader();
    renderNotifyButton();
    const rows = $("rows");
    const backends = [...state.backends.values()].sort((a, b) =>
      (URGENCY[stateName(summaryOf(a))] - URGENCY[stateName(summaryOf(b))]) || str(a.slug).localeCompare(str(b.slug)));
    const items = [];
    for (const backend of backends) {
      const key = `b:${backend.slug}`;
      items.push([key, keyed(key, rowSig(backend), () => backendRow(backend)), haystack(backend)]);
    }
    if (Array.isArray(state.instances)) {
      for (const instance of state.instances) {
        if (!instance || typeof instance !== "object") continue;
        const matched = backends.some((b) => instance.slug === b.slug || instance.directory === b.project_path);
        if (matched) continue;
        const key = `i:${instanceKey(instance)}`;
        const sig = JSON.stringify([instance, state.actionErrors.get(instanceKey(instance))]);
        items.push([key, keyed(key, sig, () => instanceOnlyRow(instance)), `${str(instance.directory)}\n${str(instance.slug)}\n${str(instance.state)}`.toLowerCase()]);
      }
    }
    const live = new Set(items.map(([key]) => key));
    for (const key of [...rowCache.keys()]) if (!live.has(key)) rowCache.delete(key);
    const nodes = items.map(([, node]) => node);
    const current = [...rows.children];
    if (current.length !== nodes.length || current.some((node, i) => node !== nodes[i])) rows.replaceChildren(...nodes);
    let shown = 0;
    for (const [, node, text] of items) {
      node.hidden = !matches(text);
      if (!node.hidden) shown += 1;
    }
    const filtered = $("filtered");
    filtered.hidden = !(items.length && shown < items.length);
    filtered.textContent = shown ? `${items.length - shown} of ${items.length} hidden by the filter` : `Nothing matches “${state.filter}”.`;
    renderEmpty(items.length === 0);
  }
  function tick() {
    for (const node of document.querySelectorAll(".ago[data-since]")) {
      const since = Number(node.getAttribute("data-since"));
      if (since) node.textContent = ago(since);
    }
  }

  // -- the event stream --------------------------------------------------------------
  function setConnection(text, cls) {
    const pill = $("connection");
    pill.textContent = text;
    pill.className = `pill ${cls}`;
  }
  function handle(name, fn, rerender = true) {
    source.addEventListener(name, (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch (error) { return; }
      if (data && typeof data.server_time === "number") state.skew = data.server_time - Date.now() / 1000;
      fn(data || {});
      if (rerender) render();
    });
  }
  // Other page sections (their own files under /_router/) follow the same stream:
  // window.ocrDashboard.on(eventName, fn) calls fn(data, routerFacts) for every such event,
  // the snapshot included, across reconnects. They add their own <section> to <main>, after this one.
  const extensions = [];
  window.ocrDashboard = {
    on(name, fn) {
      extensions.push([name, fn]);
      if (source) listen(source, name, fn);
    },
    router() { return state.router || {}; },
  };
  function listen(target, name, fn) {
    target.addEventListener(name, (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch (error) { return; }
      try { fn(data || {}, state.router || {}); } catch (error) { console.error(error); }
    });
  }
  function connect() {
    if (source) source.close();
    source = new EventSource("/api/events");
    for (const [name, fn] of extensions) listen(source, name, fn);
    source.onopen = () => { setConnection("live", "pill-live"); $("notice").hidden = true; };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. a proxy answered an error page): try again ourselves.
        setConnection("offline, retrying", "pill-bad");
        setTimeout(connect, RECONNECT_MS);
      } else {
        setConnection("reconnecting…", "pill-wait");
      }
      const notice = $("notice");
      notice.textContent = "Lost the connection to the router; the list below may be out of date. Reconnecting by itself.";
      notice.hidden = false;
    };
    handle("snapshot", (data) => {
      state.router = data.router && typeof data.router === "object" ? data.router : {};
      state.backends = new Map();
      for (const backend of Array.isArray(data.backends) ? data.backends : []) {
        if (backend && typeof backend.slug === "string") state.backends.set(backend.slug, backend);
      }
      if (Array.isArray(data.agents)) {
        // Compared with what the page knew before a reconnect, so that a change meanwhile is news.
        takeAgents(data.agents);
        const listed = new Set(data.agents.map((entry) => entry && entry.slug));
        for (const slug of [...state.agents.keys()]) if (!listed.has(slug)) state.agents.delete(slug);
      } else {
        state.agents = new Map();
      }
      pollInstances();
    });
    const upsert = (data) => {
      if (data.backend && typeof data.backend.slug === "string") state.backends.set(data.backend.slug, data.backend);
    };
    handle("added", upsert);
    handle("updated", upsert);
    handle("removed", (data) => {
      if (data.backend) { state.backends.delete(str(data.backend.slug)); state.agents.delete(str(data.backend.slug)); }
    });
    handle("agents", (data) => takeAgents(data.agents));
    handle("seen", (data) => {
      for (const [slug, when] of Object.entries(data.last_seen || {})) {
        const backend = state.backends.get(slug);
        if (backend && typeof when === "number") backend.last_seen_unix = when;
        // Only the time changes: update it in place rather than rebuild rows under the pointer.
        const row = [...document.querySelectorAll("#rows tr[data-slug]")].find((r) => r.getAttribute("data-slug") === slug);
        const node = row && row.querySelector("td[data-label='Seen'] .ago");
        if (node && typeof when === "number") { node.setAttribute("data-since", String(when)); node.textContent = ago(when); }
      }
    }, false);
    handle("instances", (data) => {
      state.instances = Array.isArray(data.instances) ? data.instances : state.instances;
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const filter = $("filter");
    filter.addEventListener("input", () => { state.filter = filter.value; render(); });
    document.addEventListener("keydown", (event) => {
      if (event.key === "/" && document.activeElement !== filter && !(event.target instanceof HTMLInputElement)) {
        event.preventDefault();
        filter.focus();
      } else if (event.key === "Escape" && document.activeElement === filter) {
        filter.value = "";
        state.filter = "";
        render();
      }
    });
    $("notify").addEventListener("click", toggleNotifications);
    renderNotifyButton();
    connect();
    setInterval(tick, 1000);
  });
})();
