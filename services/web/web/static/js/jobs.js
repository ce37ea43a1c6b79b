// The jobs pages: the live list with the "new job" form generated from GET /jobs/schema, and one job's
// page with its live log, charts, attempts and the models it produced.
import { lineChart } from "./charts.js";
import { events, json } from "./http.js";
import { age, h, showError, since } from "./ui.js";

const POLL_MS = 2000;
const ACTIVE = ["waiting", "queued", "started"];
const RETRYABLE = ["failed", "stopped", "canceled"];
const STAGE_OF_KIND = { base_train: "base", mid_train: "mid", chat_sft: "sft", chat_rl: "rl" };

function statusBadge(status) {
  return h("span", { class: `status ${status}` }, status);
}

function progressBar(record) {
  const percent = record.progress?.percent;
  if (percent == null) return h("span", { class: "muted" }, record.status === "finished" ? "100%" : "–");
  return h("div", { style: "display:flex;gap:.4rem;align-items:center" },
    h("div", { class: "progress", role: "progressbar", "aria-valuenow": percent }, h("div", { style: `width:${percent}%` })),
    `${percent.toFixed(0)}%`);
}

function actions(record, after) {
  const act = (label, path, method = "POST", cls = "ghost") =>
    h("button", { class: cls, onclick: async () => {
      try {
        await json(path, { method });
        after(label);
      } catch (error) {
        showError(error);
      }
    } }, label);
  return h("span", { style: "display:flex;gap:.3rem" },
    ACTIVE.includes(record.status) ? act("Stop", `/api/jobs/${record.id}/stop`, "POST", "danger") : null,
    RETRYABLE.includes(record.status) ? act("Retry", `/api/jobs/${record.id}/retry`) : null,
    ACTIVE.includes(record.status) ? null : act("Delete", `/api/jobs/${record.id}`, "DELETE"));
}

// -- the list ----------------------------------------------------------------------------------

// Per queue (GET /workers): the workers that take it, how many of them are free now (a worker taking both
// queues is busy for both), the jobs queued on it; a queue with jobs and no worker says how to start
// one, since its jobs would wait there forever.
const QUEUES = {
  gpu: { label: "model training and evaluation", start: "docker compose up -d worker" },
  cpu: { label: "tokenizers, exports, imports and file checks", start: "docker compose up -d cpu-worker" },
};

function workersSummary(overview) {
  const parts = overview.queues.map((queue) => {
    const { label, start } = QUEUES[queue.name] ?? { label: queue.name, start: "python -m worker" };
    const free = overview.workers.filter((w) => !w.busy && w.queues.includes(queue.name)).length;
    const stuck = queue.waiting > 0 && queue.workers === 0;
    return h("span", { "data-queue": queue.name, class: stuck ? "stuck" : null },
      `${label}: ${queue.workers} worker${queue.workers === 1 ? "" : "s"}`,
      queue.workers ? `, ${free} free` : "", queue.waiting ? `, ${queue.waiting} queued` : "",
      stuck ? ` — no live worker takes these: start one (${start}, or make up)` : "");
  });
  return ["Workers · ", ...parts.flatMap((part, i) => (i ? [" · ", part] : [part]))];
}

export async function jobsPage(root) {
  const filters = { status: "", kind: "" };
  const schemas = await json("/api/jobs/schema").catch((error) => (showError(error), null));
  // What people start most, as whole specs (make demo submits the first one too).
  const presets = await (await fetch("/presets.json")).json();
  const body = h("tbody", { id: "jobs-body" });
  const count = h("span", { class: "muted" });
  const workers = h("p", { class: "muted", id: "workers" });
  const formCard = h("div", { class: "card", id: "new-job", hidden: true });
  const select = (name, options) =>
    h("select", { "aria-label": name, onchange: (e) => { filters[name] = e.target.value; refresh(); } },
      h("option", { value: "" }, `any ${name}`), ...options.map((o) => h("option", { value: o }, o)));
  root.append(h("div", { class: "page" },
    h("div", { class: "toolbar" },
      h("h1", { style: "margin:0;font-size:1.4rem" }, "Jobs"), h("span", { class: "spacer" }),
      select("status", ["waiting", "queued", "started", "finished", "failed", "stopped", "canceled"]),
      select("kind", Object.keys(schemas || {})),
      h("button", { id: "new-job-button", onclick: () => { formCard.hidden = !formCard.hidden; } }, "New job")),
    workers,
    formCard,
    h("div", { class: "table-scroll" }, h("table", {}, h("thead", {}, h("tr", {},
      ...["job", "kind", "run", "status", "progress", "ETA", "age", ""].map((t) => h("th", { class: ["ETA", "age", "kind"].includes(t) ? "optional" : null }, t)))), body)),
    count));
  if (schemas) formCard.append(newJobForm(schemas, presets));

  async function refresh() {
    const query = new URLSearchParams({ limit: "50", ...Object.fromEntries(Object.entries(filters).filter(([, v]) => v)) });
    try {
      // The workers line is secondary: the jobs are listed even when it cannot be read.
      const [page, overview] = await Promise.all([json(`/api/jobs?${query}`), json("/api/workers").catch(() => null)]);
      workers.replaceChildren(...(overview ? workersSummary(overview) : []));
      body.replaceChildren(...page.jobs.map((record) => h("tr", { "data-job": record.id },
        h("td", {}, h("a", { href: `#/jobs/${record.id}` }, record.id.slice(0, 8))),
        h("td", { class: "optional" }, record.kind), h("td", {}, record.run), h("td", {}, statusBadge(record.status)),
        h("td", {}, progressBar(record)),
        h("td", { class: "optional" }, record.status === "started" ? age(record.progress?.eta_seconds) : ""),
        h("td", { class: "optional", title: record.created_at }, age(since(record.created_at))),
        h("td", {}, actions(record, refresh)))));
      count.textContent = page.total ? `${page.jobs.length} of ${page.total} jobs` : "No jobs yet: start one with New job.";
    } catch (error) {
      showError(error);
    }
  }
  await refresh();
  const timer = setInterval(refresh, POLL_MS);
  return () => clearInterval(timer);
}

// -- the form, from the JSON Schema --------------------------------------------------------------

function resolve(schema, root) {
  return schema.$ref ? root.$defs[schema.$ref.split("/").at(-1)] : schema;
}

// A number's bounds as the help line shows them: "1 … 64", "> 0 … 1000" (a strict minimum), "≥ -1".
function range(kind) {
  const low = kind.minimum != null ? `${kind.minimum}` : kind.exclusiveMinimum != null ? `> ${kind.exclusiveMinimum}` : null;
  if (low == null && kind.maximum == null) return null;
  return `${low ?? "−∞"} … ${kind.maximum ?? "∞"}`;
}

// One input per field: its type, bounds and enum from the schema; empty means "the default".
function field(name, property, path, root) {
  const options = property.anyOf ? property.anyOf.filter((o) => o.type !== "null") : [property];
  const kind = options[0] || {};
  const help = [property.description, range(kind),
    property.default != null && typeof property.default !== "object" && `default ${property.default}`].filter(Boolean).join(" · ");
  const choices = kind.enum ?? (kind.const !== undefined ? [kind.const] : null); // one choice is a const
  let input;
  if (choices) {
    input = h("select", {}, h("option", { value: "" }, "default"), ...choices.map((v) => h("option", { value: v }, v)));
  } else if (kind.type === "boolean") {
    input = h("select", {}, h("option", { value: "" }, "default"), h("option", { value: "true" }, "yes"), h("option", { value: "false" }, "no"));
  } else if (kind.type === "integer" || kind.type === "number") {
    input = h("input", { type: "number", min: kind.minimum, max: kind.maximum, step: kind.type === "integer" ? 1 : "any" });
  } else {
    input = h("input", { type: "text", pattern: kind.pattern ? kind.pattern.replace(/^\^|\$$/g, "") : null });
  }
  input.dataset.path = path;
  input.dataset.type = kind.type || "string";
  input.name = path;
  return h("label", { title: property.description || "" }, name, input, help ? h("small", {}, help) : null);
}

function fieldsOf(schema, root, prefix) {
  const properties = resolve(schema, root).properties || {};
  return Object.entries(properties).map(([name, property]) => field(name, property, `${prefix}.${name}`, root));
}

function newJobForm(schemas, presets) {
  const kindSelect = h("select", { id: "job-kind", "aria-label": "kind" }, ...Object.keys(schemas).map((k) => h("option", { value: k }, k)));
  const runInput = h("input", { id: "job-run", value: "demo", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}", "aria-label": "run", required: true });
  const fields = h("div", { id: "job-fields" });
  const about = h("p", { class: "muted", id: "preset-about" });
  const presetSelect = h("select", { id: "job-preset", "aria-label": "preset" },
    h("option", { value: "" }, "choose a preset…"),
    ...Object.entries(presets).map(([name, preset]) => h("option", { value: name, title: preset.about }, name)));

  function renderFields() {
    const root = schemas[kindSelect.value];
    const config = resolve(root.properties.config, root);
    if (kindSelect.value !== "pipeline") {
      fields.replaceChildren(h("div", { class: "form-grid" }, ...fieldsOf(config, root, "config")));
      return;
    }
    const stages = config.properties.skip.items.enum;
    // The pipeline's own settings (its recipe, whether RL runs), then each stage's config.
    const own = Object.entries(config.properties).filter(([name]) => name !== "skip" && !stages.includes(name));
    fields.replaceChildren(
      h("div", { class: "form-grid" }, ...own.map(([name, property]) => field(name, property, `config.${name}`, root))),
      h("fieldset", {}, h("legend", {}, "stages to skip"),
        ...stages.map((stage) => h("label", { style: "margin-right:1rem" },
          h("input", { type: "checkbox", "data-skip": stage }), ` ${stage}`))),
      ...stages.map((stage) => h("fieldset", {}, h("legend", {}, stage),
        h("div", { class: "form-grid" }, ...fieldsOf(config.properties[stage], root, `config.${stage}`)))));
  }

  function applyPreset(name) {
    const preset = presets[name]?.spec;
    if (!preset) return;
    about.textContent = presets[name].about;
    kindSelect.value = preset.kind;
    runInput.value = preset.run;
    renderFields();
    const fill = (values, prefix) => {
      for (const [key, value] of Object.entries(values)) {
        if (key === "skip") {
          for (const box of fields.querySelectorAll("[data-skip]")) box.checked = value.includes(box.dataset.skip);
        } else if (value && typeof value === "object") fill(value, `${prefix}.${key}`);
        else {
          const input = fields.querySelector(`[data-path="${prefix}.${key}"]`);
          if (input) input.value = String(value);
        }
      }
    };
    fill(preset.config, "config");
  }

  function spec() {
    const config = {};
    for (const input of fields.querySelectorAll("[data-path]")) {
      if (input.value === "") continue;
      const value = input.dataset.type === "integer" || input.dataset.type === "number" ? Number(input.value)
        : input.dataset.type === "boolean" ? input.value === "true" : input.value;
      const keys = input.dataset.path.split(".").slice(1);
      let target = config;
      for (const key of keys.slice(0, -1)) target = target[key] ??= {};
      target[keys.at(-1)] = value;
    }
    const skipped = [...fields.querySelectorAll("[data-skip]:checked")].map((box) => box.dataset.skip);
    if (kindSelect.value === "pipeline") config.skip = skipped;
    return { kind: kindSelect.value, run: runInput.value, config };
  }

  kindSelect.addEventListener("change", renderFields);
  presetSelect.addEventListener("change", () => applyPreset(presetSelect.value));
  renderFields();
  return h("form", { onsubmit: async (e) => {
    e.preventDefault();
    try {
      const record = await json("/api/jobs", { method: "POST", body: spec() });
      location.hash = `#/jobs/${record.id}`;
    } catch (error) {
      showError(error);
    }
  } },
  h("div", { class: "toolbar" }, h("label", {}, "Preset ", presetSelect), h("label", {}, "Kind ", kindSelect),
    h("label", {}, "Run ", runInput), h("button", { type: "submit", id: "submit-job" }, "Submit")),
  about, fields);
}

// -- one job ---------------------------------------------------------------------------------------

export async function jobPage(root, params, jobId) {
  let record = await json(`/api/jobs/${jobId}`);
  const trains = record.kind !== "pipeline"; // a pipeline's log and curves are its stages'
  const controller = new AbortController();
  const summary = h("div", { class: "card", id: "job-summary" });
  const chartsBox = h("div", { class: "charts", id: "charts" });
  const logBox = h("pre", { class: "log", id: "log", tabindex: 0 });
  const produced = h("div", { id: "produced" });
  const attempts = h("div", { id: "attempts" });
  let paused = false;
  let search = "";
  const lines = [];
  const pause = h("button", { class: "ghost", id: "log-pause", onclick: () => {
    paused = !paused;
    pause.textContent = paused ? "Resume scrolling" : "Pause scrolling";
    if (!paused) renderLog();
  } }, "Pause scrolling");
  root.append(h("div", { class: "page" },
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    summary, produced,
    trains ? [h("h2", {}, "Charts"), chartsBox,
      h("div", { class: "toolbar" }, h("h2", { style: "margin:0" }, "Log"), h("span", { class: "spacer" }),
        h("input", { type: "search", id: "log-search", placeholder: "Search the log", "aria-label": "Search the log",
          oninput: (e) => { search = e.target.value; renderLog(); } }), pause),
      logBox,
      h("h2", {}, "Attempts"), attempts] : null));

  const charts = {
    loss: lineChart(chartsBox, "train loss", "loss"),
    val_bpb: lineChart(chartsBox, "val bpb", "val_bpb"),
    tok_per_s: lineChart(chartsBox, "tokens / s", "tok_per_s"),
    mfu: lineChart(chartsBox, "MFU", "mfu"),
  };

  function renderLog() {
    const shown = search ? lines.filter((line) => line.toLowerCase().includes(search.toLowerCase())) : lines;
    logBox.replaceChildren(...shown.slice(-5000).map((line) => {
      if (!search) return `${line}\n`;
      const at = line.toLowerCase().indexOf(search.toLowerCase());
      return h("span", {}, line.slice(0, at), h("mark", {}, line.slice(at, at + search.length)), `${line.slice(at + search.length)}\n`);
    }));
    if (!paused) logBox.scrollTop = logBox.scrollHeight;
  }

  let logFrame = null;
  const follow = (path, onData) =>
    events(path, { signal: controller.signal, onEvent: ({ event, data }) => event === "message" && onData(data) })
      .catch((error) => error.name !== "AbortError" && showError(error));
  if (trains) follow(`/api/jobs/${jobId}/logs?follow=true`, (line) => {
    lines.push(line);
    if (lines.length > 20000) lines.splice(0, lines.length - 20000);
    if (!paused) logFrame ??= requestAnimationFrame(() => { logFrame = null; renderLog(); });
  });
  if (trains) follow(`/api/jobs/${jobId}/metrics?follow=true`, (data) => {
    const values = JSON.parse(data);
    for (const [key, chart] of Object.entries(charts)) chart.push(values.step, values[key]);
  });

  let stages = [];
  async function show() { // the record as it is now: its stages, the summary, and once it ended its models
    stages = await Promise.all((record.stages || []).map((id) => json(`/api/jobs/${id}`)));
    renderSummary();
    if (!ACTIVE.includes(record.status)) await renderProduced();
  }
  async function refresh() {
    try {
      record = await json(`/api/jobs/${jobId}`);
      await show();
    } catch (error) {
      showError(error);
    }
  }

  function renderSummary() {
    const r = record;
    const times = [["created", r.created_at], ["started", r.started_at], ["ended", r.ended_at]]
      .filter(([, t]) => t).map(([name, t]) => `${name} ${new Date(t).toLocaleString()}`);
    summary.replaceChildren(...[
      h("div", { class: "toolbar", style: "margin:0" },
        h("h1", { style: "margin:0;font-size:1.3rem" }, `${r.kind} · ${r.run}`), statusBadge(r.status), progressBar(r),
        r.status === "started" && r.progress?.eta_seconds != null ? h("span", { class: "muted" }, `ETA ${age(r.progress.eta_seconds)}`) : null,
        h("span", { class: "spacer" }), actions(r, refresh)),
      h("p", { class: "muted" }, `${r.id} · ${times.join(" · ")}`),
      r.error ? h("p", { style: "color:var(--danger)" }, r.error) : null,
      stages.length ? h("table", { id: "stages" }, h("tbody", {}, ...stages.map((stage) => h("tr", {},
        h("td", {}, h("a", { href: `#/jobs/${stage.id}` }, stage.kind)), h("td", {}, statusBadge(stage.status)),
        h("td", {}, progressBar(stage)))))) : null,
      r.pipeline_id ? h("p", {}, "Part of ", h("a", { href: `#/jobs/${r.pipeline_id}` }, `pipeline ${r.pipeline_id.slice(0, 8)}`)) : null,
      h("details", {}, h("summary", { class: "muted" }, "config"), h("pre", {}, JSON.stringify(r.config, null, 2))),
    ].filter(Boolean));
    attempts.replaceChildren(r.attempts?.length
      ? h("div", { class: "table-scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ...["worker", "started", "resumed from step", "ended", "why"].map((t) => h("th", {}, t)))),
        h("tbody", {}, ...r.attempts.map((a) => h("tr", {},
          h("td", {}, a.worker), h("td", {}, a.started_at ? new Date(a.started_at).toLocaleString() : ""),
          h("td", {}, a.resumed_from_step ?? "–"), h("td", {}, a.ended_at ? new Date(a.ended_at).toLocaleString() : ""),
          h("td", {}, a.end_reason ?? ""))))))
      : h("p", { class: "muted" }, "not started yet"));
  }

  let producedShown = false;
  async function renderProduced() {
    const stage = record.kind === "import" ? record.config.stage : STAGE_OF_KIND[record.kind];
    if (producedShown) return;
    if (record.kind === "export" && record.status === "finished" && record.result?.model) {
      producedShown = true;
      const id = record.result.model;
      produced.replaceChildren(h("h2", {}, "Export"), h("p", {}, h("a", { href: `#/models/${id}` }, id), " · its page has Download"));
      return;
    }
    if (!stage) return;
    producedShown = true;
    const models = (await json("/api/models").catch(() => [])).filter((m) => m.run === record.run && m.stage === stage);
    produced.replaceChildren(...(models.length ? [h("h2", {}, "Models"), h("ul", {}, ...models.map((m) =>
      h("li", {}, h("a", { href: `#/models/${m.id}` }, m.id), " · ", h("a", { href: `#/chat?model=${m.id}` }, "chat with it"))))] : []));
  }

  await show();
  const timer = setInterval(() => (ACTIVE.includes(record.status) ? refresh() : null), POLL_MS);
  return () => {
    clearInterval(timer);
    controller.abort();
  };
}
