// OpenCodeRouter dashboard, Tasks section: the router's autodispatch (GET /api/tasks, then the
// "task" events of the dashboard's one event stream via window.ocrDashboard.on).
// Task titles, answers and errors are hostile data: they reach the page only as text nodes.
"use strict";

(function () {
  const STATES = ["running", "queued", "failed", "done"];
  const ID = /^t[0-9a-f]{6,32}$/;
  const SESSION_LINK = /^http:\/\/[a-z0-9][a-z0-9.-]*\.localhost(:\d{1,5})?\/[A-Za-z0-9_-]+\/session\/ses_[A-Za-z0-9]+$/;
  const tasks = new Map(); // id -> task JSON
  let section = null;
  let skew = 0; // server clock minus ours, seconds
  let loaded = 0; // which load() answer is the latest

  const { el, str } = window.OpenCodeRouterDOM;

  function duration(task) {
    let seconds = typeof task.duration_s === "number" ? task.duration_s : null;
    if (task.state === "running" && task.started) {
      const started = Date.parse(task.started) / 1000;
      if (!Number.isNaN(started)) seconds = Math.max(0, Date.now() / 1000 + skew - started);
    }
    if (seconds === null) return "";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${Math.floor(seconds % 60)} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  // The link the router wrote uses its own port; this browser may reach it on another (a tunnel).
  function sessionLink(task) {
    const link = str(task.link);
    if (!SESSION_LINK.test(link)) return null;
    const url = new URL(link);
    url.port = location.port;
    return url.href;
  }

  function build() {
    section = el("section", { id: "tasks", class: "tasks", hidden: "", "aria-labelledby": "tasks-title" },
      el("h2", { id: "tasks-title", text: "Tasks" }),
      el("p", { id: "tasks-counts", class: "tasks-counts muted" }),
      el("p", { id: "tasks-error", class: "tasks-error", hidden: "" }),
      el("table", { class: "tasks-table" },
        el("thead", {}, el("tr", {}, ...["State", "Task", "Project", "Session", "Duration", "Outcome"]
          .map((name) => el("th", { scope: "col", text: name })))),
        el("tbody", { id: "tasks-rows" })),
      el("p", { id: "tasks-empty", class: "muted", hidden: "",
        text: "No tasks yet. Drop a Markdown file with 'project:' front matter in the tasks folder, " +
              "or POST it to /api/tasks." }));
    (document.querySelector("main") || document.body).append(section);
  }

  function row(task) {
    const state = STATES.includes(task.state) ? task.state : "queued";
    const title = str(task.title) || str(task.ref) || str(task.id);
    const where = [str(task.source), str(task.ref)].filter(Boolean).join(" · ");
    const link = sessionLink(task);
    const session = task.session_id
      ? (link ? el("a", { href: link, rel: "noreferrer", text: "open" }) : el("span", { class: "mono", text: str(task.session_id) }))
      : "";
    let outcome = "";
    if (task.error) {
      outcome = el("span", { class: "tasks-failure", text: str(task.error) });
    } else if (task.text) {
      outcome = el("details", {}, el("summary", { text: str(task.text).split("\n")[0].slice(0, 80) || "answer" }),
        el("pre", { class: "tasks-answer", text: str(task.text) + (task.text_cut ? "\n[… the rest: /api/tasks/" + str(task.id) + "]" : "") }));
    } else if (task.waiting) {
      outcome = el("span", { class: "muted", text: str(task.waiting) });
    }
    const report = task.report_error ? el("div", { class: "tasks-failure", text: `write-back: ${str(task.report_error)}` }) : null;
    return el("tr", { "data-id": str(task.id) },
      el("td", {}, el("span", { class: `pill task-${state}`, text: state })),
      el("td", {}, el("div", { class: "tasks-title", text: title }), el("div", { class: "muted", text: where })),
      el("td", { text: str(task.slug) || str(task.project) }),
      el("td", {}, session),
      el("td", { class: "tasks-duration", text: duration(task) }),
      el("td", {}, outcome, report));
  }

  function render() {
    const list = [...tasks.values()].sort((a, b) => str(a.created).localeCompare(str(b.created))).reverse();
    const counts = STATES.map((name) => `${list.filter((t) => t.state === name).length} ${name}`);
    document.getElementById("tasks-counts").textContent = counts.join(" · ");
    document.getElementById("tasks-rows").replaceChildren(...list.map(row));
    document.getElementById("tasks-empty").hidden = list.length > 0;
  }

  function showError(message) {
    const node = document.getElementById("tasks-error");
    node.textContent = message;
    node.hidden = !message;
  }

  function load() {
    const mine = ++loaded;
    fetch("/api/tasks", { headers: { accept: "application/json" }, credentials: "same-origin" })
      .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`GET /api/tasks answered ${response.status}`))))
      .then((list) => {
        if (mine !== loaded) return;
        tasks.clear();
        for (const task of Array.isArray(list) ? list : []) remember(task);
        showError("");
        render();
      })
      .catch((error) => showError(`Could not read the tasks: ${error.message}`));
  }

  function remember(task) {
    if (task && typeof task === "object" && ID.test(str(task.id))) tasks.set(task.id, task);
  }

  function show(router) {
    const on = Boolean(router && router.tasks);
    section.hidden = !on;
    if (on) load();
  }

  function start() {
    if (!window.ocrDashboard) return; // the main dashboard script did not run
    build();
    window.ocrDashboard.on("snapshot", (data) => {
      if (data && typeof data.server_time === "number") skew = data.server_time - Date.now() / 1000;
      show(data && data.router);
    });
    window.ocrDashboard.on("task", (data) => {
      if (data && typeof data.server_time === "number") skew = data.server_time - Date.now() / 1000;
      remember(data && data.task);
      if (!section.hidden) render();
    });
    if (window.ocrDashboard.router().tasks) show(window.ocrDashboard.router());
    // Running tasks' durations count up.
    setInterval(() => {
      for (const node of section.querySelectorAll("tr[data-id]")) {
        const task = tasks.get(node.getAttribute("data-id"));
        if (task && task.state === "running") node.querySelector(".tasks-duration").textContent = duration(task);
      }
    }, 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
