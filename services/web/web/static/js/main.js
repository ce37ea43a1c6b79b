// The single-page app: a hash router over the chat, jobs, job, models, model, data and file pages; the token
// dialog; light and dark.
import { chatPage } from "./chat.js";
import { dataPage, filePage } from "./data.js";
import { token } from "./http.js";
import { jobPage, jobsPage } from "./jobs.js";
import { modelPage, modelsPage } from "./models.js";
import { hideError, showError } from "./ui.js";

const ROUTES = [
  [/^\/chat$/, chatPage, "chat"],
  [/^\/jobs$/, jobsPage, "jobs"],
  [/^\/jobs\/([0-9a-f]+)$/, jobPage, "jobs"],
  [/^\/models$/, modelsPage, "models"],
  [/^\/models\/([A-Za-z0-9._-]+)$/, modelPage, "models"],
  [/^\/data$/, dataPage, "data"],
  [/^\/data\/(file-[0-9a-f]{24})$/, filePage, "data"],
];

let leave = null; // the current page's clean-up (closes its streams and timers)

async function route() {
  const [path, query] = (location.hash.slice(1) || "/chat").split("?");
  const params = new URLSearchParams(query || "");
  const [, page, nav, match] = ROUTES.map(([pattern, page, nav]) => [pattern, page, nav, path.match(pattern)]).find((r) => r[3]) || [];
  if (!page) {
    location.hash = "#/chat";
    return;
  }
  leave?.();
  leave = null;
  hideError();
  for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", link.dataset.nav === nav);
  const view = document.getElementById("view");
  view.replaceChildren();
  try {
    leave = (await page(view, params, ...match.slice(1).map(decodeURIComponent))) || null;
  } catch (error) {
    showError(error);
  }
}

function setupToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  const ask = () => {
    if (dialog.open) return;
    input.value = token.get();
    dialog.showModal();
  };
  document.getElementById("token-button").addEventListener("click", ask);
  window.addEventListener("nanochat:unauthorized", ask);
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "save") {
      token.set(input.value.trim());
      route();
    }
  });
}

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  document.getElementById("hl-light").media = theme === "light" ? "all" : "not all";
  document.getElementById("hl-dark").media = theme === "dark" ? "all" : "not all";
}

function setupTheme() {
  const saved = localStorage.getItem("nanochat.theme");
  const system = matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  applyTheme(saved || system);
  document.getElementById("theme-button").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem("nanochat.theme", next);
    applyTheme(next);
  });
}

setupTheme();
setupToken();
window.addEventListener("hashchange", route);
route();
