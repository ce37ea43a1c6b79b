// The models pages: every checkpoint with its numbers, the Import form and every export (those of deleted
// checkpoints too), and one model's report card with Export for Hugging Face, Download and Delete export.
import { json, request } from "./http.js";
import { markdown } from "./render.js";
import { age, h, megabytes, showError } from "./ui.js";

const number = (value) => (typeof value === "number" ? (Number.isInteger(value) ? value : value.toFixed(4)) : String(value));
const millions = (params) => `${(params / 1e6).toFixed(params < 1e7 ? 2 : 0)} M`;

const STAGES = ["sft", "base", "mid", "rl"]; // the import's default first

// POST /models/import: a folder in the data volume or a hub repo becomes a run's checkpoint; the job's
// page shows its progress and errors.
function importForm() {
  const input = (name, attributes) => h("input", { name, "data-field": name, ...attributes });
  const form = h("form", { id: "import-form", class: "card", hidden: true, onsubmit: async (e) => {
    e.preventDefault();
    const body = Object.fromEntries([...form.querySelectorAll("[data-field]")]
      .filter((field) => field.value !== "").map((field) => [field.dataset.field, field.value]));
    try {
      const record = await json("/api/models/import", { method: "POST", body });
      location.hash = `#/jobs/${record.id}`;
    } catch (error) {
      showError(error);
    }
  } },
  h("div", { class: "form-grid" },
    h("label", {}, "source", input("source", { id: "import-source", required: true, placeholder: "runs/demo/exports/demo-sft-000420 or owner/name" }),
      h("small", {}, "a folder in the data volume (relative to the base dir: an export, a transformers NanoChat folder, a nanochat base dir) or a Hugging Face hub repo id")),
    h("label", {}, "run", input("run", { id: "import-run", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}" }),
      h("small", {}, "a new run, or one with the same tokenizer")),
    h("label", {}, "stage", h("select", { id: "import-stage", "data-field": "stage" }, ...STAGES.map((s) => h("option", { value: s }, s))),
      h("small", {}, "the stage it becomes")),
    h("label", {}, "revision", input("revision", { id: "import-revision", placeholder: "main" }),
      h("small", {}, "hub only: a branch, tag or commit (optional)"))),
  h("div", { class: "toolbar", style: "margin:.8rem 0 0" }, h("button", { type: "submit", id: "submit-import" }, "Import")));
  return form;
}

// Every export with Download and Delete: an export outlives its checkpoint, and this is where one whose
// checkpoint is gone can still be found.
function exportsTable(exports) {
  if (!exports.length) return null;
  const card = h("div", { class: "card", id: "exports" }, h("h2", {}, "Exports"),
    h("div", { class: "table-scroll" }, h("table", {}, h("thead", {}, h("tr", {},
      ...["export", "size", "age", ""].map((t) => h("th", { class: t === "age" ? "optional" : null }, t)))),
    h("tbody", {}, ...exports.map((e) => {
      const status = h("span", { class: "muted" });
      const row = h("tr", { "data-export": e.id },
        h("td", {}, e.checkpoint ? h("a", { href: `#/models/${e.id}` }, e.id) : e.id,
          e.checkpoint ? null : h("small", { class: "muted" }, " · checkpoint deleted")),
        h("td", {}, megabytes(e.bytes)), h("td", { class: "optional" }, age(Date.now() / 1000 - e.created)),
        h("td", {}, h("div", { class: "toolbar", style: "margin:0" },
          h("button", { type: "button", class: "ghost", "data-action": "download", onclick: (event) => saveExport(e.id, status, event.currentTarget) }, "Download"),
          h("button", { type: "button", class: "ghost", "data-action": "delete", onclick: async (event) => {
            const button = event.currentTarget;
            button.disabled = true;
            if (!(await deleteExport(e.id, status, e.checkpoint))) button.disabled = false;
            else if (row.parentElement.children.length > 1) row.remove();
            else card.remove(); // the last one: no empty table left behind
          } }, "Delete"),
          status)));
      return row;
    })))));
  return card;
}

export async function modelsPage(root) {
  // The exports are secondary: the models are shown even when they cannot be listed.
  const [models, exports] = await Promise.all([json("/api/models"), json("/api/models/exports").catch((error) => (showError(error), []))]);
  const form = importForm();
  root.append(h("div", { class: "page" },
    h("div", { class: "toolbar" },
      h("h1", { style: "margin:0;font-size:1.4rem" }, "Models"), h("span", { class: "spacer" }),
      h("button", { id: "import-button", onclick: () => { form.hidden = !form.hidden; } }, "Import")),
    form,
    models.length
      ? h("div", { class: "table-scroll" }, h("table", {}, h("thead", {}, h("tr", {},
        ...["model", "stage", "step", "params", "numbers", "age", ""].map((t) => h("th", { class: ["stage", "numbers", "age"].includes(t) ? "optional" : null }, t)))),
        h("tbody", {}, ...models.map((m) => h("tr", { "data-model": m.id },
          h("td", {}, h("a", { href: `#/models/${m.id}` }, m.id)), h("td", { class: "optional" }, m.stage), h("td", {}, m.step),
          h("td", {}, millions(m.params)),
          h("td", { class: "muted optional" }, Object.entries(m.metrics).slice(0, 3).map(([k, v]) => `${k} ${number(v)}`).join(" · ")),
          h("td", { class: "optional" }, age(Date.now() / 1000 - m.created)),
          h("td", {}, h("a", { href: `#/chat?model=${m.id}` }, "chat")))))))
      : h("p", { class: "muted" }, "No models yet: a training job's checkpoints, and imported models, appear here."),
    exportsTable(exports)));
}

// A link cannot send the bearer header (and the token never goes in a URL), so the tarball is fetched
// with it and saved from a blob URL (Chromium keeps a large blob on disk). For a model of many GB, curl
// with -C - resumes a cut download (README: "Using the API").
async function download(modelId, status) {
  const response = await request(`/api/models/${modelId}/download`);
  const reader = response.body.getReader();
  const parts = [];
  let received = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parts.push(value);
    received += value.length;
    status.textContent = `downloading… ${(received / 1e6).toFixed(1)} MB`;
  }
  const url = URL.createObjectURL(new Blob(parts, { type: "application/x-tar" }));
  const link = h("a", { href: url, download: `${modelId}.tar`, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  status.textContent = `saved ${modelId}.tar (${(received / 1e6).toFixed(1)} MB)`;
}

// Download's button: disabled while the tarball comes, and the error in the banner.
async function saveExport(modelId, status, button) {
  button.disabled = true;
  try {
    await download(modelId, status);
  } catch (error) {
    status.textContent = "";
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// Delete export, once confirmed: true when the export is gone (a 404 means deleted elsewhere meanwhile).
async function deleteExport(modelId, status, checkpoint) {
  const after = checkpoint ? "The checkpoint stays." : "Its checkpoint is deleted already: nothing of this model will be left.";
  if (!confirm(`Delete the export of ${modelId} (its folder and tarball)? ${after}`)) return false;
  try {
    await request(`/api/models/${modelId}/export`, { method: "DELETE" }).catch((error) => {
      if (error.status !== 404) throw error;
    });
    status.textContent = "export deleted";
    return true;
  } catch (error) {
    showError(error);
    return false;
  }
}

// Export starts the export job and links to its page; Download appears once a tarball exists.
function exportControls(model) {
  const status = h("span", { class: "muted", id: "export-status" });
  const exportButton = h("button", { type: "button", class: "ghost", id: "export-model", onclick: async () => {
    exportButton.disabled = true;
    try {
      const record = await json(`/api/models/${model.id}/export`, { method: "POST" });
      status.replaceChildren("exporting: ", h("a", { href: `#/jobs/${record.id}`, id: "export-job" }, `job ${record.id.slice(0, 8)}`));
    } catch (error) {
      showError(error);
    } finally {
      exportButton.disabled = false;
    }
  } }, model.exported ? "Export again" : "Export for Hugging Face");
  const downloadButton = model.exported ? h("button", { type: "button", class: "ghost", id: "download-model",
    onclick: () => saveExport(model.id, status, downloadButton) }, "Download") : null;
  const deleteButton = model.exported ? h("button", { type: "button", class: "ghost", id: "delete-export", onclick: async () => {
    deleteButton.disabled = true;
    if (await deleteExport(model.id, status, true)) {
      downloadButton.remove();
      deleteButton.remove();
      exportButton.textContent = "Export for Hugging Face";
    } else {
      deleteButton.disabled = false;
    }
  } }, "Delete export") : null;
  return [exportButton, downloadButton, deleteButton, status];
}

// Charts are fetched with the token (an <img src> cannot send it) and shown from blob URLs.
async function chartImage(modelId, name) {
  const response = await request(`/api/models/${modelId}/report/charts/${encodeURIComponent(name)}`);
  const url = URL.createObjectURL(await response.blob());
  return h("figure", {}, h("img", { src: url, alt: name }), h("figcaption", { class: "muted" }, name));
}

export async function modelPage(root, params, modelId) {
  const model = await json(`/api/models/${modelId}`);
  const report = h("div", { class: "report", id: "report" }, h("p", { class: "muted" }, "loading the report card…"));
  root.append(h("div", { class: "page" },
    h("p", {}, h("a", { href: "#/models" }, "← Models")),
    h("div", { class: "card" },
      h("div", { class: "toolbar", style: "margin:0" },
        h("h1", { style: "margin:0;font-size:1.3rem" }, model.id), h("span", { class: "spacer" }),
        h("a", { href: `#/chat?model=${model.id}` }, h("button", { type: "button", id: "chat-with-model" }, "Chat with this model"))),
      h("p", { class: "muted" }, `${model.stage} · step ${model.step} · ${millions(model.params)} parameters`),
      h("div", { class: "toolbar", id: "export" }, ...exportControls(model)),
      h("table", { id: "model-numbers" }, h("tbody", {}, ...Object.entries(model.metrics).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, number(v))))))),
    report));
  try {
    const card = await json(`/api/models/${modelId}/report`);
    const charts = await Promise.all(card.charts.map((name) => chartImage(modelId, name)));
    report.replaceChildren(markdown(card.markdown), h("div", { class: "charts" }, ...charts));
  } catch (error) {
    if (error.status === 404) report.replaceChildren(h("p", { class: "muted" }, "This model's run has no report card yet."));
    else showError(error);
  }
}
