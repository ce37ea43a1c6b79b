// Small DOM helpers and the page-wide error banner.

export function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

let retryTimer = null;

// One banner for the whole page: an error, and for a 429 a countdown and a retry button.
export function showError(error, retry) {
  const banner = document.getElementById("banner");
  clearInterval(retryTimer);
  banner.replaceChildren(error.message || String(error));
  if (error.status === 429 && retry) {
    let seconds = error.retryAfter || 1;
    const button = h("button", { class: "ghost", onclick: () => { hideError(); retry(); } }, `Retry in ${seconds} s`);
    banner.append(button);
    retryTimer = setInterval(() => {
      seconds -= 1;
      if (seconds > 0) button.textContent = `Retry in ${seconds} s`;
      else { clearInterval(retryTimer); button.textContent = "Retry now"; }
    }, 1000);
  }
  banner.hidden = false;
}

export function hideError() {
  clearInterval(retryTimer);
  document.getElementById("banner").hidden = true;
}

export function age(seconds) {
  if (seconds == null) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
}

export const megabytes = (bytes) => (bytes < 1e6 ? `${(bytes / 1e3).toFixed(1)} kB` : `${(bytes / 1e6).toFixed(1)} MB`);

export const since = (isoTime) => (isoTime ? (Date.now() - Date.parse(isoTime)) / 1000 : null);
