// The dashboard: plain JavaScript over the public /v1 API, with the key the user types (kept for this
// browser tab only). Text from the server is only ever set with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (selector) => document.querySelector(selector);
let selectedJob = null;
let curve = { job: null, after: null, points: [] };

function headers(extra = {}) {
  const key = sessionStorage.getItem("softprompt-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) {
    const error = body && body.error ? body.error : { code: response.status, message: response.statusText };
    throw new Error(`${error.code}: ${error.message}`);
  }
  return body;
}

function say(message) {
  $("#status").textContent = message;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

const percent = (value) => (typeof value === "number" ? `${(100 * value).toFixed(1)} %` : null);
const day = (iso) => new Date(iso).toLocaleString();

async function refreshTasks() {
  const page = await api("/v1/prompts?limit=100");
  const body = $("#tasks tbody");
  body.replaceChildren();
  const picker = $("#try-task");
  const picked = picker.value;
  picker.replaceChildren(new Option("(bare backbone)", ""));
  for (const task of page.data) {
    picker.add(new Option(task.name, task.name));
    for (const version of task.versions.slice().reverse()) {
      const row = body.insertRow();
      row.dataset.task = task.name;
      const m = version.metrics || {};
      [task.name, version.version, version.method, version.kind, percent(m.val_accuracy), percent(m.val_macro_f1),
        percent(m.zero_shot_accuracy), day(version.created_at)].forEach((text) => cell(row, text));
    }
  }
  picker.value = [...picker.options].some((o) => o.value === picked) ? picked : picker.value;
}

async function refreshJobs() {
  const page = await api("/v1/tuning/jobs?limit=20");
  const body = $("#jobs tbody");
  body.replaceChildren();
  for (const job of page.data) {
    const row = body.insertRow();
    row.className = job.id === selectedJob ? "job selected" : "job";
    row.dataset.jobId = job.id;
    const step = `${job.progress.step} / ${job.progress.total_steps}`;
    const loss = job.metrics.train_loss;
    cell(row, job.id);
    cell(row, job.task);
    cell(row, job.status, `status-${job.status}`);
    cell(row, step);
    cell(row, typeof loss === "number" ? loss.toFixed(3) : null);
    cell(row, job.result ? `${job.result.task}@${job.result.version}` : job.error ? job.error.code : null);
    row.addEventListener("click", () => selectJob(job.id));
  }
  return page.data;
}

async function selectJob(id) {
  selectedJob = id;
  for (const row of document.querySelectorAll("#jobs tr.job")) {
    row.classList.toggle("selected", Number(row.dataset.jobId) === id);
  }
  await refreshCurve();
}

// One curve update at a time, in order: two at once (a poll and a click) would read the same `after` and
// add the same points twice.
let curveUpdates = Promise.resolve();

function refreshCurve() {
  curveUpdates = curveUpdates.then(updateCurve, updateCurve);
  return curveUpdates;
}

async function updateCurve() {
  const id = selectedJob;
  if (id === null) return;
  if (curve.job !== id) curve = { job: id, after: null, points: [] };
  const query = curve.after === null ? "" : `?after=${curve.after}`;
  const events = await api(`/v1/tuning/jobs/${id}/events${query}`);
  if (selectedJob !== id) return; // another job was picked meanwhile; its own update follows
  for (const event of events) {
    curve.after = event.id;
    if (event.type === "progress" && typeof event.data.loss === "number") {
      curve.points.push([event.data.step, event.data.loss]);
    }
  }
  const job = await api(`/v1/tuning/jobs/${id}`);
  if (selectedJob !== id) return;
  $("#curve-title").textContent = `Job ${job.id} (${job.task}), ${job.status}: training loss by step`;
  drawCurve(curve.points);
}

function svg(name, attributes, text) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function drawCurve(points) {
  const box = { left: 48, right: 590, top: 12, bottom: 190 };
  const plot = $("#curve");
  plot.replaceChildren(svg("line", { x1: box.left, y1: box.bottom, x2: box.right, y2: box.bottom }),
    svg("line", { x1: box.left, y1: box.top, x2: box.left, y2: box.bottom }));
  if (points.length === 0) {
    plot.append(svg("text", { x: box.left + 10, y: 100 }, "No progress reported yet."));
    return;
  }
  const steps = points.map((p) => p[0]);
  const losses = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  const [y0, y1] = [Math.min(...losses), Math.max(...losses, Math.min(...losses) + 1e-6)];
  const x = (step) => box.left + ((step - x0) / (x1 - x0)) * (box.right - box.left);
  const y = (loss) => box.bottom - ((loss - y0) / (y1 - y0)) * (box.bottom - box.top);
  plot.append(
    svg("polyline", { points: points.map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" ") }),
    svg("text", { x: 4, y: box.top + 8 }, y1.toFixed(3)),
    svg("text", { x: 4, y: box.bottom }, y0.toFixed(3)),
    svg("text", { x: box.left, y: 210 }, `step ${x0}`),
    svg("text", { x: box.right - 60, y: 210 }, `step ${x1}`),
  );
}

async function tryTask(route) {
  const task = $("#try-task").value || null;
  const input = $("#try-input").value;
  const body = route === "classify" ? { task, input } : { task, input, max_new_tokens: 32 };
  $("#try-output").textContent = "…";
  try {
    const answer = await api(`/v1/${route}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    $("#try-output").textContent = route === "classify"
      ? `${answer.results[0].label}  ${JSON.stringify(answer.results[0].scores)}`
      : answer.outputs[0].text;
  } catch (error) {
    $("#try-output").textContent = error.message;
  }
}

// Another key may be another tenant: nothing read with the last one stays on the page.
function forgetShown() {
  selectedJob = null;
  curve = { job: null, after: null, points: [] };
  $("#tasks tbody").replaceChildren();
  $("#jobs tbody").replaceChildren();
  $("#try-task").replaceChildren(new Option("(bare backbone)", ""));
  $("#try-output").textContent = "";
  $("#curve-title").textContent = "Pick a job to see its training loss.";
  $("#curve").replaceChildren();
}

async function refresh() {
  try {
    const [, jobs] = await Promise.all([refreshTasks(), refreshJobs()]);
    if (selectedJob === null && jobs.length > 0) selectedJob = jobs[0].id;
    await refreshCurve();
    say("");
  } catch (error) {
    say(error.message);
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#key").value = sessionStorage.getItem("softprompt-key") || "";
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("softprompt-key", $("#key").value.trim());
    forgetShown();
    refresh();
  });
  $("#try-classify").addEventListener("click", () => tryTask("classify"));
  $("#try-generate").addEventListener("click", () => tryTask("generate"));
  poll();
});
