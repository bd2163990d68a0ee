// The dcm-scheduler dashboard: sessions, one session's job DAG, how each
// service's jobs do, the channels (pause and resume) and the cohort runs.
//
// Plain JavaScript over the JSON API of the same server (no build step); the
// DAG is laid out by dagre (vendor/dagre.min.js, see vendor/README.md).
// Routes: #/ (sessions, filters in the hash query), #/sessions/<id>,
// #/services (the period in the hash query), #/channels and #/cohorts. Writes send the API token as a
// bearer token; it is asked for once and kept in localStorage. Pages refresh
// while they are open: every second or two while work is running.
"use strict";

(() => {
  const TOKEN_KEY = "dcm-scheduler.api-token";
  const ACTIVE_SESSION = new Set(["planning", "running"]);
  const ACTIVE_JOB = new Set(["queued", "running"]);
  const RETRYABLE_JOB = new Set(["failed", "cancelled"]);
  const SESSION_STATUSES = [
    "planning", "running", "succeeded", "failed", "partial", "cancelled", "empty",
  ];
  const FAST_POLL_MS = 1000;
  const LIST_POLL_MS = 5000;
  const SLOW_POLL_MS = 10000;
  const STATS_POLL_MS = 30000; // the statistics read every job of the period
  const PAGE_SIZE = 50;
  const NODE_W = 196;
  const NODE_H = 66;
  const RANK_SEP = 72;
  const NODE_SEP = 26;
  const EDGE_SEP = 14;
  const PAD = 16;
  const PERIODS = { "24h": 24 * 3600, "7d": 7 * 24 * 3600, "30d": 30 * 24 * 3600, all: null };

  const view = document.getElementById("view");
  let routeId = 0; // bumped on every navigation: stale refreshes stop
  let pollTimer = null;
  let lastDocument = "";
  const detailState = new Map(); // <details data-key> → open, as the user left it

  // ---------------------------------------------------------------- DOM

  function el(tag, attrs, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  function svg(tag, attrs, ...children) {
    return build(document.createElementNS("http://www.w3.org/2000/svg", tag), attrs, children);
  }

  function build(node, attrs, children) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith("on") && typeof value === "function") {
        node.addEventListener(key.slice(2), value);
      } else if (key === "text") {
        node.textContent = String(value);
      } else {
        node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function badge(status) {
    return el("span", { class: `badge status-${status}`, "data-status": status, text: status });
  }

  function urgentBadge(title) {
    return el("span", { class: "badge urgent", "data-urgent": "true", title, text: "urgent" });
  }

  function cohortLink(name) {
    // A cohort's name leads to its sessions (README, "Cohort runs").
    return el("a", {
      class: "cohort-link", "data-cohort": name, href: `#/?cohort=${encodeURIComponent(name)}`,
      title: `the sessions of cohort ${name}`, text: name,
    });
  }

  function short(id) {
    return (id || "").slice(0, 8);
  }

  function when(iso) {
    if (!iso) return el("span", { class: "muted", text: "—" });
    return el("time", { datetime: iso, title: iso, text: new Date(iso).toLocaleString() });
  }

  function seconds(value) {
    if (value === null || value === undefined) return "";
    if (value < 0.1) return "<0.1s";
    if (value < 60) return `${value < 10 ? value.toFixed(1) : Math.round(value)}s`;
    const minutes = Math.floor(value / 60);
    if (minutes < 60) return `${minutes}m ${String(Math.round(value % 60)).padStart(2, "0")}s`;
    return `${Math.floor(minutes / 60)}h ${String(minutes % 60).padStart(2, "0")}m`;
  }

  function elapsed(start, end) {
    if (!start) return null;
    const stop = end ? Date.parse(end) : Date.now();
    return Math.max(0, (stop - Date.parse(start)) / 1000);
  }

  function jobDuration(job) {
    if (job.duration_s !== null && job.duration_s !== undefined) return job.duration_s;
    return job.status === "running" ? elapsed(job.started_at, null) : null;
  }

  function remembered(details, openByDefault = false) {
    // Pages are redrawn every second while jobs run: keep what the user opened.
    const key = details.getAttribute("data-key");
    details.open = detailState.has(key) ? detailState.get(key) : openByDefault;
    details.addEventListener("toggle", () => detailState.set(key, details.open));
    return details;
  }

  let toastTimer = null;
  function toast(message, kind = "info") {
    const box = document.getElementById("toast");
    box.textContent = message;
    box.className = `toast ${kind}`;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  // -------------------------------------------------------------- token

  let tokenRequest = null;

  function storedToken() {
    try {
      return localStorage.getItem(TOKEN_KEY) || "";
    } catch (_error) {
      return "";
    }
  }

  function askToken(reason) {
    if (tokenRequest) return tokenRequest;
    const dialog = document.getElementById("token-dialog");
    const input = document.getElementById("token-input");
    document.getElementById("token-reason").textContent = reason
      || "Retry, cancel and other writes need the server's DCM_API_TOKEN. "
        + "It is kept in this browser only (localStorage).";
    input.value = "";
    dialog.hidden = false;
    input.focus();
    tokenRequest = new Promise((resolve) => {
      const form = document.getElementById("token-form");
      const done = (token) => {
        dialog.hidden = true;
        form.removeEventListener("submit", onSave);
        form.removeEventListener("keydown", onKey);
        document.getElementById("token-cancel").removeEventListener("click", onCancel);
        tokenRequest = null;
        resolve(token);
      };
      const onSave = (event) => {
        event.preventDefault();
        const token = input.value.trim();
        if (!token) return;
        localStorage.setItem(TOKEN_KEY, token);
        done(token);
      };
      const onCancel = () => done(null);
      const onKey = (event) => { if (event.key === "Escape") onCancel(); };
      form.addEventListener("keydown", onKey);
      form.addEventListener("submit", onSave);
      document.getElementById("token-cancel").addEventListener("click", onCancel);
    });
    return tokenRequest;
  }

  document.getElementById("token-button").addEventListener("click", () => {
    askToken().then((token) => { if (token) toast("API token saved in this browser"); });
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    document.getElementById("token-cancel").click();
    toast("API token forgotten");
  });

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function detailOf(data, fallback) {
    if (!data || data.detail === undefined) return fallback;
    if (typeof data.detail === "string") return data.detail;
    return data.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }

  async function api(path, { method = "GET", body, asked = false } = {}) {
    const headers = { Accept: "application/json" };
    const token = storedToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    let data = null;
    try {
      data = await response.json();
    } catch (_error) {
      data = null;
    }
    if (response.status === 401 && !asked) {
      const reason = token
        ? "The server refused the saved token: enter the current DCM_API_TOKEN."
        : "This server needs the API token (DCM_API_TOKEN).";
      if (await askToken(reason)) return api(path, { method, body, asked: true });
    }
    if (!response.ok) {
      throw new ApiError(response.status, detailOf(data, `${response.status} ${response.statusText}`));
    }
    return data;
  }

  async function write(path, success, body) {
    if (!storedToken() && !(await askToken())) return false;
    try {
      const data = await api(path, { method: "POST", body });
      toast(success(data), "ok");
      return true;
    } catch (error) {
      toast(error.message, "error");
      return false;
    }
  }

  // ------------------------------------------------------------- health

  async function refreshHealth() {
    const box = document.getElementById("health");
    try {
      const response = await fetch("/api/health", {
        headers: storedToken() ? { Authorization: `Bearer ${storedToken()}` } : {},
        cache: "no-store",
      });
      const data = await response.json();
      const parts = [data.ok ? "store ok" : "store unreachable"];
      if (data.services !== undefined) parts.push(`${data.services} service(s)`);
      if (data.problems) parts.push(`${data.problems} problem(s)`);
      box.textContent = parts.join(" · ");
      box.className = `health ${data.ok && !data.problems ? "ok" : "bad"}`;
    } catch (_error) {
      box.textContent = "server unreachable";
      box.className = "health bad";
    }
    setTimeout(refreshHealth, 15000);
  }

  // ------------------------------------------------------------- router

  function route() {
    routeId += 1;
    clearTimeout(pollTimer);
    lastDocument = "";
    view.replaceChildren(el("p", { class: "muted", text: "loading…" }));
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    const match = path.match(/^\/sessions\/([^/]+)$/);
    const page = { "/services": "services", "/channels": "channels", "/cohorts": "cohorts" }[path];
    markNav(match ? "sessions" : page || "sessions");
    if (match) {
      showSession(decodeURIComponent(match[1]), routeId);
    } else if (page === "services") {
      showServices(new URLSearchParams(query || ""), routeId);
    } else if (page === "channels") {
      showChannels(routeId);
    } else if (page === "cohorts") {
      showCohorts(routeId);
    } else {
      showSessions(new URLSearchParams(query || ""), routeId);
    }
  }

  function markNav(page) {
    for (const link of document.querySelectorAll("[data-nav]")) {
      if (link.getAttribute("data-nav") === page) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  function poll(fn, ms, id) {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(() => { if (id === routeId) fn(); }, ms);
  }

  function failure(error, id, retry) {
    if (id !== routeId) return;
    lastDocument = "";
    view.replaceChildren(el("p", { class: "banner error", text: error.message }));
    if (!(error instanceof ApiError) || error.status >= 500) poll(retry, 3000, id);
  }

  // ----------------------------------------------------------- sessions

  async function showSessions(params, id) {
    const filters = {
      status: params.get("status") || "",
      event: params.get("event") || "",
      q: params.get("q") || "",
      uid: params.get("uid") || "", // links made before the search box
      cohort: params.get("cohort") || "",
      urgent: params.get("urgent") === "true" ? "true" : "",
      offset: Math.max(0, Number(params.get("offset")) || 0),
    };
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(filters.offset) });
    for (const key of ["status", "event", "q", "uid", "cohort", "urgent"]) {
      if (filters[key]) query.set(key, filters[key]);
    }
    let rows;
    try {
      rows = await api(`/api/sessions?${query}`);
    } catch (error) {
      failure(error, id, () => showSessions(params, id));
      return;
    }
    if (id !== routeId) return;
    const text = JSON.stringify(rows);
    if (!view.querySelector("#sessions-view")) renderSessionsPage(filters);
    if (text !== lastDocument || !view.querySelector("#sessions")) {
      lastDocument = text;
      renderSessions(rows, filters);
    }
    const stamp = document.getElementById("sessions-updated");
    stamp.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    stamp.setAttribute("data-updated", String(Date.now()));
    // New sessions arrive all the time: the list follows them under its filters.
    const busy = rows.some((row) => ACTIVE_SESSION.has(row.status));
    poll(() => showSessions(params, id), busy ? FAST_POLL_MS * 2 : LIST_POLL_MS, id);
  }

  function go(filters) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(filters)) if (value) query.set(key, value);
    const text = query.toString();
    location.hash = text ? `#/?${text}` : "#/";
  }

  function renderSessionsPage(filters) {
    // The filters are drawn once per route, so a refresh never eats what is typed.
    const status = el("select", { id: "filter-status", name: "status", title: "status" },
      el("option", { value: "", text: "any status" }),
      SESSION_STATUSES.map((s) => el("option", { value: s, selected: s === filters.status, text: s })));
    const q = el("input", {
      id: "filter-q", name: "q", type: "search", value: filters.q,
      placeholder: "patient ID or name, study UID, description, accession", size: 48,
    });
    const event = el("input", {
      id: "filter-event", name: "event", type: "search", value: filters.event,
      placeholder: "event", size: 16, list: "known-events",
    });
    const events = el("datalist", { id: "known-events" });
    knownEvents().then((names) => {
      events.replaceChildren(...names.map((name) => el("option", { value: name })));
    });
    const urgent = el("input", {
      id: "filter-urgent", name: "urgent", type: "checkbox", checked: filters.urgent === "true",
    });
    const cohort = el("input", {
      id: "filter-cohort", name: "cohort", type: "search", value: filters.cohort,
      placeholder: "cohort", size: 14,
    });
    const form = el("form", {
      class: "filters",
      onsubmit: (e) => {
        e.preventDefault();
        go({
          status: status.value, q: q.value.trim(), event: event.value.trim(), uid: filters.uid,
          cohort: cohort.value.trim(), urgent: urgent.checked ? "true" : "",
        });
      },
    }, status, q, event, events, cohort,
    el("label", { class: "check" }, urgent, " urgent only"),
    el("button", { type: "submit", text: "Search" }),
    el("button", { type: "button", class: "quiet", text: "Clear", onclick: () => go({}) }),
    filters.uid ? el("span", { class: "muted", text: `uid = ${filters.uid}` }) : null,
    el("span", { id: "sessions-updated", class: "muted live" }));
    status.addEventListener("change", () => form.requestSubmit());
    event.addEventListener("change", () => form.requestSubmit());
    urgent.addEventListener("change", () => form.requestSubmit());
    view.replaceChildren(el("section", { class: "sessions", id: "sessions-view" },
      el("h1", { text: "Sessions" }), form, el("div", { id: "sessions-list" })));
  }

  async function knownEvents() {
    // The events the loaded services listen to, offered in the event filter.
    const names = new Set(["study.stable", "series.stable", "patient.stable"]);
    try {
      const report = await api("/api/services");
      for (const service of report.services) {
        for (const job of service.jobs) for (const name of job.events) names.add(name);
      }
    } catch (_error) {
      // The filter works without suggestions.
    }
    return [...names].sort();
  }

  function renderSessions(rows, filters) {
    const body = rows.map((row) => el("tr", {
      "data-session": row.id, "data-status": row.status, "data-urgent": row.urgent ? "true" : null,
    },
      el("td", {}, el("a", { href: `#/sessions/${row.id}`, class: "mono", text: short(row.id) })),
      el("td", {}, badge(row.status), row.urgent ? [" ", urgentBadge()] : null),
      el("td", { text: row.event }),
      el("td", { class: "cohort" }, row.cohort ? cohortLink(row.cohort) : null),
      el("td", { text: row.level }),
      el("td", { class: "uid mono", title: row.uid, text: row.uid }),
      el("td", { class: "num", text: row.revision }),
      el("td", {}, when(row.created_at)),
      el("td", {}, when(row.finished_at)),
      el("td", { class: "num", text: seconds(elapsed(row.created_at, row.finished_at)) })));
    const table = el("table", { id: "sessions", class: "grid" },
      el("thead", {}, el("tr", {},
        ["session", "status", "event", "cohort", "level", "uid", "rev", "created", "finished",
          "took"].map((h) => el("th", { text: h })))),
      el("tbody", {}, body.length ? body
        : el("tr", {}, el("td", { colspan: 10, class: "muted", text: "no session matches" }))));
    const pager = el("div", { class: "pager" },
      el("button", {
        type: "button", class: "quiet", disabled: filters.offset === 0, text: "← newer",
        onclick: () => go({ ...filters, offset: Math.max(0, filters.offset - PAGE_SIZE) }),
      }),
      el("span", {
        class: "muted",
        text: rows.length ? `${filters.offset + 1}–${filters.offset + rows.length}` : "",
      }),
      el("button", {
        type: "button", class: "quiet", disabled: rows.length < PAGE_SIZE, text: "older →",
        onclick: () => go({ ...filters, offset: filters.offset + PAGE_SIZE }),
      }));
    document.getElementById("sessions-list").replaceChildren(table, pager);
  }

  // ------------------------------------------------------------ session

  async function showSession(sessionId, id) {
    let doc;
    try {
      doc = await api(`/api/sessions/${encodeURIComponent(sessionId)}`);
    } catch (error) {
      failure(error, id, () => showSession(sessionId, id));
      return;
    }
    if (id !== routeId) return;
    const busy = ACTIVE_SESSION.has(doc.status) || doc.jobs.some((j) => ACTIVE_JOB.has(j.status));
    const text = JSON.stringify(doc);
    if (text !== lastDocument || busy) {
      lastDocument = text;
      renderSession(doc, () => showSession(sessionId, id));
    }
    poll(() => showSession(sessionId, id), busy ? FAST_POLL_MS : SLOW_POLL_MS, id);
  }

  function renderSession(doc, refresh) {
    const failed = doc.jobs.filter((j) => RETRYABLE_JOB.has(j.status));
    const retrySession = el("button", {
      type: "button", id: "retry-session", "data-action": "retry-session",
      disabled: failed.length === 0, text: "Retry failed jobs",
      onclick: async () => {
        if (await write(`/api/sessions/${doc.id}/retry`,
          (r) => `requeued ${r.requeued.join(", ") || "nothing"}`)) refresh();
      },
    });
    const cancel = el("button", {
      type: "button", id: "cancel-session", class: "danger", "data-action": "cancel-session",
      disabled: !ACTIVE_SESSION.has(doc.status) && !doc.jobs.some((j) => ACTIVE_JOB.has(j.status)),
      text: "Cancel session",
      onclick: async () => {
        if (!window.confirm(`Cancel session ${short(doc.id)}? Running jobs are stopped.`)) return;
        if (await write(`/api/sessions/${doc.id}/cancel`,
          (r) => `cancelled ${r.cancelled.length} job(s)`
            + (r.stopped.length ? `, stopping ${r.stopped.join(", ")}` : ""))) refresh();
      },
    });
    const facts = el("dl", { class: "facts" },
      fact("event", doc.event), fact("level", doc.level),
      fact("uid", el("span", { class: "mono", text: doc.uid })),
      fact("revision", doc.revision), fact("created", when(doc.created_at)),
      fact("planned", when(doc.planned_at)), fact("finished", when(doc.finished_at)),
      fact("took", seconds(elapsed(doc.created_at, doc.finished_at))),
      doc.trigger ? fact("trigger", "manual") : null,
      doc.cohort ? fact("cohort", cohortLink(doc.cohort)) : null);
    const trace = doc.trace || {};
    const why = trace.urgent || [];
    const traced = trace.jobs || {};
    view.replaceChildren(el("section", {
      class: "session", id: "session", "data-session": doc.id, "data-status": doc.status,
    },
    el("p", {}, el("a", { href: "#/", text: "← sessions" })),
    el("div", { class: "session-head" },
      el("h1", {}, "Session ", el("code", { title: doc.id, text: short(doc.id) }), " ",
        el("span", { id: "session-status" }, badge(doc.status)),
        doc.urgent ? [" ", urgentBadge(why.join("\n"))] : null),
      el("div", { class: "actions" }, retrySession, cancel)),
    facts,
    doc.urgent ? el("div", { class: "banner urgent", id: "urgent-why" },
      el("strong", { text: "Urgent: " }), "its jobs are sent ahead of normal work and ignore "
        + "off-peak windows.",
      why.length ? el("ul", {}, why.map((reason) => el("li", { text: reason }))) : null) : null,
    doc.error ? el("p", { class: "banner error", text: doc.error }) : null,
    el("h2", { text: `Jobs (${doc.jobs.length})` }),
    doc.jobs.length ? dag(doc.jobs) : el("p", { class: "muted", text: "no job was scheduled" }),
    legend(),
    doc.jobs.length ? edgeLegend() : null,
    el("div", { class: "jobs" }, doc.jobs.map((job) => jobCard(job, traced[job.job_name], refresh))),
    notScheduled(traced),
    notes("Warnings", trace.warnings), notes("Service problems", trace.service_problems)));
  }

  function fact(name, value) {
    return [el("dt", { text: name }), el("dd", {}, value)];
  }

  function legend() {
    return el("p", { class: "legend" },
      ["queued", "running", "succeeded", "failed", "upstream_failed", "cancelled"].map(badge));
  }

  function notes(title, items) {
    if (!items || !items.length) return null;
    return el("section", { class: "notes" }, el("h2", { text: title }),
      el("ul", {}, items.map((item) => el("li", { text: item }))));
  }

  function notScheduled(traced) {
    const skipped = Object.entries(traced).filter(([, entry]) => entry && !entry.scheduled);
    if (!skipped.length) return null;
    return el("section", { class: "not-scheduled" },
      el("h2", { text: `Not scheduled (${skipped.length})` }),
      el("ul", {}, skipped.map(([name, entry]) => el("li", { "data-trace-job": name },
        el("strong", { text: name }), " ",
        el("span", { class: "muted", text: `${entry.service || ""} · ${entry.phase || ""}` }), ": ",
        el("span", { class: "reason", text: entry.reason || "" }),
        entry.traceback ? remembered(el("details", { "data-key": `trace-${name}` },
          el("summary", { text: "traceback" }), el("pre", { text: entry.traceback }))) : null))));
  }

  // ---------------------------------------------------------------- DAG

  function dependenciesOf(job) {
    // A server without edge kinds sends depends_on only: draw those as declared.
    return job.dependencies
      || job.depends_on.map((name) => ({ job_name: name, kind: "declared" }));
  }

  function layout(jobs) {
    // dagre ranks the jobs left to right, orders each rank to cut crossings,
    // and gives an edge that spans ranks a free slot in each rank it crosses.
    const graph = new dagre.graphlib.Graph();
    graph.setGraph({
      rankdir: "LR", ranksep: RANK_SEP, nodesep: NODE_SEP, edgesep: EDGE_SEP,
      marginx: PAD, marginy: PAD + 8,
    });
    graph.setDefaultEdgeLabel(() => ({}));
    for (const job of jobs) graph.setNode(job.job_name, { width: NODE_W, height: NODE_H });
    for (const job of jobs) {
      for (const dependency of dependenciesOf(job)) {
        if (graph.hasNode(dependency.job_name)) graph.setEdge(dependency.job_name, job.job_name);
      }
    }
    dagre.layout(graph);
    const place = new Map(jobs.map((job) => {
      const node = graph.node(job.job_name);
      return [job.job_name, { x: node.x - NODE_W / 2, y: node.y - NODE_H / 2 }];
    }));
    const columns = [...new Set([...place.values()].map((p) => p.x))];
    const route = (from, to) => {
      // An edge leaves its job's right side and enters the other's left side.
      // Where it crosses a rank it runs straight through its own slot, and it
      // bends only between ranks, where there is no box to pass behind.
      const a = place.get(from);
      const b = place.get(to);
      const points = [{ x: a.x + NODE_W, y: a.y + NODE_H / 2 }];
      for (const p of graph.edge(from, to).points.slice(1, -1)) {
        const left = columns.find((x) => p.x > x && p.x < x + NODE_W);
        if (left === undefined) points.push({ x: p.x, y: p.y });
        else points.push({ x: left, y: p.y }, { x: left + NODE_W, y: p.y });
      }
      points.push({ x: b.x, y: b.y + NODE_H / 2 });
      return points;
    };
    const size = graph.graph();
    return { place, route, width: Math.ceil(size.width), height: Math.ceil(size.height) };
  }

  function provenance(job) {
    const version = job.service_version ? ` ${job.service_version}` : "";
    const hash = job.service_hash ? ` · ${job.service_hash.slice(0, 8)}` : "";
    return `${job.service}${version}${hash}`;
  }

  function clip(text, length) {
    return text.length > length ? `${text.slice(0, length - 1)}…` : text;
  }

  function dag(jobs) {
    const { place, route, width, height } = layout(jobs);
    const byName = new Map(jobs.map((job) => [job.job_name, job]));
    const edges = [];
    for (const job of jobs) {
      for (const { job_name: parent, kind } of dependenciesOf(job)) {
        if (!place.has(parent)) continue;
        const points = route(parent, job.job_name);
        edges.push(svg("path", {
          class: `edge ${kind} from-${byName.get(parent).status}`,
          "data-from": parent,
          "data-to": job.job_name,
          "data-kind": kind,
          d: `M${points.map((p) => `${p.x},${p.y}`).join(" L")}`,
          "marker-end": kind === "implicit" ? "url(#arrow-implicit)" : "url(#arrow)",
        }, svg("title", {
          text: kind === "implicit"
            ? `${job.job_name} waits for ${parent} (phase rule: ${byName.get(parent).phase} before ${job.phase})`
            : `${job.job_name} depends on ${parent} (dependsOn)`,
        })));
      }
    }
    // Declared edges are drawn last, over the lighter implicit ones.
    edges.sort((a, b) => (a.getAttribute("data-kind") === "implicit" ? 0 : 1)
      - (b.getAttribute("data-kind") === "implicit" ? 0 : 1));
    const nodes = jobs.map((job) => {
      const { x, y } = place.get(job.job_name);
      const took = seconds(jobDuration(job));
      const attempts = job.max_attempts > 1 || job.attempts > 1
        ? ` · try ${job.attempts}/${job.max_attempts}` : "";
      return svg("g", {
        class: `node status-${job.status}${job.waiting ? " waiting" : ""}`,
        "data-job": job.job_name,
        "data-job-id": job.id,
        "data-status": job.status,
        "data-waiting": job.waiting || null,
        transform: `translate(${x},${y})`,
        tabindex: 0,
        role: "button",
        onclick: () => focusCard(job.job_name),
        onkeydown: (e) => { if (e.key === "Enter") focusCard(job.job_name); },
      },
      svg("title", {
        text: `${job.job_name}: ${job.status}${took ? ` (${took})` : ""}`
          + `${job.waiting ? `, waiting: ${job.waiting}` : ""}\n`
          + `${job.service} ${job.service_version || ""} ${job.service_hash || ""}`.trim(),
      }),
      svg("rect", { width: NODE_W, height: NODE_H, rx: 8, ry: 8 }),
      svg("circle", { class: "dot", cx: 14, cy: 18, r: 5 }),
      svg("text", { class: "name", x: 26, y: 22, text: clip(job.job_name, 23) }),
      svg("text", {
        class: "meta", x: 12, y: 40,
        text: job.waiting ? clip(`waiting: ${job.waiting}`, 32)
          : `${job.status}${took ? ` · ${took}` : ""}${attempts}`,
      }),
      svg("text", { class: "provenance", x: 12, y: 57, text: clip(provenance(job), 30) }));
    });
    const marker = (id) => svg("marker", {
      id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 8, markerHeight: 8,
      orient: "auto-start-reverse",
    }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: id }));
    return el("div", { class: "dag-wrap" }, svg("svg", {
      class: "dag", id: "dag", width, height, viewBox: `0 0 ${width} ${height}`,
      role: "img", "aria-label": "job dependency graph",
    }, svg("defs", {}, marker("arrow"), marker("arrow-implicit")),
    svg("g", { class: "edges" }, edges), svg("g", { class: "nodes" }, nodes)));
  }

  function edgeLegend() {
    return el("p", { class: "legend edges-legend" },
      el("span", { class: "edge-sample declared" }), "dependsOn",
      el("span", { class: "edge-sample implicit" }), "phase rule (pre → main, → post)");
  }

  function focusCard(name) {
    const card = document.querySelector(`[data-job-card="${CSS.escape(name)}"]`);
    if (!card) return;
    card.scrollIntoView({ behavior: "smooth", block: "center" });
    card.classList.add("flash");
    setTimeout(() => card.classList.remove("flash"), 1200);
  }

  // ---------------------------------------------------------- job cards

  function jobCard(job, trace, refresh) {
    const retry = RETRYABLE_JOB.has(job.status) ? el("button", {
      type: "button", class: "retry-job", "data-retry-job": job.job_name,
      text: "Retry",
      onclick: async (event) => {
        event.target.disabled = true;
        if (await write(`/api/jobs/${job.id}/retry`,
          (r) => `requeued ${r.requeued.join(", ")}`)) refresh();
        else event.target.disabled = false;
      },
    }) : null;
    const [message, ...rest] = (job.error || "").split("\n");
    const earlier = (job.attempt_log || []).filter((a) => a.status !== "succeeded");
    return el("article", {
      class: `job status-${job.status}${job.waiting ? " waiting" : ""}`,
      "data-job-card": job.job_name, "data-status": job.status,
    },
    el("header", {},
      badge(job.status), " ", el("strong", { text: job.job_name }), " ",
      el("span", { class: "muted", text: `${job.service} · ${job.phase} · channel ${job.channel}` }),
      retry),
    job.waiting ? el("p", { class: "waiting-note", "data-waiting": job.waiting },
      el("strong", { text: "waiting: " }), job.waiting) : null,
    el("dl", { class: "facts small" },
      job.window ? fact("window", el("span", { class: "mono", text: job.window })) : null,
      fact("code", el("span", {
        class: "provenance", title: job.service_hash || "",
      }, `${job.service} ${job.service_version || "(no version)"}`,
      job.service_hash ? el("code", { text: ` ${job.service_hash.slice(0, 12)}` }) : null)),
      fact("attempts", `${job.attempts}/${job.max_attempts}`),
      fact("worker", job.worker || "—"),
      fact("depends on", job.depends_on.join(", ") || "—"),
      fact("started", when(job.started_at)),
      fact("finished", when(job.finished_at)),
      fact("took", seconds(jobDuration(job)) || "—"),
      trace && trace.reason ? fact("scheduled because", trace.reason) : null),
    job.error ? el("p", { class: "error-message", text: message }) : null,
    job.error && rest.join("\n").trim() ? remembered(el("details", {
      "data-key": `error-${job.id}`, class: "traceback",
    }, el("summary", { text: "traceback" }), el("pre", { text: rest.join("\n") })),
    job.status === "failed") : null,
    earlier.length && !(earlier.length === 1 && job.status === "failed") ? remembered(el("details", {
      "data-key": `attempts-${job.id}`,
    }, el("summary", { text: `earlier attempts (${earlier.length})` }),
    el("ol", {}, earlier.map((a) => el("li", {},
      `${a.status} on ${a.worker || "?"}: `, el("pre", { text: a.error || "" })))))) : null,
    job.result !== null && job.result !== undefined ? remembered(el("details", {
      "data-key": `result-${job.id}`,
    }, el("summary", { text: "result" }),
    el("pre", { text: JSON.stringify(job.result, null, 2) }))) : null);
  }

  // ----------------------------------------------------------- services

  async function showServices(params, id) {
    const period = Object.hasOwn(PERIODS, params.get("period")) ? params.get("period") : "7d";
    const span = PERIODS[period];
    const query = span === null ? ""
      : `?since=${encodeURIComponent(new Date(Date.now() - span * 1000).toISOString())}`;
    let rows;
    try {
      rows = await api(`/api/services/stats${query}`);
    } catch (error) {
      failure(error, id, () => showServices(params, id));
      return;
    }
    if (id !== routeId) return;
    if (!view.querySelector("#services-view")) renderServicesPage(period);
    const text = JSON.stringify(rows);
    if (text !== lastDocument) {
      lastDocument = text;
      renderServiceStats(rows, period);
    }
    poll(() => showServices(params, id), STATS_POLL_MS, id);
  }

  function renderServicesPage(period) {
    const select = el("select", { id: "period", name: "period", title: "period" },
      Object.keys(PERIODS).map((key) => el("option", {
        value: key, selected: key === period, text: key === "all" ? "all time" : `last ${key}`,
      })));
    select.addEventListener("change", () => { location.hash = `#/services?period=${select.value}`; });
    view.replaceChildren(el("section", { class: "services", id: "services-view" },
      el("h1", { text: "Services" }),
      el("p", { class: "muted" },
        "Jobs that ran to an end (succeeded or failed) in the period, by job and service. "
        + "Durations are of the last attempt."),
      el("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
        el("label", {}, "period ", select)),
      el("div", { id: "services-stats" })));
  }

  function rate(value) {
    const percent = Math.round(value * 1000) / 10;
    const level = value >= 0.95 ? "good" : value >= 0.8 ? "fair" : "poor";
    return el("span", { class: `rate ${level}`, text: `${percent}%` });
  }

  function renderServiceStats(rows, period) {
    const body = rows.map((row) => {
      const failure = row.last_failure;
      return el("tr", { "data-stats": `${row.service}/${row.job_name}` },
        el("td", { text: row.service }),
        el("td", {}, el("strong", { text: row.job_name })),
        el("td", { class: "num", "data-field": "runs", text: row.runs }),
        el("td", { class: "num", "data-field": "failed", text: row.failed }),
        el("td", { class: "num", "data-field": "success" }, rate(row.success_rate)),
        el("td", { class: "num", "data-field": "p50", text: seconds(row.p50_s) || "—" }),
        el("td", { class: "num", "data-field": "p95", text: seconds(row.p95_s) || "—" }),
        el("td", { class: "mono", text: row.last_version || "—" }),
        el("td", { class: "last-failure", "data-field": "last-failure" }, failure
          ? [when(failure.finished_at), " ",
            el("a", { href: `#/sessions/${failure.session_id}`, class: "mono", text: short(failure.session_id) }),
            el("div", { class: "error-message", title: failure.error, text: failure.error })]
          : el("span", { class: "muted", text: "—" })));
    });
    const table = el("table", { id: "service-stats", class: "grid" },
      el("thead", {}, el("tr", {},
        ["service", "job", "runs", "failed", "success", "p50", "p95", "last version", "last failure"]
          .map((h) => el("th", { text: h })))),
      el("tbody", {}, body.length ? body : el("tr", {}, el("td", {
        colspan: 9, class: "muted",
        text: period === "all" ? "no job has run yet" : `no job ended in the last ${period}`,
      }))));
    document.getElementById("services-stats").replaceChildren(table);
  }

  // ----------------------------------------------------------- channels

  async function showChannels(id) {
    let channels;
    let workers;
    try {
      [channels, workers] = await Promise.all([api("/api/channels"), api("/api/workers")]);
    } catch (error) {
      failure(error, id, () => showChannels(id));
      return;
    }
    if (id !== routeId) return;
    const text = JSON.stringify([channels, workers.map((w) => [w.hostname, w.channels, w.live])]);
    if (!view.querySelector("#channels-view")) {
      view.replaceChildren(el("section", { class: "channels", id: "channels-view" },
        el("h1", { text: "Channels" }),
        el("p", { class: "muted" },
          "While a channel is paused its jobs stay queued and are not sent; running jobs "
          + "finish and no session fails for it. Resume sends them in priority order "
          + "(README, \"Pausing a channel\")."),
        el("div", { id: "channels-list" }),
        el("p", { id: "channels-updated", class: "muted live" })));
    }
    if (text !== lastDocument) {
      lastDocument = text;
      renderChannels(channels, workers, () => showChannels(id));
    }
    document.getElementById("channels-updated").textContent =
      `live · updated ${new Date().toLocaleTimeString()}`;
    const busy = channels.some((c) => c.queued || c.running);
    poll(() => showChannels(id), busy ? FAST_POLL_MS * 2 : LIST_POLL_MS, id);
  }

  function renderChannels(channels, workers, refresh) {
    const body = channels.map((row) => {
      const consuming = workers.filter((w) => (w.channels || []).includes(row.channel));
      const live = consuming.filter((w) => w.live);
      const action = row.paused
        ? el("button", {
          type: "button", "data-resume": row.channel, text: "Resume",
          onclick: async (event) => {
            event.target.disabled = true;
            if (await write(`/api/channels/${encodeURIComponent(row.channel)}/resume`,
              (r) => `channel ${row.channel} resumed${r.sent !== undefined ? `, ${r.sent} job(s) sent` : ""}`)) {
              refresh();
            } else event.target.disabled = false;
          },
        })
        : el("button", {
          type: "button", class: "danger", "data-pause": row.channel, text: "Pause",
          onclick: async (event) => {
            const reason = window.prompt(
              `Pause channel ${row.channel}? Queued jobs wait until it is resumed.\n`
              + "Reason (shown to others, may be empty):", "");
            if (reason === null) return;
            event.target.disabled = true;
            if (await write(`/api/channels/${encodeURIComponent(row.channel)}/pause`,
              () => `channel ${row.channel} paused`,
              { reason: reason.trim() || null })) refresh();
            else event.target.disabled = false;
          },
        });
      return el("tr", {
        "data-channel": row.channel, "data-paused": row.paused ? "true" : "false",
        class: row.paused ? "paused" : null,
      },
      el("td", {}, el("strong", { class: "mono", text: row.channel })),
      el("td", { "data-field": "state" }, row.paused
        ? [el("span", { class: "badge paused", text: "paused" }), " ",
          row.reason ? el("span", { class: "reason", text: row.reason }) : null,
          row.paused_at ? [" ", el("span", { class: "muted" }, "since ", when(row.paused_at))] : null]
        : el("span", { class: "badge status-running", text: "not paused" })),
      el("td", { class: "num", "data-field": "queued", text: row.queued }),
      el("td", { class: "num", "data-field": "running", text: row.running }),
      el("td", { class: "num", "data-field": "workers", title: consuming.map((w) => w.hostname).join("\n") },
        `${live.length}`, consuming.length > live.length
          ? el("span", { class: "muted", text: ` (+${consuming.length - live.length} gone)` }) : null),
      el("td", {}, el("div", { class: "actions" }, action)));
    });
    const table = el("table", { id: "channels", class: "grid" },
      el("thead", {}, el("tr", {},
        ["channel", "state", "queued", "running", "live workers", ""].map((h) => el("th", { text: h })))),
      el("tbody", {}, body.length ? body : el("tr", {}, el("td", {
        colspan: 6, class: "muted", text: "no channel yet: no worker, job or pause names one",
      }))));
    document.getElementById("channels-list").replaceChildren(table);
  }

  // ------------------------------------------------------------ cohorts

  const COHORT_ACTIVE = new Set(["opening", "opened"]);

  async function showCohorts(id) {
    let rows;
    try {
      rows = await api("/api/cohorts");
    } catch (error) {
      failure(error, id, () => showCohorts(id));
      return;
    }
    if (id !== routeId) return;
    if (!view.querySelector("#cohorts-view")) renderCohortsPage(() => showCohorts(id));
    const text = JSON.stringify(rows);
    if (text !== lastDocument) {
      lastDocument = text;
      renderCohorts(rows, () => showCohorts(id));
    }
    const busy = rows.some((row) => COHORT_ACTIVE.has(row.status));
    poll(() => showCohorts(id), busy ? FAST_POLL_MS * 2 : LIST_POLL_MS, id);
  }

  function cohortRequest(form, dryRun) {
    // The fields of `trigger EVENT --where …` (README, "Cohort runs").
    const value = (name) => form.elements[name].value.trim();
    const body = {
      event: value("event"),
      level: value("level"),
      where: value("where").split("\n").map((line) => line.trim()).filter(Boolean),
      dry_run: dryRun,
    };
    for (const key of ["since", "until", "rate", "name"]) if (value(key)) body[key] = value(key);
    if (value("limit")) body.limit = Number(value("limit"));
    return body;
  }

  function renderCohortsPage(refresh) {
    const field = (label, input) => el("label", {}, label, input);
    const result = el("p", { id: "cohort-preview", class: "muted" });
    const form = el("form", { id: "cohort-form", class: "cohort-form" },
      field("event", el("input", {
        name: "event", required: true, placeholder: "reprocess", size: 16, pattern: "[A-Za-z0-9_.:\\-]+",
      })),
      field("level", el("select", { name: "level" },
        ["study", "series", "patient"].map((l) => el("option", { value: l, text: l })))),
      field("where (FIELD=VALUE, one a line)", el("textarea", {
        name: "where", rows: 3, cols: 34, placeholder: "Modality=CT\nStudyDescription=*THORAX*",
      })),
      field("since", el("input", { name: "since", type: "date" })),
      field("until", el("input", { name: "until", type: "date" })),
      field("limit", el("input", { name: "limit", type: "number", min: 1, size: 7 })),
      field("rate", el("input", { name: "rate", placeholder: "30/min", size: 8 })),
      field("name", el("input", { name: "name", placeholder: "(default: event and time)", size: 18 })),
      el("div", { class: "actions" },
        el("button", { type: "submit", id: "cohort-dry-run", "data-dry-run": "true", text: "Count matches" }),
        el("button", { type: "submit", id: "cohort-start", class: "danger", text: "Start cohort" })),
      result);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const dryRun = event.submitter && event.submitter.getAttribute("data-dry-run") === "true";
      const body = cohortRequest(form, Boolean(dryRun));
      if (!dryRun && !window.confirm(`Start a cohort run of ${body.event} over every match?`)) return;
      let answer = null;
      await write("/api/cohorts", (data) => {
        answer = data;
        return dryRun ? `${data.count} ${data.level}(s) match` : `cohort ${data.name} started`;
      }, body);
      if (!answer) return;
      if (dryRun) {
        result.replaceChildren(el("strong", { id: "cohort-count", "data-count": answer.count,
          text: `${answer.count} ${answer.level}(s) match` }),
        answer.first && answer.first.length
          ? el("span", { class: "muted mono", text: ` — ${answer.first.join(", ")}${answer.count > answer.first.length ? ", …" : ""}` })
          : null);
      } else {
        result.textContent = `cohort ${answer.name}: ${answer.total} session(s) to open`;
        refresh();
      }
    });
    view.replaceChildren(el("section", { class: "cohorts", id: "cohorts-view" },
      el("h1", { text: "Cohorts" }),
      el("p", { class: "muted" },
        "A cohort run opens one session per matching study, series or patient, behind live "
        + "work and at its rate (README, \"Cohort runs\"). A cohort's name lists its sessions."),
      el("div", { id: "cohorts-list" }),
      remembered(el("details", { "data-key": "cohort-form", class: "start-cohort" },
        el("summary", { text: "Start a cohort run" }), form))));
  }

  function progress(row) {
    // One bar: each session status its share of the cohort's total.
    const total = Math.max(row.total, row.opened, 1);
    const parts = Object.entries(row.sessions || {}).filter(([, n]) => n)
      .map(([status, n]) => el("span", {
        class: `part status-${status}`, "data-status": status,
        title: `${status}: ${n}`, "data-width": (100 * n) / total,
      }));
    const bar = el("div", { class: "progress", role: "img", "aria-label": `${row.opened} of ${row.total} opened` }, parts);
    // Widths via the CSSOM: the page's CSP forbids inline style attributes.
    for (const part of parts) part.style.width = `${part.getAttribute("data-width")}%`;
    return bar;
  }

  function renderCohorts(rows, refresh) {
    const act = (row, what, label, success, enabled, cls) => el("button", {
      type: "button", class: cls, "data-cohort-action": what, disabled: !enabled, text: label,
      onclick: async (event) => {
        if (what === "cancel" && !window.confirm(
          `Cancel cohort ${row.name}? Its open sessions are cancelled and no more are opened.`)) return;
        event.target.disabled = true;
        if (await write(`/api/cohorts/${encodeURIComponent(row.name)}/${what}`, success)) refresh();
        else event.target.disabled = false;
      },
    });
    const body = rows.map((row) => {
      const counts = Object.entries(row.sessions || {}).filter(([, n]) => n);
      const failed = (row.sessions.failed || 0) + (row.sessions.partial || 0);
      return el("tr", { "data-cohort": row.name, "data-status": row.status },
        el("td", {}, cohortLink(row.name)),
        el("td", { text: `${row.event} · ${row.level}` }),
        el("td", {}, el("span", { class: `badge cohort-${row.status}`, text: row.status })),
        el("td", { class: "num", "data-field": "opened", text: `${row.opened}/${row.total}` }),
        el("td", { class: "num", "data-field": "ended", text: row.ended }),
        el("td", { class: "bar" }, progress(row),
          el("div", { class: "counts small", "data-field": "sessions" },
            counts.length ? counts.map(([s, n]) => el("span", { "data-count": s, text: `${s} ${n}` }))
              : el("span", { class: "muted", text: "no session yet" }))),
        el("td", { text: row.rate_per_min ? `${row.rate_per_min}/min` : "—" }),
        el("td", {}, when(row.created_at)),
        el("td", {}, el("div", { class: "actions" },
          act(row, "cancel", "Cancel", (r) => `cohort ${r.cohort} cancelled: ${r.sessions.length} session(s), `
            + `${r.not_opened} not opened`, COHORT_ACTIVE.has(row.status), "danger"),
          act(row, "retry", "Retry failed", (r) => `cohort ${r.cohort}: ${r.jobs} job(s) of `
            + `${r.sessions.length} session(s) re-queued`, failed > 0, "quiet"))));
    });
    const table = el("table", { id: "cohorts", class: "grid" },
      el("thead", {}, el("tr", {},
        ["cohort", "event", "status", "opened", "ended", "sessions", "rate", "started", ""]
          .map((h) => el("th", { text: h })))),
      el("tbody", {}, body.length ? body : el("tr", {}, el("td", {
        colspan: 9, class: "muted", text: "no cohort run yet",
      }))));
    document.getElementById("cohorts-list").replaceChildren(table);
  }

  window.addEventListener("hashchange", route);
  route();
  refreshHealth();
})();
