// "On the network": the LAN directory (GET /api/lan), live from the dashboard's event stream.
// The snapshot carries the whole view (data.lan); "lan" events carry batches of changes
// ({upsert: [...], remove: [ids]}). Everything here was announced by other machines and is
// hostile data: it reaches the page only as text nodes, and links only as validated URLs.
"use strict";

(function () {
  const URL_OK = /^http:\/\/(\[[0-9A-Fa-f:.]+\]|[0-9.]+|[A-Za-z0-9_.-]+):[0-9]{1,5}\/([a-z0-9][a-z0-9-]*\/)?$/;
  const entries = new Map();   // id -> entry JSON
  let enabled = false;

  const { el, str } = window.OpenCodeRouterDOM;

  function link(kind, url) {
    const text = str(url);
    if (!URL_OK.test(text)) return null;
    return el("div", { class: "lan-link" }, el("span", { class: "lan-link-kind" }, kind),
      el("a", { href: text, class: `lan-${kind}`, rel: "noreferrer" }, text.replace(/^http:\/\//, "")));
  }
  function row(entry) {
    const router = entry.behind_router === true;
    const name = router ? (str(entry.project_name) || str(entry.instance)) : str(entry.instance);
    const project = el("td", { class: "lan-project" }, el("div", { class: "project-name" }, name));
    if (entry.project_path) project.append(el("div", { class: "project-path mono" }, str(entry.project_path)));
    const kind = router ? el("span", { class: "pill lan-router" }, "via router")
      : el("span", { class: "pill lan-plain", title: "opencode serve --mdns: no router in front of it" }, "not behind a router");
    const links = el("td", { class: "lan-links" }, link(router ? "path" : "direct", entry.url),
      router ? link("LAN", entry.host_url) : null);
    return el("tr", { "data-lan-id": str(entry.id) },
      project, el("td", {}, str(entry.owner) || "—"), el("td", {}, kind), el("td", {}, str(entry.version)), links);
  }
  function render() {
    const section = document.getElementById("lan");
    if (!section) return;
    section.hidden = !enabled;
    if (!enabled) return;
    const groups = new Map();
    const sorted = [...entries.values()].sort((a, b) =>
      str(a.addresses && a.addresses[0]).localeCompare(str(b.addresses && b.addresses[0])) || (a.port - b.port)
      || str(a.instance).localeCompare(str(b.instance)));
    for (const entry of sorted) {
      const address = Array.isArray(entry.addresses) && entry.addresses.length ? str(entry.addresses[0]) : "?";
      if (!groups.has(address)) groups.set(address, []);
      groups.get(address).push(entry);
    }
    const parts = [el("h2", { id: "lan-title" }, "On the network")];
    const count = entries.size;
    parts.push(el("p", { class: "muted lan-summary" }, count
      ? `${count} service${count === 1 ? "" : "s"} on ${groups.size} other machine${groups.size === 1 ? "" : "s"}`
      : "Nothing announced by other machines yet."));
    for (const [address, listed] of groups) {
      const names = [...new Set(listed.map((e) => str(e.host)).filter(Boolean))].slice(0, 3);
      const body = el("tbody", {}, ...listed.map(row));
      parts.push(el("div", { class: "lan-host", "data-address": address },
        el("h3", {}, address, names.length ? el("span", { class: "muted" }, ` · ${names.join(", ")}`) : null),
        el("table", { class: "lan-table" },
          el("thead", {}, el("tr", {}, ...["Project", "Owner", "Kind", "Version", "Open"].map((h) => el("th", { scope: "col" }, h)))),
          body)));
    }
    section.replaceChildren(...parts);
  }

  window.ocrDashboard.on("snapshot", (data) => {
    enabled = Boolean(data.router && data.router.lan);
    entries.clear();
    const hosts = data.lan && Array.isArray(data.lan.hosts) ? data.lan.hosts : [];
    for (const host of hosts) {
      for (const entry of Array.isArray(host && host.entries) ? host.entries : []) {
        if (entry && typeof entry.id === "string") entries.set(entry.id, entry);
      }
    }
    render();
  });
  window.ocrDashboard.on("lan", (data) => {
    for (const id of Array.isArray(data.remove) ? data.remove : []) entries.delete(str(id));
    for (const entry of Array.isArray(data.upsert) ? data.upsert : []) {
      if (entry && typeof entry.id === "string") entries.set(entry.id, entry);
    }
    render();
  });
})();
