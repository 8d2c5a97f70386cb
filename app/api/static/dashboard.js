// The dashboard: plain JavaScript over the public /v1 API, with the key the user types (kept for this
// browser tab only). Text from the server is only ever set with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (selector) => document.querySelector(selector);
let selectedJob = null;
let curve = { job: null, after: null, points: [] };
let selectedEvaluation = null;
let evaluations = []; // the last page read, for drawing a clicked one at once
// The figures an evaluation compares, in the order people read them (as `softprompt eval` prints them);
// the nested ones (per_label, confusion_matrix, signatures) stay in the API's answer.
const METRICS = ["accuracy", "macro_f1", "bleu", "chrf", "rouge_l", "exact_match", "f1"];
// Classification figures are fractions, shown as percentages; generation figures are already 0-100.
const FRACTIONS = new Set(["accuracy", "macro_f1"]);
const PICK_EVALUATION = "Pick a succeeded evaluation to compare its models.";

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
      [task.name, version.version, version.parent, version.method, version.kind, percent(m.val_accuracy),
        percent(m.val_macro_f1), percent(m.zero_shot_accuracy), day(version.created_at)].forEach((text) => cell(row, text));
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

const modelName = (model) => (model === null ? "bare backbone" : model);
const points = (name, value) => (FRACTIONS.has(name) ? 100 * value : value);

function figure(name, value) {
  if (typeof value !== "number") return null;
  return FRACTIONS.has(name) ? percent(value) : value.toFixed(1);
}

// The plain numbers among an evaluation's metrics: the known ones in METRICS order, then any other.
function metricNames(evaluation) {
  const present = new Set();
  for (const result of evaluation.results) {
    for (const [name, value] of Object.entries(result.metrics || {})) {
      if (typeof value === "number") present.add(name);
    }
  }
  return [...METRICS.filter((name) => present.has(name)),
    ...[...present].filter((name) => !METRICS.includes(name)).sort()];
}

async function refreshEvaluations() {
  const page = await api("/v1/evaluations?limit=20");
  const body = $("#evaluations tbody");
  body.replaceChildren();
  for (const evaluation of page.data) {
    const row = body.insertRow();
    row.className = evaluation.id === selectedEvaluation ? "evaluation selected" : "evaluation";
    row.dataset.evaluationId = evaluation.id;
    const main = metricNames(evaluation)[0];
    const headline = main
      ? evaluation.results.map((r) => `${main} ${figure(main, r.metrics[main]) ?? "–"}`).join("\n")
      : evaluation.error ? evaluation.error.code : null;
    cell(row, evaluation.id);
    cell(row, evaluation.status, `status-${evaluation.status}`);
    cell(row, evaluation.dataset);
    cell(row, `${evaluation.progress.done} / ${evaluation.progress.total}`);
    cell(row, evaluation.results.map((r) => modelName(r.model)).join("\n"), "lines");
    cell(row, headline, "lines");
    row.addEventListener("click", () => selectEvaluation(evaluation.id));
  }
  evaluations = page.data;
  return page.data;
}

function selectEvaluation(id) {
  selectedEvaluation = id;
  for (const row of document.querySelectorAll("#evaluations tr.evaluation")) {
    row.classList.toggle("selected", Number(row.dataset.evaluationId) === id);
  }
  drawComparison();
}

// One bar chart per metric, a bar per model, from the evaluation as the last page read it.
function drawComparison() {
  const evaluation = evaluations.find((e) => e.id === selectedEvaluation);
  const charts = $("#comparison-charts");
  charts.replaceChildren();
  if (!evaluation) {
    $("#comparison-title").textContent = PICK_EVALUATION;
    return;
  }
  const { done, total } = evaluation.progress;
  const models = evaluation.results.map((r) => modelName(r.model)).join(" vs ");
  $("#comparison-title").textContent = evaluation.status === "succeeded"
    ? `Evaluation ${evaluation.id} on dataset ${evaluation.dataset ?? "–"}: ${models}`
    : `Evaluation ${evaluation.id}, ${evaluation.status} (${done} / ${total} rows): no metrics yet.`;
  if (evaluation.status !== "succeeded") return;
  for (const name of metricNames(evaluation)) {
    const chart = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = FRACTIONS.has(name) ? `${name} (%)` : name;
    chart.append(caption, drawBars(name, evaluation.results));
    charts.append(chart);
  }
}

function drawBars(name, results) {
  // Every metric on one 0-100 scale, with its 100 line drawn, so a bar's height reads against it.
  const box = { left: 32, top: 14, bottom: 130, slot: 90 };
  const right = box.left + box.slot * results.length;
  const y = (value) => box.bottom - (value / 100) * (box.bottom - box.top);
  const plot = svg("svg", { viewBox: `0 0 ${right + 8} 160`, role: "img", "aria-label": `${name} by model`,
    "data-metric": name });
  plot.append(
    svg("line", { class: "full", x1: box.left, y1: y(100), x2: right, y2: y(100) }),
    svg("line", { x1: box.left, y1: box.bottom, x2: right, y2: box.bottom }),
    svg("text", { x: 4, y: y(100) + 4 }, "100"),
    svg("text", { x: 4, y: box.bottom + 4 }, "0"),
  );
  results.forEach((result, i) => {
    const value = (result.metrics || {})[name];
    const top = y(typeof value === "number" ? points(name, value) : 0);
    const x = box.left + i * box.slot + 0.15 * box.slot;
    const width = 0.7 * box.slot;
    const middle = { x: x + width / 2, "text-anchor": "middle" };
    plot.append(
      svg("rect", { class: `bar model-${i % 8}`, x, y: top, width, height: box.bottom - top }),
      svg("text", { ...middle, class: "value", y: top - 3 }, figure(name, value) ?? "–"),
      svg("text", { ...middle, class: "model", y: box.bottom + 16 }, modelName(result.model)),
    );
  });
  return plot;
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
  selectedEvaluation = null;
  evaluations = [];
  $("#tasks tbody").replaceChildren();
  $("#jobs tbody").replaceChildren();
  $("#evaluations tbody").replaceChildren();
  $("#comparison-title").textContent = PICK_EVALUATION;
  $("#comparison-charts").replaceChildren();
  $("#try-task").replaceChildren(new Option("(bare backbone)", ""));
  $("#try-output").textContent = "";
  $("#curve-title").textContent = "Pick a job to see its training loss.";
  $("#curve").replaceChildren();
}

async function refresh() {
  try {
    const [, jobs, shown] = await Promise.all([refreshTasks(), refreshJobs(), refreshEvaluations()]);
    if (selectedJob === null && jobs.length > 0) selectedJob = jobs[0].id;
    const succeeded = shown.find((e) => e.status === "succeeded");
    if (selectedEvaluation === null && succeeded) selectEvaluation(succeeded.id);
    else drawComparison();
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
