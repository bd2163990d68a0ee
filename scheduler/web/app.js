// The dcm-scheduler dashboard: sessions, and one session's job DAG.
//
// Plain JavaScript over the JSON API of the same server (no build step).
// Routes: #/ (sessions, filters in the hash query) and #/sessions/<id>.
// Writes send the API token as a bearer token; it is asked for once and
// kept in localStorage. Pages refresh every second while work is running.
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
  const SLOW_POLL_MS = 10000;
  const PAGE_SIZE = 50;
  const NODE_W = 200;
  const NODE_H = 54;
  const COL_GAP = 70;
  const ROW_GAP = 22;
  const PAD = 16;

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
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function badge(status) {
    return el("span", { class: `badge status-${status}`, "data-status": status, text: status });
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

  async function write(path, success) {
    if (!storedToken() && !(await askToken())) return false;
    try {
      const data = await api(path, { method: "POST" });
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
    if (match) {
      showSession(decodeURIComponent(match[1]), routeId);
    } else {
      showSessions(new URLSearchParams(query || ""), routeId);
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
      uid: params.get("uid") || "",
      event: params.get("event") || "",
      offset: Math.max(0, Number(params.get("offset")) || 0),
    };
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(filters.offset) });
    for (const key of ["status", "uid", "event"]) if (filters[key]) query.set(key, filters[key]);
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
    const busy = rows.some((row) => ACTIVE_SESSION.has(row.status));
    poll(() => showSessions(params, id), busy ? FAST_POLL_MS * 2 : SLOW_POLL_MS, id);
  }

  function go(filters) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(filters)) if (value) query.set(key, value);
    const text = query.toString();
    location.hash = text ? `#/?${text}` : "#/";
  }

  function renderSessionsPage(filters) {
    // The filters are drawn once per route, so a refresh never eats what is typed.
    const status = el("select", { id: "filter-status", name: "status" },
      el("option", { value: "", text: "any status" }),
      SESSION_STATUSES.map((s) => el("option", { value: s, selected: s === filters.status, text: s })));
    const uid = el("input", {
      id: "filter-uid", name: "uid", type: "search", value: filters.uid,
      placeholder: "study/series UID or patient ID", size: 44,
    });
    const event = el("input", {
      id: "filter-event", name: "event", type: "search", value: filters.event,
      placeholder: "event", size: 14,
    });
    const form = el("form", {
      class: "filters",
      onsubmit: (e) => {
        e.preventDefault();
        go({ status: status.value, uid: uid.value.trim(), event: event.value.trim() });
      },
    }, status, uid, event, el("button", { type: "submit", text: "Search" }),
    el("button", { type: "button", class: "quiet", text: "Clear", onclick: () => go({}) }));
    status.addEventListener("change", () => form.requestSubmit());
    view.replaceChildren(el("section", { class: "sessions", id: "sessions-view" },
      el("h1", { text: "Sessions" }), form, el("div", { id: "sessions-list" })));
  }

  function renderSessions(rows, filters) {
    const body = rows.map((row) => el("tr", { "data-session": row.id, "data-status": row.status },
      el("td", {}, el("a", { href: `#/sessions/${row.id}`, class: "mono", text: short(row.id) })),
      el("td", {}, badge(row.status)),
      el("td", { text: row.event }),
      el("td", { text: row.level }),
      el("td", { class: "uid mono", title: row.uid, text: row.uid }),
      el("td", { class: "num", text: row.revision }),
      el("td", {}, when(row.created_at)),
      el("td", {}, when(row.finished_at)),
      el("td", { class: "num", text: seconds(elapsed(row.created_at, row.finished_at)) })));
    const table = el("table", { id: "sessions", class: "grid" },
      el("thead", {}, el("tr", {},
        ["session", "status", "event", "level", "uid", "rev", "created", "finished", "took"]
          .map((h) => el("th", { text: h })))),
      el("tbody", {}, body.length ? body
        : el("tr", {}, el("td", { colspan: 9, class: "muted", text: "no session matches" }))));
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
      doc.trigger ? fact("trigger", "manual") : null);
    const trace = doc.trace || {};
    const traced = trace.jobs || {};
    view.replaceChildren(el("section", {
      class: "session", id: "session", "data-session": doc.id, "data-status": doc.status,
    },
    el("p", {}, el("a", { href: "#/", text: "← sessions" })),
    el("div", { class: "session-head" },
      el("h1", {}, "Session ", el("code", { title: doc.id, text: short(doc.id) }), " ",
        el("span", { id: "session-status" }, badge(doc.status))),
      el("div", { class: "actions" }, retrySession, cancel)),
    facts,
    doc.error ? el("p", { class: "banner error", text: doc.error }) : null,
    el("h2", { text: `Jobs (${doc.jobs.length})` }),
    doc.jobs.length ? dag(doc.jobs) : el("p", { class: "muted", text: "no job was scheduled" }),
    legend(),
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

  function layout(jobs) {
    const byName = new Map(jobs.map((job) => [job.job_name, job]));
    const depth = new Map();
    const visiting = new Set();
    const depthOf = (name) => {
      if (depth.has(name)) return depth.get(name);
      if (visiting.has(name)) return 0; // a cycle cannot be stored; stay safe anyway
      visiting.add(name);
      const parents = byName.get(name).depends_on.filter((p) => byName.has(p));
      const value = parents.length ? 1 + Math.max(...parents.map(depthOf)) : 0;
      visiting.delete(name);
      depth.set(name, value);
      return value;
    };
    const columns = [];
    for (const job of jobs) {
      const d = depthOf(job.job_name);
      (columns[d] = columns[d] || []).push(job);
    }
    const row = new Map();
    columns.forEach((column, index) => {
      if (index > 0) {
        // Barycentre ordering: a job sits near the jobs it depends on.
        const weight = (job) => {
          const parents = job.depends_on.filter((p) => row.has(p));
          return parents.length
            ? parents.reduce((sum, p) => sum + row.get(p), 0) / parents.length : 0;
        };
        column.sort((a, b) => weight(a) - weight(b));
      }
      column.forEach((job, i) => row.set(job.job_name, i));
    });
    const place = new Map();
    for (const job of jobs) {
      place.set(job.job_name, {
        x: PAD + depth.get(job.job_name) * (NODE_W + COL_GAP),
        y: PAD + row.get(job.job_name) * (NODE_H + ROW_GAP),
      });
    }
    const tallest = Math.max(...columns.map((c) => (c ? c.length : 0)));
    return {
      place,
      width: PAD * 2 + columns.length * NODE_W + (columns.length - 1) * COL_GAP,
      height: PAD * 2 + tallest * NODE_H + (tallest - 1) * ROW_GAP,
    };
  }

  function dag(jobs) {
    const { place, width, height } = layout(jobs);
    const byName = new Map(jobs.map((job) => [job.job_name, job]));
    const edges = [];
    for (const job of jobs) {
      const to = place.get(job.job_name);
      for (const parent of job.depends_on) {
        const from = place.get(parent);
        if (!from) continue;
        const x1 = from.x + NODE_W;
        const y1 = from.y + NODE_H / 2;
        const x2 = to.x - 4;
        const y2 = to.y + NODE_H / 2;
        const bend = (x2 - x1) / 2;
        edges.push(svg("path", {
          class: `edge from-${byName.get(parent).status}`,
          "data-from": parent,
          "data-to": job.job_name,
          d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`,
          "marker-end": "url(#arrow)",
        }));
      }
    }
    const nodes = jobs.map((job) => {
      const { x, y } = place.get(job.job_name);
      const took = seconds(jobDuration(job));
      const attempts = job.max_attempts > 1 || job.attempts > 1
        ? ` · try ${job.attempts}/${job.max_attempts}` : "";
      const label = job.job_name.length > 24 ? `${job.job_name.slice(0, 23)}…` : job.job_name;
      return svg("g", {
        class: `node status-${job.status}`,
        "data-job": job.job_name,
        "data-job-id": job.id,
        "data-status": job.status,
        transform: `translate(${x},${y})`,
        tabindex: 0,
        role: "button",
        onclick: () => focusCard(job.job_name),
        onkeydown: (e) => { if (e.key === "Enter") focusCard(job.job_name); },
      },
      svg("title", { text: `${job.job_name}: ${job.status}${took ? ` (${took})` : ""}` }),
      svg("rect", { width: NODE_W, height: NODE_H, rx: 8, ry: 8 }),
      svg("circle", { class: "dot", cx: 14, cy: 18, r: 5 }),
      svg("text", { class: "name", x: 26, y: 22, text: label }),
      svg("text", { class: "meta", x: 12, y: 42, text: `${job.status}${took ? ` · ${took}` : ""}${attempts}` }));
    });
    const arrow = svg("defs", {}, svg("marker", {
      id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 8, markerHeight: 8,
      orient: "auto-start-reverse",
    }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow" })));
    return el("div", { class: "dag-wrap" }, svg("svg", {
      class: "dag", id: "dag", width, height, viewBox: `0 0 ${width} ${height}`,
      role: "img", "aria-label": "job dependency graph",
    }, arrow, svg("g", { class: "edges" }, edges), svg("g", { class: "nodes" }, nodes)));
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
      class: `job status-${job.status}`, "data-job-card": job.job_name, "data-status": job.status,
    },
    el("header", {},
      badge(job.status), " ", el("strong", { text: job.job_name }), " ",
      el("span", { class: "muted", text: `${job.service} · ${job.phase} · channel ${job.channel}` }),
      retry),
    el("dl", { class: "facts small" },
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

  window.addEventListener("hashchange", route);
  route();
  refreshHealth();
})();
