// The chat page: conversations kept in this browser, replies streamed from /v1/chat/completions.
import { events, HttpError, json } from "./http.js";
import { renderReply } from "./render.js";
import { h, hideError, showError } from "./ui.js";

const STORE = "nanochat.conversations";
const SETTINGS = "nanochat.chat-settings";
const DEFAULTS = { model: "", system: "", temperature: 0.6, top_k: 50, max_tokens: 512 };

const load = (key, fallback) => {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
};

const state = {
  conversations: load(STORE, []),
  settings: { ...DEFAULTS, ...load(SETTINGS, {}) },
  currentId: null,
  search: "",
  controller: null, // the streaming reply's AbortController, while one streams
};

function save() {
  localStorage.setItem(STORE, JSON.stringify(state.conversations));
  localStorage.setItem(SETTINGS, JSON.stringify(state.settings));
}

const current = () => state.conversations.find((c) => c.id === state.currentId);

function newConversation() {
  state.conversations = state.conversations.filter((c) => c.messages.length); // no pile of empty chats
  const conversation = { id: crypto.randomUUID(), title: "New chat", created: Date.now(), messages: [] };
  state.conversations.unshift(conversation);
  state.currentId = conversation.id;
  save();
  return conversation;
}

export async function chatPage(root, params) {
  if (params.get("model")) state.settings.model = params.get("model");
  state.currentId = current()?.id ?? state.conversations[0]?.id ?? newConversation().id;
  root.replaceChildren(layout());
  renderList();
  renderMessages();
  await loadModels();
  return stop; // leaving the page ends a reply still streaming
}

function layout() {
  const s = state.settings;
  const number = (name, attributes) =>
    h("input", {
      type: "number", name, value: s[name], ...attributes,
      onchange: (e) => { s[name] = Number(e.target.value); save(); },
    });
  return h("div", { class: "chat", id: "chat" },
    h("aside", { class: "sidebar" },
      h("button", { id: "new-chat", onclick: () => { newConversation(); renderList(); renderMessages(); focusComposer(); } }, "+ New chat"),
      h("input", { id: "chat-search", type: "search", placeholder: "Search chats", "aria-label": "Search chats",
        oninput: (e) => { state.search = e.target.value.toLowerCase(); renderList(); } }),
      h("ul", { id: "conversation-list" })),
    h("section", { class: "conversation" },
      h("div", { class: "settings-row" },
        h("button", { class: "ghost show-narrow", "aria-label": "Chats", onclick: () => document.getElementById("chat").classList.toggle("show-list") }, "☰"),
        h("label", {}, "Model", h("select", { id: "model-select", "aria-label": "Model",
          onchange: (e) => { s.model = e.target.value; save(); } })),
        h("details", { class: "sampling", open: window.innerWidth > 760 },
          h("summary", { class: "muted" }, "Settings"),
          h("div", { class: "sampling-fields" },
            h("label", {}, "Temperature", number("temperature", { min: 0, max: 2, step: 0.1 })),
            h("label", {}, "Top-k", number("top_k", { min: 1, max: 200, step: 1 })),
            h("label", {}, "Max tokens", number("max_tokens", { min: 1, max: 8192, step: 1 })),
            h("textarea", { id: "system-prompt", placeholder: "System prompt (optional instructions for the model)",
              "aria-label": "System prompt", rows: 1, oninput: (e) => { s.system = e.target.value; save(); } }, s.system)))),
      h("div", { class: "messages", id: "messages", "aria-live": "polite" }),
      h("form", { class: "composer", onsubmit: (e) => { e.preventDefault(); submit(); } },
        h("textarea", { id: "composer", rows: 1, placeholder: "Message (Enter sends, Shift+Enter for a new line)",
          "aria-label": "Message", onkeydown: composerKey }),
        h("button", { id: "send", type: "submit" }, "Send"),
        h("button", { id: "stop", type: "button", class: "danger", hidden: true, onclick: stop }, "Stop"))));
}

function focusComposer() {
  document.getElementById("composer")?.focus();
}

function composerKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
}

async function loadModels() {
  const select = document.getElementById("model-select");
  try {
    const { data } = await json("/v1/models");
    const ids = data.map((m) => m.id);
    select.replaceChildren(...ids.map((id) => h("option", { value: id }, id)));
    if (!ids.length) {
      showError(new Error("No model to chat with yet: train one on the Jobs page (the tiny demo pipeline takes minutes)."));
      return;
    }
    if (!ids.includes(state.settings.model)) state.settings.model = ids.includes("default") ? "default" : ids[0];
    select.value = state.settings.model;
    save();
  } catch (error) {
    showError(error.status === 502 ? new Error("The model server is unreachable.") : error);
  }
}

function renderList() {
  const list = document.getElementById("conversation-list");
  const shown = state.conversations.filter(
    (c) => !state.search || c.title.toLowerCase().includes(state.search) ||
      c.messages.some((m) => m.content.toLowerCase().includes(state.search)));
  list.replaceChildren(...shown.map((c) =>
    h("li", { class: c.id === state.currentId ? "current" : "" },
      h("a", { href: "#/chat", title: c.title, onclick: (e) => { e.preventDefault(); open(c.id); } }, c.title),
      h("button", { class: "ghost", title: "Rename", "aria-label": `Rename ${c.title}`, onclick: () => rename(c) }, "✎"),
      h("button", { class: "ghost", title: "Delete", "aria-label": `Delete ${c.title}`, onclick: () => remove(c) }, "✕"))));
}

function open(id) {
  if (state.controller) stop();
  state.currentId = id;
  document.getElementById("chat").classList.remove("show-list");
  renderList();
  renderMessages();
}

function rename(conversation) {
  const title = prompt("Name this chat", conversation.title);
  if (title && title.trim()) {
    conversation.title = title.trim().slice(0, 80);
    save();
    renderList();
  }
}

function remove(conversation) {
  if (!confirm(`Delete "${conversation.title}"?`)) return;
  state.conversations = state.conversations.filter((c) => c !== conversation);
  if (state.currentId === conversation.id) state.currentId = state.conversations[0]?.id ?? newConversation().id;
  save();
  renderList();
  renderMessages();
}

function renderMessages() {
  const box = document.getElementById("messages");
  const conversation = current();
  box.replaceChildren(...conversation.messages.map((message, index) => messageNode(message, index)));
  if (!conversation.messages.length) box.append(h("p", { class: "muted", style: "text-align:center" }, "Ask anything."));
  box.scrollTop = box.scrollHeight;
}

function messageNode(message, index) {
  const conversation = current();
  const last = index === conversation.messages.length - 1;
  const bubble = h("div", { class: "bubble" });
  const node = h("div", { class: `message ${message.role}`, "data-index": index }, bubble);
  if (message.role === "user") {
    bubble.textContent = message.content;
    node.append(h("div", { class: "meta" },
      h("button", { class: "ghost edit", onclick: () => edit(node, index), disabled: !!state.controller }, "Edit")));
    return node;
  }
  renderReply(bubble, message.content);
  node.append(meta(message, last));
  return node;
}

function meta(message, last) {
  const m = message.meta || {};
  const facts = [];
  if (m.completion_tokens != null) facts.push(`${m.completion_tokens} tokens`);
  if (m.prompt_tokens != null) facts.push(`${m.prompt_tokens} in prompt`);
  if (m.tokens_per_second) facts.push(`${m.tokens_per_second.toFixed(1)} tok/s`);
  if (m.model) facts.push(m.model);
  if (m.stopped) facts.push("stopped");
  else if (m.finish_reason === "length") facts.push("cut at max tokens");
  return h("div", { class: "meta" },
    h("span", { class: "facts" }, facts.join(" · ")),
    h("button", { class: "ghost copy", onclick: (e) => copy(message.content, e.target) }, "Copy"),
    last && !state.controller ? h("button", { class: "ghost regenerate", onclick: regenerate }, "Regenerate") : null);
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

function edit(node, index) {
  const message = current().messages[index];
  const area = h("textarea", { "aria-label": "Edit message" }, message.content);
  const box = h("form", { class: "edit-box", onsubmit: (e) => {
    e.preventDefault();
    const content = area.value.trim();
    if (!content) return;
    const conversation = current();
    conversation.messages = conversation.messages.slice(0, index);
    conversation.messages.push({ role: "user", content });
    save();
    renderMessages();
    generate();
  } },
  area,
  h("div", { class: "meta" },
    h("button", { type: "submit" }, "Save & submit"),
    h("button", { type: "button", class: "ghost", onclick: renderMessages }, "Cancel")));
  node.replaceChildren(box);
  area.focus();
}

function submit() {
  const composer = document.getElementById("composer");
  const content = composer.value.trim();
  if (!content || state.controller) return;
  const conversation = current();
  if (!conversation.messages.length) conversation.title = content.slice(0, 40);
  conversation.messages.push({ role: "user", content });
  composer.value = "";
  save();
  renderList();
  renderMessages();
  generate();
}

function regenerate() {
  const conversation = current();
  if (conversation.messages.at(-1)?.role === "assistant") conversation.messages.pop();
  save();
  renderMessages();
  generate();
}

function stop() {
  state.controller?.abort();
}

function streaming(on) {
  document.getElementById("send").hidden = on;
  document.getElementById("stop").hidden = !on;
}

async function generate() {
  const conversation = current();
  const s = state.settings;
  const history = conversation.messages.map(({ role, content }) => ({ role, content }));
  const messages = s.system.trim() ? [{ role: "system", content: s.system.trim() }, ...history] : history;
  const reply = { role: "assistant", content: "", meta: { model: s.model } };
  conversation.messages.push(reply);
  renderMessages();
  const node = document.getElementById("messages").lastElementChild;
  const bubble = node.querySelector(".bubble");
  const box = document.getElementById("messages");
  state.controller = new AbortController();
  streaming(true);
  hideError();
  let first = null;
  let frame = null;
  const paint = () => {
    frame = null;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    renderReply(bubble, reply.content);
    if (atBottom) box.scrollTop = box.scrollHeight;
  };
  try {
    await events("/v1/chat/completions", {
      method: "POST",
      signal: state.controller.signal,
      body: {
        model: s.model, messages, temperature: s.temperature, top_k: s.top_k, max_tokens: s.max_tokens,
        stream: true, stream_options: { include_usage: true },
      },
      onEvent: ({ data }) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new HttpError(500, chunk.error.message);
        if (chunk.usage) {
          Object.assign(reply.meta, { prompt_tokens: chunk.usage.prompt_tokens, completion_tokens: chunk.usage.completion_tokens });
        }
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) {
          first ??= performance.now();
          reply.content += choice.delta.content;
          reply.meta.last = performance.now();
          frame ??= requestAnimationFrame(paint);
        }
        if (choice?.finish_reason) reply.meta.finish_reason = choice.finish_reason;
      },
    });
  } catch (error) {
    if (error.name === "AbortError") reply.meta.stopped = true;
    else {
      if (!reply.content) conversation.messages.pop(); // nothing came: the user can retry
      showError(error, () => (conversation.messages.at(-1)?.role === "user" ? generate() : null));
    }
  } finally {
    if (first && reply.meta.completion_tokens > 1 && reply.meta.last > first) {
      reply.meta.tokens_per_second = (reply.meta.completion_tokens - 1) / ((reply.meta.last - first) / 1000);
    }
    delete reply.meta.last;
    state.controller = null;
    streaming(false);
    save();
    if (document.getElementById("messages")) renderMessages();
  }
}
