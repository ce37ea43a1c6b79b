// The models pages: every checkpoint with its numbers, and one model's report card.
import { json, request } from "./http.js";
import { markdown } from "./render.js";
import { age, h, showError } from "./ui.js";

const number = (value) => (typeof value === "number" ? (Number.isInteger(value) ? value : value.toFixed(4)) : String(value));
const millions = (params) => `${(params / 1e6).toFixed(params < 1e7 ? 2 : 0)} M`;

export async function modelsPage(root) {
  const models = await json("/api/models");
  root.append(h("div", { class: "page" },
    h("h1", { style: "font-size:1.4rem" }, "Models"),
    models.length
      ? h("div", { class: "table-scroll" }, h("table", {}, h("thead", {}, h("tr", {},
        ...["model", "stage", "step", "params", "numbers", "age", ""].map((t) => h("th", { class: ["stage", "numbers", "age"].includes(t) ? "optional" : null }, t)))),
        h("tbody", {}, ...models.map((m) => h("tr", { "data-model": m.id },
          h("td", {}, h("a", { href: `#/models/${m.id}` }, m.id)), h("td", { class: "optional" }, m.stage), h("td", {}, m.step),
          h("td", {}, millions(m.params)),
          h("td", { class: "muted optional" }, Object.entries(m.metrics).slice(0, 3).map(([k, v]) => `${k} ${number(v)}`).join(" · ")),
          h("td", { class: "optional" }, age(Date.now() / 1000 - m.created)),
          h("td", {}, h("a", { href: `#/chat?model=${m.id}` }, "chat")))))))
      : h("p", { class: "muted" }, "No models yet: a training job's checkpoints appear here.")));
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
