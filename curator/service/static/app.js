// curator's web page: plain JavaScript over the /v1 API (docs/service.md), no build step, no library.
// What the server sends includes document text, so the page is built with createElement and
// textContent, never innerHTML: a document cannot inject markup or script into the page.
"use strict";

const TOKEN_KEY = "curator.token";
const FINAL = new Set(["done", "failed", "cancelled", "interrupted"]);
// Browsers open at most 6 HTTP/1.1 connections to one server; each followed job holds one open, so
// only a few are streamed and the rest are kept current by the jobs poll.
const MAX_STREAMS = 3;
const POLL_MS = 3000;

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY);
const streams = new Map();      // job id → AbortController of its event stream
const jobRows = new Map();      // job id → its table row
const openLogs = new Map();     // job id → when its shown log was last fetched (ms)
const LOG_REFRESH_MS = 2000;
let pollTimer = null;
let refreshTimer = null;

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// -- the API -----------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${token}` };
  const response = await fetch(`/v1${path}`, { ...options, headers });
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try { message = (await response.json()).error || message; } catch { /* not JSON: keep the status */ }
  if (response.status === 401) {
    signOut(`The server refused this token (${message}). Check it, or make one on the server with ` +
            "`curator token create --scope read`.");
  }
  throw new ApiError(response.status, message);
}

const getJSON = async (path) => (await api(path)).json();
const postJSON = (path, body) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});

// Errors of the background loaders: a refused token already sent the user to the sign-in form.
function showError(error) {
  if (error.status === 401) return;
  console.error(error);
  $("app-error").textContent = error.message;
}

// -- small DOM helpers ---------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

const fmt = (n) => (n == null ? "–" : Number(n).toLocaleString("en", { maximumFractionDigits: 1 }));
const num = (value) => el("td", { class: "num" }, fmt(value));
const fillTable = (id, rows) => $(id).tBodies[0].replaceChildren(...rows);
const emptyRow = (columns, text) => el("tr", {}, el("td", { colSpan: columns, class: "muted" }, text));

// -- signing in and out ----------------------------------------------------------------------------

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  $("login-error").textContent = "";
  try {
    await api("/jobs?limit=1");         // any read route: checks the token before anything is shown
  } catch (error) {
    if (error.status !== 401) $("login-error").textContent = `Could not reach the server: ${error.message}`;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  start();
});

$("sign-out").addEventListener("click", () => signOut(""));

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
  for (const controller of streams.values()) controller.abort();
  streams.clear();
  clearInterval(pollTimer);
  $("app").hidden = $("nav").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("token").focus();
}

function start() {
  $("login").hidden = true;
  $("app").hidden = $("nav").hidden = false;
  loadAll();
  pollTimer = setInterval(() => loadJobs().catch(showError), POLL_MS);
}

function loadAll() {
  for (const load of [loadComposition, loadJobs, loadRuns, loadRankings, loadMixtures, loadAudit]) {
    load().catch(showError);
  }
}

// -- corpus composition: a bar chart drawn as inline SVG ------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const METRICS = [["documents", "#2f6fb0"], ["tokens", "#e08a2c"]];

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text != null) node.textContent = text;
  return node;
}

async function loadComposition() {
  const rows = await getJSON("/sources");
  fillTable("composition-table", rows.length ? rows.map((r) => el("tr", {},
    el("td", {}, r.source), el("td", {}, r.kind), num(r.documents), num(r.tokens), num(r.chars)))
    : [emptyRow(5, "No documents yet: ingest a corpus.")]);
  drawComposition(rows);
}

function drawComposition(rows) {
  // One row per source, a bar per measure; each measure is scaled to its largest source so both read
  // as shares of the corpus whatever their units.
  const width = 760, labelWidth = 170, room = width - labelWidth - 120, bar = 16, rowHeight = 2 * bar + 14;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${rows.length * rowHeight + 34}` });
  METRICS.forEach(([metric, colour], j) => {
    chart.append(svg("rect", { x: labelWidth + j * 120, y: 4, width: 12, height: 12, fill: colour }),
                 svg("text", { x: labelWidth + j * 120 + 18, y: 15 }, metric));
  });
  rows.forEach((row, i) => {
    const y = 30 + i * rowHeight;
    chart.append(svg("text", { x: 0, y: y + bar + 4 }, `${row.source} (${row.kind})`));
    METRICS.forEach(([metric, colour], j) => {
      const largest = Math.max(1, ...rows.map((r) => r[metric] || 0));
      const length = Math.max(1, (room * (row[metric] || 0)) / largest);
      const rect = svg("rect", { x: labelWidth, y: y + j * bar, width: length, height: bar - 3, fill: colour, rx: 2 });
      rect.append(svg("title", {}, `${row.source}: ${fmt(row[metric])} ${metric}`));
      chart.append(rect, svg("text", { x: labelWidth + length + 6, y: y + j * bar + bar - 5 }, fmt(row[metric])));
    });
  });
  $("composition-chart").replaceChildren(chart);
}

// -- search ------------------------------------------------------------------------------------------

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = event.submitter || event.target.querySelector("button");
  const status = $("search-status");
  button.disabled = true;
  status.className = "muted";
  status.textContent = "Searching…";
  const started = performance.now();
  try {
    const body = { prompt: $("prompt").value, completion: $("completion").value,
                   top: Number($("top").value), bottom: Number($("bottom").value) };
    const [hits] = await (await postJSON("/search", body)).json();
    $("search-top").replaceChildren(...hitItems(hits.top));
    $("search-bottom").replaceChildren(...hitItems(hits.bottom));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    status.textContent = `From sketch store ${hits.store}${hits.reranked ? `, ${hits.reranked} re-scored exactly` : ""}` +
                         ` in ${seconds} s. Scores are influence estimates: higher helps the completion more.`;
  } catch (error) {
    if (error.status !== 401) {
      status.className = "error";
      status.textContent = `Search failed: ${error.message}`;
    }
  } finally {
    button.disabled = false;
  }
});

function hitItems(hits) {
  if (!hits.length) return [el("li", { class: "muted" }, "none asked for")];
  return hits.map((hit) => el("li", { "data-doc": hit.doc_id },
    el("div", { class: "meta" }, el("span", { class: "score" }, hit.score.toFixed(3)),
       el("span", { class: "tag" }, hit.source), el("span", { class: "muted" }, `document ${hit.doc_id}`)),
    el("div", { class: "snippet" }, hit.snippet)));
}

// -- jobs: a poll for the list, Server-Sent Events for live progress ------------------------------

async function loadJobs() {
  const page = await getJSON("/jobs?limit=50");
  if (!page.items.length && !jobRows.size) fillTable("jobs-table", [emptyRow(6, "No jobs yet.")]);
  for (const job of [...page.items].reverse()) showJob(job);     // oldest first: each new row goes on top
  // Running jobs first, then the oldest queued ones: those are the next to move.
  const waiting = page.items.filter((job) => !FINAL.has(job.state))
    .sort((a, b) => (b.state === "running") - (a.state === "running") || a.submitted_at.localeCompare(b.submitted_at));
  for (const job of waiting) if (streams.size < MAX_STREAMS) follow(job.id);
}

function showJob(job) {
  let row = jobRows.get(job.id);
  if (!row) {
    if (!jobRows.size) fillTable("jobs-table", []);
    row = el("tr", { "data-job": job.id });
    jobRows.set(job.id, row);
    $("jobs-table").tBodies[0].prepend(row);
  }
  const before = row.dataset.state;
  // A poll's answer can be older than the stream's last event: an ended job never goes back.
  if (FINAL.has(before) && !FINAL.has(job.state)) return;
  row.dataset.state = job.state;
  const cancel = FINAL.has(job.state) ? "" :
    el("button", { type: "button", class: "link", onclick: () => cancelJob(job.id),
                   "aria-label": `Cancel job ${job.id}` }, "cancel");
  const logButton = el("button", { type: "button", class: "link", onclick: () => toggleLog(job.id),
                                   "aria-label": `Log of job ${job.id}`, "aria-expanded": String(openLogs.has(job.id)) },
                       "log");
  row.replaceChildren(
    el("td", { class: "mono" }, job.id), el("td", {}, job.kind),
    el("td", {}, el("span", { class: `state ${job.state}`, title: job.error || "" }, job.state)),
    progressCell(job), el("td", {}, new Date(job.submitted_at).toLocaleString()), el("td", {}, logButton, cancel));
  if (job.error) row.children[3].append(el("div", { class: "error" }, job.error));
  // An open log follows the job: fetched again as it moves (at most every LOG_REFRESH_MS) and once it ends.
  if (openLogs.has(job.id) && (job.state !== before || Date.now() - openLogs.get(job.id) > LOG_REFRESH_MS)) {
    showLog(job.id);
  }
  // A job that has just finished may have added runs, mixtures, exports or a report.
  if (before && !FINAL.has(before) && job.state === "done") refreshSoon();
}

// The log tail of a job, in a row under the job's own.
function toggleLog(id) {
  const shown = document.querySelector(`tr.log-row[data-log="${CSS.escape(id)}"]`);
  if (shown) {
    shown.remove();
    openLogs.delete(id);
    jobRows.get(id)?.querySelector("[aria-label^='Log of job']")?.setAttribute("aria-expanded", "false");
    return;
  }
  showLog(id);
}

async function showLog(id) {
  openLogs.set(id, Date.now());
  const row = jobRows.get(id);
  if (!row) return;
  row.querySelector("[aria-label^='Log of job']")?.setAttribute("aria-expanded", "true");
  let logRow = document.querySelector(`tr.log-row[data-log="${CSS.escape(id)}"]`);
  if (!logRow) {
    logRow = el("tr", { class: "log-row", "data-log": id },
                el("td", { colSpan: 6 }, el("pre", { class: "log", "aria-label": `log of ${id}` }, "…")));
    row.after(logRow);
  }
  let text;
  try {
    text = await (await api(`/jobs/${encodeURIComponent(id)}/log`)).text();
  } catch (error) {
    text = `The log could not be read: ${error.message}`;
  }
  if (!openLogs.has(id)) return;            // closed while it loaded
  const pre = logRow.querySelector("pre");
  pre.textContent = text.trim() || "(nothing logged yet)";
  pre.scrollTop = pre.scrollHeight;         // the newest lines
}

function progressCell(job) {
  const p = job.progress;
  const cell = el("td", { class: "progress" });
  if (!p) {
    cell.append(el("span", { class: "muted" }, job.state === "queued" ? "waiting" : ""));
    return cell;
  }
  const bar = el("progress", { "aria-label": `${job.kind} ${job.id} progress` });
  if (p.total) { bar.max = p.total; bar.value = p.done; } else if (job.state === "done") { bar.max = bar.value = 1; }
  // (no value: the bar shows activity of unknown length)
  const rate = p.rate && !FINAL.has(job.state) ? `, ${fmt(p.rate)} ${p.unit}/s` : "";
  // A stage of unknown size that counts nothing (index, rank, audit) shows only its name.
  const count = p.total || p.done ? `${fmt(p.done)}${p.total ? " / " + fmt(p.total) : ""} ${p.unit}${rate}` : "";
  const text = [p.stage, count].filter(Boolean).join(": ");
  cell.append(bar, el("span", { class: "progress-text" }, text));
  return cell;
}

// EventSource cannot send an Authorization header, so the stream is read with fetch and parsed here:
// events are blocks ended by a blank line, made of "event:" and "data:" lines (":" starts a comment).
async function follow(id) {
  if (streams.has(id)) return;
  const controller = new AbortController();
  streams.set(id, controller);
  try {
    const response = await api(`/jobs/${encodeURIComponent(id)}/events`, { signal: controller.signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event.type === "job") showJob(JSON.parse(event.data));
      }
    }
  } catch (error) {
    if (error.name !== "AbortError" && error.status !== 401) console.warn(`job ${id} stream:`, error);
  } finally {
    streams.delete(id);         // a stream cut short is picked up again by the next poll
  }
}

function parseEvent(block) {
  const event = { type: "message", data: "" };
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event.type = line.slice(6).trim();
    else if (line.startsWith("data:")) event.data += line.slice(5).trim();
  }
  return event;
}

async function cancelJob(id) {
  try {
    showJob(await (await api(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" })).json());
  } catch (error) {
    if (error.status !== 401) $("job-error").textContent = `Cancel failed: ${error.message}`;
  }
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("job-error").textContent = "";
  let body;
  try { body = JSON.parse($("job-body").value); } catch (error) {
    $("job-error").textContent = `Not JSON: ${error.message}`;
    return;
  }
  try {
    const job = await (await postJSON("/jobs", body)).json();
    showJob(job);
    follow(job.id);
  } catch (error) {
    if (error.status !== 401) $("job-error").textContent = `Not submitted: ${error.message}`;
  }
});

function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => {
    for (const load of [loadComposition, loadRuns, loadRankings, loadMixtures, loadAudit]) load().catch(showError);
  }, 500);
}

// -- runs, mixtures, exports ------------------------------------------------------------------------

async function loadRuns() {
  const page = await getJSON("/runs?limit=100");
  fillTable("runs-table", page.items.length ? page.items.reverse().map((run) => el("tr", {},
    el("td", { class: "mono" }, run.id), el("td", {}, run.method), num(run.query_ids.length),
    num(run.stats?.documents), num(run.stats?.docs_per_second)))
    : [emptyRow(5, "No scoring runs yet.")]);
}

async function loadRankings() {
  const rankings = await getJSON("/rankings");
  fillTable("rankings-table", rankings.length ? rankings.reverse().map((r) => el("tr", { "data-ranking": r.name },
    el("td", {}, r.name), el("td", { class: "mono" }, r.run_id), el("td", {}, r.tasks.join(", ")),
    el("td", {}, `${r.aggregate} (${r.normalize})`), num(r.query_ids.length), num(r.documents),
    el("td", {}, el("button", { type: "button", class: "link", onclick: () => showRanking(r.name),
                                "aria-label": `Documents of ranking ${r.name}` }, "documents"))))
    : [emptyRow(7, "No rankings yet: submit a rank job.")]);
}

// A ranking's ten best and ten worst documents (the API pages through all of them).
async function showRanking(name) {
  const path = `/rankings/${encodeURIComponent(name)}?limit=10`;
  const [top, bottom] = await Promise.all([getJSON(path), getJSON(`${path}&bottom=true`)]);
  $("ranking-title").textContent = `${name}: ${fmt(top.documents)} documents, by ${top.aggregate} over ` +
    `${top.query_ids.length} queries of ${top.tasks.join(", ")}`;
  $("ranking-top").replaceChildren(...hitItems(top.page.items));
  $("ranking-bottom").replaceChildren(...hitItems(bottom.page.items));
  $("ranking-view").hidden = false;
}

async function loadMixtures() {
  const [mixtures, exports] = await Promise.all([getJSON("/mixtures"), getJSON("/exports")]);
  fillTable("mixtures-table", mixtures.length ? mixtures.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", {}, m.ranking), el("td", {}, m.strategy), num(m.documents), num(m.tokens),
    num(m.budget))) : [emptyRow(6, "No mixtures yet.")]);
  fillTable("exports-table", exports.length ? exports.map((x) => {
    const files = ["manifest.json", ...(x.manifest.shards || []).flatMap((shard) => shard.files)];
    const links = files.map((name) => el("button", {
      type: "button", class: "link", "data-file": name, onclick: () => download(x.path, name),
      "aria-label": `Download ${name} of the ${x.mixture} export`,
    }, name));
    return el("tr", { "data-export": x.path }, el("td", {}, x.mixture), el("td", {}, x.format),
      num(x.manifest.documents), num(x.manifest.tokens), el("td", { class: "mono" }, x.path), el("td", {}, ...links));
  }) : [emptyRow(6, "No exports yet.")]);
}

// A plain link cannot carry the Authorization header, and a token in a URL would end up in server
// logs and the browser's history; so the file is fetched with the header and saved from a blob.
// The whole file passes through the browser's memory: fine for export shards (curl suits huge ones).
async function download(path, name) {
  $("download-error").textContent = "";
  try {
    const query = new URLSearchParams({ path, name });
    saveBlob(await (await api(`/exports/file?${query}`)).blob(), name);
  } catch (error) {
    if (error.status !== 401) $("download-error").textContent = `Download failed: ${error.message}`;
  }
}

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// -- the audit report -----------------------------------------------------------------------------

async function loadAudit() {
  let html;
  try {
    html = await (await api("/audit/report")).text();
  } catch (error) {
    if (error.status !== 404) throw error;
    $("audit-status").textContent = 'No audit report yet: submit an audit job ({"kind": "audit"}).';
    return;
  }
  // A sandboxed frame (no scripts, no same origin): the report cannot reach this page or its token.
  $("audit-frame").srcdoc = html;
  $("audit-frame").hidden = $("audit-download").hidden = false;
  $("audit-status").textContent = "The report of the latest audit job:";
  $("audit-download").onclick = () => saveBlob(new Blob([html], { type: "text/html" }), "audit.html");
}

// -- start -------------------------------------------------------------------------------------------

fetch("/v1/health").then((r) => r.json()).then((health) => {
  $("workspace").textContent = `${health.workspace} · curator ${health.version}`;
}).catch(() => { $("workspace").textContent = "the server does not answer"; });

if (token) start(); else $("token").focus();
