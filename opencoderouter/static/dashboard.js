// OpenCodeRouter dashboard: follows GET /api/events (SSE) and renders every backend.
// Everything that comes from a backend is hostile data: it only ever reaches the page as
// text nodes (textContent) or as validated URL parts, never as markup.
"use strict";

(function () {
  const SLUG = /^[a-z0-9][a-z0-9-]*$/;
  const LABEL = /^[a-z0-9][a-z0-9.-]*$/i;
  const INSTANCE_POLL_MS = 3000;
  const RECONNECT_MS = 3000;

  const state = {
    router: null,            // facts from the snapshot
    backends: new Map(),     // slug -> backend JSON
    instances: null,         // launcher instances (array) or null when there is no launcher
    skew: 0,                 // server clock minus ours, seconds
    openLogs: new Set(),     // instance keys whose log expander is open
    actionErrors: new Map(), // instance key -> last start/stop error sentence
  };
  let source = null;
  let instanceTimer = null;
  let lastInstancesText = null;

  // -- small DOM helpers (text only) ---------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const $ = (id) => document.getElementById(id);
  const str = (value) => (typeof value === "string" ? value : value === undefined || value === null ? "" : String(value));
  const now = () => Date.now() / 1000 + state.skew;

  function ago(unix) {
    if (typeof unix !== "number") return "";
    const seconds = Math.max(0, Math.round(now() - unix));
    if (seconds < 60) return `${seconds} s ago`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ago`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return `${hours} h ago`;
    return `${Math.floor(hours / 24)} days ago`;
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
  function links(backend) {
    const out = [];
    const label = hostName(backend);
    const routerPort = state.router && state.router.listen_port ? state.router.listen_port : location.port;
    if (label) {
      // .local: other machines on the LAN reach the router's real port (only when they can:
      // mDNS on and the router listening beyond the loopback).
      if (state.router && state.router.lan_links && backend.mdns_name) {
        out.push(["LAN", `http://${label}.local${portSuffix(routerPort)}/`]);
      }
      // .localhost: this browser's own way in (an SSH tunnel's local port, or the router's).
      const hereLabel = str(backend.host_label) && LABEL.test(backend.host_label) ? backend.host_label : label;
      out.push(["tunnel", `http://${hereLabel}.localhost${portSuffix(location.port)}/`]);
    }
    if (SLUG.test(str(backend.slug))) {
      out.push(["path", `${location.origin}/${encodeURIComponent(backend.slug)}/`]);
    }
    return out;
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

  // -- rendering -----------------------------------------------------------------
  function cell(label, ...children) {
    return el("td", { "data-label": label }, ...children);
  }
  function statusOf(backend, instance) {
    const managedState = instance ? str(instance.state) : "";
    if (managedState === "restarting" || managedState === "failed" || managedState === "starting") return managedState;
    return backend.up ? "up" : "down";
  }
  function backendRow(backend) {
    const instance = instanceFor(backend);
    const status = statusOf(backend, instance);
    const row = el("tr", { class: backend.up ? "is-up" : "is-down", "data-slug": str(backend.slug) });
    const statusCell = cell("Status", el("span", { class: `pill st-${status}` }, status));
    // A password-protected backend (the router holds no credentials for it) is listed but locked.
    if (backend.locked === true) statusCell.append(el("span", { class: "pill locked", title: "needs the backend's password" }, "locked"));
    row.append(statusCell);
    const project = el("div", {},
      el("div", { class: "project-name" }, backend.project_path === null ? "password-protected server" : str(backend.project_name)),
      backend.project_path === null
        ? el("div", { class: "project-path unlock" },
          "Unknown project: start the router with --opencode-password-file FILE (the server's OPENCODE_SERVER_PASSWORD) to open it.")
        : el("div", { class: "project-path mono" }, str(backend.project_path)));
    if (instance) project.append(managedBlock(instance));
    row.append(cell("Project", project));
    const owner = str(backend.owner);
    row.append(cell("Slug", el("div", {}, el("code", {}, str(backend.slug)), owner ? el("div", { class: "muted" }, owner) : null)));
    row.append(cell("Version", str(backend.version)));
    row.append(cell("Port", str(backend.port)));
    row.append(cell("Last seen", el("span", { class: "ago", "data-since": String(Number(backend.last_seen_unix) || "") }, ago(backend.last_seen_unix))));
    const box = el("div", { class: "links" });
    for (const [kind, url] of links(backend)) {
      box.append(el("div", { class: "link-line" },
        el("span", { class: "link-kind" }, kind),
        el("a", { href: url, class: `link-${kind}`, rel: "noreferrer" }, url.replace(/^https?:\/\//, "")),
        copyButton(url, `${kind} link`)));
    }
    row.append(cell("Open", box));
    return row;
  }
  function instanceOnlyRow(instance) {
    // A managed instance not (yet, or no longer) answering: starting, failed, stopped.
    const stateName = str(instance.state) || "unknown";
    const row = el("tr", { class: "is-down", "data-instance": instanceKey(instance) });
    row.append(cell("Status", el("span", { class: `pill st-${/^[a-z]+$/.test(stateName) ? stateName : "unknown"}` }, stateName)));
    const directory = str(instance.directory);
    const name = directory.replace(/\/+$/, "").split("/").pop() || directory;
    row.append(cell("Project", el("div", {}, el("div", { class: "project-name" }, name),
      el("div", { class: "project-path mono" }, directory), managedBlock(instance))));
    row.append(cell("Slug", el("code", {}, str(instance.slug))));
    row.append(cell("Version", ""));
    row.append(cell("Port", str(instance.port)));
    row.append(cell("Last seen", ""));
    row.append(cell("Open", el("span", { class: "muted" }, "not answering yet")));
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
    $("counts").textContent = counts;
    document.title = `OpenCodeRouter (${up} up)`;
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
  function render() {
    renderHeader();
    const rows = $("rows");
    const backends = [...state.backends.values()].sort((a, b) => str(a.slug).localeCompare(str(b.slug)));
    const fresh = backends.map(backendRow);
    if (Array.isArray(state.instances)) {
      for (const instance of state.instances) {
        if (!instance || typeof instance !== "object") continue;
        const matched = backends.some((b) => instance.slug === b.slug || instance.directory === b.project_path);
        if (!matched) fresh.push(instanceOnlyRow(instance));
      }
    }
    rows.replaceChildren(...fresh);
    renderEmpty(fresh.length === 0);
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
  // the snapshot included, across reconnects.
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
      pollInstances();
    });
    const upsert = (data) => {
      if (data.backend && typeof data.backend.slug === "string") state.backends.set(data.backend.slug, data.backend);
    };
    handle("added", upsert);
    handle("updated", upsert);
    handle("removed", (data) => { if (data.backend) state.backends.delete(str(data.backend.slug)); });
    handle("seen", (data) => {
      for (const [slug, when] of Object.entries(data.last_seen || {})) {
        const backend = state.backends.get(slug);
        if (backend && typeof when === "number") backend.last_seen_unix = when;
        // Only the time changes: update it in place rather than rebuild rows under the pointer.
        const row = [...document.querySelectorAll("#rows tr[data-slug]")].find((r) => r.getAttribute("data-slug") === slug);
        const node = row && row.querySelector(".ago");
        if (node && typeof when === "number") { node.setAttribute("data-since", String(when)); node.textContent = ago(when); }
      }
    }, false);
    handle("instances", (data) => {
      state.instances = Array.isArray(data.instances) ? data.instances : state.instances;
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    connect();
    setInterval(tick, 1000);
  });
})();
