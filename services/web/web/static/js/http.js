// Talking to the stack through this site's proxy: /api/* is the API, /v1/* the model server.
// The token lives in localStorage and goes out as a bearer header, never in a URL.

const TOKEN_KEY = "nanochat.token";

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY) || "",
  set: (value) => (value ? localStorage.setItem(TOKEN_KEY, value) : localStorage.removeItem(TOKEN_KEY)),
};

export class HttpError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (token.get()) h.Authorization = `Bearer ${token.get()}`;
  return h;
}

// The message of an error body, whatever its shape: OpenAI's {error: {message}}, FastAPI's {detail}.
export async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const detail = body.error?.message ?? body.detail;
    if (typeof detail === "string") message = detail;
    else if (Array.isArray(detail)) message = detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  } catch {
    /* not JSON: keep the status line */
  }
  if (response.status === 401) {
    message = "The API token is missing or wrong: set it with the Token button.";
    window.dispatchEvent(new Event("nanochat:unauthorized")); // the page asks for it
  }
  return new HttpError(response.status, message, Number(response.headers.get("Retry-After")) || null);
}

export async function request(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function json(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

// Server-sent events over fetch (EventSource cannot send a bearer header): calls onEvent({event, data, id})
// for each event until the stream ends or `signal` aborts it.
export async function events(path, { method = "GET", body, signal, onEvent }) {
  const response = await request(path, { method, body, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", data: [], id: null };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(value);
        else if (field === "event") event.event = value;
        else if (field === "id") event.id = value;
      }
      if (event.data.length) onEvent({ ...event, data: event.data.join("\n") });
    }
  }
}
