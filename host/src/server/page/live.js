// The live view of `staircase serve`: starts pipeline runs through the chat endpoint, follows
// them on /v1/runs/{id}/events, and draws one lane per node, the staircase chart, the answer
// and, at the end, the report. Plain DOM and SVG; no library, nothing fetched but the API.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (selector) => document.querySelector(selector);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "-";
  return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : Math.round(ms) + " ms";
}

function authHeaders() {
  const key = $("#key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function apiError(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message += ": " + body.error.message;
  } catch (_) {
    // Not JSON: the status says enough.
  }
  return new Error(message);
}

// Calls `onData` with the data of every server-sent event of `response`, until it ends.
async function readSse(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) onData(data);
    }
  }
}

// One run drawn from its events: lanes, chart, answer, report.
class RunView {
  constructor(root, title) {
    this.root = root;
    // A view reused for a new run says nothing of the last one.
    delete root.dataset.state;
    delete root.dataset.runId;
    root.replaceChildren();
    root.classList.add("run");
    this.title = el("h2", {}, title || "Run");
    this.status = el("p", { class: "status" }, "starting…");
    this.chart = el("div", { class: "chart" });
    this.lanes = el("div", { class: "lanes" });
    this.answer = el("pre", { class: "answer" });
    this.report = el("div", { class: "report" });
    root.append(
      this.title,
      this.status,
      this.chart,
      el("h3", {}, "Answer"),
      this.answer,
      el("h3", {}, "Agents"),
      this.lanes,
      this.report,
    );
    this.nodes = [];
    this.latest = 0;
    this.drawPending = false;
    this.critical = new Set();
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  apply(event) {
    if (typeof event.at_ms === "number") this.latest = Math.max(this.latest, event.at_ms);
    const node = this.nodes[event.node];
    switch (event.type) {
      case "run_started":
        this.started(event);
        break;
      case "node_started":
        node.started = event.at_ms;
        this.setState(node, "running");
        break;
      case "node_delta":
        this.delta(node, event);
        break;
      case "chunk_handed":
        node.chunks.push({ at: event.at_ms, total: event.total_tokens, to: event.to });
        break;
      case "step_started":
        node.steps.push({ index: event.index, start: event.at_ms, end: null, final: event.is_final });
        node.stepsLabel.textContent = "steps " + node.steps.length;
        if (event.messages) this.prompt(node, event);
        break;
      case "step_finished": {
        const step = node.steps.find((s) => s.index === event.index && s.end === null);
        if (step) step.end = event.at_ms;
        break;
      }
      case "warm_up":
        break;
      case "guard":
        this.guardVerdict(node, event.event);
        break;
      case "released":
        this.released(event);
        break;
      case "plugin_log":
        // What the node's plugin wrote with host.log, in order.
        node.logs.textContent += `${event.plugin} ${event.level}: ${event.message}\n`;
        node.lane.dataset.logs = (Number(node.lane.dataset.logs) || 0) + 1;
        break;
      case "node_finished":
        node.finished = event.at_ms;
        node.cancelled = event.cancelled;
        node.lane.dataset.finishedMs = event.at_ms;
        this.setState(node, event.cancelled ? "cancelled" : "done");
        break;
      case "run_finished":
        this.finished(event.report);
        break;
      case "run_failed":
        this.failed(event.error);
        break;
      default:
        // Newer servers may send more kinds; this view draws the ones it knows.
        break;
    }
    this.scheduleDraw();
  }

  started(event) {
    this.output = event.output;
    this.title.textContent = event.pipeline + " · " + event.mode;
    this.status.textContent = "running";
    this.nodes = event.nodes.map((info, index) => {
      const text = el("pre", { class: "lane-text" });
      const logs = el("pre", { class: "lane-logs" });
      const promptSummary = el("summary", {}, "");
      const promptText = el("pre", {});
      const prompt = el("details", { class: "lane-prompt" }, promptSummary, promptText);
      const state = el("span", { class: "state" }, "waiting");
      const tokens = el("span", { class: "tokens" }, "0 tokens");
      const stepsLabel = el("span", { class: "steps" }, "");
      const guardsLabel = el("span", { class: "guards" }, "");
      const lane = el(
        "div",
        { class: "lane", "data-node": info.id, "data-kind": info.kind },
        el("div", { class: "lane-head" }, el("b", {}, info.id), " ", el("span", { class: "kind" }, info.kind), " ", state, " ", tokens, " ", stepsLabel, " ", guardsLabel),
        text,
        logs,
        prompt,
      );
      if (index === event.output) lane.classList.add("output");
      this.lanes.append(lane);
      return {
        info, lane, text, logs, prompt, promptSummary, promptText, state, tokens, stepsLabel, guardsLabel,
        started: null, first: null, finished: null, cancelled: false,
        count: 0, chunks: [], steps: [], verdicts: new Map(),
      };
    });
  }

  // The messages the node's latest engine request sent to its model (folded until opened).
  prompt(node, event) {
    node.promptSummary.textContent = `prompt of step ${event.index + 1} (${event.messages.length} messages)`;
    node.promptText.textContent = event.messages.map((m) => `${m.role}: ${m.content}`).join("\n\n");
    node.prompt.dataset.step = event.index;
  }

  // What a node's guards did, each guard's verdicts counted: an inner-edge guard's to the
  // text the node hands on, or, on the output node, an answer guard's to the answer.
  guardVerdict(node, verdict) {
    const key = verdict.guard + " " + verdict.verdict;
    node.verdicts.set(key, (node.verdicts.get(key) || 0) + 1);
    node.guardsLabel.textContent = "guards: " + [...node.verdicts].map(([k, n]) => (n > 1 ? `${k} ×${n}` : k)).join(", ");
    node.lane.dataset.guard = verdict.verdict;
  }

  setState(node, state) {
    node.state.textContent = state;
    node.lane.dataset.state = state;
  }

  delta(node, event) {
    if (node.first === null) {
      node.first = event.at_ms;
      node.lane.dataset.firstMs = event.at_ms;
    }
    node.count += event.tokens;
    node.tokens.textContent = node.count + " tokens";
    node.text.textContent += event.text;
    if (node === this.nodes[this.output]) {
      if (!this.answer.dataset.firstMs) {
        // Which other nodes were still generating when the answer began: the staircase.
        const running = this.nodes.filter((n) => n !== node && n.started !== null && n.finished === null);
        this.answer.dataset.firstMs = event.at_ms;
        this.answer.dataset.runningAtFirstAnswer = running.map((n) => n.info.id).join(",");
      }
      this.answer.textContent += event.text;
    }
  }

  // Text the answer's output guards let out: a guarded run's answer as its client saw it.
  // Such a run's lanes count tokens only; the text before the guards never leaves the server.
  released(event) {
    if (!this.answer.dataset.guarded) {
      this.answer.dataset.guarded = "true";
      this.lanes.dataset.withheld = "true";
      this.lanes.before(el("p", { class: "withheld" }, "Output guards watch this answer: the agents' texts are withheld."));
    }
    this.answer.textContent += event.text;
  }

  scheduleDraw() {
    if (this.drawPending) return;
    this.drawPending = true;
    requestAnimationFrame(() => {
      this.drawPending = false;
      this.draw();
    });
  }

  // The staircase chart: a bar per node while it works, a rising line for the output it
  // handed downstream, boxes for steps, a dot at the first token, red for the critical path.
  draw() {
    const width = 900, label = 130, laneHeight = 44, top = 10, axis = 24;
    const height = top + this.nodes.length * laneHeight + axis;
    const span = Math.max(this.latest, 1);
    const x = (ms) => label + ((width - label - 20) * ms) / span;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "staircase", role: "img" });
    const maxTotal = Math.max(1, ...this.nodes.map((n) => n.count));
    this.nodes.forEach((node, i) => {
      const y0 = top + i * laneHeight;
      const critical = this.critical.has(node.info.id);
      const colour = critical ? "#d62728" : "#4c566a";
      const name = svg("text", { x: 4, y: y0 + laneHeight / 2 + 4, class: critical ? "critical" : "" });
      name.textContent = node.info.id;
      chart.append(name);
      chart.append(svg("line", { x1: label, x2: width - 20, y1: y0 + laneHeight - 6, y2: y0 + laneHeight - 6, stroke: "#e5e9f0" }));
      if (node.started === null) return;
      const end = node.finished === null ? this.latest : node.finished;
      const bottom = y0 + laneHeight - 8;
      chart.append(svg("rect", { x: x(node.started), y: bottom - 4, width: Math.max(1, x(end) - x(node.started)), height: 6, fill: colour, opacity: 0.8 }));
      // Steps are drawn for nodes that read others (an agent alone steps once, all along).
      for (const step of node.info.inputs.length ? node.steps : []) {
        const stepEnd = step.end === null ? this.latest : step.end;
        chart.append(svg("rect", { x: x(step.start), y: y0 + 6, width: Math.max(1, x(stepEnd) - x(step.start)), height: laneHeight - 22, fill: "#1f77b4", opacity: step.final ? 0.35 : 0.18, stroke: "#1f77b4" }));
      }
      if (node.chunks.length) {
        const rise = laneHeight - 20;
        let points = `${x(node.started)},${bottom}`;
        let level = bottom;
        for (const chunk of node.chunks) {
          points += ` ${x(chunk.at)},${level}`;
          level = bottom - (rise * chunk.total) / maxTotal;
          points += ` ${x(chunk.at)},${level}`;
        }
        points += ` ${x(end)},${level}`;
        chart.append(svg("polyline", { points, fill: "none", stroke: colour, "stroke-width": 2 }));
      }
      if (node.first !== null) chart.append(svg("circle", { cx: x(node.first), cy: bottom - 1, r: 4, fill: "#2e7d32" }));
      if (node.cancelled) {
        const cx = x(end), cy = bottom - 1;
        chart.append(svg("path", { d: `M${cx - 5},${cy - 5}L${cx + 5},${cy + 5}M${cx - 5},${cy + 5}L${cx + 5},${cy - 5}`, stroke: "#d62728", "stroke-width": 2 }));
      }
    });
    const axisY = height - axis + 14;
    for (let i = 0; i <= 4; i++) {
      const ms = (span * i) / 4;
      const tick = svg("text", { x: x(ms), y: axisY, "text-anchor": "middle", class: "tick" });
      tick.textContent = fmtMs(ms);
      chart.append(tick);
    }
    this.chart.replaceChildren(chart);
  }

  finished(report) {
    this.critical = new Set(report.critical_path_measured.nodes);
    for (const node of this.nodes) {
      node.lane.classList.toggle("critical", this.critical.has(node.info.id));
    }
    this.status.textContent = "finished";
    this.root.dataset.state = "finished";
    const spec = report.nodes
      .map((n) => n.speculation)
      .filter(Boolean)
      .reduce((a, s) => ({ drafted: a.drafted + s.drafted_tokens, accepted: a.accepted + s.accepted_tokens }), { drafted: 0, accepted: 0 });
    const cache = report.cache;
    const share = (part, whole) => (whole ? Math.round((100 * part) / whole) + "%" : "-");
    const rows = report.nodes.map((n) =>
      el(
        "tr",
        { class: this.critical.has(n.id) ? "critical" : "" },
        el("td", {}, n.id), el("td", {}, n.kind), el("td", {}, fmtMs(n.started_ms)), el("td", {}, fmtMs(n.first_token_ms)),
        el("td", {}, fmtMs(n.finished_ms)), el("td", {}, n.output_tokens), el("td", {}, n.steps),
        el("td", {}, n.prompt_tokens + " / " + n.cached_prompt_tokens), el("td", {}, n.cancelled ? "cancelled" : ""),
      ),
    );
    const id = report.run_id;
    this.report.replaceChildren(
      el("h3", {}, "Report"),
      el(
        "div",
        { class: "figures" },
        el("span", { class: "ttft" }, "TTFT ", el("b", {}, fmtMs(report.ttft_ms))),
        el("span", {}, "total ", el("b", {}, fmtMs(report.total_ms))),
        el("span", { class: "path" }, "critical path ", el("b", {}, report.critical_path_measured.nodes.join(" → ")), " (" + fmtMs(report.critical_path_measured.length_ms) + ")"),
      ),
      el(
        "div",
        { class: "figures counters" },
        el("span", {}, "prompt tokens " + cache.prompt_tokens + ", from the prefix cache " + cache.cached_prompt_tokens + " (" + share(cache.cached_prompt_tokens, cache.prompt_tokens) + ")"),
        el("span", {}, "aggregator cache hits " + share(cache.aggregator_cached_prompt_tokens, cache.aggregator_prompt_tokens)),
        el("span", {}, "speculation: " + spec.accepted + " of " + spec.drafted + " drafted tokens accepted"),
      ),
      el(
        "table",
        { class: "nodes" },
        el("thead", {}, el("tr", {}, ...["node", "kind", "started", "first token", "finished", "tokens", "steps", "prompt / cached", ""].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows),
      ),
      el(
        "p",
        { class: "links" },
        el("a", { href: `/v1/runs/${id}/trace`, download: `${id}.json`, class: "trace-link" }, "Chrome trace (Perfetto, chrome://tracing)"),
        " · ",
        el("a", { href: `/v1/runs/${id}/trace.svg`, target: "_blank" }, "staircase chart (SVG)"),
      ),
    );
    this.resolveDone(report);
  }

  failed(error) {
    this.status.textContent = "failed: " + (error && error.message ? error.message : "unknown error");
    this.root.dataset.state = "failed";
    this.resolveDone(null);
  }
}

// Follows run `id` (live or finished) into `view`.
async function follow(id, view) {
  const response = await fetch(`/v1/runs/${id}/events`, { headers: authHeaders() });
  if (!response.ok) throw await apiError(response);
  await readSse(response, (data) => view.apply(JSON.parse(data)));
}

// Starts a run through the chat endpoint (the run id comes in a header, before any event)
// and follows it. Resolves with the report, or null when the run failed.
async function startRun(view, { model, mode, prompt, maxTokens }) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify({
      model,
      mode,
      stream: true,
      max_tokens: maxTokens,
      messages: [{ role: "user", content: prompt }],
    }),
  });
  if (!response.ok) throw await apiError(response);
  const id = response.headers.get("x-staircase-run-id");
  if (!id) throw new Error("the server sent no run id; is `" + model + "` a pipeline?");
  view.root.dataset.runId = id;
  // Read the completion to its end: a client that stops reading cancels the run.
  const completion = readSse(response, (data) => {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) view.failed(chunk.error);
  });
  await Promise.all([completion, follow(id, view)]);
  return view.done;
}

function formValues() {
  return {
    model: $("#pipeline").value,
    mode: $("#mode").value,
    prompt: $("#prompt").value,
    maxTokens: Math.max(1, parseInt($("#max-tokens").value, 10) || 64),
  };
}

async function loadPipelines() {
  const response = await fetch("/v1/models", { headers: authHeaders() });
  if (!response.ok) throw await apiError(response);
  const { data } = await response.json();
  const select = $("#pipeline");
  const chosen = select.value;
  select.replaceChildren(
    ...data
      .filter((m) => m.owned_by === "staircase-pipeline")
      .map((m) => el("option", { value: m.id, title: m.description || "" }, m.id)),
  );
  if (chosen) select.value = chosen;
  else if ([...select.options].some((o) => o.value === "moa")) select.value = "moa";
  document.body.dataset.ready = "true";
}

async function loadRuns() {
  // The caller's own runs; prompts are shown only when asked for.
  const response = await fetch("/v1/runs?include_prompt=true", { headers: authHeaders() });
  if (!response.ok) throw await apiError(response);
  const { data } = await response.json();
  $("#runs-table tbody").replaceChildren(
    ...data.map((run) => {
      const open = el("button", { type: "button", class: "open" }, "open");
      open.addEventListener("click", () => guard(follow(run.id, new RunView($("#opened-run"), run.id))));
      return el(
        "tr",
        { "data-run-id": run.id },
        el("td", {}, run.id), el("td", {}, run.model), el("td", {}, run.mode), el("td", { class: "prompt" }, run.prompt),
        el("td", {}, run.status), el("td", {}, fmtMs(run.ttft_ms)), el("td", {}, fmtMs(run.total_ms)), el("td", {}, open),
      );
    }),
  );
}

async function compare() {
  const values = formValues();
  const summary = $("#compare-summary");
  summary.textContent = "running staircase…";
  const stair = await startRun(new RunView($("#compare-staircase"), "staircase"), { ...values, mode: "staircase" });
  summary.textContent = "running layered…";
  const layered = await startRun(new RunView($("#compare-layered"), "layered"), { ...values, mode: "layered" });
  if (!stair || !layered || stair.ttft_ms === null || layered.ttft_ms === null) {
    summary.textContent = "a run failed or gave no answer; see below";
    return;
  }
  const lower = Math.round(100 * (1 - stair.ttft_ms / layered.ttft_ms));
  const bar = (ms, cls) => el("div", { class: "bar " + cls, style: `width:${(100 * ms) / Math.max(stair.ttft_ms, layered.ttft_ms)}%` }, fmtMs(ms));
  summary.replaceChildren(
    el("p", { class: "headline" }, `TTFT: staircase ${fmtMs(stair.ttft_ms)} vs layered ${fmtMs(layered.ttft_ms)}: ${lower}% lower`),
    bar(stair.ttft_ms, "staircase"),
    bar(layered.ttft_ms, "layered"),
  );
}

// Shows a failed promise in the banner (an awaited error is not an unhandled one).
function guard(promise) {
  promise.catch((error) => showError(error.message || String(error)));
}

let currentView = "live";

function showView(name) {
  currentView = name;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
  $("#run-form").hidden = name === "runs";
  $(".mode-field").hidden = name === "compare";
  $("#run").textContent = name === "compare" ? "Compare" : "Run";
  if (name === "runs") guard(loadRuns());
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}
$("#refresh-runs").addEventListener("click", () => guard(loadRuns()));
$("#key").addEventListener("change", () => guard(loadPipelines()));
$("#run-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const button = $("#run");
  button.disabled = true;
  const work = currentView === "compare" ? compare() : startRun(new RunView($("#live-run")), formValues());
  guard(work.finally(() => (button.disabled = false)));
});
guard(loadPipelines());
