// The data pages: uploads (drag and drop, with a progress bar) and every uploaded file; one file's
// validation report (problems by line, statistics, a few rows rendered as a chat), its download, and
// "Fine-tune a model on this file", which uploads a mixture naming it and starts an SFT job on it.
import { failure, json, request, token } from "./http.js";
import { age, h, megabytes, showError, since } from "./ui.js";

const POLL_MS = 2000;
const PURPOSES = {
  conversations: { accept: ".jsonl", about: "chat conversations to fine-tune on: JSONL, ours, OpenAI's {messages} or ShareGPT's {conversations}" },
  pretrain: { accept: ".parquet,.jsonl,.txt,.md", about: "text to pretrain (and train a tokenizer) on: parquet or JSONL with text, or .txt/.md files (several make one corpus)" },
  mixture: { accept: ".yaml,.yml", about: "a mixture YAML whose entries name uploaded conversations: {source: file, id: file-…}" },
  questions: { accept: ".jsonl", about: "GSM8K-style questions for RL: {question, answer ending in #### <number>}" },
};

function statusBadge(status) {
  const look = { ready: "finished", invalid: "failed", validating: "started" }[status];
  return h("span", { class: `status ${look}` }, status);
}

const names = (record) => record.parts.map((p) => p.name).join(", ");

// POST /files with XMLHttpRequest, not fetch: only it reports how much of the body has gone.
function send(form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/files");
    if (token.get()) xhr.setRequestHeader("Authorization", `Bearer ${token.get()}`);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new Error("the upload failed: the connection was lost"));
    xhr.onload = async () => {
      if (xhr.status === 201) return resolve(JSON.parse(xhr.responseText));
      const response = new Response(xhr.responseText, {
        status: xhr.status, statusText: xhr.statusText, headers: { "Content-Type": "application/json" } });
      reject(await failure(response));
    };
    xhr.send(form);
  });
}

// The purpose's fields first: the API refuses a file of the wrong kind before its bytes arrive.
function uploadForm({ purpose, tokenizer, valFraction }, files) {
  const form = new FormData();
  form.append("purpose", purpose);
  if (tokenizer) form.append("tokenizer", tokenizer);
  if (valFraction !== "") form.append("val_fraction", valFraction);
  for (const file of files) form.append("file", file, file.name);
  return form;
}

// -- the list and the upload ------------------------------------------------------------------------

export async function dataPage(root) {
  const models = await json("/api/models").catch((error) => (showError(error), []));
  const runs = [...new Set(models.map((m) => m.run))];
  const body = h("tbody", { id: "files-body" });
  const purpose = h("select", { id: "upload-purpose", "aria-label": "purpose" },
    ...Object.keys(PURPOSES).map((p) => h("option", { value: p }, p)));
  const about = h("small", { id: "purpose-about" });
  const tokenizer = h("select", { id: "upload-tokenizer", "aria-label": "tokenizer" },
    h("option", { value: "" }, "none (count characters)"), ...runs.map((run) => h("option", { value: run }, `run ${run}`)));
  const valFraction = h("input", { id: "upload-val", type: "number", min: 0, max: 0.5, step: "any", value: "0.05" });
  const input = h("input", { id: "upload-input", type: "file", multiple: true, hidden: true });
  const bar = h("div", { style: "width:0%" });
  const progress = h("div", { class: "progress wide", id: "upload-progress", role: "progressbar", hidden: true }, bar);
  const note = h("span", { class: "muted", id: "upload-status" });
  const showPurpose = () => { about.textContent = PURPOSES[purpose.value].about; input.accept = PURPOSES[purpose.value].accept; };
  purpose.addEventListener("change", showPurpose);
  showPurpose();

  async function upload(files) {
    if (!files.length) return;
    progress.hidden = false;
    bar.style.width = "0%";
    note.textContent = `uploading ${files.length > 1 ? `${files.length} files` : files[0].name}…`;
    try {
      const form = uploadForm({ purpose: purpose.value, tokenizer: tokenizer.value, valFraction: valFraction.value }, files);
      const record = await send(form, (fraction) => { bar.style.width = `${(100 * fraction).toFixed(0)}%`; });
      location.hash = `#/data/${record.id}`;
    } catch (error) {
      note.textContent = "";
      showError(error);
    } finally {
      progress.hidden = true;
      input.value = "";
    }
  }

  const drop = h("div", { class: "dropzone", id: "drop-zone", tabindex: 0,
    onclick: () => input.click(),
    onkeydown: (e) => (e.key === "Enter" || e.key === " ") && input.click(),
    ondragover: (e) => { e.preventDefault(); drop.classList.add("over"); },
    ondragleave: () => drop.classList.remove("over"),
    ondrop: (e) => { e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]); } },
  "Drop files here, or click to choose", h("small", { class: "muted" }, "a folder's text files may go together as one corpus"));
  input.addEventListener("change", () => upload([...input.files]));

  root.append(h("div", { class: "page" },
    h("div", { class: "toolbar" }, h("h1", { style: "margin:0;font-size:1.4rem" }, "Data")),
    h("div", { class: "card", id: "upload-card" },
      h("div", { class: "form-grid" },
        h("label", {}, "purpose", purpose, about),
        h("label", {}, "tokenizer", tokenizer, h("small", {}, "whose tokens the statistics count")),
        h("label", {}, "val fraction", valFraction, h("small", {}, "rows set aside for validation (0 … 0.5)"))),
      drop, input, h("div", { class: "toolbar" }, progress, note)),
    h("div", { class: "table-scroll" }, h("table", {}, h("thead", {}, h("tr", {},
      ...["file", "purpose", "status", "rows", "size", "age"].map((t) => h("th", {}, t)))), body))));

  async function refresh() {
    try {
      const records = await json("/api/files");
      body.replaceChildren(...records.map((r) => h("tr", { "data-file": r.id },
        h("td", {}, h("a", { href: `#/data/${r.id}` }, names(r))), h("td", {}, r.purpose), h("td", {}, statusBadge(r.status)),
        h("td", {}, r.stats ? String(r.stats.rows ?? r.stats.documents ?? r.stats.train_entries ?? "") : ""),
        h("td", {}, megabytes(r.bytes)), h("td", { title: r.created_at }, age(since(r.created_at))))));
      if (!records.length) body.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No files yet: drop one above.")));
    } catch (error) {
      showError(error);
    }
  }
  await refresh();
  const timer = setInterval(refresh, POLL_MS);
  return () => clearInterval(timer);
}

// -- one file -------------------------------------------------------------------------------------

function problemsTable(record) {
  if (!record.problems_total) return null;
  const more = record.problems_total - record.problems.length;
  return h("div", { class: "card", id: "problems" },
    h("h2", {}, `${record.problems_total} problem${record.problems_total > 1 ? "s" : ""}: nothing of this file is trained on`),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "where"), h("th", {}, "reason"))),
      h("tbody", {}, ...record.problems.map((p) => h("tr", { "data-line": p.line ?? "" },
        h("td", {}, record.parts.length > 1 ? `${p.part}${p.line ? `:${p.line}` : ""}` : (p.line ? `line ${p.line}` : "the file")),
        h("td", {}, p.reason))))),
    more > 0 ? h("p", { class: "muted" }, `and ${more} more`) : null,
    h("p", { class: "muted" }, "Fix the lines and upload the file again."));
}

function histogram(hist) {
  const top = Math.max(1, ...hist.counts);
  const labels = [...hist.edges.map((e) => `≤ ${e}`), `> ${hist.edges.at(-1)}`];
  return h("div", { class: "histogram", id: "histogram", title: `row lengths in ${hist.unit}` },
    ...hist.counts.map((count, i) => h("div", { class: "bar-row" }, h("span", {}, labels[i]),
      h("div", { class: "bar" }, h("div", { style: `width:${(100 * count) / top}%` })), h("span", {}, String(count)))));
}

function statistics(stats) {
  if (!stats) return null;
  const rows = Object.entries(stats).filter(([k, v]) => k !== "histogram" && typeof v !== "object")
    .concat(Object.entries(stats.roles || {}).map(([role, n]) => [`${role} messages`, n]));
  return h("div", { class: "card", id: "statistics" }, h("h2", {}, "Statistics"),
    h("table", { class: "numbers" }, h("tbody", {}, ...rows.map(([k, v]) => h("tr", {}, h("th", {}, k.replaceAll("_", " ")), h("td", {}, v == null ? "—" : String(v)))))),
    stats.histogram ? h("div", {}, h("h3", {}, `lengths (${stats.histogram.unit})`), histogram(stats.histogram)) : null);
}

// Sample rows as the chat page shows a conversation; always as text, never as markup.
function samples(record) {
  if (!record.samples?.length) return null;
  const text = (content) => (typeof content === "string" ? content : content.map((p) => p.text).join(""));
  const rendered = record.samples.map((sample) => h("div", { class: "sample" },
    ...(typeof sample === "string" ? [h("pre", {}, sample)] : (sample.messages || []).map((m) =>
      h("div", { class: `message ${m.role}` }, h("div", { class: "meta" }, m.role), h("div", { class: "bubble" }, text(m.content)))))));
  return h("div", { class: "card", id: "samples" }, h("h2", {}, "Sample rows"), ...rendered);
}

// The mixture that mixes the file in: its train split N times (plus SmolTalk rows if asked for), and its
// val split (else its first rows) to measure val bpb on.
function mixtureYaml(record, epochs, smoltalkRows) {
  const entry = `{source: file, id: ${record.id}`;
  const val = record.stats.val_rows > 0 ? `${entry}, split: val}` : `${entry}, rows: 50}`;
  return `train:\n  - ${entry}, epochs: ${epochs}}\n`
    + (smoltalkRows > 0 ? `  - {source: smoltalk, split: train, rows: ${smoltalkRows}}\n` : "")
    + `val:\n  - ${val}\n`;
}

async function settled(fileId) {
  for (;;) {
    const record = await json(`/api/files/${fileId}`);
    if (record.status !== "validating") return record;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function fineTuneForm(record, models) {
  const sources = models.filter((m) => ["base", "mid", "sft"].includes(m.stage));
  const model = h("select", { id: "ft-model", "aria-label": "model" }, ...sources.map((m) => h("option", { value: m.id }, m.id)));
  const run = h("input", { id: "ft-run", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}" });
  const epochs = h("input", { id: "ft-epochs", type: "number", min: 0.1, max: 100, step: "any", value: 1 });
  const smoltalk = h("input", { id: "ft-smoltalk", type: "number", min: 0, step: 1, value: 0 });
  const steps = h("input", { id: "ft-steps", type: "number", min: 1, step: 1, placeholder: "one pass" });
  const chatcore = h("input", { id: "ft-chatcore", type: "checkbox" });
  const status = h("span", { class: "muted", id: "ft-status" });
  const chosen = () => sources.find((m) => m.id === model.value);
  const suggest = () => { if (chosen()) run.value = `${chosen().run}-ft`; };
  model.addEventListener("change", suggest);
  suggest();
  const submit = h("button", { type: "submit", id: "ft-submit", disabled: !sources.length }, "Start fine-tuning");
  const form = h("form", { class: "card", id: "finetune-form", onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      status.textContent = "uploading the mixture…";
      const yaml = new File([mixtureYaml(record, Number(epochs.value), Number(smoltalk.value))], "fine-tune.yaml");
      const mixture = await settled((await send(uploadForm({ purpose: "mixture", valFraction: "" }, [yaml]), () => {})).id);
      if (mixture.status !== "ready") throw new Error(`the mixture is invalid: ${mixture.problems.map((p) => p.reason).join("; ") || mixture.error}`);
      const source = chosen();
      const config = { source: source.stage, source_run: source.run, source_step: source.step, mixture: mixture.id,
        chatcore_every: chatcore.checked ? 0 : -1 };
      if (steps.value) config.num_iterations = Number(steps.value);
      const job = await json("/api/jobs", { method: "POST", body: { kind: "chat_sft", run: run.value, config } });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      status.textContent = "";
      showError(error);
    } finally {
      submit.disabled = false;
    }
  } },
  h("h2", {}, "Fine-tune a model on this file"),
  h("div", { class: "form-grid" },
    h("label", {}, "model", model, h("small", {}, sources.length ? "trained here or imported" : "no model yet: train or import one")),
    h("label", {}, "new run", run, h("small", {}, "the fine-tuned model's run (its tokenizer comes along)")),
    h("label", {}, "epochs of this file", epochs, h("small", {}, `its ${record.stats.train_rows} training conversations, repeated`)),
    h("label", {}, "SmolTalk rows mixed in", smoltalk, h("small", {}, "general chat kept alongside (needs the SmolTalk data)")),
    h("label", {}, "steps", steps, h("small", {}, "optimizer steps (default: one pass over the mixture)")),
    h("label", { class: "check" }, h("span", {}, chatcore, " ChatCORE at the end"), h("small", {}, "needs the chat eval tasks' data"))),
  h("div", { class: "toolbar", style: "margin:.8rem 0 0" }, submit, status));
  return form;
}

async function download(record, status) {
  const response = await request(`/api/files/${record.id}/content`);
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", { href: url, download: record.parts[0].name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  status.textContent = `saved ${record.parts[0].name}`;
}

export async function filePage(root, params, fileId) {
  const models = await json("/api/models").catch(() => []);
  const page = h("div", { class: "page" });
  root.append(page);

  async function render() {
    const record = await json(`/api/files/${fileId}`);
    const status = h("span", { class: "muted", id: "file-status" });
    page.replaceChildren(
      h("p", {}, h("a", { href: "#/data" }, "← Data")),
      h("div", { class: "card", id: "file-summary" },
        h("div", { class: "toolbar", style: "margin:0" },
          h("h1", { style: "margin:0;font-size:1.3rem" }, names(record)), statusBadge(record.status), h("span", { class: "spacer" }),
          h("button", { type: "button", class: "ghost", id: "download-file", onclick: () => download(record, status).catch(showError) }, "Download"),
          h("button", { type: "button", class: "danger", id: "delete-file", onclick: async () => {
            try {
              await json(`/api/files/${fileId}`, { method: "DELETE" });
              location.hash = "#/data";
            } catch (error) {
              showError(error);
            }
          } }, "Delete")),
        h("p", { class: "muted" }, `${record.id} · ${record.purpose} · ${megabytes(record.bytes)} · `,
          record.job_id ? h("a", { href: `#/jobs/${record.job_id}` }, "validation job") : "", " ", status),
        record.status === "validating" ? h("p", { id: "validating" }, "Validating: every line is checked before anything trains on it…") : null,
        record.error ? h("p", { class: "error", id: "file-error" }, record.error) : null),
      ...[problemsTable(record), statistics(record.stats), samples(record),
        record.status === "ready" && record.purpose === "conversations" ? fineTuneForm(record, models) : null].filter(Boolean));
    return record;
  }

  // Redrawn while it validates; after that it stays put (the fine-tune form keeps what was typed).
  if ((await render()).status !== "validating") return null;
  const timer = setInterval(async () => {
    try {
      if ((await render()).status !== "validating") clearInterval(timer);
    } catch (error) {
      showError(error);
    }
  }, POLL_MS);
  return () => clearInterval(timer);
}
