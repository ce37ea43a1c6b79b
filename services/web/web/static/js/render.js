// A reply as the page shows it: markdown (code highlighted) with the calculator's calls and outputs
// set apart. Model output is never trusted: HTML inside it is shown as text, what marked makes still
// goes through DOMPurify (links with javascript: URLs, say), and tool text is only ever textContent.
import DOMPurify from "dompurify";
import hljs from "highlight";
import { marked } from "marked";
import { h } from "./ui.js";

// The tool's special tokens as the server spells them inside the text; the closing one may not have
// arrived yet while a reply streams.
const TOOL = /<\|python_start\|>([\s\S]*?)(?:<\|python_end\|>|$)|<\|output_start\|>([\s\S]*?)(?:<\|output_end\|>|$)/g;

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
marked.use({ renderer: { html: ({ text }) => escapeHtml(text) } });

export function segments(text) {
  const parts = [];
  let last = 0;
  for (const match of text.matchAll(TOOL)) {
    if (match.index > last) parts.push({ kind: "text", text: text.slice(last, match.index) });
    if (match[1] !== undefined) parts.push({ kind: "call", text: match[1] });
    else parts.push({ kind: "output", text: match[2] });
    last = match.index + match[0].length;
    if (match[0].length === 0) break;
  }
  if (last < text.length) parts.push({ kind: "text", text: text.slice(last) });
  return parts;
}

export function markdown(text) {
  const node = document.createElement("div");
  node.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }));
  for (const block of node.querySelectorAll("pre code")) hljs.highlightElement(block);
  for (const link of node.querySelectorAll("a")) link.setAttribute("rel", "noopener noreferrer");
  return node;
}

export function renderReply(target, text) {
  const nodes = segments(text).map((part) => {
    if (part.kind === "text") return markdown(part.text);
    const label = part.kind === "call" ? "python" : "output";
    return h("div", { class: `tool ${part.kind}` }, h("span", { class: "label" }, label), part.text);
  });
  target.replaceChildren(...nodes);
}
